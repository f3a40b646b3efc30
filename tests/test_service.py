"""Queries end to end: local calendar buckets across DST, fills, COUNT/FIRST/LAST, streaming.

Expected answers come from references written here in plain Python with zoneinfo, apart
from the code under test.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import psycopg
import pytest
from conftest import (
    ASSET,
    OTHER_ASSET,
    RunningService,
    fresh_database,
    insert_quarter_hours,
    request,
    run_grpcurl,
    series,
    status_of,
    wait_for,
)
from conftest import reference as original_reference
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from google.protobuf.timestamp_pb2 import Timestamp

import edgecom
import service as service_module
from change_listener import ChangeListener
from config import AuthConfig, Config, RateLimitConfig, UpstreamConfig
from interceptors import QueryCache
from metrics import Metrics
from repository import Repository
from service import PAGE_POINTS, parse_bucket_window

TimeSeriesRequest = edgecom.protos.TimeSeriesRequest
QUARTER = 900
HOUR = 3600
DAY = 86400
AGGREGATIONS = ("MIN", "MAX", "AVG", "SUM", "COUNT", "FIRST", "LAST")
YEAR_START = 1_704_067_200  # 2024-01-01T00:00:00Z
YEAR_END = 1_735_689_600  # 2025-01-01T00:00:00Z


# --- references -----------------------------------------------------------------------------


def utc_seconds(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


@functools.cache
def first_instant(day: date, zone) -> int:
    """The first instant of a local day: midnight, or the end of a DST jump over midnight."""
    t = int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp())
    local = datetime.fromtimestamp(t, zone)
    if local.date() == day and (local.hour, local.minute) == (0, 0):
        return t
    # Midnight does not exist: walk a minute at a time to the first one of the day.
    t -= 4 * HOUR
    while datetime.fromtimestamp(t, zone).date() < day:
        t += 60
    return t


def bucket_of(t: int, zone, window: str) -> int:
    """Start of the bucket holding instant t, by the rules in the README."""
    day = datetime.fromtimestamp(t, zone).date()
    if window.endswith("mo"):
        n = int(window[:-2])
        months = (day.year - 1970) * 12 + day.month - 1
        first = months // n * n
        return first_instant(date(1970 + first // 12, first % 12 + 1, 1), zone)
    if window.endswith("w"):
        n = int(window[:-1])
        weeks = (day - date(1970, 1, 5)).days // 7
        return first_instant(date(1970, 1, 5) + timedelta(weeks=weeks // n * n), zone)
    seconds = int(window[:-1]) * {"m": 60, "h": HOUR, "d": DAY}[window[-1]]
    if zone is UTC:
        return t // seconds * seconds  # the original buckets, aligned to the epoch
    if seconds % DAY == 0:
        n = seconds // DAY
        days = (day - date(1970, 1, 1)).days
        return first_instant(date(1970, 1, 1) + timedelta(days=days // n * n), zone)
    day_start = first_instant(day, zone)
    return day_start + (t - day_start) // seconds * seconds


def combine(aggregation: str, points: list[tuple[int, float]]) -> float:
    values = [v for _, v in points]
    return {
        "MIN": lambda: min(values),
        "MAX": lambda: max(values),
        "SUM": lambda: math.fsum(values),
        "AVG": lambda: math.fsum(values) / len(values),
        "COUNT": lambda: float(len(values)),
        "FIRST": lambda: min(points)[1],
        "LAST": lambda: max(points)[1],
    }[aggregation]()


def reference(points, start_s, end_s, window, aggregation, zone=UTC):
    """(bucket start, value, count) of each non-empty bucket, ascending."""
    buckets = grouped(tuple(points), start_s, end_s, window, zone)
    return [(b, combine(aggregation, pts), len(pts)) for b, pts in buckets]


@functools.lru_cache(maxsize=32)
def grouped(points: tuple, start_s: int, end_s: int, window: str, zone) -> tuple:
    """The points in [start_s, end_s) by bucket, ascending: computed once for every
    aggregation and test that asks about the same series and layout."""
    buckets: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for t, v in points:
        if start_s <= t < end_s:
            buckets[bucket_of(t, zone, window)].append((t, v))
    return tuple(sorted(buckets.items()))


def reference_filled(points, start_s, end_s, window, aggregation, fill, zone=UTC, now=None):
    """The reference answer with empty buckets between start and end filled."""
    known = reference(points, start_s, end_s, window, aggregation, zone)
    if fill == "none":
        return known
    before = max(((t, v) for t, v in points if t < start_s), default=None)
    after = min(((t, v) for t, v in points if t >= end_s), default=None)
    fill_end = end_s
    if now is not None and end_s > now and after is None:
        stored = [t for t, _ in points if t < end_s]
        fill_end = min(end_s, max(stored) + 1) if stored else start_s
    # Every bucket holds a quarter-hour instant of the test zones, so scanning them finds all.
    starts = sorted(
        {bucket_of(t, zone, window) for t in range(start_s // QUARTER * QUARTER, fill_end, 60)}
        | ({bucket_of(start_s, zone, window)} if start_s < fill_end else set())
    )
    starts = [b for b in starts if b < fill_end]
    by_start = {b: (v, c) for b, v, c in known}
    answer = []
    for b in starts:
        if b in by_start:
            answer.append((b, *by_start[b]))
            continue
        earlier = [(k, v) for k, v, _ in known if k < b] or ([before] if before else [])
        later = [(k, v) for k, v, _ in known if k > b] or ([after] if after else [])
        if fill == "zero":
            answer.append((b, 0.0, 0))
        elif fill == "nan":
            answer.append((b, math.nan, 0))
        elif fill == "previous" and earlier:
            answer.append((b, earlier[-1][1], 0))
        elif fill == "linear" and earlier and later:
            (t0, v0), (t1, v1) = earlier[-1], later[0]
            share = min(1.0, max(0.0, (b - t0) / (t1 - t0)))
            answer.append((b, v0 + (v1 - v0) * share, 0))
    return answer


def assert_same(actual, expected):
    assert [t for t, _, _ in actual] == [t for t, _, _ in expected]
    for (t, got, count), (_, want, want_count) in zip(actual, expected, strict=True):
        assert count == want_count, (t, count, want_count)
        if math.isnan(want):
            assert math.isnan(got), (t, got)
        else:
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9), (t, got, want)


# --- helpers --------------------------------------------------------------------------------


def triples(data) -> list[tuple[int, float, int]]:
    return [(p.time.seconds, p.value, p.count) for p in data]


def query(service, *args, **fields):
    return triples(service.stub.QueryTimeSeries(request(*args, **fields)).data)


def stream(service, *args, **fields):
    pages = list(service.stub.StreamTimeSeries(request(*args, **fields)))
    return [point for page in pages for point in triples(page.data)], [
        len(page.data) for page in pages
    ]


def year_of_quarter_hours() -> list[tuple[int, float]]:
    """Every quarter-hour of 2024 (UTC), with varied values, so every bucket is full."""
    return [
        (t, round(math.sin(t / 7919) * 300 + (t // QUARTER) % 17 - 5, 3))
        for t in range(YEAR_START - 2 * DAY, YEAR_END + 2 * DAY, QUARTER)
    ]


@pytest.fixture(scope="module")
def module_dsn(server_dsn: str) -> Iterator[str]:
    """A database shared by the read-only tests of this module, dropped afterwards."""
    with fresh_database(server_dsn) as database:
        yield database


@pytest.fixture(scope="module")
def year() -> tuple[tuple[int, float], ...]:
    return tuple(year_of_quarter_hours())


@pytest.fixture(scope="module")
def year_service(module_dsn: str, year) -> Iterator[RunningService]:
    """A service whose first asset holds every quarter-hour of 2024; only read from."""
    with Repository(dsn=module_dsn, max_connections=4) as repo:
        repo.migrate()
        repo.upsert_points(ASSET, year)
        running = RunningService(repo, assets=(ASSET, OTHER_ASSET), max_points=100000)
        yield running
        running.close()


# --- local calendar buckets across DST --------------------------------------------------------

DST_ZONES = ("Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe")


@pytest.mark.parametrize("window", ["1h", "1d", "1w", "1mo"])
@pytest.mark.parametrize("zone", DST_ZONES)
def test_local_buckets_match_the_reference(year_service, year, zone, window):
    tz = ZoneInfo(zone)
    for aggregation in AGGREGATIONS:
        answer = query(year_service, YEAR_START, YEAR_END, window, aggregation, timezone=zone)
        assert_same(answer, reference(year, YEAR_START, YEAR_END, window, aggregation, tz))


@pytest.mark.parametrize(
    ("zone", "day", "quarter_hours"),
    [
        ("Europe/Berlin", "2024-03-31", 92),
        ("Europe/Berlin", "2024-10-27", 100),
        ("Europe/Berlin", "2024-06-12", 96),
        ("America/New_York", "2024-03-10", 92),
        ("America/New_York", "2024-11-03", 100),
        ("America/New_York", "2024-06-12", 96),
        ("Asia/Kolkata", "2024-03-31", 96),
        ("Australia/Lord_Howe", "2024-10-06", 94),  # 23.5 hours
        ("Australia/Lord_Howe", "2024-04-07", 98),  # 24.5 hours
        ("America/Havana", "2024-03-10", 92),  # midnight does not exist: starts at 01:00
        ("Asia/Beirut", "2024-03-31", 92),  # the same
        ("Asia/Beirut", "2024-10-26", 100),  # 23:00-24:00 happens twice, on this day
    ],
)
def test_a_local_day_runs_from_its_first_instant_to_the_next(
    year_service, zone, day, quarter_hours
):
    tz = ZoneInfo(zone)
    local_day = date.fromisoformat(day)
    start_s = first_instant(local_day, tz)
    end_s = first_instant(local_day + timedelta(days=1), tz)
    assert (end_s - start_s) // QUARTER == quarter_hours
    answer = query(year_service, start_s, end_s, "1d", "COUNT", timezone=zone)
    assert answer == [(start_s, float(quarter_hours), quarter_hours)]
    # The same day inside a longer range: same bucket, same count.
    week = query(year_service, start_s - 3 * DAY, end_s + 3 * DAY, "1d", "SUM", timezone=zone)
    assert (start_s, quarter_hours) in [(t, count) for t, _, count in week]


def test_day_bucket_starts_are_local_midnights_in_utc(year_service):
    answer = query(
        year_service,
        utc_seconds("2024-03-30T00:00:00"),
        utc_seconds("2024-04-02T00:00:00"),
        "1d",
        "COUNT",
        timezone="Europe/Berlin",
    )
    starts = [Timestamp(seconds=t).ToJsonString() for t, _, _ in answer]
    assert starts == [
        "2024-03-29T23:00:00Z",  # partial: the range starts at 01:00 local
        "2024-03-30T23:00:00Z",
        "2024-03-31T22:00:00Z",
        "2024-04-01T22:00:00Z",
    ]
    assert [count for _, _, count in answer] == [92, 92, 96, 8]


def test_fall_back_gives_two_buckets_for_the_repeated_hour(year_service):
    zone = ZoneInfo("Europe/Berlin")
    start_s = first_instant(date(2024, 10, 27), zone)
    answer = query(year_service, start_s, start_s + 25 * HOUR, "1h", "COUNT", timezone=zone.key)
    assert len(answer) == 25 and all(count == 4 for _, _, count in answer)
    local = [datetime.fromtimestamp(t, zone) for t, _, _ in answer]
    repeated = [
        (t, moment) for (t, _, _), moment in zip(answer, local, strict=True) if moment.hour == 2
    ]
    assert [moment.utcoffset() for _, moment in repeated] == [
        timedelta(hours=2),
        timedelta(hours=1),
    ]
    assert repeated[1][0] - repeated[0][0] == HOUR


def test_spring_forward_has_no_bucket_for_the_missing_hour(year_service):
    zone = ZoneInfo("America/New_York")
    start_s = first_instant(date(2024, 3, 10), zone)
    answer = query(year_service, start_s, start_s + 23 * HOUR, "1h", "AVG", timezone=zone.key)
    hours = [datetime.fromtimestamp(t, zone).hour for t, _, _ in answer]
    assert hours == [0, 1, *range(3, 24)]


def test_half_hour_zones_get_buckets_on_local_hours(year_service):
    kolkata = ZoneInfo("Asia/Kolkata")
    start_s = first_instant(date(2024, 5, 1), kolkata)
    answer = query(year_service, start_s, start_s + DAY, "1h", "SUM", timezone=kolkata.key)
    assert [datetime.fromtimestamp(t, kolkata).hour for t, _, _ in answer] == list(range(24))
    assert Timestamp(seconds=answer[0][0]).ToJsonString() == "2024-04-30T18:30:00Z"


def test_lord_howe_sub_day_buckets_are_laid_from_local_midnight(year_service):
    # 02:00 becomes 02:30 on 2024-10-06: hourly buckets keep their absolute length from
    # midnight, so they sit on the half hour after the jump, and the day's last one
    # (23:30-24:00) holds half an hour.
    zone = ZoneInfo("Australia/Lord_Howe")
    start_s = first_instant(date(2024, 10, 6), zone)
    end_s = first_instant(date(2024, 10, 7), zone)
    answer = query(year_service, start_s, end_s, "1h", "COUNT", timezone=zone.key)
    local = [datetime.fromtimestamp(t, zone).strftime("%H:%M") for t, _, _ in answer]
    assert local[:4] == ["00:00", "01:00", "02:30", "03:30"] and local[-1] == "23:30"
    assert [count for _, _, count in answer] == [4] * 23 + [2]


@pytest.mark.parametrize("window", ["15m", "2h", "7d", "2w", "3mo", "12mo"])
def test_multiples_are_anchored_in_1970_local(year_service, year, window):
    zone = ZoneInfo("America/New_York")
    for aggregation in ("SUM", "LAST"):
        answer = query(year_service, YEAR_START, YEAR_END, window, aggregation, timezone=zone.key)
        assert_same(answer, reference(year, YEAR_START, YEAR_END, window, aggregation, zone))


@pytest.mark.parametrize("window", ["1w", "1mo"])
def test_weeks_and_months_in_utc(year_service, year, window):
    answer = query(year_service, YEAR_START, YEAR_END, window, "AVG")
    assert_same(answer, reference(year, YEAR_START, YEAR_END, window, "AVG"))
    if window == "1w":
        assert datetime.fromtimestamp(answer[1][0], UTC).strftime("%a %H:%M") == "Mon 00:00"


def test_utc_and_its_aliases_are_the_original_buckets(year_service, year):
    for zone in ("", "UTC", "Etc/UTC"):
        for window in ("1h", "1d", "7d", "7h"):
            answer = query(year_service, YEAR_START, YEAR_END, window, "SUM", timezone=zone)
            assert_same(answer, reference(year, YEAR_START, YEAR_END, window, "SUM"))


# --- aggregations -----------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["1m", "5m", "15m", "1h", "1d"])
@pytest.mark.parametrize("aggregation", ["COUNT", "FIRST", "LAST"])
def test_count_first_last_match_the_reference(service, window, aggregation):
    points = [*series(YEAR_START - DAY, 3 * 288, step_s=300), (YEAR_START + 30, 5.5)]
    points += [(YEAR_START + 59, -3.5), (YEAR_START + 3599, 0.5), (YEAR_START + 3660, -0.25)]
    service.repository.upsert_points(ASSET, points)
    start_s, end_s = YEAR_START - DAY + 61, YEAR_START + DAY + 7
    for zone in ("", "Europe/Berlin"):
        answer = query(service, start_s, end_s, window, aggregation.lower(), timezone=zone)
        expected = reference(points, start_s, end_s, window, aggregation, ZoneInfo(zone or "UTC"))
        assert_same(answer, expected)


def test_count_is_set_for_every_aggregation(service):
    service.repository.upsert_points(ASSET, series(YEAR_START, 10))
    for aggregation in AGGREGATIONS:
        answer = query(service, YEAR_START, YEAR_START + DAY, "1h", aggregation)
        assert [count for _, _, count in answer] == [4, 4, 2]


# --- fills ------------------------------------------------------------------------------------


def gappy_points() -> list[tuple[int, float]]:
    """Quarter-hours over five days around YEAR_START, with gaps over the start, in the
    middle and at the end of the range [YEAR_START, YEAR_START + 2.5 days) used below."""
    gaps = [
        (YEAR_START - 2 * HOUR, YEAR_START + 5 * HOUR),
        (YEAR_START + DAY + 3 * HOUR, YEAR_START + DAY + 10 * HOUR),
        (YEAR_START + 2 * DAY, YEAR_START + 3 * DAY),
    ]
    return [
        (t, v)
        for t, v in series(YEAR_START - 2 * DAY, 5 * 96)
        if not any(lo <= t < hi for lo, hi in gaps)
    ]


FILL_RANGE = (YEAR_START, YEAR_START + 2 * DAY + 12 * HOUR)


@pytest.mark.parametrize("fill", ["none", "zero", "previous", "linear", "nan"])
@pytest.mark.parametrize(
    ("window", "zone"), [("15m", ""), ("1h", ""), ("1h", "Europe/Berlin"), ("1d", "Asia/Kolkata")]
)
def test_fills_match_the_reference(service, fill, window, zone):
    points = gappy_points()
    service.repository.upsert_points(ASSET, points)
    tz = ZoneInfo(zone or "UTC")
    for aggregation in ("AVG", "SUM"):
        answer = query(service, *FILL_RANGE, window, aggregation, timezone=zone, fill=fill)
        expected = reference_filled(points, *FILL_RANGE, window, aggregation, fill, tz)
        assert_same(answer, expected)


def test_fill_previous_seeds_leading_gap_from_the_last_point_before_start(service):
    service.repository.upsert_points(
        ASSET, [(YEAR_START - 5 * HOUR, 7.0), (YEAR_START + 2 * HOUR, 9.0)]
    )
    answer = query(service, YEAR_START, YEAR_START + 4 * HOUR, "1h", "AVG", fill="previous")
    assert answer == [
        (YEAR_START, 7.0, 0),
        (YEAR_START + HOUR, 7.0, 0),
        (YEAR_START + 2 * HOUR, 9.0, 1),
        (YEAR_START + 3 * HOUR, 9.0, 0),
    ]


def test_fill_linear_uses_the_nearest_points_outside_the_range(service):
    service.repository.upsert_points(
        ASSET,
        [(YEAR_START - 2 * HOUR, 0.0), (YEAR_START + HOUR, 30.0), (YEAR_START + 6 * HOUR, 80.0)],
    )
    answer = query(service, YEAR_START, YEAR_START + 4 * HOUR, "1h", "AVG", fill="linear")
    assert answer == [
        (YEAR_START, 20.0, 0),
        (YEAR_START + HOUR, 30.0, 1),
        (YEAR_START + 2 * HOUR, 40.0, 0),
        (YEAR_START + 3 * HOUR, 50.0, 0),
    ]


def test_fill_without_neighbours_leaves_out_what_it_cannot_fill(service):
    service.repository.upsert_points(ASSET, [(YEAR_START + HOUR, 5.0)])
    args = (YEAR_START, YEAR_START + 3 * HOUR, "1h", "AVG")
    assert query(service, *args, fill="previous") == [
        (YEAR_START + HOUR, 5.0, 1),
        (YEAR_START + 2 * HOUR, 5.0, 0),
    ]
    assert query(service, *args, fill="linear") == [(YEAR_START + HOUR, 5.0, 1)]


@pytest.mark.parametrize("fill", ["none", "zero", "previous", "linear", "nan"])
def test_fill_over_a_range_without_points(service, fill):
    points = [(YEAR_START - HOUR, 10.0), (YEAR_START + DAY + HOUR, 34.0)]
    service.repository.upsert_points(ASSET, points)
    answer = query(service, YEAR_START, YEAR_START + DAY, "1h", "SUM", fill=fill)
    expected = reference_filled(points, YEAR_START, YEAR_START + DAY, "1h", "SUM", fill)
    assert len(expected) == (0 if fill == "none" else 24)
    assert_same(answer, expected)
    # An asset with nothing stored at all: only zero and nan have something to say.
    empty = query(
        service, YEAR_START, YEAR_START + DAY, "1h", "SUM", fill=fill, asset_id=OTHER_ASSET
    )
    assert len(empty) == (24 if fill in ("zero", "nan") else 0)


@pytest.mark.parametrize("fill", ["zero", "previous", "linear", "nan"])
def test_fill_never_goes_past_the_last_point_when_end_is_ahead(service, fill):
    now = int(time.time())
    last_s = now // HOUR * HOUR - 2 * HOUR + 15 * 60
    points = [(t, float(t % 1000)) for t in range(last_s - DAY, last_s + 1, QUARTER)]
    points = [(t, v) for t, v in points if not last_s - 10 * HOUR <= t < last_s - 6 * HOUR]
    service.repository.upsert_points(ASSET, points)
    for zone in ("", "Europe/Berlin"):
        start_s, end_s = last_s - 12 * HOUR, now + 2 * DAY
        answer = query(service, start_s, end_s, "1h", "AVG", fill=fill, timezone=zone)
        expected = reference_filled(
            points, start_s, end_s, "1h", "AVG", fill, ZoneInfo(zone or "UTC"), now=now
        )
        assert_same(answer, expected)
        assert answer[-1][0] == last_s - 15 * 60 and answer[-1][2] == 2
    # Everything before start: nothing to carry into a range that lies ahead.
    assert query(service, now + DAY, now + 2 * DAY, "1h", "AVG", fill=fill) == []


@pytest.mark.parametrize("zone", ["", "Europe/Berlin"])
def test_fill_answers_the_bucket_holding_start_and_the_last_point_when_end_is_ahead(service, zone):
    now = int(time.time())
    last_s = now // 300 * 300 - HOUR  # 16:30, say
    service.repository.upsert_points(ASSET, [(last_s - 300, 1.0), (last_s, 2.0)])
    start_s, end_s = last_s + 295, now + 365 * DAY  # 16:34:55, next year
    for fill, value in (("previous", 2.0), ("zero", 0.0)):
        args = (start_s, end_s, "5m", "LAST")
        expected = [(last_s, value, 0)]
        assert query(service, *args, fill=fill, timezone=zone) == expected
        assert stream(service, *args, fill=fill, timezone=zone)[0] == expected
    # The bucket holding start holds no stored point: nothing to answer.
    assert query(service, last_s + 300, end_s, "5m", "LAST", fill="previous") == []


def test_filled_buckets_count_towards_max_points(repository):
    running = RunningService(repository, assets=(ASSET,), max_points=10)
    try:
        repository.upsert_points(ASSET, [(YEAR_START, 1.0), (YEAR_START + 5 * HOUR, 2.0)])
        req = request(YEAR_START, YEAR_START + DAY, "1h", "SUM")
        assert len(running.stub.QueryTimeSeries(req).data) == 2
        req.fill = "zero"
        code, details = status_of(lambda: running.stub.QueryTimeSeries(req))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "widen the window or shorten the range" in details and "StreamTimeSeries" in details
        req.end.seconds = YEAR_START + 10 * HOUR
        assert len(running.stub.QueryTimeSeries(req).data) == 10
    finally:
        running.close()


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "hint"),
    [
        ({"timezone": "Mars/Olympus_Mons"}, "Europe/Berlin"),
        ({"timezone": "europe/berlin"}, "IANA"),
        ({"timezone": "../../etc/passwd"}, "IANA"),
        ({"timezone": "Europe"}, "IANA"),
        ({"timezone": "+01:00"}, "IANA"),
        ({"fill": "interpolate"}, "none, zero, previous, linear, nan"),
        ({"window": "53w"}, "52w"),
        ({"window": "13mo"}, "12mo"),
        ({"window": "0mo"}, "1mo"),
        ({"window": "1y"}, "1mo"),
        ({"window": "7h", "timezone": "Europe/Berlin"}, "15m, 1h, 1d or 7d"),
        ({"window": "36h", "timezone": "Asia/Kolkata"}, "straddle"),
        ({"aggregation": "MEDIAN"}, "COUNT, FIRST, LAST"),
    ],
)
def test_bad_requests_are_invalid_argument_and_list_what_is_accepted(service, fields, hint):
    req = request(YEAR_START, YEAR_START + DAY, **{"window": "1h", **fields})
    for call in (service.stub.QueryTimeSeries, lambda r: list(service.stub.StreamTimeSeries(r))):
        code, details = status_of(lambda call=call: call(req))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert hint in details


def test_fill_and_windows_are_case_insensitive(service):
    service.repository.upsert_points(ASSET, [(YEAR_START, 1.0)])
    lower = query(service, YEAR_START, YEAR_START + 3 * HOUR, "1h", "sum", fill="zero")
    upper = query(service, YEAR_START, YEAR_START + 3 * HOUR, "1H", "SUM", fill="ZERO")
    assert (
        lower
        == upper
        == [(YEAR_START, 1.0, 1), (YEAR_START + HOUR, 0.0, 0), (YEAR_START + 2 * HOUR, 0.0, 0)]
    )
    assert query(service, YEAR_START, YEAR_START + DAY, "1MO", "sum") == [(YEAR_START, 1.0, 1)]


# --- old clients ------------------------------------------------------------------------------

# The query the service ran before these additions, word for word.
ORIGINAL_QUERY = """
SELECT extract(epoch FROM date_bin(%(window)s, time, TIMESTAMPTZ 'epoch'))::bigint AS bucket,
       {aggregate}(value) AS value
FROM points
WHERE asset_id = %(asset_id)s AND time >= %(start)s AND time < %(end)s
GROUP BY bucket
ORDER BY bucket
LIMIT %(limit)s
"""


def original_messages():
    """TimeSeriesRequest/Response as a client built from the previous .proto knows them."""
    pool = descriptor_pool.DescriptorPool()
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    pool.Add(timestamp)
    file = descriptor_pb2.FileDescriptorProto(
        name="edgecom_previous.proto",
        package="edgecom",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    F = descriptor_pb2.FieldDescriptorProto

    def message(name, *fields):
        proto = file.message_type.add(name=name)
        for number, (field_name, kind, type_name, label) in enumerate(fields, start=1):
            field = proto.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name

    stamp = (F.TYPE_MESSAGE, ".google.protobuf.Timestamp", F.LABEL_OPTIONAL)
    text = (F.TYPE_STRING, "", F.LABEL_OPTIONAL)
    message(
        "TimeSeriesRequest",
        ("start", *stamp),
        ("end", *stamp),
        ("window", *text),
        ("aggregation", *text),
        ("asset_id", *text),
    )
    message("TimeSeriesDataPoint", ("time", *stamp), ("value", F.TYPE_DOUBLE, "", F.LABEL_OPTIONAL))
    message(
        "TimeSeriesResponse",
        ("data", F.TYPE_MESSAGE, ".edgecom.TimeSeriesDataPoint", F.LABEL_REPEATED),
    )
    pool.Add(file)
    return tuple(
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"edgecom.{name}"))
        for name in ("TimeSeriesRequest", "TimeSeriesDataPoint", "TimeSeriesResponse")
    )


@pytest.mark.parametrize("window", ["1m", "15m", "1h", "7h", "1d", "36h", "7d"])
def test_old_clients_get_exactly_the_previous_answers(service, dsn, window):
    Request, Point, Response = original_messages()
    points = [*series(YEAR_START - 3 * DAY, 9 * 96, seed=2), (YEAR_START + 59, -3.25)]
    service.repository.upsert_points(ASSET, points)
    call = service.channel.unary_unary(
        "/edgecom.TimeSeriesService/QueryTimeSeries",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    window_s = parse_bucket_window(window).count
    start_s, end_s = YEAR_START - 2 * DAY + 1234, YEAR_START + 3 * DAY
    for aggregation in ("MIN", "MAX", "AVG", "SUM"):
        old_request = Request(window=window, aggregation=aggregation.lower())
        old_request.start.seconds, old_request.end.seconds = start_s, end_s
        answer = call(old_request)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                ORIGINAL_QUERY.format(aggregate=aggregation),
                {
                    "window": timedelta(seconds=window_s),
                    "asset_id": ASSET,
                    "start": datetime.fromtimestamp(start_s, UTC),
                    "end": datetime.fromtimestamp(end_s, UTC),
                    "limit": 100001,
                },
            ).fetchall()
        previous = Response(data=[Point(time={"seconds": t}, value=v) for t, v in rows])
        assert [p.time.seconds for p in answer.data] == [t for t, _ in rows]
        # Rollups sum in another order than the points one by one: the last bits may differ.
        assert [p.value for p in answer.data] == pytest.approx([v for _, v in rows], rel=1e-12)
        # The only addition is the new count field, which the old client keeps as unknown.
        answer.DiscardUnknownFields()
        for point, (_, value) in zip(answer.data, rows, strict=True):
            point.value = value
        assert answer.SerializeToString(deterministic=True) == previous.SerializeToString(
            deterministic=True
        )
        expected = original_reference(points, start_s, end_s, window_s, aggregation)
        assert [t for t, _ in rows] == [t for t, _ in expected]


# --- caching ----------------------------------------------------------------------------------


def test_cache_tells_timezones_and_fills_apart(repository, dsn):
    config = Config(
        upstream=UpstreamConfig(assets=(ASSET,)),
        rate_limit=RateLimitConfig(rps=0),
    )
    metrics = Metrics()
    cache = QueryCache(100, metrics=metrics)
    interceptors = edgecom.interceptors_for(config, metrics=metrics, cache=cache)
    running = RunningService(
        repository, assets=(ASSET,), max_points=1000, interceptors=interceptors
    )
    # Wired as in edgecom.run(): a write anywhere drops the entries whose span holds it.
    listener = ChangeListener(
        dsn=dsn,
        on_change=lambda asset_id, first_s, last_s: cache.invalidate(asset_id, first_s, last_s + 1),
        on_reconnect=cache.clear,
    ).start()
    try:
        assert listener.wait_listening(10)
        repository.upsert_points(ASSET, series(YEAR_START, 96))
        day = (YEAR_START, YEAR_START + DAY, "1d", "SUM")
        utc = query(running, *day)
        assert query(running, *day, timezone="UTC") == utc
        assert len(cache) == 1  # "" and "UTC" are one key
        berlin = query(running, *day, timezone="Europe/Berlin")
        assert berlin != utc and len(cache) == 2
        sparse = (YEAR_START - 3 * HOUR, YEAR_START + 2 * HOUR, "1h", "AVG")
        assert len(query(running, *sparse)) == 2
        assert len(query(running, *sparse, fill="zero")) == 5
        # A point before start changes what "previous" carries into the range: the entry
        # must go although the point lies outside [start, end).
        carried = query(running, *sparse, fill="previous")
        assert [t for t, _, _ in carried] == [YEAR_START, YEAR_START + HOUR]
        repository.upsert_points(ASSET, [(YEAR_START - 4 * HOUR, 42.0)])
        assert wait_for(lambda: len(query(running, *sparse, fill="previous")) == 5)
    finally:
        listener.close()
        running.close()


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"window": "15m", "aggregation": "AVG"},
        {"window": "1h", "aggregation": "FIRST", "timezone": "Europe/Berlin", "fill": "linear"},
        {"window": "1d", "aggregation": "SUM", "timezone": "America/New_York", "fill": "zero"},
        {"window": "1mo", "aggregation": "COUNT", "timezone": "Australia/Lord_Howe"},
    ],
)
def test_stream_answers_the_same_query_in_pages(repository, fields):
    running = RunningService(repository, assets=(ASSET,), max_points=100000, page_points=7)
    try:
        points = gappy_points()
        repository.upsert_points(ASSET, points)
        start_s, end_s = YEAR_START - 2 * DAY, YEAR_START + 3 * DAY
        unary = triples(running.stub.QueryTimeSeries(request(start_s, end_s, **fields)).data)
        streamed, sizes = stream(running, start_s, end_s, **fields)
        assert streamed == unary and unary
        assert all(size == 7 for size in sizes[:-1]) and 1 <= sizes[-1] <= 7
    finally:
        running.close()


def test_stream_has_no_overall_cap_and_an_empty_answer_has_no_pages(repository):
    running = RunningService(repository, assets=(ASSET,), max_points=10, page_points=4)
    try:
        repository.upsert_points(ASSET, series(YEAR_START, 96))
        code, _ = status_of(lambda: query(running, YEAR_START, YEAR_START + DAY, "15m", "SUM"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        points, sizes = stream(running, YEAR_START, YEAR_START + DAY, "15m", "SUM")
        assert len(points) == 96 and sizes == [4] * 24
        assert stream(running, YEAR_START + DAY, YEAR_START + 2 * DAY, "15m", "SUM") == ([], [])
    finally:
        running.close()


def _sessions(dsn: str, *states: str) -> int:
    """Client sessions of the test database in one of `states`, other than the one asking.

    Only client backends count: TimescaleDB runs its job scheduler and jobs as background
    workers connected to each database, and they come and go on their own.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend'"
            " AND state = ANY(%s) AND pid <> pg_backend_pid()",
            (list(states),),
        ).fetchone()[0]


def test_cancelling_a_stream_midway_releases_its_connection(dsn):
    # One connection in the pool: the query after the cancelled stream needs it back.
    with Repository(dsn=dsn, max_connections=1, connect_timeout_s=3) as repo:
        repo.migrate()
        # Far more than HTTP/2 flow control lets the server send ahead of the client.
        repo.upsert_points(ASSET, series(YEAR_START, 730 * 96))
        running = RunningService(repo, assets=(ASSET,), max_points=100000, page_points=10)
        try:
            call = running.stub.StreamTimeSeries(request(YEAR_START, YEAR_START + 730 * DAY, "15m"))
            first = next(call)
            assert len(first.data) == 10
            # The stream holds its cursor open on the only connection.
            assert _sessions(dsn, "idle in transaction", "active") == 1
            call.cancel()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
            assert wait_for(lambda: _sessions(dsn, "idle in transaction") == 0)
            assert len(query(running, YEAR_START, YEAR_START + DAY, "1h", "SUM")) == 24
        finally:
            running.close()


def test_cancelling_a_stream_stops_its_database_work(service, dsn):
    service.repository.upsert_points(ASSET, series(YEAR_START, 96))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE points IN ACCESS EXCLUSIVE MODE")
        call = service.stub.StreamTimeSeries(
            request(YEAR_START, YEAR_START + DAY, "1h", timezone="Europe/Berlin")
        )
        outcome: list[grpc.StatusCode] = []

        def consume() -> None:
            try:
                list(call)
            except grpc.RpcError as exc:
                outcome.append(exc.code())

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert wait_for(lambda: _sessions(dsn, "active") == 1)
        call.cancel()
        consumer.join(10)
        assert outcome == [grpc.StatusCode.CANCELLED]
        assert wait_for(lambda: _sessions(dsn, "active") == 0, timeout_s=5)
    # The connection went back usable.
    assert len(query(service, YEAR_START, YEAR_START + DAY, "1h", "SUM")) == 24


def test_stream_deadline_is_deadline_exceeded(service, dsn):
    service.repository.upsert_points(ASSET, series(YEAR_START, 96))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE points IN ACCESS EXCLUSIVE MODE")
        call = service.stub.StreamTimeSeries(request(YEAR_START, YEAR_START + DAY), timeout=0.5)
        code, _ = status_of(lambda: list(call))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: _sessions(dsn, "active") == 0, timeout_s=5)


def test_stream_passes_auth_rate_limit_metrics_and_log_but_not_the_cache(repository, caplog):
    config = Config(
        upstream=UpstreamConfig(assets=(ASSET,)),
        auth=AuthConfig(tokens=("s3cret",)),
        # The call without a token takes one too: the rate limit comes first.
        rate_limit=RateLimitConfig(rps=0.001, burst=4),
    )
    metrics = Metrics()
    cache = QueryCache(100, metrics=metrics)
    interceptors = edgecom.interceptors_for(config, metrics=metrics, cache=cache)
    running = RunningService(
        repository, assets=(ASSET,), max_points=1000, page_points=5, interceptors=interceptors
    )
    try:
        repository.upsert_points(ASSET, series(YEAR_START, 96))
        req = request(YEAR_START, YEAR_START + DAY, "1h", "SUM")
        code, _ = status_of(lambda: list(running.stub.StreamTimeSeries(req)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", "Bearer s3cret"),)
        # By request id: the refused call's line may land late, while INFO is captured.
        ids = [f"stream-{i}" for i in range(3)]
        with caplog.at_level("INFO", logger="interceptors"):
            for request_id in ids:
                metadata = (*token, ("x-request-id", request_id))
                pages = list(running.stub.StreamTimeSeries(req, metadata=metadata))
                assert sum(len(page.data) for page in pages) == 24
        code, details = status_of(lambda: list(running.stub.StreamTimeSeries(req, metadata=token)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details
        method = "/edgecom.TimeSeriesService/StreamTimeSeries"
        sample = metrics.registry.get_sample_value
        assert sample("edgecom_grpc_requests_total", {"method": method, "code": "OK"}) == 3
        assert sample("edgecom_grpc_request_duration_seconds_count", {"method": method}) == 5
        lines = [r for r in caplog.records if getattr(r, "request_id", None) in ids]
        assert all(r.method == method for r in lines)
        assert [(r.code, r.points, r.cache) for r in lines] == [("OK", 24, None)] * 3
        assert len(cache) == 0
    finally:
        running.close()


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_ten_years_stream_with_flat_server_memory(repository, dsn, capsys):
    count = 350_640  # ten years of quarter-hours
    start_s = 1_420_070_400  # 2015-01-01T00:00:00Z
    # Written by the database itself, so that loading leaves nothing in this process's heap.
    insert_quarter_hours(dsn, start_s, count)
    running = RunningService(repository, assets=(ASSET,), max_points=100000)
    try:
        end_s = start_s + count * QUARTER
        req = request(start_s, end_s, "15m", "AVG", timezone="Europe/Berlin", fill="zero")
        # A first, short stream allocates what any call needs once (buffers, caches).
        list(running.stub.StreamTimeSeries(request(start_s, start_s + DAY, "15m")))
        gc.collect()
        baseline = peak = _rss_bytes()
        received = 0
        last = None
        for page in running.stub.StreamTimeSeries(req):
            assert len(page.data) <= PAGE_POINTS
            received += len(page.data)
            last = page.data[-1].time.seconds
            peak = max(peak, _rss_bytes())
        growth = peak - baseline
        assert received == count and last == end_s - QUARTER
        # What holding the whole answer at once would take, for scale. The memory the
        # stream freed goes back to the system first, or the answer would be built in it.
        gc.collect()
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        before = _rss_bytes()
        whole = edgecom.protos.TimeSeriesResponse()
        for i in range(count):
            point = whole.data.add()
            point.time.seconds, point.value, point.count = start_s + i * QUARTER, 1.0, 1
        materialized = _rss_bytes() - before
        del whole
        with capsys.disabled():
            print(
                f"\nstreamed {received} points: server RSS grew {growth / 2**20:.1f} MiB "
                f"(one response holding them all: {materialized / 2**20:.1f} MiB)"
            )
        assert growth < materialized / 2
    finally:
        running.close()


# --- grpcurl ----------------------------------------------------------------------------------


def test_readme_monthly_energy_query_with_grpcurl(year_service, year, grpcurl):
    # As in the README: the year 2024 in Berlin, from local midnight to local midnight.
    body = {
        "start": "2024-01-01T00:00:00+01:00",
        "end": "2025-01-01T00:00:00+01:00",
        "window": "1mo",
        "aggregation": "SUM",
        "timezone": "Europe/Berlin",
    }
    output = run_grpcurl(
        grpcurl,
        "-d",
        json.dumps(body),
        year_service.address,
        "edgecom.TimeSeriesService/QueryTimeSeries",
    )
    answer = json.loads(output)["data"]
    assert [p["time"] for p in answer[:4]] == [
        "2023-12-31T23:00:00Z",
        "2024-01-31T23:00:00Z",
        "2024-02-29T23:00:00Z",
        "2024-03-31T22:00:00Z",
    ]
    assert len(answer) == 12
    # int64 is a string in JSON. March loses an hour to DST and October gains one.
    counts = [int(p["count"]) for p in answer]
    assert counts[:3] == [31 * 96, 29 * 96, 31 * 96 - 4] and counts[9] == 31 * 96 + 4
    start_s, end_s = YEAR_START - HOUR, YEAR_END - HOUR
    expected = reference(year, start_s, end_s, "1mo", "SUM", ZoneInfo("Europe/Berlin"))
    assert [p["value"] for p in answer] == pytest.approx([v for _, v, _ in expected], rel=1e-9)
    streamed = run_grpcurl(
        grpcurl,
        "-d",
        json.dumps({**body, "window": "1d", "fill": "zero"}),
        year_service.address,
        "edgecom.TimeSeriesService/StreamTimeSeries",
    )
    assert streamed.count('"time"') == 366


# --- streams cannot starve queries or ingestion ----------------------------------------------

# Ten years of quarter-hours: far more than HTTP/2 flow control lets the server send ahead of
# a client that has stopped reading, so an unread stream stays open on its connection.
LONG_COUNT = 350_640
LONG_START = 1_420_070_400  # 2015-01-01T00:00:00Z


@pytest.fixture(scope="module")
def long_dsn(server_dsn: str) -> Iterator[str]:
    """A database whose first asset holds ten years of quarter-hours; only read from."""
    with fresh_database(server_dsn) as database:
        with Repository(dsn=database, max_connections=1) as repo:
            repo.migrate()
        insert_quarter_hours(database, LONG_START, LONG_COUNT)
        yield database


def long_request():
    return request(LONG_START, LONG_START + LONG_COUNT * QUARTER, "15m")


def read_first_page(call) -> grpc.StatusCode:
    """Take one page of a stream and leave the rest unread; returns how the first read went."""
    try:
        next(call)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_unread_streams_leave_connections_for_queries_and_ingestion(long_dsn):
    with Repository(dsn=long_dsn, max_connections=3, connect_timeout_s=1) as repo:
        running = RunningService(repo, assets=(ASSET, OTHER_ASSET), max_points=1000, max_streams=2)
        calls = [running.stub.StreamTimeSeries(long_request()) for _ in range(4)]
        try:
            # More streams than the pool has connections, none of them read past a page.
            outcomes = [read_first_page(call) for call in calls]
            assert len(query(running, LONG_START, LONG_START + DAY, "1h", "SUM")) == 24
            written = repo.upsert_points(OTHER_ASSET, series(LONG_START, 96))
            assert written.changed == 96
            assert outcomes.count(grpc.StatusCode.OK) == 2
        finally:
            for call in calls:
                call.cancel()
            running.close()
            with psycopg.connect(long_dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM points WHERE asset_id = %s", (OTHER_ASSET,))


def test_a_stream_beyond_max_streams_is_resource_exhausted_at_once(long_dsn):
    with Repository(dsn=long_dsn, max_connections=2, connect_timeout_s=1) as repo:
        running = RunningService(repo, assets=(ASSET,), max_points=1000, max_streams=1)
        first = running.stub.StreamTimeSeries(long_request())
        try:
            assert read_first_page(first) == grpc.StatusCode.OK
            code, details = status_of(lambda: list(running.stub.StreamTimeSeries(long_request())))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "query.max_streams" in details and "1" in details
            assert "QueryTimeSeries" in details and "retry" in details
            first.cancel()

            def admitted() -> bool:
                try:
                    return len(stream(running, LONG_START, LONG_START + DAY, "1h")[0]) == 24
                except grpc.RpcError:
                    return False

            # The slot is free again once the stream has ended.
            assert wait_for(admitted)
        finally:
            first.cancel()
            running.close()


def test_an_unread_stream_ends_after_the_idle_timeout_and_frees_its_connection(long_dsn):
    with Repository(dsn=long_dsn, max_connections=2, connect_timeout_s=1) as repo:
        running = RunningService(
            repo, assets=(ASSET,), max_points=1000, max_streams=1, stream_idle_timeout_s=1
        )
        call = running.stub.StreamTimeSeries(long_request())
        try:
            assert read_first_page(call) == grpc.StatusCode.OK
            assert _sessions(long_dsn, "idle in transaction", "active") == 1
            # Ended on the server while the client still reads nothing.
            assert wait_for(lambda: _sessions(long_dsn, "idle in transaction", "active") == 0)
            # What was sent ahead still arrives, then the reason the stream ended.
            code, details = status_of(lambda: list(call))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "query.stream_idle_timeout" in details and "1s" in details
            # Its slot and connection are back: a new stream and a pool's worth of queries.
            assert len(stream(running, LONG_START, LONG_START + DAY, "1h")[0]) == 24
            answers = [
                running.stub.QueryTimeSeries.future(
                    request(LONG_START, LONG_START + DAY, "1h"), timeout=10
                )
                for _ in range(2)
            ]
            assert [len(answer.result().data) for answer in answers] == [24, 24]
        finally:
            call.cancel()
            running.close()


def test_the_layouts_of_bucket_edges_kept_for_later_queries_are_few_and_short():
    berlin = service_module.parse_query(
        request(0, 1, "1d", timezone="Europe/Berlin"), [ASSET]
    ).buckets
    for day in range(100):  # more spans than are kept
        service_module._laid_out_edges(berlin, YEAR_START + day * DAY, YEAR_START + 400 * DAY, iter)
    service_module._laid_out_edges(berlin, 0, 20 * 365 * DAY, iter)  # too long to keep
    assert len(service_module._edge_layouts) == service_module._EDGE_LAYOUTS
    assert all(
        len(edges) <= service_module._EDGE_LAYOUT_MAX
        for edges in service_module._edge_layouts.values()
    )
    kept = service_module._laid_out_edges(
        berlin, YEAR_START + 99 * DAY, YEAR_START + 400 * DAY, iter
    )
    assert kept == tuple(berlin.edges(YEAR_START + 99 * DAY, YEAR_START + 400 * DAY))
