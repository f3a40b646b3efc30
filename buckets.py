"""Where time buckets lie in a local calendar, and how gaps between them are filled."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo

DAY_S = 86400
# The instants datetime can hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
FIRST_S = -62_135_596_800
LAST_S = 253_402_300_799
# Multi-day, multi-week and multi-month buckets count from these local dates, so that
# in UTC `<N>d` buckets are the Unix-epoch-aligned ones the service always had.
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_EPOCH_MONDAY = date(1970, 1, 5).toordinal()
_EPOCH_MONTH = 1970 * 12
_FIRST_DAY = date.min.toordinal()
_LAST_DAY = date.max.toordinal()
# The Gregorian calendar repeats every 400 years, which are this many days.
_CYCLE_DAYS = 146_097

FILLS = ("none", "zero", "previous", "linear", "nan")

# A bucket: start in Unix seconds, aggregated value, number of points aggregated.
Bucket = tuple[int, float, int]


@dataclass(frozen=True)
class Window:
    """A bucket width: `count` seconds (unit "s"), calendar weeks ("w") or months ("mo")."""

    count: int
    unit: str

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"


class Buckets:
    """The buckets of one window in the calendar of one time zone, in Unix seconds.

    Three layouts, chosen from the window and the zone:

    - "epoch": a fixed window in UTC. Buckets of the window's length aligned to the Unix
      epoch, as the service has always laid them.
    - "days": whole days, weeks or months of the local calendar. A bucket runs from the
      first instant of a local day (local midnight, or the end of the DST gap when
      midnight does not exist) to the first instant of the day the next bucket starts
      on, so a local day can last 23, 24 or 25 hours. `<N>d` counts from 1970-01-01,
      `<N>w` from Monday 1970-01-05 and `<N>mo` from January 1970, all local.
    - "strides": a window shorter than a day that divides 24 hours, outside UTC. Buckets
      of that absolute length laid from the first instant of each local day; the last
      bucket of a day ends at the next day's first instant, so it is shorter on days
      whose length the window does not divide (23.5 h and 24.5 h days in
      Australia/Lord_Howe).

    Raises ValueError for a fixed window that is neither whole days nor divides a day,
    outside UTC: such buckets would straddle local midnights.
    """

    def __init__(self, window: Window, zone: tzinfo) -> None:
        self.window = window
        self.zone = zone
        if window.unit == "s" and zone is UTC:
            self.layout = "epoch"
        elif window.unit == "s" and window.count % DAY_S == 0:
            self.layout = "days"
        elif window.unit == "s" and DAY_S % window.count == 0:
            self.layout = "strides"
        elif window.unit == "s":
            raise ValueError(
                "it neither divides a day nor is whole days, so its buckets would straddle "
                "local midnights; outside UTC use one that is, such as 15m, 1h, 1d or 7d"
            )
        elif window.unit in ("w", "mo"):
            self.layout = "days"
        else:
            raise ValueError(f"unknown window unit {window.unit!r}")

    @property
    def stride_s(self) -> int | None:
        """The fixed bucket length of the "epoch" and "strides" layouts; None for "days"."""
        return self.window.count if self.layout in ("epoch", "strides") else None

    def start_of(self, t: int) -> int:
        """Start of the bucket holding the instant `t`."""
        if self.layout == "epoch":
            return t - t % self.window.count
        first, _ = self._span_of(t)
        if self.layout == "days":
            return first
        return first + (t - first) // self.window.count * self.window.count

    def starts(self, lo: int, hi: int) -> Iterator[int]:
        """Starts of the buckets overlapping [lo, hi), ascending; lazily, one at a time.

        The first is found arithmetically, however far `lo` lies from any other instant.
        """
        if lo >= hi:
            return
        if self.layout == "epoch":
            yield from range(self.start_of(lo), hi, self.window.count)
            return
        first = self.start_of(lo)
        day = self._span_day(lo)
        span_start, span_end = self._first_instant(day), self._span_end(day)
        while span_start < hi:
            if self.layout == "days":
                yield span_start
            else:
                yield from range(max(first, span_start), min(span_end, hi), self.window.count)
            day = self._next_span_day(day)
            span_start, span_end = span_end, self._span_end(day)

    def edges(self, lo: int, hi: int) -> Iterator[int]:
        """Ascending instants whose consecutive pairs cover [lo, hi) without gaps; lazily.

        "days": the starts of the buckets overlapping [lo, hi), then the end of the last.
        "strides": the same for local days, which the window then cuts into buckets.
        "epoch": none; the buckets need no edges.
        The last edge is at most LAST_S, which datetime can hold: it covers every range
        that ends at or before LAST_S.
        """
        if self.layout == "epoch" or lo >= hi:
            return
        day = self._span_day(lo)
        yield self._first_instant(day)
        span_end = self._span_end(day)
        while span_end < hi:
            yield span_end
            day = self._next_span_day(day)
            span_end = self._span_end(day)
        yield min(span_end, LAST_S)

    # --- local calendar ---------------------------------------------------------------
    # A "span" is a bucket of the "days" layout, or one local day for "strides". Local
    # dates are proleptic Gregorian ordinals (date.toordinal()), which, unlike dates, go
    # on before year 1 and after year 9999: an instant of year 1 or 9999 can fall on such
    # a local date, and the span after the last one of year 9999 has to start somewhere.

    def _span_of(self, t: int) -> tuple[int, int]:
        """[start, end) of the span holding the instant `t`."""
        day = self._span_day(t)
        return self._first_instant(day), self._span_end(day)

    def _span_end(self, day: int) -> int:
        return self._first_instant(self._next_span_day(day))

    def _span_day(self, t: int) -> int:
        """Local date on which the span holding the instant `t` starts."""
        day = self._period_start(self._local_day(t))
        # Where a clock went back across midnight, the local date of an instant can be
        # the day before the one whose span holds it; spans are defined by instants.
        while self._span_end(day) <= t:
            day = self._next_span_day(day)
        while self._first_instant(day) > t:
            day = self._period_start(day - 1)
        return day

    def _period_start(self, day: int) -> int:
        """First local date of the span holding the local date `day`."""
        if self.layout == "strides":
            return day
        if self.window.unit == "mo":
            year, month, _ = _ymd(day)
            index = (year * 12 + month - 1 - _EPOCH_MONTH) // self.window.count
            first = _EPOCH_MONTH + index * self.window.count
            return _ordinal(first // 12, first % 12 + 1)
        anchor, length = self._anchor_and_days()
        return anchor + (day - anchor) // length * length

    def _next_span_day(self, day: int) -> int:
        """First local date of the span after the one starting on `day`."""
        if self.layout == "strides":
            return day + 1
        if self.window.unit == "mo":
            year, month, _ = _ymd(day)
            index = year * 12 + month - 1 + self.window.count
            return _ordinal(index // 12, index % 12 + 1)
        return day + self._anchor_and_days()[1]

    def _anchor_and_days(self) -> tuple[int, int]:
        if self.window.unit == "w":
            return _EPOCH_MONDAY, 7 * self.window.count
        return _EPOCH_DAY, self.window.count // DAY_S

    def _first_instant(self, day: int) -> int:
        """The first instant (Unix seconds) whose local date is `day` or later.

        That is local midnight, the earlier one when midnight occurs twice; where the
        clock jumps over midnight (America/Havana, Asia/Beirut in spring) it is the
        instant of the jump, the first moment the new day shows on the clock. Cut to
        [FIRST_S, LAST_S + 1]: the calendar's first span starts at FIRST_S, and its
        last ends at LAST_S + 1.
        """
        if day < _FIRST_DAY:
            return FIRST_S
        if day > _LAST_DAY:
            return LAST_S + 1
        midnight = datetime.fromordinal(day)
        local_s = (day - _EPOCH_DAY) * DAY_S
        # utcoffset of the naive local time: no datetime outside years 1 to 9999 is made.
        before = self.zone.utcoffset(midnight)
        after = self.zone.utcoffset(midnight.replace(fold=1))
        if before == after:
            # Midnight occurs exactly once, as on almost every day: it is the first instant.
            return max(FIRST_S, min(local_s - int(before.total_seconds()), LAST_S + 1))
        readings = sorted(local_s - int(offset.total_seconds()) for offset in (before, after))
        if self._local_day(readings[0]) >= day:
            return max(FIRST_S, min(readings[0], LAST_S + 1))
        # Midnight falls in a gap: the two readings, made with the offsets before and after
        # the jump, bracket it. Find the first second of the new day between them.
        lo, hi = readings
        while self._local_day(hi) < day:
            hi += 3600
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._local_day(mid) >= day:
                hi = mid
            else:
                lo = mid
        return max(FIRST_S, min(hi, LAST_S + 1))

    def _local_day(self, t: int) -> int:
        """The local date of the instant `t`, which may lie before year 1 or after 9999."""
        near = min(max(t, FIRST_S + DAY_S), LAST_S - DAY_S)
        if near == t:
            return datetime.fromtimestamp(t, self.zone).toordinal()
        # Beyond a day from the calendar's ends the local date itself may not exist as a
        # date; the zone's offset does not change there (no zone moves its clocks on the
        # first or last days of the year), so it is taken from a day inward.
        offset = datetime.fromtimestamp(near, self.zone).utcoffset()
        return _EPOCH_DAY + (t + int(offset.total_seconds())) // DAY_S


def _ymd(day: int) -> tuple[int, int, int]:
    """Year, month and day of a proleptic Gregorian ordinal, also outside years 1 to 9999."""
    cycles = 0
    if day < _FIRST_DAY:
        cycles = (day - _FIRST_DAY) // _CYCLE_DAYS
    elif day > _LAST_DAY:
        cycles = (day - _LAST_DAY - 1) // _CYCLE_DAYS + 1
    inside = date.fromordinal(day - cycles * _CYCLE_DAYS)
    return inside.year + cycles * 400, inside.month, inside.day


def _ordinal(year: int, month: int) -> int:
    """The ordinal of the first day of a month, also outside years 1 to 9999."""
    cycles = (year - 1) // 400
    inside = date(year - cycles * 400, month, 1)
    return inside.toordinal() + cycles * _CYCLE_DAYS


# Where the aggregates of a range can be read from: the points themselves, or the rollups
# kept beside them (migrations/0003_rollups.sql) of UTC hours, UTC days and the local days
# of the zones listed in storage.rollup_timezones.
POINTS, HOURS, DAYS, LOCAL_DAYS = "points", "hours", "days", "local days"
# The rollups of whole units from the Unix epoch, coarsest first.
_EPOCH_UNITS = ((DAYS, DAY_S), (HOURS, 3600))
# A range [lo, hi) and what to read it from.
Source = tuple[str, int, int]


def sources(
    buckets: Buckets,
    lo: int,
    hi: int,
    edges: Sequence[int],
    *,
    local_days: bool = False,
) -> list[Source]:
    """[lo, hi) cut into ranges, each read from the coarsest rollup that answers it exactly.

    A range gets the coarsest rollup whose whole units make it up without a bucket edge
    cutting one: local days (when `local_days`, in the buckets' zone, whose days and
    longer buckets are made of them), then UTC days, then UTC hours. What is left is read
    from the points: the part hours at either end of [lo, hi), the part hours of every
    bucket whose edges are not whole hours (zones such as Asia/Kolkata), and whole
    buckets shorter than an hour or not aligned to one. `edges` are Buckets.edges over
    [lo, hi) (the "epoch" layout has none). Adjacent ranges of one kind are merged, so two
    years of daily buckets are a few ranges.
    """
    if lo >= hi:
        return []
    window = buckets.window
    if buckets.layout == "epoch":
        # Buckets are whole windows from the epoch: no edge cuts a unit that divides one.
        units = [unit for unit in _EPOCH_UNITS if window.count % unit[1] == 0]
        return _merged(_cut(lo, hi, units))
    if buckets.layout == "strides":
        # Edges at each local day's first instant and whole windows after it.
        units = [
            (kind, span)
            for kind, span in _EPOCH_UNITS
            if window.count % span == 0 and all(edge % span == 0 for edge in edges)
        ]
        return _merged(_cut(lo, hi, units))
    if local_days:
        # Every bucket edge is a local day's first instant: the whole local days in [lo, hi)
        # are one range, and what is left at either end lies within one bucket.
        days = Buckets(Window(DAY_S, "s"), buckets.zone)
        day_start, day_end = days.edges(lo, lo + 1)
        first = lo if day_start == lo else day_end
        day_start, day_end = days.edges(hi - 1, hi)
        last = hi if day_end == hi else day_start
        if first < last:
            return _merged(
                [
                    *_cut(lo, first, _EPOCH_UNITS),
                    (LOCAL_DAYS, first, last),
                    *_cut(last, hi, _EPOCH_UNITS),
                ]
            )
    # Each bucket is cut on its own.
    inner = [lo, *(edge for edge in edges if lo < edge < hi), hi]
    pieces = []
    for start, end in itertools.pairwise(inner):
        pieces += _cut(start, end, _EPOCH_UNITS)
    return _merged(pieces)


def _cut(lo: int, hi: int, units: Sequence[tuple[str, int]]) -> list[Source]:
    """[lo, hi) as whole units of the first kind, its ends cut by the next kinds."""
    if lo >= hi:
        return []
    if not units:
        return [(POINTS, lo, hi)]
    kind, span = units[0]
    a, b = -(-lo // span) * span, hi // span * span
    if a >= b:
        return _cut(lo, hi, units[1:])
    return [*_cut(lo, a, units[1:]), (kind, a, b), *_cut(b, hi, units[1:])]


def _merged(pieces: list[Source]) -> list[Source]:
    merged: list[Source] = []
    for kind, lo, hi in pieces:
        if merged and merged[-1][0] == kind and merged[-1][2] == lo:
            merged[-1] = (kind, merged[-1][1], hi)
        else:
            merged.append((kind, lo, hi))
    return merged


def fill_gaps(
    rows: Iterable[Bucket],
    starts: Iterable[int],
    fill: str,
    *,
    before: tuple[int, float] | None = None,
    after: tuple[int, float] | None = None,
) -> Iterator[Bucket]:
    """Merge non-empty buckets into the sequence of all bucket starts, filling the empty ones.

    `rows` are the non-empty buckets and `starts` every bucket start to answer, both
    ascending. An empty bucket gets, by `fill`:

    - "none": nothing; it is left out.
    - "zero", "nan": the value 0.0 or NaN.
    - "previous": the value of the last non-empty bucket before it, or of the point
      `before` (time, value) for the leading ones; left out when there is neither.
    - "linear": the value on the straight line, over time, between the last known value
      before it and the next one after it, known values being the non-empty buckets (at
      their start) and the points `before` and `after` outside the range; left out when
      one side has none. A bucket that starts before the point `before` (it straddles the
      range's start) gets that point's value rather than an extrapolation.

    Filled buckets have a count of 0. Lazy: holds one row at a time.
    """
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}")
    pending = iter(rows)
    if fill == "none":
        yield from pending
        return
    row = next(pending, None)
    known = before
    for start in starts:
        while row is not None and row[0] <= start:
            yield row
            known = (row[0], row[1])
            found, row = row[0] == start, next(pending, None)
            if found:
                break
        else:
            if fill == "zero":
                yield (start, 0.0, 0)
            elif fill == "nan":
                yield (start, math.nan, 0)
            elif fill == "previous":
                if known is not None:
                    yield (start, known[1], 0)
            else:
                following = (row[0], row[1]) if row is not None else after
                if known is not None and following is not None:
                    yield (start, _interpolate(known, following, start), 0)
    # Rows past the last start (there should be none) are answered, never dropped.
    while row is not None:
        yield row
        row = next(pending, None)


def fillable(
    fill: str,
    lo: int,
    hi: int,
    *,
    first_s: int | None,
    last_s: int | None,
    before: tuple[int, float] | None,
    after: tuple[int, float] | None,
) -> tuple[int, int]:
    """The part of [lo, hi) whose buckets fill_gaps can answer, for the starts to give it.

    `first_s` and `last_s` are the first and last stored point in [lo, hi), `before`
    and `after` the nearest ones outside. "previous" and "linear" give nothing to the
    empty buckets before the first known value, nor "linear" to those after the last:
    the part drops them, so millennia of them cost no more than none. Every other
    bucket in the part is answered.
    """
    if fill in ("previous", "linear") and before is None:
        lo = hi if first_s is None else max(lo, first_s)
    if fill == "linear" and after is None:
        hi = lo if last_s is None else min(hi, last_s + 1)
    return lo, hi


def _interpolate(a: tuple[int, float], b: tuple[int, float], t: int) -> float:
    (t0, v0), (t1, v1) = a, b
    if t1 <= t0:
        return v0
    share = min(1.0, max(0.0, (t - t0) / (t1 - t0)))
    return v0 + (v1 - v0) * share
