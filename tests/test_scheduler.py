"""Ingestor and Scheduler against the simulator over real HTTP and a real PostgreSQL."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from conftest import ASSET, OTHER_ASSET, query_buckets, wait_for
from psycopg.conninfo import conninfo_to_dict

from api_client import ApiClient
from repository import DatabaseUnavailable, Repository
from scheduler import (
    MAX_CONSECUTIVE_FAILURES,
    STEP_S,
    Ingestor,
    Progress,
    Scheduler,
    plan_batches,
    plan_chunks,
)
from simulator import Faults, Simulator

DAY = 86_400
HOUR = 3_600
# 2024-01-10T12:07:30Z: deliberately between two quarter hours, so the newest chunk ends
# between points and the next point is still in the future.
NOW = 1_704_888_450
THIRD_ASSET = "9d1c2f0e-5a4b-4c3d-8e7f-6a5b4c3d2e1f"
# Tiny backoff; a timeout generous enough that a loaded machine never causes retries, for
# tests that count requests.
FAST = {"backoff_initial_s": 0.001, "backoff_max_s": 0.01, "timeout_s": 10.0}


class Clock:
    """A settable clock shared by the simulator and the ingestor."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """An IngestObserver that keeps everything it hears; called from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.chunks: list[tuple[str, int, int]] = []
        self.synced: list[tuple[str, bool, float | None]] = []
        self.progress_reports: list[Progress] = []

    def chunk_stored(self, asset_id: str, points: int, skipped: int) -> None:
        with self._lock:
            self.chunks.append((asset_id, points, skipped))

    def asset_synced(self, asset_id: str, *, ok: bool, coverage: float | None) -> None:
        with self._lock:
            self.synced.append((asset_id, ok, coverage))

    def progress(self, progress: Progress) -> None:
        with self._lock:
            self.progress_reports.append(progress)

    def skipped(self, asset_id: str) -> int:
        with self._lock:
            return sum(skipped for asset, _, skipped in self.chunks if asset == asset_id)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def sim(clock: Clock) -> Iterator[Simulator]:
    with Simulator(seed=11, now=clock) as simulator:
        yield simulator


@pytest.fixture
def make_client(sim: Simulator) -> Iterator[Callable[..., ApiClient]]:
    """Builds clients for the simulator with tiny backoff and closes them after the test."""
    clients: list[ApiClient] = []

    def make(**options: Any) -> ApiClient:
        client = ApiClient(url_template=sim.url_template, **{**FAST, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def make_ingestor(
    make_client: Callable[..., ApiClient], repository: Repository, clock: Clock
) -> Callable[..., Ingestor]:
    """Builds ingestors on the test's repository and clock; keyword arguments override."""

    def make(**options: Any) -> Ingestor:
        settings: dict[str, Any] = {
            "client": options.pop("client", None) or make_client(),
            "repository": repository,
            "assets": (ASSET, OTHER_ASSET),
            "bootstrap_s": 3 * DAY,
            "chunk_s": DAY,
            "concurrency": 4,
            "overlap_s": HOUR,
            "clock": clock,
        }
        return Ingestor(**{**settings, **options})

    return make


def stored(dsn: str, asset_id: str) -> list[tuple[int, float]]:
    """Every stored point of one asset, oldest first, read straight from the table."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT extract(epoch FROM time)::bigint, value FROM points"
            " WHERE asset_id = %s ORDER BY time",
            (asset_id,),
        ).fetchall()


def covered(dsn: str, asset_id: str) -> list[tuple[int, int]]:
    """The asset's covered ranges as [start, end) Unix seconds, oldest first."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT extract(epoch FROM lower(r))::bigint, extract(epoch FROM upper(r))::bigint"
            " FROM assets, unnest(covered) AS r WHERE asset_id = %s ORDER BY lower(r)",
            (asset_id,),
        ).fetchall()


def coverage(repository: Repository, ingestor: Ingestor, asset_id: str) -> float:
    start, end = ingestor.window()
    return repository.asset_status([asset_id], start_s=start, end_s=end)[0].coverage


def fetched(sim: Simulator, asset_id: str) -> list[tuple[int, int]]:
    """The [start, end) ranges of the successful requests for one asset, in arrival order."""
    return [
        (r.start_s, r.end_s)
        for r in sim.requests
        if r.asset_id == asset_id and r.status == 200 and r.start_s is not None
    ]


# -- planning --------------------------------------------------------------------------------


def test_window_starts_on_a_quarter_hour_and_ends_now(make_ingestor, clock):
    ingestor = make_ingestor(bootstrap_s=3 * DAY)
    start, end = ingestor.window()
    assert end == NOW
    assert start % STEP_S == 0
    assert NOW - 3 * DAY - STEP_S < start <= NOW - 3 * DAY
    clock.advance(0.9)  # fractions of a second never make a range end between seconds
    assert ingestor.window() == (start, NOW)


@pytest.mark.parametrize(
    ("gaps", "chunk_s", "expected"),
    [
        ([], 100, []),
        ([(0, 250)], 100, [(150, 250), (50, 150), (0, 50)]),
        ([(0, 200)], 100, [(100, 200), (0, 100)]),
        ([(0, 50), (300, 420)], 100, [(320, 420), (300, 320), (0, 50)]),
        ([(300, 420), (0, 50)], 1000, [(300, 420), (0, 50)]),
    ],
)
def test_plan_chunks_splits_gaps_newest_first(gaps, chunk_s, expected):
    chunks = plan_chunks(gaps, chunk_s=chunk_s)
    assert chunks == expected
    assert all(end - start <= chunk_s for start, end in chunks)
    # An exact partition: sorted, the chunks tile the gaps with neither holes nor overlaps.
    tiles = sorted(chunks)
    for gap_start, gap_end in sorted(gaps):
        position = gap_start
        while position < gap_end:
            start, end = tiles.pop(0)
            assert start == position
            position = end
        assert position == gap_end
    assert tiles == []


@pytest.mark.parametrize(
    ("chunks", "span_s", "workers", "expected"),
    [
        ([], 300, 1, []),
        # Newest first, as planned: the newest alone, then runs of adjacent chunks up to
        # the span.
        (
            [(400, 500), (300, 400), (200, 300), (100, 200), (50, 100), (0, 50)],
            300,
            1,
            [[(400, 500)], [(300, 400), (200, 300), (100, 200)], [(50, 100), (0, 50)]],
        ),
        # A gap ends a batch.
        ([(500, 600), (300, 400), (100, 200)], 1000, 1, [[(500, 600)], [(300, 400)], [(100, 200)]]),
        # Spread over the workers, though a batch could hold them all.
        (
            [(400, 500), (300, 400), (200, 300), (100, 200), (0, 100)],
            1000,
            2,
            [[(400, 500)], [(300, 400), (200, 300), (100, 200)], [(0, 100)]],
        ),
        # A chunk longer than the span is a batch of its own.
        ([(400, 600), (200, 400), (0, 200)], 100, 1, [[(400, 600)], [(200, 400)], [(0, 200)]]),
    ],
)
def test_plan_batches_groups_adjacent_chunks(chunks, span_s, workers, expected):
    assert plan_batches(chunks, span_s=span_s, workers=workers) == expected


def test_a_failed_chunk_leaves_the_rest_of_its_batch_to_be_stored(
    make_ingestor, make_client, sim, dsn
):
    answered = itertools.count(1)

    def fail_the_third(asset_id: str, outcome: str, duration_s: float) -> None:
        # Only the third request meets the outage, and it is not retried.
        sim.faults.outage = next(answered) == 2

    ingestor = make_ingestor(
        client=make_client(on_request=fail_the_third, max_attempts=1),
        assets=(ASSET,),
        bootstrap_s=10 * DAY,
        concurrency=1,
    )
    start, end = ingestor.window()
    ingestor.run_once()
    ranges = fetched(sim, ASSET)
    assert len(sim.requests) == 11 and len(ranges) == 10
    assert sim.requests[2].status == 503
    # Newest first: the third chunk lies between the second and the third fetched.
    hole = (ranges[2][1], ranges[1][0])
    assert hole[1] - hole[0] == DAY
    assert covered(dsn, ASSET) == [(start, hole[0]), (hole[1], end)]
    assert stored(dsn, ASSET) == [
        point for point in sim.points(ASSET, start, end) if not hole[0] <= point[0] < hole[1]
    ]


def test_chunks_are_requested_newest_first(make_ingestor, sim):
    make_ingestor(assets=(ASSET,), concurrency=1, bootstrap_s=5 * DAY).run_once()
    ranges = fetched(sim, ASSET)
    assert len(ranges) == 6
    assert ranges[0][1] == NOW
    assert [end for _, end in ranges] == sorted((end for _, end in ranges), reverse=True)
    # Adjacent: each chunk ends where the one before it started.
    assert all(older[1] == newer[0] for newer, older in itertools.pairwise(ranges))


def test_chunk_ending_now_stores_what_exists_and_the_next_run_adds_the_rest(
    make_ingestor, sim, clock, dsn
):
    ingestor = make_ingestor(assets=(ASSET,), bootstrap_s=DAY)
    start, _ = ingestor.window()
    ingestor.run_once()
    assert stored(dsn, ASSET)[-1][0] == NOW // STEP_S * STEP_S  # 12:00, not 12:15
    assert max(end for _, end in fetched(sim, ASSET)) == NOW
    clock.advance(10 * 60)  # 12:17:30: the 12:15 point exists now
    ingestor.run_once()
    assert stored(dsn, ASSET) == sim.points(ASSET, start, int(clock()))
    assert stored(dsn, ASSET)[-1][0] == NOW // STEP_S * STEP_S + STEP_S


# -- bootstrap -------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_year_bootstrap_stores_exactly_the_upstream_series(make_ingestor, sim, repository, dsn):
    recorder = Recorder()
    ingestor = make_ingestor(bootstrap_s=730 * DAY, chunk_s=7 * DAY, observer=recorder)
    start, end = ingestor.window()
    ingestor.run_once()
    for asset_id in (ASSET, OTHER_ASSET):
        truth = sim.points(asset_id, start, end)
        assert len(truth) == 730 * 96 + 1  # the step-aligned start adds 12:00 two years ago
        assert stored(dsn, asset_id) == truth
        assert covered(dsn, asset_id) == [(start, end)]
        assert coverage(repository, ingestor, asset_id) == 1.0
        # Each range was asked for once: the overlap is part of the newest chunk here.
        ranges = fetched(sim, asset_id)
        assert sorted(ranges) == sorted(plan_chunks([(start, end)], chunk_s=7 * DAY))
        status = repository.asset_status([asset_id], start_s=start, end_s=end)[0]
        assert status.last_error is None and status.last_success_s is not None
    assert sorted(recorder.synced) == sorted([(ASSET, True, 1.0), (OTHER_ASSET, True, 1.0)])
    # The bucketed query the service answers from sees the same series.
    buckets = query_buckets(
        repository,
        asset_id=ASSET,
        start_s=start,
        end_s=end,
        window_s=STEP_S,
        aggregation="SUM",
        limit=1_000_000,
    )
    assert buckets == sim.points(ASSET, start, end)


@pytest.mark.slow
def test_bootstrap_under_faults_is_exact_within_a_few_runs(
    make_ingestor, make_client, sim, repository, dsn
):
    sim.faults = Faults(
        error_rate=0.2,
        error_statuses=(500, 503, 429),
        retry_after_s=0,
        slow_rate=0.02,
        slow_s=1.0,
        garbage_rate=0.1,
        bad_item_rate=0.0005,
    )
    recorder = Recorder()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def count_outcome(asset_id: str, outcome: str, duration_s: float) -> None:
        with lock:
            outcomes[outcome] += 1

    ingestor = make_ingestor(
        # The slow answers time out.
        client=make_client(timeout_s=0.5, on_request=count_outcome),
        bootstrap_s=730 * DAY,
        chunk_s=7 * DAY,
        observer=recorder,
    )
    start, end = ingestor.window()
    runs = 0
    while runs < 4 and any(coverage(repository, ingestor, a) < 1.0 for a in (ASSET, OTHER_ASSET)):
        ingestor.run_once()
        runs += 1
    # Every kind of fault was met, and got past.
    assert {"ok", "http_5xx", "rate_limited", "timeout", "bad_response"} <= set(outcomes)
    for asset_id in (ASSET, OTHER_ASSET):
        assert coverage(repository, ingestor, asset_id) == 1.0, f"after {runs} runs"
        truth = dict(sim.points(asset_id, start, end))
        rows = dict(stored(dsn, asset_id))
        # Nothing invented and every stored value exact; the only points missing are items
        # the upstream sent broken, and the observer heard of every one of those.
        assert rows.items() <= truth.items()
        missing = truth.keys() - rows.keys()
        assert len(missing) <= recorder.skipped(asset_id)
    assert recorder.skipped(ASSET) + recorder.skipped(OTHER_ASSET) > 0


# -- restart, revisions, outages ---------------------------------------------------------------


def test_restart_fetches_only_the_overlap(make_client, sim, clock, dsn):
    def ingestor_on(repository: Repository) -> Ingestor:
        return Ingestor(
            client=make_client(),
            repository=repository,
            assets=(ASSET, OTHER_ASSET),
            bootstrap_s=30 * DAY,
            chunk_s=7 * DAY,
            concurrency=4,
            overlap_s=HOUR,
            clock=clock,
        )

    with Repository(dsn=dsn) as first:
        first.migrate()
        ingestor = ingestor_on(first)
        start, _ = ingestor.window()
        ingestor.run_once()
    sim.reset_counts()
    clock.advance(5 * 60)
    with Repository(dsn=dsn) as second:
        restarted = ingestor_on(second)
        restarted.run_once()
        now = int(clock())
        assert sorted((r.asset_id, r.start_s, r.end_s) for r in sim.requests) == sorted(
            [(ASSET, now - HOUR, now), (OTHER_ASSET, now - HOUR, now)]
        )
        for asset_id in (ASSET, OTHER_ASSET):
            assert stored(dsn, asset_id) == sim.points(asset_id, start, now)
            assert coverage(second, restarted, asset_id) == 1.0


def test_revision_inside_the_overlap_wins_and_outside_is_untouched(make_ingestor, sim, clock, dsn):
    ingestor = make_ingestor(assets=(ASSET,), bootstrap_s=2 * DAY)
    start, _ = ingestor.window()
    ingestor.run_once()
    before = dict(stored(dsn, ASSET))
    clock.advance(5 * 60)
    recent = NOW // STEP_S * STEP_S - STEP_S  # 11:45, inside the last hour
    old = recent - 6 * HOUR  # covered long ago, outside the overlap
    sim.revise(ASSET, recent, 1234.5)
    sim.revise(ASSET, old, 6789.0)
    ingestor.run_once()
    after = dict(stored(dsn, ASSET))
    assert after[recent] == 1234.5
    assert after[old] == before[old] != 6789.0
    assert len(after) == len(sim.points(ASSET, start, int(clock())))
    assert {t: v for t, v in after.items() if t not in (recent, old)} == {
        t: v for t, v in sim.points(ASSET, start, int(clock())) if t not in (recent, old)
    }


def test_upstream_outage_of_hours_is_filled_after_recovery(
    make_ingestor, sim, clock, repository, dsn
):
    recorder = Recorder()
    ingestor = make_ingestor(bootstrap_s=2 * DAY, observer=recorder)
    start, _ = ingestor.window()
    ingestor.run_once()
    sim.faults.outage = True
    for _ in range(12):  # three hours of polls every 15 minutes
        clock.advance(STEP_S)
        ingestor.run_once()
    assert recorder.synced[-1][1] is False
    for asset_id in (ASSET, OTHER_ASSET):
        assert coverage(repository, ingestor, asset_id) < 1.0
        status = repository.asset_status([asset_id], start_s=start, end_s=int(clock()))[0]
        assert "503" in status.last_error
    sim.faults.outage = False
    clock.advance(STEP_S)
    ingestor.run_once()
    for asset_id in (ASSET, OTHER_ASSET):
        assert coverage(repository, ingestor, asset_id) == 1.0
        assert stored(dsn, asset_id) == sim.points(asset_id, start, int(clock()))
        window_start, window_end = ingestor.window()
        status = repository.asset_status([asset_id], start_s=window_start, end_s=window_end)[0]
        assert status.last_error is None


@pytest.mark.fresh_database
def test_database_outage_is_filled_after_recovery(make_client, sim, clock, dsn, server_dsn):
    name = conninfo_to_dict(dsn)["dbname"]

    def allow_connections(allowed: bool) -> None:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            if not allowed:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    recorder = Recorder()
    with Repository(dsn=dsn, connect_timeout_s=1) as repository:
        repository.migrate()
        ingestor = Ingestor(
            client=make_client(),
            repository=repository,
            assets=(ASSET, OTHER_ASSET),
            bootstrap_s=2 * DAY,
            chunk_s=DAY,
            concurrency=2,
            overlap_s=HOUR,
            observer=recorder,
            clock=clock,
        )
        start, _ = ingestor.window()
        ingestor.run_once()
        try:
            allow_connections(False)
            for _ in range(3):
                clock.advance(HOUR)
                ingestor.run_once()  # logs and returns; never raises
        finally:
            allow_connections(True)
        assert len(recorder.synced) == 2  # only the run before the outage got that far
        clock.advance(STEP_S)

        def caught_up() -> bool:
            # Caught up means a run that got through for both assets, not merely a coverage
            # of 1.0: until such a run is recorded, coverage reads as of the last good one.
            before = len(recorder.synced)
            ingestor.run_once()
            if [ok for _, ok, _ in recorder.synced[before:]] != [True, True]:
                return False
            try:
                return all(coverage(repository, ingestor, a) == 1.0 for a in (ASSET, OTHER_ASSET))
            except DatabaseUnavailable:
                return False

        # The pool reconnects in the background with its own backoff; the first runs after
        # the outage may still find no connection.
        assert wait_for(caught_up, timeout_s=30)
        for asset_id in (ASSET, OTHER_ASSET):
            assert stored(dsn, asset_id) == sim.points(asset_id, start, int(clock()))


# -- several replicas ------------------------------------------------------------------------


def test_two_replicas_at_once_fetch_each_range_once(make_client, sim, clock, dsn):
    assets = (ASSET, OTHER_ASSET, THIRD_ASSET)
    with Repository(dsn=dsn) as setup:
        setup.migrate()
    barrier = threading.Barrier(2)
    replicas: list[Repository] = []
    ingestors: list[Ingestor] = []
    for _ in range(2):
        repository = Repository(dsn=dsn, max_connections=4).open(wait=True)
        replicas.append(repository)
        ingestors.append(
            Ingestor(
                client=make_client(),
                repository=repository,
                assets=assets,
                bootstrap_s=180 * DAY,
                chunk_s=7 * DAY,
                concurrency=2,
                overlap_s=HOUR,
                clock=clock,
            )
        )

    def replica(ingestor: Ingestor) -> None:
        barrier.wait()
        ingestor.run_once()

    threads = [threading.Thread(target=replica, args=(i,)) for i in ingestors]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()
        # Both replicas are done: anything still uncovered is left to the next round.
        for ingestor in ingestors:
            ingestor.run_once()
    finally:
        for repository in replicas:
            repository.close()
    start, end = ingestors[0].window()
    for asset_id in assets:
        assert stored(dsn, asset_id) == sim.points(asset_id, start, end)
        # Every quarter hour older than the overlap was asked for exactly once; the last hour
        # is re-fetched on purpose by every run that syncs the asset.
        asked = Counter(
            t
            for lower, upper in fetched(sim, asset_id)
            for t in range(-(-lower // STEP_S) * STEP_S, upper, STEP_S)
        )
        old = [t for t, _ in sim.points(asset_id, start, end - HOUR)]
        assert {t: asked[t] for t in old} == dict.fromkeys(old, 1)


def test_asset_locked_by_another_replica_is_skipped_this_round(make_ingestor, sim, repository, dsn):
    recorder = Recorder()
    ingestor = make_ingestor(observer=recorder)
    with Repository(dsn=dsn) as other, other.asset_lock(ASSET) as acquired:
        assert acquired
        ingestor.run_once()
    assert {r.asset_id for r in sim.requests} == {OTHER_ASSET}
    assert [asset for asset, _, _ in recorder.synced] == [OTHER_ASSET]
    ingestor.run_once()  # the next round takes it
    assert coverage(repository, ingestor, ASSET) == 1.0


# -- bad answers -----------------------------------------------------------------------------


def test_bad_items_are_skipped_and_counted(make_ingestor, sim, dsn):
    sim.faults.bad_item_rate = 0.01
    recorder = Recorder()
    ingestor = make_ingestor(assets=(ASSET,), bootstrap_s=20 * DAY, observer=recorder)
    start, end = ingestor.window()
    ingestor.run_once()
    truth = dict(sim.points(ASSET, start, end))
    rows = dict(stored(dsn, ASSET))
    assert rows.items() <= truth.items()
    # One request per range here, so every broken item is exactly one missing point.
    assert len(truth) - len(rows) == recorder.skipped(ASSET) > 0


def test_unknown_asset_fails_alone(make_ingestor, sim, repository, dsn):
    sim.faults.not_found_assets = {ASSET}
    recorder = Recorder()
    ingestor = make_ingestor(bootstrap_s=30 * DAY, observer=recorder)
    start, end = ingestor.window()
    ingestor.run_once()
    statuses = repository.asset_status([ASSET, OTHER_ASSET], start_s=start, end_s=end)
    missing, present = sorted(statuses, key=lambda status: status.asset_id != ASSET)
    assert "404" in missing.last_error and missing.last_success_s is None
    assert missing.coverage == 0.0 and missing.points == 0
    assert present.last_error is None and present.coverage == 1.0
    assert stored(dsn, OTHER_ASSET) == sim.points(OTHER_ASSET, start, end)
    assert sorted(recorder.synced) == sorted([(ASSET, False, 0.0), (OTHER_ASSET, True, 1.0)])
    # A 404 is not retried, and the run gives up on the asset after a few failed chunks.
    not_found = [r for r in sim.requests if r.asset_id == ASSET]
    assert len(not_found) <= MAX_CONSECUTIVE_FAILURES + 4 - 1


def test_points_outside_the_requested_range_are_skipped(repository, clock, dsn):
    """Points the upstream sends outside the range asked for are not stored; the range is
    still covered."""
    elsewhere = [(NOW // STEP_S * STEP_S - 400 * DAY, 42.0), (NOW // STEP_S * STEP_S + DAY, 7.5)]
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_FixedAnswer, points=elsewhere))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    template = f"http://127.0.0.1:{server.server_address[1]}/core/asset/{{asset_id}}/series"
    try:
        with ApiClient(url_template=template, **FAST) as client:
            ingestor = Ingestor(
                client=client,
                repository=repository,
                assets=(ASSET,),
                bootstrap_s=DAY,
                chunk_s=DAY,
                concurrency=2,
                overlap_s=HOUR,
                clock=clock,
            )
            ingestor.run_once()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert stored(dsn, ASSET) == []
    assert coverage(repository, ingestor, ASSET) == 1.0


class _FixedAnswer(BaseHTTPRequestHandler):
    """Answers every request with the same points, whatever range it asks for."""

    def __init__(self, *args: Any, points: list[tuple[int, float]], **kwargs: Any) -> None:
        self._points = points
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        body = json.dumps({"result": [{"time": t, "value": v} for t, v in self._points]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Raising(Recorder):
    def chunk_stored(self, asset_id: str, points: int, skipped: int) -> None:
        raise RuntimeError("metrics backend down")

    def asset_synced(self, asset_id: str, *, ok: bool, coverage: float | None) -> None:
        raise RuntimeError("metrics backend down")

    def progress(self, progress: Progress) -> None:
        raise RuntimeError("terminal gone")


def test_a_failing_observer_never_breaks_ingestion(make_ingestor, sim, repository, dsn):
    ingestor = make_ingestor(observer=_Raising(), progress_interval_s=0)
    start, end = ingestor.window()
    ingestor.run_once()
    for asset_id in (ASSET, OTHER_ASSET):
        assert stored(dsn, asset_id) == sim.points(asset_id, start, end)
        status = repository.asset_status([asset_id], start_s=start, end_s=end)[0]
        assert status.coverage == 1.0 and status.last_error is None


def test_an_empty_window_is_fully_covered(make_ingestor, clock):
    clock.now = NOW // STEP_S * STEP_S
    recorder = Recorder()
    make_ingestor(bootstrap_s=0, overlap_s=0, observer=recorder).run_once()
    assert sorted(recorder.synced) == sorted([(ASSET, True, 1.0), (OTHER_ASSET, True, 1.0)])


def most_at_once(spans: list[tuple[str, float, float]]) -> int:
    """The largest number of (label, start, end) spans that overlap at any moment."""
    # At equal times an end sorts before a start: touching spans do not overlap.
    events = sorted([(start, 1) for _, start, _ in spans] + [(end, -1) for _, _, end in spans])
    return max(itertools.accumulate(change for _, change in events), default=0)


def test_assets_sync_side_by_side_within_one_bound_on_requests(
    make_ingestor, make_client, sim, dsn
):
    sim.faults.slow_rate, sim.faults.slow_s = 1.0, 0.1
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def record(asset_id: str, outcome: str, duration_s: float) -> None:
        now = time.monotonic()
        with lock:
            spans.append((asset_id, now - duration_s, now))

    assets = (ASSET, OTHER_ASSET, THIRD_ASSET)
    ingestor = make_ingestor(
        client=make_client(on_request=record), assets=assets, bootstrap_s=10 * DAY, concurrency=4
    )
    start, end = ingestor.window()
    ingestor.run_once()
    for asset_id in assets:
        assert stored(dsn, asset_id) == sim.points(asset_id, start, end)
    assert len(spans) == 3 * 11
    assert most_at_once(spans) <= 4
    # Side by side: requests for different assets were in flight at the same time.
    assert any(
        a != b and a_start < b_end and b_start < a_end
        for (a, a_start, a_end), (b, b_start, b_end) in itertools.combinations(spans, 2)
    )


class _HangsForOneAsset(BaseHTTPRequestHandler):
    """Sends the headers of an answer for `stuck` and then nothing; relays the rest to `sim`."""

    def __init__(
        self,
        *args: Any,
        stuck: str,
        sim: Simulator,
        release: threading.Event,
        hung: threading.Event,
        **kwargs: Any,
    ) -> None:
        self._stuck = stuck
        self._sim = sim
        self._release = release
        self._hung = hung
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        if f"/{self._stuck}/" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            self._hung.set()
            self._release.wait(60)
            return
        relayed = self._sim.url_template.split("/core/")[0] + self.path
        with urllib.request.urlopen(relayed, timeout=10) as answer:
            body = answer.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hung() -> threading.Event:
    """Set once the hanging upstream holds a request it will not finish answering."""
    return threading.Event()


@pytest.fixture
def hanging_upstream(sim: Simulator, hung: threading.Event) -> Iterator[str]:
    """URL template of an upstream that never finishes answering for THIRD_ASSET."""
    release = threading.Event()
    handler = partial(_HangsForOneAsset, stuck=THIRD_ASSET, sim=sim, release=release, hung=hung)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/core/asset/{{asset_id}}/series"
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def stuck_first(client: ApiClient, repository: Repository, clock: Clock) -> Ingestor:
    """An ingestor of three assets, the first of which the hanging upstream never answers."""
    return Ingestor(
        client=client,
        repository=repository,
        assets=(THIRD_ASSET, ASSET, OTHER_ASSET),
        bootstrap_s=DAY,
        chunk_s=DAY,
        concurrency=4,
        overlap_s=HOUR,
        clock=clock,
    )


def test_a_hanging_answer_for_one_asset_holds_up_no_other(
    hanging_upstream, sim, repository, clock, dsn, caplog
):
    # Each attempt for the stuck asset ends after a second, and it takes three to give up.
    with ApiClient(
        url_template=hanging_upstream,
        timeout_s=1.0,
        max_attempts=3,
        backoff_initial_s=0.001,
        backoff_max_s=0.01,
    ) as client:
        ingestor = stuck_first(client, repository, clock)
        start, end = ingestor.window()
        run = threading.Thread(target=ingestor.run_once, name="test-hanging-run")
        with caplog.at_level(logging.WARNING, logger="scheduler"):
            run.start()
            assert wait_for(
                lambda: all(coverage(repository, ingestor, a) == 1.0 for a in (ASSET, OTHER_ASSET)),
                timeout_s=20,
            )
            # The others are complete while the stuck asset is still waiting on its upstream.
            stuck = repository.asset_status([THIRD_ASSET], start_s=start, end_s=end)[0]
            assert stuck.last_error is None and run.is_alive()
            run.join(30)
        assert not run.is_alive()
    for asset_id in (ASSET, OTHER_ASSET):
        assert stored(dsn, asset_id) == sim.points(asset_id, start, end)
    stuck = repository.asset_status([THIRD_ASSET], start_s=start, end_s=end)[0]
    assert stuck.coverage == 0.0 and stuck.last_success_s is None
    assert "timed out after" in stuck.last_error and THIRD_ASSET in stuck.last_error
    warnings = [r for r in caplog.records if getattr(r, "asset_id", None) == THIRD_ASSET]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    timed_out = [r for r in warnings if r.getMessage() == "upstream fetch timed out"]
    assert timed_out and all(r.start and r.end and not r.exc_info for r in timed_out)


def test_the_scheduler_stops_soon_while_an_upstream_answer_hangs(
    hanging_upstream, repository, clock
):
    shutdown = threading.Event()
    with ApiClient(
        url_template=hanging_upstream,
        timeout_s=1.0,
        backoff_initial_s=0.001,
        backoff_max_s=0.01,
        stop=shutdown,
    ) as client:
        ingestor = stuck_first(client, repository, clock)
        scheduler = Scheduler(ingestor.run_once, interval_s=0.2, name="test-hanging").start()
        try:
            assert wait_for(
                lambda: all(coverage(repository, ingestor, a) == 1.0 for a in (ASSET, OTHER_ASSET)),
                timeout_s=20,
            )
        finally:
            # As the service shuts down: the client stops retrying, then the scheduler joins.
            shutdown.set()
            stopping = time.monotonic()
            scheduler.close(timeout_s=10)
    # The attempt in flight ended at its timeout, and none started after.
    assert time.monotonic() - stopping < 1.0 + 1.0
    assert not _thread_alive("test-hanging")


def test_a_stuck_asset_does_not_delay_the_next_poll_of_the_others(
    hanging_upstream, sim, repository, clock, dsn, caplog
):
    shutdown = threading.Event()
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def record(asset_id: str, outcome: str, duration_s: float) -> None:
        now = time.monotonic()
        with lock:
            spans.append((asset_id, now - duration_s, now))

    # Every attempt for the stuck asset hangs until its 1 s timeout and it gets twenty, so
    # its sync lasts far longer than the poll interval; concurrency 2 gives each asset one.
    with ApiClient(
        url_template=hanging_upstream,
        timeout_s=1.0,
        max_attempts=20,
        backoff_initial_s=0.001,
        backoff_max_s=0.01,
        on_request=record,
        stop=shutdown,
    ) as client:
        ingestor = Ingestor(
            client=client,
            repository=repository,
            assets=(THIRD_ASSET, ASSET),
            bootstrap_s=DAY,
            chunk_s=DAY,
            concurrency=2,
            overlap_s=HOUR,
            clock=clock,
        )
        start, end = ingestor.window()
        scheduler = Scheduler(
            lambda stop: ingestor.start_round(), interval_s=0.5, name="test-polls"
        )
        polls = lambda: len([r for r in sim.requests if r.asset_id == ASSET])  # noqa: E731
        try:
            with caplog.at_level(logging.INFO, logger="scheduler"):
                scheduler.start()
                assert wait_for(lambda: coverage(repository, ingestor, ASSET) == 1.0, timeout_s=10)
                first = polls()
                time.sleep(3)
                while_stuck = polls() - first
                # A point that appears now is stored within a poll interval or two.
                clock.advance(STEP_S)
                newest = int(clock()) // STEP_S * STEP_S
                assert wait_for(lambda: stored(dsn, ASSET)[-1][0] == newest, timeout_s=2)
            # All along, the stuck asset was still in its first sync.
            stuck = repository.asset_status([THIRD_ASSET], start_s=start, end_s=end)[0]
            assert stuck.last_error is None and stuck.last_success_s is None
        finally:
            # As the service shuts down: the client stops retrying, then scheduler and
            # ingestor join their threads.
            shutdown.set()
            stopping = time.monotonic()
            scheduler.close(timeout_s=10)
            ingestor.close(timeout_s=10)
            closing_s = time.monotonic() - stopping
    assert while_stuck >= 4, f"{while_stuck} polls of the other asset in 3 s"
    assert stored(dsn, ASSET) == sim.points(ASSET, start, int(clock()))
    # The attempt in flight ended at its timeout and nothing started after.
    assert closing_s < 1.0 + 1.0
    assert not any(t.name.startswith(("test-polls", "sync-")) for t in threading.enumerate())
    # The stuck asset was skipped by later rounds, never synced twice at once, and the
    # requests of both assets together stayed within the bound.
    skipped = [
        r
        for r in caplog.records
        if r.getMessage() == "asset still syncing; skipped this round" and r.asset_id == THIRD_ASSET
    ]
    assert len(skipped) >= 4
    assert most_at_once(spans) <= 2
    assert most_at_once([s for s in spans if s[0] == THIRD_ASSET]) <= 1
    stuck = repository.asset_status([THIRD_ASSET], start_s=start, end_s=end)[0]
    assert "timed out after" in stuck.last_error


def test_ingestor_close_says_so_when_a_sync_does_not_stop(
    hanging_upstream, hung, repository, caplog
):
    # No stop event for the client: the attempt in flight runs to its 1 s timeout.
    with ApiClient(url_template=hanging_upstream, timeout_s=1.0, max_attempts=1) as client:
        ingestor = Ingestor(
            client=client,
            repository=repository,
            assets=(THIRD_ASSET,),
            bootstrap_s=DAY,
            chunk_s=DAY,
            concurrency=1,
            overlap_s=HOUR,
        )
        ingestor.start_round()
        assert hung.wait(5)
        with caplog.at_level(logging.WARNING, logger="scheduler"):
            ingestor.close(timeout_s=0.1)
        assert "asset syncs did not stop in time" in [r.getMessage() for r in caplog.records]
        assert _thread_alive(f"sync-{THIRD_ASSET[:8]}")
        # It ends at the timeout, and a closed ingestor starts nothing.
        assert wait_for(lambda: not _thread_alive(f"sync-{THIRD_ASSET[:8]}"), timeout_s=5)
        ingestor.start_round()
        assert not _thread_alive(f"sync-{THIRD_ASSET[:8]}")
        ingestor.close()


# -- progress and shutdown -------------------------------------------------------------------


def test_progress_reports_chunks_points_rate_and_eta(make_ingestor):
    recorder = Recorder()
    make_ingestor(
        assets=(ASSET,), bootstrap_s=10 * DAY, observer=recorder, progress_interval_s=0
    ).run_once()
    reports = recorder.progress_reports
    assert reports and {p.asset_id for p in reports} == {ASSET}
    assert all(p.chunks_total == 11 for p in reports)
    done = [p.chunks_done for p in reports]
    assert done == sorted(done)
    last = reports[-1]
    assert last.chunks_done == 11 and last.points == 10 * 96 + 1
    assert last.eta_s == 0.0 and last.rate > 0
    assert "11/11 chunks" in last.describe()


def test_progress_arithmetic():
    progress = Progress("a", chunks_done=2, chunks_total=8, points=1000, elapsed_s=4.0)
    assert progress.rate == 250.0
    assert progress.eta_s == 12.0
    assert progress.describe() == "a: 2/8 chunks, 1000 points, 250 points/s, ETA 12s"
    starting = Progress("a", chunks_done=0, chunks_total=8, points=0, elapsed_s=0.0)
    assert starting.eta_s is None and starting.rate == 0.0
    assert starting.describe().endswith("ETA ?")


def test_stop_between_chunks_leaves_every_stored_chunk_whole(
    make_ingestor, make_client, sim, repository, dsn
):
    stop = threading.Event()
    answered = itertools.count(1)

    def stop_after_five(asset_id: str, outcome: str, duration_s: float) -> None:
        # As a shutdown would, while the run is fetching.
        if next(answered) >= 5:
            stop.set()

    recorder = Recorder()
    ingestor = make_ingestor(
        client=make_client(on_request=stop_after_five),
        bootstrap_s=60 * DAY,
        chunk_s=DAY,
        concurrency=3,
        observer=recorder,
    )
    start, end = ingestor.window()
    ingestor.run_once(stop)
    # Stopped soon: the requests in flight when the event was set finished, none started
    # after, and every chunk fetched was stored.
    assert 5 <= len(sim.requests) <= 5 + 3
    assert len(sim.requests) == len(recorder.chunks)
    for asset_id in (ASSET, OTHER_ASSET):
        ranges = covered(dsn, asset_id)
        rows = stored(dsn, asset_id)
        chunks = [chunk for chunk in recorder.chunks if chunk[0] == asset_id]
        assert sum(e - s for s, e in ranges) == len(chunks) * DAY
        for lower, upper in ranges:
            assert [p for p in rows if lower <= p[0] < upper] == sim.points(asset_id, lower, upper)
        assert all(any(lower <= t < upper for lower, upper in ranges) for t, _ in rows)
        status = repository.asset_status([asset_id], start_s=start, end_s=end)[0]
        assert status.coverage < 1
        assert status.last_success_s is None  # a run cut short is not a success


# -- the scheduler ---------------------------------------------------------------------------


class Job:
    """A plain callable for the scheduler that counts calls and concurrent entries."""

    def __init__(self, *, duration_s: float = 0.0, fail_first: int = 0) -> None:
        self._lock = threading.Lock()
        self._duration_s = duration_s
        self._fail_first = fail_first
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self.threads: set[str] = set()

    def __call__(self, stop: threading.Event) -> None:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.add(threading.current_thread().name)
            call = self.calls
        try:
            if self._duration_s:
                time.sleep(self._duration_s)
            if call <= self._fail_first:
                raise RuntimeError(f"job failure number {call}")
        finally:
            with self._lock:
                self.running -= 1


def _thread_alive(name: str) -> bool:
    return any(thread.name == name for thread in threading.enumerate())


def test_scheduler_runs_at_once_then_every_interval():
    job = Job()
    with Scheduler(job, interval_s=60, name="test-once"):
        assert wait_for(lambda: job.calls >= 1, timeout_s=5)
        time.sleep(0.3)
        assert job.calls == 1  # the next run is a minute away
    job = Job()
    with Scheduler(job, interval_s=0.2, name="test-periodic"):
        assert wait_for(lambda: job.calls >= 4, timeout_s=10)
    assert job.threads == {"test-periodic"}


def test_scheduler_close_stops_and_joins_and_is_idempotent():
    started = threading.Event()

    def waits_for_stop(stop: threading.Event) -> None:
        started.set()
        stop.wait(60)

    scheduler = Scheduler(waits_for_stop, interval_s=60, name="test-close").start()
    assert started.wait(5)
    scheduler.close(timeout_s=10)
    assert not _thread_alive("test-close")  # joined well before the job's minute was up
    scheduler.close()
    Scheduler(waits_for_stop, interval_s=1, name="test-never-started").close()


def test_scheduler_closed_before_start_never_runs_the_job():
    job = Job()
    scheduler = Scheduler(job, interval_s=0.05, name="test-closed-early")
    scheduler.close()
    scheduler.start()
    assert wait_for(lambda: not _thread_alive("test-closed-early"), timeout_s=5)
    assert job.calls == 0


def test_scheduler_never_overlaps_runs():
    job = Job(duration_s=0.15)
    with Scheduler(job, interval_s=0.02, name="test-overlap"):
        assert wait_for(lambda: job.calls >= 5, timeout_s=10)
    assert job.most_at_once == 1


def test_scheduler_logs_job_failures_and_goes_on(caplog):
    job = Job(fail_first=2)
    with (
        caplog.at_level(logging.ERROR, logger="scheduler"),
        Scheduler(job, interval_s=0.05, name="test-failing"),
    ):
        assert wait_for(lambda: job.calls >= 4, timeout_s=10)
    failures = [r for r in caplog.records if r.getMessage() == "scheduled job failed"]
    assert len(failures) == 2
    assert all(r.exc_info and "job failure number" in str(r.exc_info[1]) for r in failures)


def test_scheduler_close_says_so_when_the_job_does_not_stop(caplog):
    release = threading.Event()

    def ignores_stop(stop: threading.Event) -> None:
        release.wait(30)

    scheduler = Scheduler(ignores_stop, interval_s=60, name="test-stuck").start()
    try:
        with caplog.at_level(logging.WARNING, logger="scheduler"):
            scheduler.close(timeout_s=0.1)
        assert [r.getMessage() for r in caplog.records] == ["scheduler thread did not stop in time"]
        assert _thread_alive("test-stuck")
    finally:
        release.set()
    assert wait_for(lambda: not _thread_alive("test-stuck"), timeout_s=5)


def test_scheduler_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="interval_s"):
        Scheduler(Job(), interval_s=0)


def test_closing_the_scheduler_mid_bootstrap_stops_between_chunks(make_ingestor, sim, dsn):
    recorder = Recorder()
    ingestor = make_ingestor(
        assets=(ASSET,), bootstrap_s=730 * DAY, chunk_s=7 * DAY, concurrency=2, observer=recorder
    )
    scheduler = Scheduler(ingestor.run_once, interval_s=60, name="test-shutdown").start()
    try:
        assert wait_for(lambda: len(recorder.chunks) >= 3, timeout_s=20)
    finally:
        scheduler.close(timeout_s=20)
    assert not _thread_alive("test-shutdown")
    stored_chunks = len(recorder.chunks)
    assert stored_chunks < 105  # it stopped well before the end of the bootstrap
    assert len(sim.requests) == stored_chunks  # nothing fetched was left unstored
    rows = stored(dsn, ASSET)
    ranges = covered(dsn, ASSET)
    for lower, upper in ranges:
        assert [p for p in rows if lower <= p[0] < upper] == sim.points(ASSET, lower, upper)
    assert sum(upper - lower for lower, upper in ranges) == stored_chunks * 7 * DAY
    assert len(rows) == sum(points for _, points, _ in recorder.chunks)


def test_scheduler_drives_the_ingestor_without_waiting_for_the_bootstrap(
    make_ingestor, sim, repository, dsn
):
    ingestor = make_ingestor(bootstrap_s=120 * DAY, chunk_s=7 * DAY)
    start, end = ingestor.window()
    with Scheduler(ingestor.run_once, interval_s=0.2, name="test-ingest") as scheduler:
        # start() has returned before anything was fetched: start-up never waits.
        assert wait_for(
            lambda: all(coverage(repository, ingestor, a) == 1.0 for a in (ASSET, OTHER_ASSET)),
            timeout_s=30,
        )
        # Later polls with a clock that stands still fetch the last hour again, nothing else.
        assert wait_for(lambda: len(sim.requests) >= 2 * 18 + 4, timeout_s=10)
    scheduler.close()
    assert not _thread_alive("test-ingest")
    for asset_id in (ASSET, OTHER_ASSET):
        assert stored(dsn, asset_id) == sim.points(asset_id, start, end)
        repeats = Counter(fetched(sim, asset_id)[18:])
        assert set(repeats) == {(end - HOUR, end)}


def test_a_chunk_shorter_than_the_upstreams_step_is_refused_not_raised(make_ingestor):
    # A chunk below 15 minutes would ask for ranges that hold no point; it is a mistake to
    # report, not to correct silently.
    with pytest.raises(ValueError, match="chunk_s must be at least 900"):
        make_ingestor(chunk_s=60)
