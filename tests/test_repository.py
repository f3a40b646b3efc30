"""Repository against a real PostgreSQL: migrations, idempotent upserts, bucketed aggregation."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import psycopg
import pytest
from conftest import (
    ASSET,
    DAY,
    OTHER_ASSET,
    ROOT,
    T0,
    assert_same,
    query_buckets,
    reference,
    series,
    wait_for,
)
from conftest import query_buckets as query

from repository import (
    MIGRATIONS_DIR,
    BucketGrid,
    Cancellation,
    DatabaseUnavailable,
    QueryCancelled,
    Repository,
    Snapshot,
)

MIGRATIONS = sorted(path.name for path in MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


@pytest.mark.fresh_database
def test_migrations_applied_twice_are_a_no_op(dsn):
    with Repository(dsn=dsn) as repo:
        first = repo.migrate()
        second = repo.migrate()
    assert first == MIGRATIONS and first[0] == "0001_points.sql"
    assert second == []


@pytest.mark.fresh_database
def test_two_processes_migrating_at_once_both_succeed(dsn):
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]);"
        "from repository import Repository;"
        "repo = Repository(dsn=sys.argv[1]).open(wait=True);"
        "print(len(repo.migrate())); repo.close()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, dsn, str(ROOT)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(outputs) == ["0", str(len(MIGRATIONS))]
    with psycopg.connect(dsn) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
    assert count == len(MIGRATIONS)


def test_upsert_is_idempotent_and_replaces_revised_values(repository):
    points = series(T0, 96)
    first = repository.upsert_points(ASSET, points)
    assert first.changed == 96
    assert (first.first_s, first.last_s) == (T0, T0 + 95 * 900)
    assert repository.upsert_points(ASSET, points).changed == 0

    revised = [(T0 + 900, 12345.5)]
    result = repository.upsert_points(ASSET, revised)
    assert (result.changed, result.first_s, result.last_s) == (1, T0 + 900, T0 + 900)
    rows = query(repository, T0, T0 + DAY, 900, "MAX")
    assert len(rows) == 96
    assert dict(rows)[T0 + 900] == 12345.5


def test_duplicate_times_in_one_write_keep_the_last_value(repository):
    repository.upsert_points(ASSET, [(T0, 1.0), (T0, 2.0), (T0, 3.0)])
    assert query(repository, T0, T0 + 900, 900, "SUM") == [(T0, 3.0)]


def test_assets_are_kept_apart(repository):
    repository.upsert_points(ASSET, [(T0, 1.0)])
    repository.upsert_points(OTHER_ASSET, [(T0, 100.0)])
    assert query(repository, T0, T0 + 900, 900, "SUM") == [(T0, 1.0)]
    assert query(repository, T0, T0 + 900, 900, "SUM", asset_id=OTHER_ASSET) == [(T0, 100.0)]


@pytest.mark.parametrize("window_s", [60, 300, 900, 3600, DAY])
@pytest.mark.parametrize("aggregation", ["MIN", "MAX", "AVG", "SUM"])
def test_buckets_match_the_reference(repository, window_s, aggregation):
    # Points every 5 minutes over three days, plus off-grid points so that 1m and 5m
    # buckets hold more than one point and edges are exercised.
    points = series(T0 - DAY, 3 * 288, step_s=300)
    points += [(T0 + 59, -3.5), (T0 + 60, 7.25), (T0 + 3599, 0.5), (T0 + 3660, -0.25)]
    repository.upsert_points(ASSET, points)
    for start_s, end_s in [(T0 - DAY, T0 + 2 * DAY), (T0, T0 + 3600), (T0 + 60, T0 + 7200 + 1)]:
        expected = reference(points, start_s, end_s, window_s, aggregation)
        assert_same(query(repository, start_s, end_s, window_s, aggregation), expected)


def test_an_answer_of_several_chunks_comes_whole(repository):
    # More buckets than Snapshot.buckets reads in one chunk, without a batch size.
    points = series(T0, 2 * Snapshot._CHUNK_ROWS + 5, step_s=60)
    repository.upsert_points(ASSET, points)
    end_s = T0 + len(points) * 60
    expected = reference(points, T0, end_s, 60, "SUM")
    assert_same(query(repository, T0, end_s, 60, "SUM"), expected)


def test_an_answer_left_half_read_ends_cleanly(repository):
    points = series(T0, 2 * Snapshot._CHUNK_ROWS + 5, step_s=60)
    repository.upsert_points(ASSET, points)
    end_s = T0 + len(points) * 60
    with repository.snapshot() as snapshot:
        rows = snapshot.buckets(
            asset_id=ASSET, start_s=T0, end_s=end_s, grid=BucketGrid(window_s=60), aggregation="MAX"
        )
        assert [next(rows)[0] for _ in range(10)] == [t for t, _ in points[:10]]
        rows.close()
    assert_same(query(repository, T0, end_s, 60, "SUM"), reference(points, T0, end_s, 60, "SUM"))


def test_a_snapshot_ends_cleanly_with_an_answer_left_half_read_and_open(repository):
    points = series(T0, 2 * Snapshot._CHUNK_ROWS + 5, step_s=60)
    repository.upsert_points(ASSET, points)
    end_s = T0 + len(points) * 60
    with repository.snapshot() as snapshot:
        rows = snapshot.buckets(
            asset_id=ASSET, start_s=T0, end_s=end_s, grid=BucketGrid(window_s=60), aggregation="MAX"
        )
        assert next(rows)[0] == T0
    del rows
    for _ in range(3):
        assert_same(
            query(repository, T0, end_s, 60, "SUM"), reference(points, T0, end_s, 60, "SUM")
        )


def test_point_at_end_is_excluded_and_point_at_start_included(repository):
    repository.upsert_points(ASSET, [(T0, 1.0), (T0 + 900, 2.0), (T0 + 1800, 4.0)])
    assert query(repository, T0, T0 + 1800, 3600, "SUM") == [(T0, 3.0)]
    assert query(repository, T0 + 900, T0 + 1801, 3600, "SUM") == [(T0, 6.0)]


def test_bucket_edges_are_aligned_to_the_epoch(repository):
    # A range starting mid-bucket still labels buckets by their epoch-aligned start.
    repository.upsert_points(ASSET, [(T0 + 1800, 1.0), (T0 + 3600, 2.0)])
    assert query(repository, T0 + 1000, T0 + 7200, 3600, "MAX") == [(T0, 1.0), (T0 + 3600, 2.0)]
    day_rows = query(repository, T0 + 1000, T0 + 7200, DAY, "SUM")
    assert day_rows == [(T0, 3.0)]


def test_empty_range_returns_nothing(repository):
    repository.upsert_points(ASSET, series(T0, 10))
    assert query(repository, T0 + DAY, T0 + 2 * DAY, 3600, "AVG") == []
    assert query(repository, T0, T0 + DAY, 3600, "AVG", asset_id=OTHER_ASSET) == []


@pytest.mark.slow
def test_two_years_of_quarter_hours(repository):
    count = 2 * 365 * 96
    points = series(T0, count)
    repository.upsert_points(ASSET, points)
    end_s = T0 + count * 900
    for window_s in (60, 300, 900, 3600, DAY):
        for aggregation in ("MIN", "MAX", "AVG", "SUM"):
            expected = reference(points, T0, end_s, window_s, aggregation)
            assert_same(query(repository, T0, end_s, window_s, aggregation), expected)


def test_limit_caps_the_answer(repository):
    repository.upsert_points(ASSET, series(T0, 100))
    assert len(query(repository, T0, T0 + DAY * 2, 900, "SUM", limit=11)) == 11


def test_unreachable_database_raises_database_unavailable():
    repo = Repository(dsn="postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    repo.open()
    try:
        with pytest.raises(DatabaseUnavailable):
            repo.ping()
        with pytest.raises(DatabaseUnavailable):
            query(repo, T0, T0 + 900, 900, "SUM")
    finally:
        repo.close()
        repo.close()


def _waiting_queries(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND query LIKE %s",
            ("%date_bin%",),
        ).fetchone()[0]


def test_timeout_cancels_the_database_work(repository, dsn):
    repository.upsert_points(ASSET, series(T0, 10))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE points IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(QueryCancelled):
            query_buckets(
                repository,
                asset_id=ASSET,
                start_s=T0,
                end_s=T0 + DAY,
                window_s=900,
                aggregation="SUM",
                limit=10,
                timeout_s=0.3,
            )
        assert time.monotonic() - started < 10
        assert _waiting_queries(dsn) == 0


def test_cancellation_from_another_thread_stops_the_query(repository, dsn):
    repository.upsert_points(ASSET, series(T0, 10))
    cancellation = Cancellation()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            query_kwargs = dict(asset_id=ASSET, start_s=T0, end_s=T0 + DAY, window_s=900)
            query_buckets(
                repository, **query_kwargs, aggregation="SUM", limit=10, cancellation=cancellation
            )
        except BaseException as exc:
            errors.append(exc)

    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE points IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=run)
        worker.start()
        assert wait_for(lambda: _waiting_queries(dsn) == 1)
        cancellation.cancel()
        worker.join(10)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], QueryCancelled)
    # The connection went back to the pool in a usable state.
    assert query(repository, T0, T0 + DAY, DAY, "SUM") != []


def test_ingestion_under_an_asset_lock_works_with_a_one_connection_pool(dsn):
    with (
        Repository(dsn=dsn, max_connections=1, connect_timeout_s=1) as repo,
        Repository(dsn=dsn, max_connections=1, connect_timeout_s=1) as replica,
    ):
        repo.migrate()
        with repo.asset_lock(ASSET) as acquired:
            assert acquired
            # What a run does under the lock, each step on a pool connection.
            assert repo.uncovered(ASSET, T0, T0 + DAY) == [(T0, T0 + DAY)]
            assert repo.upsert_points(ASSET, [(T0, 1.0)], covered=(T0, T0 + DAY)).changed == 1
            repo.record_attempt(ASSET, error=None)
            with replica.asset_lock(ASSET) as other:
                assert not other
        with replica.asset_lock(ASSET) as other:
            assert other


def test_asset_lock_survives_its_idle_connection_being_dropped(repository, dsn):
    with repository.asset_lock(ASSET) as acquired:
        assert acquired
    # A database restart or an idle timeout ends the session the next lock would reuse.
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND query LIKE '%%advisory%%'"
        )
    with repository.asset_lock(ASSET) as acquired:
        assert acquired


def test_ping_answers_after_its_connection_was_dropped(repository, dsn):
    repository.ping()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    repository.ping()


def test_ingestion_writes_go_on_while_snapshots_hold_every_query_connection(dsn):
    with Repository(dsn=dsn, max_connections=2, connect_timeout_s=1) as repo, ExitStack() as held:
        repo.migrate()
        # What long streams do: each holds a query connection for as long as it lasts.
        for _ in range(2):
            held.enter_context(repo.snapshot())
        assert repo.uncovered(ASSET, T0, T0 + DAY) == [(T0, T0 + DAY)]
        assert repo.upsert_points(ASSET, [(T0, 1.0)], covered=(T0, T0 + DAY)).changed == 1
        repo.record_attempt(ASSET, error=None)
