"""Shared set-up of the benchmarks: a scratch database with a long series, and a real server."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repository import EmbeddedPostgres, Repository  # noqa: E402

ASSET = "3662953a-1396-4996-a1b6-99a0c5e7a5de"
QUARTER_S = 900


@contextmanager
def server_dsn(dsn: str | None) -> Iterator[str]:
    """`dsn`, $EDGECOM_BENCH_DSN, or an embedded PostgreSQL for the run."""
    dsn = dsn or os.environ.get("EDGECOM_BENCH_DSN")
    if dsn:
        yield dsn
        return
    with (
        tempfile.TemporaryDirectory(prefix="edgecom-bench-pg-") as data_dir,
        EmbeddedPostgres(data_dir=data_dir) as embedded,
    ):
        yield embedded.dsn


@contextmanager
def empty_database(server: str, *, rollup_timezones: Sequence[str] = ()) -> Iterator[str]:
    """A migrated database with no points on `server`, keeping the local-day rollups of
    `rollup_timezones` (storage.rollup_timezones); dropped after."""
    name = f"edgecom_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server, dbname=name)
    try:
        with Repository(dsn=dsn, rollup_timezones=rollup_timezones) as repo:
            repo.migrate()
        yield dsn
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_database(server: str, *, start_s: int, count: int) -> Iterator[str]:
    """A migrated database holding `count` quarter-hours of ASSET from `start_s`; dropped after."""
    with empty_database(server) as dsn:
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO points (asset_id, time, value)"
                " SELECT %s, to_timestamp(%s + i * %s), round((sin(i * 0.37) * 500)::numeric, 3)"
                " FROM generate_series(0, %s - 1) AS i",
                (ASSET, start_s, QUARTER_S, count),
            )
            conn.execute("SELECT rebuild_rollups()")
            conn.execute("ANALYZE points, points_hourly, points_daily")
        yield dsn


def asset_ids(count: int) -> list[str]:
    """ASSET and `count - 1` more stable asset ids."""
    others = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"edgecom-bench-{i}")) for i in range(1, count)]
    return [ASSET, *others]


def copy_points(dsn: str, assets: list[str], *, start_s: int, count: int) -> None:
    """COPY `count` quarter-hours of every asset from `start_s`, interleaved in time.

    Rows go in time order, all assets at one time before the next, as polling writes them,
    so one asset's points are spread over the table rather than stored together.
    """
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor().copy("COPY points (asset_id, time, value) FROM STDIN") as copy,
    ):
        for i in range(count):
            stamp = datetime.fromtimestamp(start_s + i * QUARTER_S, UTC).isoformat()
            value = round(math.sin(i * 0.37) * 500, 3)
            copy.write("".join(f"{asset}\t{stamp}\t{value}\n" for asset in assets))
    # Rollups as the service keeps them. VACUUM sets the visibility map, as autovacuum soon
    # does for a table that polling writes: without it the covering key's index-only scans
    # read the heap page of every point.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT rebuild_rollups()")
        conn.execute("VACUUM (ANALYZE) points, points_hourly, points_daily")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python edgecom.py` in a subprocess against `dsn`, serving ASSET, with no upstream."""

    def __init__(self, dsn: str, **settings: str) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            "EDGECOM_DATABASE_URL": dsn,
            "EDGECOM_SERVER_HOST": "127.0.0.1",
            "EDGECOM_SERVER_PORT": str(self.port),
            "EDGECOM_METRICS_PORT": "0",
            "EDGECOM_RATE_LIMIT_RPS": "0",
            "EDGECOM_UPSTREAM_ASSETS": ASSET,
            # Nothing listens there: ingestion fails fast and leaves the stored series alone.
            "EDGECOM_UPSTREAM_URL": "http://127.0.0.1:9/{asset_id}",
            "EDGECOM_UPSTREAM_POLL_INTERVAL": "1000d",
            "EDGECOM_LOGGING_FORMAT": "json",
            "EDGECOM_LOGGING_LEVEL": "error",
            **{f"EDGECOM_{key.upper()}": value for key, value in settings.items()},
        }
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "edgecom.py")], env=env, stderr=subprocess.DEVNULL
        )
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", 1 << 30)]
        )
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    @contextmanager
    def peak_rss(self, interval_s: float = 0.005) -> Iterator[list[int]]:
        """Sample the server's RSS while the block runs; yields [baseline, peak] (bytes)."""
        result = [self.rss_bytes()] * 2
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                result[1] = max(result[1], self.rss_bytes())
                stop.wait(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield result
        finally:
            stop.set()
            sampler.join()
            result[1] = max(result[1], self.rss_bytes())

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running_server(dsn: str, **settings: str) -> Iterator[Server]:
    """A Server; `settings` are config keys as section_key=value, e.g. cache_size="0"."""
    server = Server(dsn, **settings)
    try:
        yield server
    finally:
        server.close()
