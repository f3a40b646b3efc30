"""TimescaleDB storage: hypertable, compression and retention policies, compressed upserts."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pytest
from conftest import ASSET, DAY, OTHER_ASSET, T0, series
from conftest import query_buckets as query

from repository import AGGREGATIONS, Repository

# Data tests start 40 days before T0 and run 75 days, so they span at least three of the
# 30-day chunks. Their policy compresses nothing (100 years), so the background job never
# competes with the test's own compress_chunk calls.
START = T0 - 40 * DAY
QUARTER_HOURS = 75 * 96
NEVER_S = 100 * 365 * DAY

# Storage policies and extension state belong to a database: each test gets its own.
pytestmark = pytest.mark.fresh_database


@pytest.fixture(scope="session")
def timescaledb_available(server_dsn: str) -> bool:
    with psycopg.connect(server_dsn) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
    return found is not None


@pytest.fixture
def requires_timescaledb(timescaledb_available: bool) -> None:
    if not timescaledb_available:
        pytest.skip("TimescaleDB extension not available on this server")


@pytest.fixture
def requires_plain_postgresql(timescaledb_available: bool) -> None:
    if timescaledb_available:
        pytest.skip("TimescaleDB extension available on this server: not plain PostgreSQL")


@pytest.fixture
def ts_repository(requires_timescaledb: None, dsn: str, repository: Repository) -> Repository:
    """A migrated repository whose points table is a hypertable."""
    assert fetch(dsn, "SELECT extname FROM pg_extension WHERE extname = 'timescaledb'"), (
        "timescaledb is available but the migration could not create it: "
        "is it in shared_preload_libraries?"
    )
    return repository


def fetch(dsn: str, query: str, params: dict | None = None) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def policies(dsn: str) -> dict[str, tuple[int, timedelta]]:
    """The policy jobs on points: job procedure name -> (job id, age)."""
    rows = fetch(
        dsn,
        "SELECT proc_name::text, job_id,"
        " coalesce(config->>'compress_after', config->>'drop_after')::interval"
        " FROM timescaledb_information.jobs"
        " WHERE hypertable_schema = current_schema() AND hypertable_name = 'points'",
    )
    assert len(rows) == len({proc for proc, _, _ in rows}), rows
    return {proc: (job_id, age) for proc, job_id, age in rows}


def ages(dsn: str) -> dict[str, timedelta]:
    return {proc: age for proc, (_, age) in policies(dsn).items()}


def compress_all_chunks(dsn: str) -> int:
    """Compress every chunk of points now; returns how many chunks there are."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        chunks = conn.execute(
            "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('points') AS c"
        ).fetchall()
        compressed = conn.execute(
            "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks"
            " WHERE hypertable_schema = current_schema() AND hypertable_name = 'points'"
        ).fetchone()[0]
    assert compressed, "some chunks of points are still uncompressed"
    return len(chunks)


def schema_state(dsn: str) -> dict[str, list[tuple]]:
    """Relations, extensions and, on TimescaleDB, jobs and compression settings."""
    with psycopg.connect(dsn) as conn:
        state = {
            "relations": conn.execute(
                "SELECT n.nspname::text, c.relname::text, c.relkind::text, c.reloptions"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
                " ORDER BY 1, 2"
            ).fetchall(),
            "extensions": conn.execute(
                "SELECT extname::text FROM pg_extension ORDER BY 1"
            ).fetchall(),
        }
        if ("timescaledb",) in state["extensions"]:
            state["jobs"] = conn.execute(
                "SELECT job_id, proc_name::text, config FROM timescaledb_information.jobs"
                " ORDER BY job_id"
            ).fetchall()
            state["compression_settings"] = conn.execute(
                "SELECT * FROM timescaledb_information.compression_settings ORDER BY 1, 2, 3"
            ).fetchall()
    return state


# --- Everywhere: plain PostgreSQL and TimescaleDB ---


def test_applying_twice_changes_nothing(dsn, repository):
    first = repository.apply_storage_policies(compress_after_s=7 * DAY, retention_s=1095 * DAY)
    before = schema_state(dsn)
    second = repository.apply_storage_policies(compress_after_s=7 * DAY, retention_s=1095 * DAY)
    assert second == first
    assert schema_state(dsn) == before


def test_replicas_applying_together_both_succeed(dsn, repository):
    start = threading.Barrier(2)

    def apply(repo: Repository) -> bool:
        start.wait(timeout=30)
        return repo.apply_storage_policies(compress_after_s=7 * DAY, retention_s=None)

    with (
        Repository(dsn=dsn) as one,
        Repository(dsn=dsn) as two,
        ThreadPoolExecutor(2) as pool,
    ):
        results = list(pool.map(apply, [one, two]))
    assert results[0] == results[1]
    if results[0]:
        assert ages(dsn) == {"policy_compression": timedelta(days=7)}


@pytest.mark.parametrize(
    ("compress_after_s", "retention_s"), [(0, None), (-1.0, None), (DAY, 0), (DAY, -DAY)]
)
def test_ages_must_be_positive(repository, compress_after_s, retention_s):
    with pytest.raises(ValueError, match="must be positive"):
        repository.apply_storage_policies(
            compress_after_s=compress_after_s, retention_s=retention_s
        )


def test_plain_postgresql_is_left_alone(requires_plain_postgresql, dsn, repository):
    points = series(START, 200)
    repository.upsert_points(ASSET, points)
    before = schema_state(dsn)
    answer = query(repository, START, START + 3 * DAY, 3600, "AVG")
    assert repository.apply_storage_policies(compress_after_s=7 * DAY, retention_s=None) is False
    assert repository.apply_storage_policies(compress_after_s=DAY, retention_s=DAY) is False
    assert schema_state(dsn) == before
    assert query(repository, START, START + 3 * DAY, 3600, "AVG") == answer
    assert repository.upsert_points(ASSET, [(START, 1.5)]).changed == 1


# --- TimescaleDB only ---


def test_points_is_a_hypertable_in_30_day_chunks(dsn, ts_repository):
    dimensions = fetch(
        dsn,
        "SELECT column_name::text, time_interval FROM timescaledb_information.dimensions"
        " WHERE hypertable_schema = current_schema() AND hypertable_name = 'points'",
    )
    assert dimensions == [("time", timedelta(days=30))]


def test_compression_is_segmented_by_asset_and_ordered_by_time(dsn, ts_repository):
    assert ts_repository.apply_storage_policies(compress_after_s=7 * DAY, retention_s=None)
    assert fetch(
        dsn,
        "SELECT compression_enabled FROM timescaledb_information.hypertables"
        " WHERE hypertable_schema = current_schema() AND hypertable_name = 'points'",
    ) == [(True,)]
    settings = fetch(
        dsn,
        "SELECT attname::text, segmentby_column_index, orderby_column_index, orderby_asc"
        " FROM timescaledb_information.compression_settings"
        " WHERE hypertable_schema = current_schema() AND hypertable_name = 'points'",
    )
    segmentby = sorted((index, name) for name, index, _, _ in settings if index is not None)
    orderby = sorted((index, name, asc) for name, _, index, asc in settings if index is not None)
    assert segmentby == [(1, "asset_id")]
    assert orderby == [(1, "time", True)]
    assert ages(dsn) == {"policy_compression": timedelta(days=7)}


def test_policies_follow_the_configuration(dsn, ts_repository):
    repo = ts_repository
    assert repo.apply_storage_policies(compress_after_s=7 * DAY, retention_s=None)
    compression_job, _ = policies(dsn)["policy_compression"]

    assert repo.apply_storage_policies(compress_after_s=7 * DAY, retention_s=1095 * DAY)
    assert ages(dsn) == {
        "policy_compression": timedelta(days=7),
        "policy_retention": timedelta(days=1095),
    }
    assert policies(dsn)["policy_compression"][0] == compression_job
    retention_job, _ = policies(dsn)["policy_retention"]

    # A restart with a new compress_after replaces that policy and leaves the other alone.
    assert repo.apply_storage_policies(compress_after_s=14 * DAY, retention_s=1095 * DAY)
    assert ages(dsn) == {
        "policy_compression": timedelta(days=14),
        "policy_retention": timedelta(days=1095),
    }
    assert policies(dsn)["policy_compression"][0] != compression_job
    assert policies(dsn)["policy_retention"][0] == retention_job

    # Retention turned off removes its policy.
    assert repo.apply_storage_policies(compress_after_s=14 * DAY, retention_s=None)
    assert ages(dsn) == {"policy_compression": timedelta(days=14)}


def test_revising_a_compressed_point_replaces_it(dsn, ts_repository):
    repo = ts_repository
    points = series(START, QUARTER_HOURS)
    repo.upsert_points(ASSET, points)
    repo.upsert_points(OTHER_ASSET, series(START, QUARTER_HOURS, seed=2))
    assert repo.apply_storage_policies(compress_after_s=NEVER_S, retention_s=None)
    assert compress_all_chunks(dsn) >= 3

    revised_s = T0 + 900
    result = repo.upsert_points(ASSET, [(revised_s, 12345.5)])
    assert (result.changed, result.first_s, result.last_s) == (1, revised_s, revised_s)
    assert query(repo, revised_s, revised_s + 900, 900, "MAX") == [(revised_s, 12345.5)]
    day = query(repo, T0, T0 + DAY, 900, "SUM")
    expected = [(t, 12345.5 if t == revised_s else v) for t, v in points if T0 <= t < T0 + DAY]
    assert day == expected
    assert fetch(
        dsn,
        "SELECT count(*), count(DISTINCT (asset_id, time)) FROM points",
    ) == [(2 * QUARTER_HOURS, 2 * QUARTER_HOURS)]
    other = dict(series(START, QUARTER_HOURS, seed=2))
    assert query(repo, revised_s, revised_s + 900, 900, "MAX", asset_id=OTHER_ASSET) == [
        (revised_s, other[revised_s])
    ]


def test_rewriting_compressed_points_changes_only_new_ones(dsn, ts_repository):
    repo = ts_repository
    points = series(START, QUARTER_HOURS)
    repo.upsert_points(ASSET, points)
    assert repo.apply_storage_policies(compress_after_s=NEVER_S, retention_s=None)
    compress_all_chunks(dsn)

    assert repo.upsert_points(ASSET, points[:500]).changed == 0
    added = repo.upsert_points(ASSET, [(T0 + 450, -7.25)])
    assert (added.changed, added.first_s) == (1, T0 + 450)
    assert query(repo, T0, T0 + 900, 900, "SUM") == [(T0, dict(points)[T0] - 7.25)]
    assert fetch(dsn, "SELECT count(*) FROM points") == [(QUARTER_HOURS + 1,)]


def test_buckets_are_the_same_compressed_and_uncompressed(dsn, ts_repository):
    repo = ts_repository
    # Points every 5 minutes plus off-grid ones, so that small buckets hold several.
    points = series(START, 75 * 288, step_s=300)
    points += [(T0 + 59, -3.5), (T0 + 60, 7.25), (T0 + 3599, 0.5), (T0 + 3660, -0.25)]
    repo.upsert_points(ASSET, points)
    repo.upsert_points(OTHER_ASSET, series(START, 75 * 288, step_s=300, seed=3))
    end = START + 75 * DAY
    ranges = [(START, end), (T0 - 3 * DAY + 1000, T0 + 3 * DAY), (T0 + 60, T0 + 7201)]
    cases = [
        (aggregation, window_s, start_s, end_s)
        for aggregation in AGGREGATIONS
        for window_s in (60, 900, 3600, DAY, 7 * DAY)
        for start_s, end_s in ranges
    ]
    uncompressed = {
        (aggregation, window_s, start_s, end_s): query(repo, start_s, end_s, window_s, aggregation)
        for aggregation, window_s, start_s, end_s in cases
    }
    assert repo.apply_storage_policies(compress_after_s=NEVER_S, retention_s=None)
    compress_all_chunks(dsn)
    for case in cases:
        aggregation, window_s, start_s, end_s = case
        compressed = query(repo, start_s, end_s, window_s, aggregation)
        assert [t for t, _ in compressed] == [t for t, _ in uncompressed[case]], case
        for (t, got), (_, want) in zip(compressed, uncompressed[case], strict=True):
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9), (case, t, got, want)
