"""Benchmark of the query path: storage layout, fetch format and response building.

Prints figures and ratios; asserts nothing. Uses the PostgreSQL at $EDGECOM_BENCH_DSN, or an
embedded one in a temporary directory:

    uv run python benchmarks/query_bench.py [--assets 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import server_dsn as server_dsn_or_embedded

import edgecom
from repository import BucketGrid, Repository

STEP_S = 900
TWO_YEARS = 730 * 96
T0 = 1_672_531_200  # 2023-01-01T00:00:00Z

_PLAIN_SCHEMA = """
CREATE TABLE points (
    asset_id text NOT NULL,
    time timestamptz NOT NULL,
    value double precision NOT NULL,
    PRIMARY KEY (asset_id, time)
)
"""


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Median wall time of `repeat` calls, in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fill(dsn: str, assets: list[str]) -> None:
    """Write two years of points for every asset, interleaved in time as polling writes them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.cursor().copy("COPY points (asset_id, time, value) FROM STDIN") as copy:
            for i in range(TWO_YEARS):
                moment = datetime.fromtimestamp(T0 + i * STEP_S, UTC)
                for n, asset in enumerate(assets):
                    copy.write_row((asset, moment, math.sin(i / 96 + n) * 400 + 500))
        conn.execute("SELECT rebuild_rollups()")
        conn.execute("VACUUM ANALYZE points, points_hourly, points_daily")


def fresh_database(server_dsn: str) -> str:
    name = f"edgecom_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_dsn, dbname=name)


def drop_database(server_dsn: str, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query_time(dsn: str, asset: str, window_s: int, repeat: int) -> float:
    with Repository(dsn=dsn, max_connections=2) as repo:

        def two_years() -> object:
            with repo.snapshot() as snapshot:
                return list(
                    snapshot.buckets(
                        asset_id=asset,
                        start_s=T0,
                        end_s=T0 + TWO_YEARS * STEP_S,
                        grid=BucketGrid(window_s=window_s),
                        aggregation="AVG",
                        limit=200_000,
                    )
                )

        two_years()  # warm the cache
        return best_of(repeat, two_years)


def bench_layout(server_dsn: str, assets: list[str], repeat: int) -> None:
    print(f"Storage layout: {len(assets)} assets x {TWO_YEARS} points, written interleaved")
    results = {}
    for label, schema in (("covering key", None), ("plain key", _PLAIN_SCHEMA)):
        dsn = fresh_database(server_dsn)
        try:
            if schema is None:
                with Repository(dsn=dsn) as repo:
                    repo.migrate()
            else:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(schema)
            fill(dsn, assets)
            results[label] = {w: query_time(dsn, assets[0], w, repeat) for w in (900, 3600, 86400)}
        finally:
            drop_database(server_dsn, dsn)
    for window_s in (900, 3600, 86400):
        covering = results["covering key"][window_s]
        plain = results["plain key"][window_s]
        print(
            f"  2-year AVG, window {window_s:>5}s: covering {covering * 1000:7.1f} ms, "
            f"plain {plain * 1000:7.1f} ms, plain/covering {plain / covering:5.1f}x"
        )


def bench_response(repeat: int) -> None:
    rows = [(T0 + i * STEP_S, float(i)) for i in range(TWO_YEARS)]

    def with_seconds() -> None:
        response = edgecom.protos.TimeSeriesResponse()
        for bucket, value in rows:
            point = response.data.add()
            point.time.seconds = bucket
            point.value = value

    def with_from_datetime() -> None:
        response = edgecom.protos.TimeSeriesResponse()
        for bucket, value in rows:
            point = response.data.add()
            point.time.FromDatetime(datetime.fromtimestamp(bucket, UTC))
            point.value = value

    fast = best_of(repeat, with_seconds)
    slow = best_of(repeat, with_from_datetime)
    print(f"Response of {TWO_YEARS} points:")
    print(
        f"  time.seconds = int: {fast * 1000:6.1f} ms; Timestamp.FromDatetime: "
        f"{slow * 1000:6.1f} ms; ratio {slow / fast:4.1f}x"
    )


def bench_fetch(server_dsn: str, repeat: int) -> None:
    dsn = fresh_database(server_dsn)
    try:
        with Repository(dsn=dsn) as repo:
            repo.migrate()
        fill(dsn, ["bench"])
        sql = (
            "SELECT extract(epoch FROM time)::bigint, value FROM points"
            " WHERE asset_id = 'bench' ORDER BY time"
        )
        with psycopg.connect(dsn) as conn:
            text = best_of(repeat, lambda: conn.cursor().execute(sql).fetchall())
            binary = best_of(repeat, lambda: conn.cursor(binary=True).execute(sql).fetchall())
        print(f"Fetching {TWO_YEARS} rows:")
        print(
            f"  text {text * 1000:6.1f} ms; binary {binary * 1000:6.1f} ms; "
            f"text/binary {text / binary:4.2f}x"
        )
    finally:
        drop_database(server_dsn, dsn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=20, help="assets written interleaved")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    args = parser.parse_args()
    with server_dsn_or_embedded(None) as server_dsn:
        assets = [f"asset-{n:03d}" for n in range(args.assets)]
        bench_response(args.repeat)
        bench_fetch(server_dsn, args.repeat)
        bench_layout(server_dsn, assets, args.repeat)


if __name__ == "__main__":
    main()
