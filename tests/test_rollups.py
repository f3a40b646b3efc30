"""Rollups answer exactly as the points do: the same buckets, counts and values (up to the
rounding of a different summation order), before and after revisions and deletions.

Two services run on one database, one reading rollups where it can and one reading the
points alone; random queries over windows, zones, aggregations and fills go to both.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import grpc
import psycopg
import pytest
from conftest import ASSET, RunningService, request

import service as service_module
from buckets import DAYS, HOURS, LOCAL_DAYS, POINTS, Buckets, sources
from repository import AGGREGATIONS, Repository
from service import parse_bucket_window

HOUR = 3600
DAY = 86400
# 2024-02-20 to 2024-04-20: the spring DST changes of New York (03-10), Berlin (03-31) and
# Lord Howe (04-07, half an hour) fall inside.
FIRST_S = int(datetime(2024, 2, 20, tzinfo=UTC).timestamp())
LAST_S = int(datetime(2024, 4, 20, tzinfo=UTC).timestamp())
WINDOWS = ("15m", "30m", "1h", "2h", "3h", "5h", "6h", "12h", "1d", "2d", "36h", "7d", "1w", "1mo")
ZONES = (
    "",
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Tokyo",
)
# Zones with local-day rollups: whole-hour, half-hour and half-hour-DST offsets, and
# Santiago, whose DST ends at midnight (2024-04-07).
LOCAL_DAY_ZONES = ("Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe", "America/Santiago")
FILLS = ("none", "zero", "previous", "linear", "nan")
QUERIES = 150


def stored_points(rng: random.Random) -> list[tuple[int, float]]:
    """Quarter-hours with random gaps, a missing day, and a few points off the quarter-hour."""
    points = []
    for t in range(FIRST_S, LAST_S, 900):
        if rng.random() < 0.1 or FIRST_S + 20 * DAY <= t < FIRST_S + 21 * DAY:
            continue
        points.append((t, rng.uniform(-1000, 1000)))
    points += [(rng.randrange(FIRST_S, LAST_S), rng.uniform(-5, 5)) for _ in range(50)]
    return points


def random_query(rng: random.Random):
    def instant() -> int:
        t = rng.randrange(FIRST_S - 3 * DAY, LAST_S + 3 * DAY)
        return rng.choice([t, t - t % HOUR, t - t % DAY, t - t % 60])

    start, end = sorted((instant(), instant()))
    return request(
        start,
        end + 1,
        rng.choice(WINDOWS),
        rng.choice(AGGREGATIONS),
        timezone=rng.choice(ZONES),
        fill=rng.choice(FILLS),
    )


def answer(service: RunningService, query) -> object:
    try:
        reply = service.stub.QueryTimeSeries(query)
    except grpc.RpcError as exc:
        return exc.code()
    return [(p.time.seconds, p.value, p.count) for p in reply.data]


def assert_same_answer(with_rollups: RunningService, without: RunningService, query) -> bool:
    """Both services answer `query` alike; returns whether they answered with points."""
    got, expected = answer(with_rollups, query), answer(without, query)
    if not isinstance(expected, list):
        assert got == expected, query
        return False
    assert [(t, n) for t, _, n in got] == [(t, n) for t, _, n in expected], query
    for (t, value, _), (_, want, _) in zip(got, expected, strict=True):
        assert (
            value == want
            or math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-9)
            or (math.isnan(value) and math.isnan(want))
        ), (query, t, value, want)
    return True


def assert_equivalent(with_rollups: RunningService, without: RunningService, rng) -> int:
    """Ask both services random queries, then every day, week and month bucket of the data
    in each zone with local days; returns how many were answered with points."""
    answered = sum(
        assert_same_answer(with_rollups, without, random_query(rng)) for _ in range(QUERIES)
    )
    for zone in LOCAL_DAY_ZONES:
        for window in ("1d", "1w", "1mo"):
            for aggregation in ("AVG", "FIRST", "LAST", "COUNT"):
                query = request(FIRST_S - DAY, LAST_S + DAY, window, aggregation, timezone=zone)
                assert assert_same_answer(with_rollups, without, query)
    return answered


@pytest.fixture
def services(dsn):
    """A service reading rollups (with local days in LOCAL_DAY_ZONES) and one reading points."""
    with Repository(dsn=dsn, max_connections=4, rollup_timezones=LOCAL_DAY_ZONES) as repository:
        repository.migrate()
        both = [
            RunningService(repository, assets=(ASSET,), max_points=100_000, rollups=rollups)
            for rollups in (True, False)
        ]
        yield both
        for running in both:
            running.close()


def test_rollups_answer_as_the_points_do_before_and_after_revisions(services, dsn):
    with_rollups, without = services
    rng = random.Random(20240331)
    points = stored_points(rng)
    repository = with_rollups.repository
    for i in range(0, len(points), 700):
        repository.upsert_points(ASSET, points[i : i + 700])
    assert assert_equivalent(with_rollups, without, rng) > QUERIES // 2

    # Revisions: changed values, new points in the gaps, and points deleted by hand.
    revised = [
        (t, v + rng.choice([-1, 1]) * rng.uniform(1, 50)) for t, v in rng.sample(points, 400)
    ]
    added = [(rng.randrange(FIRST_S, LAST_S), rng.uniform(-2000, 2000)) for _ in range(200)]
    repository.upsert_points(ASSET, revised + added)
    with psycopg.connect(dsn) as conn:
        gone = rng.sample(points, 300)
        conn.execute(
            "DELETE FROM points WHERE asset_id = %s AND time = ANY(%s)",
            (ASSET, [datetime.fromtimestamp(t, UTC) for t, _ in gone]),
        )
        # A whole hour and a whole day deleted: their rollups go too.
        conn.execute(
            "DELETE FROM points WHERE asset_id = %s AND time >= %s AND time < %s",
            (
                ASSET,
                *(datetime.fromtimestamp(FIRST_S + s, UTC) for s in (30 * DAY, 31 * DAY + HOUR)),
            ),
        )
    assert assert_equivalent(with_rollups, without, rng) > QUERIES // 2


def test_the_rollups_equal_a_rebuild_from_the_points_after_revisions(services, dsn):
    repository = services[0].repository
    rng = random.Random(7)
    points = stored_points(rng)
    repository.upsert_points(ASSET, points)
    repository.upsert_points(ASSET, [(t, v * 2) for t, v in rng.sample(points, 500)])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "DELETE FROM points WHERE time < %s",
            (datetime.fromtimestamp(FIRST_S + 5 * DAY + 7 * HOUR, UTC),),
        )
        tables = ("points_hourly", "points_daily", "points_local_daily")
        columns = "asset_id, start, count, min, max, first_time, first_value, last_time, last_value"
        kept, rebuilt = [], []
        for rows in (kept, rebuilt):
            for table in tables:
                rows.append(
                    conn.execute(f"SELECT {columns}, sum FROM {table} ORDER BY 1, 2").fetchall()
                )
            conn.execute("SELECT rebuild_rollups()")
    assert len(kept[0]) > 1000 and len(kept[1]) > 50 and len(kept[2]) > 200
    for mine, theirs in zip(kept, rebuilt, strict=True):
        assert [row[:-1] for row in mine] == [row[:-1] for row in theirs]
        assert [row[-1] for row in mine] == pytest.approx([row[-1] for row in theirs], rel=1e-12)


def test_queries_that_rollups_can_answer_read_them(services, dsn):
    with_rollups, without = services
    start = FIRST_S + 10 * DAY
    with_rollups.repository.upsert_points(ASSET, [(start + i * 900, 1.0) for i in range(96 * 40)])
    # A rollup changed behind the service's back shows in the answers that read it.
    berlin_day = datetime(2024, 3, 12, tzinfo=ZoneInfo("Europe/Berlin"))
    with psycopg.connect(dsn) as conn:
        for table, moment in [
            ("points_hourly", datetime.fromtimestamp(start + 30 * DAY + 5 * HOUR, UTC)),
            ("points_daily", datetime.fromtimestamp(start + 3 * DAY, UTC)),
            ("points_local_daily", berlin_day),
        ]:
            changed = conn.execute(f"UPDATE {table} SET max = 99 WHERE start = %s", (moment,))
            assert changed.rowcount >= 1, table
    for window, zone, read in [
        ("1h", "", "an hour"),
        ("1d", "", "a UTC day"),
        ("1mo", "America/New_York", "a UTC day"),
        ("1d", "Asia/Tokyo", "an hour"),
        ("1d", "Europe/Berlin", "a Berlin day"),
        ("1w", "Europe/Berlin", "a Berlin day"),
        ("1d", "Asia/Kolkata", None),  # its local days, none changed
        ("15m", "", None),
        ("1h", "Asia/Kolkata", None),
    ]:
        query = request(start, start + 40 * DAY, window, "MAX", timezone=zone)
        peak = max(v for _, v, _ in answer(with_rollups, query))
        assert peak == (99 if read else 1.0), (window, zone)
        assert max(v for _, v, _ in answer(without, query)) == 1.0


def pieces(window: str, zone: str, lo: int, hi: int, local_days: bool = False):
    buckets = Buckets(parse_bucket_window(window), ZoneInfo(zone) if zone != "UTC" else UTC)
    return sources(buckets, lo, hi, list(buckets.edges(lo, hi)), local_days=local_days)


def test_a_range_is_read_from_the_coarsest_rollup_no_bucket_edge_cuts():
    day = FIRST_S  # a UTC midnight
    lo, hi = day - HOUR - 60, day + 3 * DAY + 2 * HOUR + 30
    assert pieces("1d", "UTC", lo, hi) == [
        (POINTS, lo, day - HOUR),
        (HOURS, day - HOUR, day),
        (DAYS, day, day + 3 * DAY),
        (HOURS, day + 3 * DAY, day + 3 * DAY + 2 * HOUR),
        (POINTS, day + 3 * DAY + 2 * HOUR, hi),
    ]
    assert pieces("2h", "UTC", lo, hi) == [
        (POINTS, lo, day - HOUR),
        (HOURS, day - HOUR, hi - 30),
        (POINTS, hi - 30, hi),
    ]
    assert pieces("15m", "UTC", lo, hi) == [(POINTS, lo, hi)]
    # Berlin's days start at 23:00 UTC in winter: whole UTC days fit none of them, its
    # local days all of them.
    berlin = (day - HOUR, day + 3 * DAY - HOUR)
    assert pieces("1d", "Europe/Berlin", *berlin) == [(HOURS, *berlin)]
    assert pieces("1d", "Europe/Berlin", *berlin, local_days=True) == [(LOCAL_DAYS, *berlin)]
    assert pieces("1mo", "Europe/Berlin", lo, hi, local_days=True) == [
        (POINTS, lo, day - HOUR),
        (LOCAL_DAYS, day - HOUR, day + 3 * DAY - HOUR),
        (HOURS, day + 3 * DAY - HOUR, day + 3 * DAY + 2 * HOUR),
        (POINTS, day + 3 * DAY + 2 * HOUR, hi),
    ]
    # Kolkata's days start at 18:30 UTC: their half hours are read from the points.
    kolkata = (day - 5 * HOUR - 1800, day + DAY - 5 * HOUR - 1800)
    assert pieces("1d", "Asia/Kolkata", *kolkata) == [
        (POINTS, kolkata[0], day - 5 * HOUR),
        (HOURS, day - 5 * HOUR, day + DAY - 6 * HOUR),
        (POINTS, day + DAY - 6 * HOUR, kolkata[1]),
    ]
    assert pieces("1d", "Asia/Kolkata", *kolkata, local_days=True) == [(LOCAL_DAYS, *kolkata)]
    # Lord Howe's winter offset, +10:30, puts every hour bucket across a UTC hour.
    june = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp())
    assert pieces("1h", "Australia/Lord_Howe", june, june + DAY) == [(POINTS, june, june + DAY)]
    midnight = june - 10 * HOUR - 1800
    assert pieces("1d", "Australia/Lord_Howe", midnight, midnight + DAY) == [
        (POINTS, midnight, midnight + 1800),
        (HOURS, midnight + 1800, midnight + DAY - 1800),
        (POINTS, midnight + DAY - 1800, midnight + DAY),
    ]


def test_without_rollups_a_plan_reads_the_points_alone():
    query = service_module.parse_query(request(FIRST_S, FIRST_S + 30 * DAY, "1d"), [ASSET])
    assert service_module.plan_query(query, None, now_s=LAST_S).sources is not None
    assert service_module.plan_query(query, None, now_s=LAST_S, rollups=False).sources is None


def test_a_zone_listed_at_start_gets_its_local_days_and_one_no_longer_listed_loses_them(
    start_service, repository, dsn
):
    midnight = int(datetime(2024, 3, 30, tzinfo=ZoneInfo("Europe/Berlin")).timestamp())
    # Three Berlin days, the middle one 23 hours long (DST starts on 2024-03-31).
    repository.upsert_points(ASSET, [(midnight + i * 900, 1.0) for i in range(3 * 96 - 4)])
    listed = start_service("listed", EDGECOM_STORAGE_ROLLUP_TIMEZONES="Europe/Berlin")
    listed.wait_serving()
    with psycopg.connect(dsn) as conn:
        kept = conn.execute(
            "SELECT extract(epoch FROM start)::bigint, count FROM points_local_daily"
            " WHERE timezone = 'Europe/Berlin' ORDER BY start"
        ).fetchall()
    assert kept == [(midnight, 96), (midnight + DAY, 92), (midnight + 2 * DAY - HOUR, 96)]
    query = request(midnight, midnight + 3 * DAY, "1d", "COUNT", timezone="Europe/Berlin")
    assert [(p.time.seconds, p.count) for p in listed.stub().QueryTimeSeries(query).data] == kept
    listed.close()

    start_service("unlisted").wait_serving()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM points_local_daily").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM rollup_timezones").fetchone() == (0,)
