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
from buckets import Buckets, sources
from repository import AGGREGATIONS, ROLLUP_SPANS_S
from service import parse_bucket_window

HOUR = 3600
DAY = 86400
# 2024-02-20 to 2024-04-20: the spring DST changes of New York (03-10), Berlin (03-31) and
# Lord Howe (04-07, half an hour) fall inside.
FIRST_S = int(datetime(2024, 2, 20, tzinfo=UTC).timestamp())
LAST_S = int(datetime(2024, 4, 20, tzinfo=UTC).timestamp())
WINDOWS = ("15m", "30m", "1h", "2h", "3h", "5h", "6h", "12h", "1d", "2d", "36h", "7d", "1w", "1mo")
ZONES = ("", "UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe")
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


def assert_equivalent(with_rollups: RunningService, without: RunningService, rng) -> int:
    """Ask both services the same random queries; returns how many were answered."""
    answered = 0
    for _ in range(QUERIES):
        query = random_query(rng)
        got, expected = answer(with_rollups, query), answer(without, query)
        if not isinstance(expected, list):
            assert got == expected, query
            continue
        answered += 1
        assert [(t, n) for t, _, n in got] == [(t, n) for t, _, n in expected], query
        for (t, value, _), (_, want, _) in zip(got, expected, strict=True):
            assert (
                value == want
                or math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-9)
                or (math.isnan(value) and math.isnan(want))
            ), (query, t, value, want)
    return answered


@pytest.fixture
def services(repository):
    both = [
        RunningService(repository, assets=(ASSET,), max_points=100_000, rollups=r)
        for r in (True, False)
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


def test_the_rollups_equal_a_rebuild_from_the_points_after_revisions(repository, dsn):
    rng = random.Random(7)
    points = stored_points(rng)
    repository.upsert_points(ASSET, points)
    repository.upsert_points(ASSET, [(t, v * 2) for t, v in rng.sample(points, 500)])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "DELETE FROM points WHERE time < %s",
            (datetime.fromtimestamp(FIRST_S + 5 * DAY + 7 * HOUR, UTC),),
        )
        kept = [
            conn.execute(f"SELECT * FROM {table} ORDER BY start").fetchall()
            for table in ("points_hourly", "points_daily")
        ]
        conn.execute("SELECT rebuild_rollups()")
        rebuilt = [
            conn.execute(f"SELECT * FROM {table} ORDER BY start").fetchall()
            for table in ("points_hourly", "points_daily")
        ]
    assert len(kept[0]) > 1000 and len(kept[1]) > 50
    for mine, theirs in zip(kept, rebuilt, strict=True):
        assert [row[:5] + row[6:] for row in mine] == [row[:5] + row[6:] for row in theirs]
        assert [row[5] for row in mine] == pytest.approx([row[5] for row in theirs], rel=1e-12)


def test_queries_that_rollups_can_answer_read_them(services, dsn):
    with_rollups, without = services
    start = FIRST_S + 10 * DAY
    with_rollups.repository.upsert_points(ASSET, [(start + i * 900, 1.0) for i in range(96 * 40)])
    # A rollup changed behind the service's back shows in the answers that read it.
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE points_hourly SET max = 99 WHERE start = %s",
            (datetime.fromtimestamp(start + 30 * DAY + 5 * HOUR, UTC),),
        )
        conn.execute(
            "UPDATE points_daily SET max = 99 WHERE start = %s",
            (datetime.fromtimestamp(start + 3 * DAY, UTC),),
        )
    for window, zone, rolled_up in [
        ("1h", "", True),
        ("1d", "Europe/Berlin", True),
        ("1mo", "America/New_York", True),
        ("1d", "", True),
        ("1d", "Asia/Kolkata", True),
        ("15m", "", False),
        ("1h", "Asia/Kolkata", False),
    ]:
        query = request(start, start + 40 * DAY, window, "MAX", timezone=zone)
        peak = max(v for _, v, _ in answer(with_rollups, query))
        assert peak == (99 if rolled_up else 1.0), (window, zone)
        assert max(v for _, v, _ in answer(without, query)) == 1.0


def pieces(window: str, zone: str, lo: int, hi: int) -> list[tuple[int, int, int]]:
    buckets = Buckets(parse_bucket_window(window), ZoneInfo(zone) if zone != "UTC" else UTC)
    return sources(buckets, lo, hi, list(buckets.edges(lo, hi)), ROLLUP_SPANS_S)


def test_a_range_is_read_from_the_coarsest_rollup_no_bucket_edge_cuts():
    day = FIRST_S  # a UTC midnight
    lo, hi = day - HOUR - 60, day + 3 * DAY + 2 * HOUR + 30
    assert pieces("1d", "UTC", lo, hi) == [
        (0, lo, day - HOUR),
        (HOUR, day - HOUR, day),
        (DAY, day, day + 3 * DAY),
        (HOUR, day + 3 * DAY, day + 3 * DAY + 2 * HOUR),
        (0, day + 3 * DAY + 2 * HOUR, hi),
    ]
    assert pieces("2h", "UTC", lo, hi) == [
        (0, lo, day - HOUR),
        (HOUR, day - HOUR, hi - 30),
        (0, hi - 30, hi),
    ]
    assert pieces("15m", "UTC", lo, hi) == [(0, lo, hi)]
    # Berlin's days start at 23:00 UTC in winter: whole UTC days fit none of them.
    assert pieces("1d", "Europe/Berlin", day - HOUR, day + 3 * DAY - HOUR) == [
        (HOUR, day - HOUR, day + 3 * DAY - HOUR)
    ]
    # Kolkata's days start at 18:30 UTC: their half hours are read from the points.
    assert pieces("1d", "Asia/Kolkata", day - 5 * HOUR - 1800, day + DAY - 5 * HOUR - 1800) == [
        (0, day - 5 * HOUR - 1800, day - 5 * HOUR),
        (HOUR, day - 5 * HOUR, day + DAY - 6 * HOUR),
        (0, day + DAY - 6 * HOUR, day + DAY - 5 * HOUR - 1800),
    ]
    # Lord Howe's winter offset, +10:30, puts every hour bucket across a UTC hour.
    june = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp())
    assert pieces("1h", "Australia/Lord_Howe", june, june + DAY) == [(0, june, june + DAY)]
    midnight = june - 10 * HOUR - 1800
    assert pieces("1d", "Australia/Lord_Howe", midnight, midnight + DAY) == [
        (0, midnight, midnight + 1800),
        (HOUR, midnight + 1800, midnight + DAY - 1800),
        (0, midnight + DAY - 1800, midnight + DAY),
    ]


def test_without_rollups_a_plan_reads_the_points_alone():
    query = service_module.parse_query(request(FIRST_S, FIRST_S + 30 * DAY, "1d"), [ASSET])
    assert service_module.plan_query(query, None, now_s=LAST_S).sources is not None
    assert service_module.plan_query(query, None, now_s=LAST_S, spans=()).sources is None
