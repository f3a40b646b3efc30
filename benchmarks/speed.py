"""The speed targets: each figure next to its reference from the same run, as a ratio.

    uv run python benchmarks/speed.py [--dsn postgresql://...] [--assets 100] [--quick]
                                      [--p5-assets 100] [--skip-bootstrap | --only-bootstrap]

Runs `edgecom.py` in a subprocess, as users do, on a scratch database (on --dsn,
$EDGECOM_BENCH_DSN or an embedded PostgreSQL) holding two years of quarter-hours for one
asset, then for --assets assets written interleaved in time (loaded with COPY, not through the
service), and prints:

  P1  2 years at 1m end to end (cache missed), against the server time of the same SQL
      (EXPLAIN ANALYZE, TIMING OFF); target <= 2x
  P2  2 years at 1d UTC, 1d Europe/Berlin and 1mo Europe/Berlin end to end, the service
      keeping Europe/Berlin's local days (storage.rollup_timezones); target <= 3 ms
  P3  a 1-day query's p50 against the health RPC's p50 + the SQL round trip's p50, measured
      call by call, interleaved; target <= 1.5x
  P4  a cached answer's throughput at 16 client threads against the health RPC's, alternate
      rounds, medians; target >= 90 %
  P5  bootstrap of two years x --p5-assets assets (default: --assets) from the simulator
      answering at once, rollups included, from the service's start until every asset is
      covered, against the database alone: a COPY of the same points into a temp table and
      an upsert from it, a transaction per asset (Repository.upsert_points' rate in the
      note); target >= 150,000 points/s. Best of two runs, alternated with two runs whose
      database keeps no rollups: their difference is the rollups' upkeep; target <= 20 %
  Growth: each query figure at --assets assets against the one-asset figure; target <= 1.2x

The cache is missed on purpose by moving `start` back a second per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from _harness import (
    ASSET,
    QUARTER_S,
    Server,
    asset_ids,
    copy_points,
    empty_database,
    running_server,
    server_dsn,
)
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

import edgecom
import service
from repository import Repository, Snapshot
from simulator import Simulator

DAY_S = 86_400
COUNT = 2 * 365 * 96  # two years of quarter-hours
START_S = 1_672_531_200  # 2023-01-01T00:00:00Z
END_S = START_S + COUNT * QUARTER_S
ONE_DAY_START_S = START_S + 365 * DAY_S
MAX_POINTS = 100_000  # query.max_points' default: the limit the service puts on the SQL

P2_CASES = [("1d", "UTC"), ("1d", "Europe/Berlin"), ("1mo", "Europe/Berlin")]
NO_ROLLUP_UPKEEP = """
CREATE OR REPLACE FUNCTION refresh_rollups(asset text, hours timestamptz[]) RETURNS void
LANGUAGE sql AS ''
"""
# The database's own COPY and upsert, the reference for P5: what Repository.upsert_points
# does with rollups left out and the rows made beforehand.
COPY_UPSERT = """
INSERT INTO points (asset_id, time, value)
SELECT %(asset_id)s, time, value FROM incoming
ON CONFLICT (asset_id, time) DO UPDATE SET value = EXCLUDED.value
WHERE points.value IS DISTINCT FROM EXCLUDED.value
"""
# The service keeps local-day rollups for the zone P2 asks for, as its users would configure
# it (storage.rollup_timezones); P5's bootstrap keeps them too.
ROLLUP_TIMEZONES = "Europe/Berlin"


@dataclass
class Row:
    """One line of the final table."""

    figure: str
    assets: int
    measured: str
    reference: str
    ratio: float
    target: str
    passed: bool
    note: str = ""


@dataclass
class Settings:
    repeat: int
    calls: int
    rounds: int
    round_s: float
    threads: int


# --- requests and the SQL the service runs for them ----------------------------------------


class Shifter:
    """Moves `start` back a second per call, so no two calls share a cache entry."""

    def __init__(self) -> None:
        self._shift = 0

    def request(self, *, start_s: int, end_s: int, window: str, timezone: str = "") -> object:
        self._shift += 1
        return make_request(start_s - self._shift, end_s, window, timezone)


def make_request(start_s: int, end_s: int, window: str, timezone: str = "") -> object:
    return edgecom.protos.TimeSeriesRequest(
        asset_id=ASSET,
        start=Timestamp(seconds=start_s),
        end=Timestamp(seconds=end_s),
        window=window,
        aggregation="AVG",
        timezone=timezone,
    )


def service_sql(repo: Repository, request: object, assets: list[str]) -> tuple[object, dict]:
    """The bucket statement and parameters the service runs for `request` (query.max_points)."""
    query = service.parse_query(request, assets)
    extent = None
    if service.needs_extent(query):
        with repo.snapshot() as snapshot:
            extent = snapshot.extent(
                asset_id=query.asset_id, start_s=query.start_s, end_s=query.end_s
            )
    local_days = query.timezone in ROLLUP_TIMEZONES.split(",")
    plan = service.plan_query(query, extent, now_s=time.time(), local_days=local_days)
    return Snapshot._bucket_query(
        query.asset_id,
        query.start_s,
        query.end_s,
        plan.grid,
        query.aggregation,
        MAX_POINTS + 1,
        plan.sources,
        query.timezone,
    )


def server_time_ms(conn: psycopg.Connection, statement: object, params: dict) -> float:
    """Execution time of the statement on the server, by EXPLAIN ANALYZE (no per-node timing)."""
    explain = sql.SQL("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {}").format(statement)
    (plan,) = conn.execute(explain, params).fetchone()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return plan[0]["Execution Time"]


def round_trip_s(conn: psycopg.Connection, statement: object, params: dict) -> float:
    """The statement run and fetched by a client, as the service does (binary rows)."""
    started = time.perf_counter()
    with conn.cursor(binary=True) as cur:
        cur.execute(statement, params).fetchall()
    return time.perf_counter() - started


def timed(call: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


# --- P1 to P4 --------------------------------------------------------------------------------


@dataclass
class Context:
    server: Server
    repo: Repository
    conn: psycopg.Connection
    assets: list[str]

    @property
    def stub(self) -> object:
        return edgecom.services.TimeSeriesServiceStub(self.server.channel)

    @property
    def health(self) -> object:
        return health_pb2_grpc.HealthStub(self.server.channel)


def measure_long(ctx: Context, window: str, timezone: str, repeat: int) -> tuple[float, float]:
    """(end to end ms, server ms) medians of a two-year query, each call uncached."""
    shifter = Shifter()
    stub = ctx.stub
    stub.QueryTimeSeries(make_request(START_S, END_S, window, timezone))  # warm up
    ends, servers = [], []
    for _ in range(repeat):
        request = shifter.request(start_s=START_S, end_s=END_S, window=window, timezone=timezone)
        ends.append(timed(stub.QueryTimeSeries, request) * 1000)
        servers.append(server_time_ms(ctx.conn, *service_sql(ctx.repo, request, ctx.assets)))
    return statistics.median(ends), statistics.median(servers)


def measure_small(ctx: Context, calls: int) -> tuple[float, float, float]:
    """p50s (ms) of a 1-day query, the health RPC and the query's SQL round trip, interleaved."""
    shifter = Shifter()
    stub, health = ctx.stub, ctx.health
    check = health_pb2.HealthCheckRequest()
    end_s = ONE_DAY_START_S + DAY_S
    queries, checks, trips = [], [], []
    for i in range(calls + 10):
        request = shifter.request(start_s=ONE_DAY_START_S, end_s=end_s, window="15m")
        statement = service_sql(ctx.repo, request, ctx.assets)
        query_s = timed(stub.QueryTimeSeries, request)
        check_s = timed(health.Check, check)
        trip_s = round_trip_s(ctx.conn, *statement)
        if i >= 10:  # the first calls warm connections and caches
            queries.append(query_s)
            checks.append(check_s)
            trips.append(trip_s)
    return tuple(statistics.median(times) * 1000 for times in (queries, checks, trips))


def throughput(call: Callable[[], object], threads: int, duration_s: float) -> float:
    """Calls per second that `threads` threads complete, each calling in a loop."""
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(index: int) -> None:
        start.wait()
        while not stop.is_set():
            call()
            counts[index] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(duration_s)
    stop.set()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - began)


def measure_cached(ctx: Context, settings: Settings) -> tuple[float, float]:
    """Medians (calls/s) of cached 1-day answers and of health RPCs, in alternate rounds."""
    stub, health = ctx.stub, ctx.health
    request = make_request(ONE_DAY_START_S, ONE_DAY_START_S + DAY_S, "15m")
    check = health_pb2.HealthCheckRequest()
    stub.QueryTimeSeries(request)  # now cached
    cached, checks = [], []
    for _ in range(settings.rounds):
        cached.append(
            throughput(lambda: stub.QueryTimeSeries(request), settings.threads, settings.round_s)
        )
        checks.append(throughput(lambda: health.Check(check), settings.threads, settings.round_s))
    return statistics.median(cached), statistics.median(checks)


def query_figures(ctx: Context, settings: Settings) -> dict[str, tuple]:
    """Every query figure for the dataset the service runs on."""
    figures: dict[str, tuple] = {}
    figures["P1"] = measure_long(ctx, "1m", "", settings.repeat)
    for window, timezone in P2_CASES:
        figures[f"P2 {window} {timezone}"] = measure_long(ctx, window, timezone, settings.repeat)
    figures["P3"] = measure_small(ctx, settings.calls)
    figures["P4"] = measure_cached(ctx, settings)
    return figures


def run_queries(server: str, assets: list[str], settings: Settings) -> dict[str, tuple]:
    """Load two years of `assets` with COPY, start the service on them, measure."""
    with empty_database(server, rollup_timezones=ROLLUP_TIMEZONES.split(",")) as dsn:
        started = time.perf_counter()
        copy_points(dsn, assets, start_s=START_S, count=COUNT)
        print(
            f"  loaded {len(assets) * COUNT:,} points of {len(assets)} asset(s) "
            f"in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        with (
            running_server(
                dsn, upstream_assets=",".join(assets), storage_rollup_timezones=ROLLUP_TIMEZONES
            ) as process,
            Repository(dsn=dsn, max_connections=2) as repo,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            # Ingestion fails at once (nothing listens upstream); let its retries settle.
            time.sleep(2)
            return query_figures(Context(process, repo, conn, assets), settings)


def query_rows(figures: dict[str, tuple], assets: int) -> list[Row]:
    end_ms, server_ms = figures["P1"]
    ratio = end_ms / server_ms
    rows = [
        Row(
            "P1 2y 1m",
            assets,
            f"{end_ms:.1f} ms",
            f"{server_ms:.1f} ms SQL",
            ratio,
            "<= 2x",
            ratio <= 2,
        )
    ]
    for window, timezone in P2_CASES:
        end_ms, server_ms = figures[f"P2 {window} {timezone}"]
        rows.append(
            Row(
                f"P2 2y {window} {timezone}",
                assets,
                f"{end_ms:.1f} ms",
                "3 ms",
                end_ms / 3,
                "<= 1x",
                end_ms <= 3,
                f"SQL {server_ms:.1f} ms",
            )
        )
    query_ms, check_ms, trip_ms = figures["P3"]
    ratio = query_ms / (check_ms + trip_ms)
    rows.append(
        Row(
            "P3 1d p50",
            assets,
            f"{query_ms:.2f} ms",
            f"{check_ms:.2f}+{trip_ms:.2f} ms",
            ratio,
            "<= 1.5x",
            ratio <= 1.5,
            "health + SQL",
        )
    )
    cached, checks = figures["P4"]
    ratio = cached / checks
    rows.append(
        Row(
            "P4 cached x16",
            assets,
            f"{cached:,.0f}/s",
            f"{checks:,.0f}/s health",
            ratio,
            ">= 0.9x",
            ratio >= 0.9,
        )
    )
    return rows


def growth_rows(one: dict[str, tuple], many: dict[str, tuple], assets: int) -> list[Row]:
    """Each query figure at `assets` assets against one asset (slower: above 1)."""
    rows = []
    for name in one:
        # P4 is a throughput, the others times: above 1 is slower either way.
        ratio = one[name][0] / many[name][0] if name == "P4" else many[name][0] / one[name][0]
        unit = "/s" if name == "P4" else "ms"
        rows.append(
            Row(
                f"growth {name}",
                assets,
                f"{many[name][0]:,.1f} {unit}",
                f"{one[name][0]:,.1f} {unit}",
                ratio,
                "<= 1.2x",
                ratio <= 1.2,
                "vs 1 asset",
            )
        )
    return rows


# --- P5 ---------------------------------------------------------------------------------------


def bootstrap_rate(
    server: str, assets: list[str], timeout_s: float, *, rollups: bool = True
) -> tuple[int, float, float]:
    """(points, seconds from the service's start until every asset is covered, to SERVING).

    The end is when every asset has a successful run in the assets table, confirmed by
    ListAssets showing each covered: ListAssets counts every stored point, so polling it
    every 50 ms would load the database being measured (at 10 assets, most of a core).
    """
    with empty_database(server) as dsn, Simulator() as upstream:
        if not rollups:
            # The reference for the rollups' upkeep: the same bootstrap with none kept.
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(NO_ROLLUP_UPKEEP)
        started = time.perf_counter()
        with (
            running_server(
                dsn,
                upstream_url=upstream.url_template,
                upstream_assets=",".join(assets),
                storage_rollup_timezones=ROLLUP_TIMEZONES,
                logging_level="warning",
            ) as process,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            serving_s = time.perf_counter() - started
            stub = edgecom.services.TimeSeriesServiceStub(process.channel)
            while time.perf_counter() < started + timeout_s:
                if synced(conn) == len(assets):
                    elapsed_s = time.perf_counter() - started
                    answer = stub.ListAssets(edgecom.protos.ListAssetsRequest())
                    if all(info.coverage >= 0.9999 for info in answer.assets):
                        points = sum(info.point_count for info in answer.assets)
                        return points, elapsed_s, serving_s
                time.sleep(0.05)
            raise RuntimeError(f"the bootstrap did not finish within {timeout_s:.0f} s")


def synced(conn: psycopg.Connection) -> int:
    """How many assets have had a successful ingestion run."""
    return conn.execute("SELECT count(*) FROM assets WHERE last_success IS NOT NULL").fetchone()[0]


def two_years(assets: list[str]) -> tuple[dict[str, list[tuple[int, float]]], tuple[int, int]]:
    """The points the simulator serves for two years up to now, per asset, and that range."""
    now_s = int(time.time())
    covered = (now_s - 730 * DAY_S, now_s)
    upstream = Simulator()
    return {asset: upstream.points(asset, *covered) for asset in assets}, covered


def upsert_rate(server: str, assets: list[str]) -> float:
    """Points/s of Repository.upsert_points given two years of an asset per call."""
    series, covered = two_years(assets)
    with empty_database(server) as dsn, Repository(dsn=dsn) as repo:
        started = time.perf_counter()
        for asset, points in series.items():
            repo.upsert_points(asset, points, covered=covered)
        return sum(map(len, series.values())) / (time.perf_counter() - started)


def copy_upsert_rate(server: str, assets: list[str]) -> float:
    """Points/s of the database alone: a COPY of two years of an asset into a temp table and
    the repository's upsert from it, a transaction per asset, the rows' text made beforehand."""
    series, _ = two_years(assets)
    texts = {
        asset: "".join(
            f"{datetime.fromtimestamp(t, UTC).isoformat()}\t{value!r}\n" for t, value in points
        )
        for asset, points in series.items()
    }
    with empty_database(server) as dsn, psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for asset, text in texts.items():
            with conn.transaction():
                conn.execute(
                    "CREATE TEMP TABLE incoming (time timestamptz NOT NULL,"
                    " value double precision NOT NULL) ON COMMIT DROP"
                )
                with conn.cursor().copy("COPY incoming (time, value) FROM STDIN") as copy:
                    copy.write(text)
                conn.execute(COPY_UPSERT, {"asset_id": asset})
        return sum(map(len, series.values())) / (time.perf_counter() - started)


def ingest_row(server: str, assets: list[str], timeout_s: float) -> list[Row]:
    """P5 and the rollups' upkeep: bootstraps with and without rollups, alternated."""
    kept, without = [], []
    for _ in range(2):
        kept.append(bootstrap_rate(server, assets, timeout_s))
        without.append(bootstrap_rate(server, assets, timeout_s, rollups=False))
    points, elapsed_s, serving_s = min(kept, key=lambda run: run[1])
    plain_s = min(run[1] for run in without)
    reference = copy_upsert_rate(server, assets)
    in_python = upsert_rate(server, assets)
    rate = points / elapsed_s
    upkeep = 1 - plain_s / elapsed_s
    return [
        Row(
            "P5 bootstrap",
            len(assets),
            f"{rate:,.0f} pt/s",
            f"{reference:,.0f} pt/s COPY+upsert",
            rate / 150_000,
            ">= 1x 150k",
            rate >= 150_000,
            f"{points:,} pts in {elapsed_s:.1f} s (SERVING at {serving_s:.1f} s);"
            f" {rate / reference:.2f}x COPY+upsert; upsert_points {in_python:,.0f} pt/s",
        ),
        Row(
            "P5 rollup upkeep",
            len(assets),
            f"{upkeep:.0%} of the time",
            f"{points / plain_s:,.0f} pt/s without",
            upkeep / 0.2,
            "<= 20 %",
            upkeep <= 0.2,
            "best of 2 bootstraps each, alternated",
        ),
    ]


# --- output ------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    header = ("figure", "assets", "measured", "reference", "ratio", "target", "", "note")
    cells = [
        (
            r.figure,
            str(r.assets),
            r.measured,
            r.reference,
            f"{r.ratio:.2f}",
            r.target,
            "PASS" if r.passed else "MISS",
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    for line in [header, *cells]:
        cells_padded = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells_padded).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL server to use (default: embedded)")
    parser.add_argument("--assets", type=int, help="assets of the larger query dataset")
    parser.add_argument("--p5-assets", type=int, help="assets bootstrapped for P5")
    parser.add_argument("--quick", action="store_true", help="fewer assets, calls and rounds")
    parser.add_argument("--skip-bootstrap", action="store_true", help="leave P5 out")
    parser.add_argument("--only-bootstrap", action="store_true", help="measure P5 alone")
    args = parser.parse_args()
    quick = args.quick
    assets = args.assets or (10 if quick else 100)
    p5_assets = args.p5_assets or (2 if quick else assets)
    settings = Settings(
        repeat=5 if quick else 9,
        calls=200 if quick else 1000,
        rounds=3 if quick else 7,
        round_s=0.5 if quick else 1.0,
        threads=16,
    )
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    rows = []
    with server_dsn(args.dsn) as server:
        if not args.only_bootstrap:
            print("1 asset:", flush=True)
            one = run_queries(server, asset_ids(1), settings)
            print(f"{assets} assets:", flush=True)
            many = run_queries(server, asset_ids(assets), settings)
            rows += [*query_rows(one, 1), *query_rows(many, assets)]
            rows += growth_rows(one, many, assets)
        if not args.skip_bootstrap:
            print(f"P5: bootstrap of {p5_assets} asset(s):", flush=True)
            rows += ingest_row(server, asset_ids(p5_assets), timeout_s=600)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    print_table(rows)


if __name__ == "__main__":
    main()
