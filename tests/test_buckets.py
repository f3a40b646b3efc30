"""Bucket layouts at the limits of the calendar, and the part of a range a fill can answer."""

from __future__ import annotations

from datetime import UTC, date
from zoneinfo import ZoneInfo

import pytest

from buckets import FIRST_S, LAST_S, Buckets, Window, fill_gaps, fillable

DAY = 86400
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Pacific/Kiritimati", "Pacific/Pago_Pago")
WINDOWS = (
    Window(60, "s"),
    Window(3600, "s"),
    Window(DAY, "s"),
    Window(7 * DAY, "s"),
    Window(366 * DAY, "s"),
    Window(1, "w"),
    Window(1, "mo"),
    Window(5, "mo"),
    Window(12, "mo"),
)


def layouts() -> list[Buckets]:
    zones = [UTC if name == "UTC" else ZoneInfo(name) for name in ZONES]
    found = [Buckets(window, zone) for zone in zones for window in WINDOWS]
    return [b for b in found if b.layout != "epoch"]


@pytest.mark.parametrize("buckets", layouts(), ids=lambda b: f"{b.window}-{b.zone}")
@pytest.mark.parametrize(("lo", "hi"), [(FIRST_S, FIRST_S + 3 * DAY), (LAST_S - 3 * DAY, LAST_S)])
def test_buckets_at_the_ends_of_the_calendar_cover_every_instant_once(buckets, lo, hi):
    edges = list(buckets.edges(lo, hi))
    starts = list(buckets.starts(lo, hi))
    assert edges == sorted(set(edges)) and edges[0] <= lo and edges[-1] >= hi
    assert edges[0] >= FIRST_S and edges[-1] <= LAST_S
    assert starts == sorted(set(starts)) and starts[0] <= lo
    for t in range(lo, hi, 3 * 3600 + 7):
        start = buckets.start_of(t)
        assert start <= t and start in starts


def test_the_last_span_of_year_9999_takes_in_what_lies_past_it():
    # In Berlin the last hour of 9999 UTC is already 10000-01-01 locally: it belongs to the
    # calendar's last bucket rather than to one that cannot be named.
    berlin = Buckets(Window(DAY, "s"), ZoneInfo("Europe/Berlin"))
    assert berlin.start_of(LAST_S) == berlin.start_of(LAST_S - 3600) == LAST_S + 1 - 25 * 3600
    months = Buckets(Window(1, "mo"), UTC)
    assert list(months.edges(LAST_S - 1, LAST_S)) == [LAST_S + 1 - 31 * DAY, LAST_S]


def test_month_buckets_count_from_1970_across_the_whole_calendar():
    quarters = Buckets(Window(3, "mo"), UTC)
    first_of = {date(1, 1, 1): FIRST_S, date(9999, 10, 1): LAST_S + 1 - 92 * DAY}
    assert quarters.start_of(FIRST_S + 40 * DAY) == first_of[date(1, 1, 1)]
    assert quarters.start_of(LAST_S) == first_of[date(9999, 10, 1)]


FILLABLE = {
    # fill, (first_s, last_s), before, after -> the part of [100, 1000)
    "none answers every row": ("none", (300, 600), None, None, (100, 1000)),
    "zero fills everything": ("zero", (None, None), None, None, (100, 1000)),
    "previous waits for the first point": ("previous", (300, 600), None, None, (300, 1000)),
    "previous carries a point before": ("previous", (300, 600), (50, 1.0), None, (100, 1000)),
    "previous with nothing known": ("previous", (None, None), None, (2000, 1.0), (1000, 1000)),
    "linear between the points": ("linear", (300, 600), None, None, (300, 601)),
    "linear between the neighbours": ("linear", (None, None), (50, 1.0), (2000, 2.0), (100, 1000)),
    "linear without a later point": ("linear", (None, None), (50, 1.0), None, (100, 100)),
}


@pytest.mark.parametrize("case", FILLABLE)
def test_fillable_drops_the_empty_buckets_a_fill_cannot_answer(case):
    fill, (first_s, last_s), before, after, expected = FILLABLE[case]
    part = fillable(fill, 100, 1000, first_s=first_s, last_s=last_s, before=before, after=after)
    assert part == expected


@pytest.mark.parametrize("fill", ["none", "zero", "previous", "linear", "nan"])
def test_a_fill_over_the_fillable_part_answers_as_over_the_whole_range(fill):
    rows = [(300, 3.0, 2), (400, 4.0, 1), (700, 7.0, 1)]
    for before, after in [(None, None), ((50, 1.0), None), (None, (1500, 9.0))]:
        whole = list(fill_gaps(rows, range(0, 1000, 100), fill, before=before, after=after))
        lo, hi = fillable(fill, 0, 1000, first_s=300, last_s=750, before=before, after=after)
        part = list(
            fill_gaps(rows, range(lo // 100 * 100, hi, 100), fill, before=before, after=after)
        )
        assert part == whole
