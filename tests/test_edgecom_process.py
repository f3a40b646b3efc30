"""The service as a process (`python edgecom.py`): cache across replicas, TLS, auth, metrics,
request logs and graceful shutdown, with real clients on loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from conftest import (
    ASSET,
    DAY,
    ROOT,
    SERVING,
    T0,
    RunningService,
    ServiceProcess,
    free_port,
    insert_quarter_hours,
    points_of,
    request,
    service_env,
    status_of,
    wait_for,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import edgecom
from change_listener import LISTENER_APPLICATION_NAME
from config import CacheConfig, Config, RateLimitConfig, UpstreamConfig
from interceptors import QueryCache
from metrics import Metrics
from simulator import Simulator

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_METHOD = "/grpc.health.v1.Health/Check"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples served at /metrics, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def listening_replicas(dsn: str) -> int:
    """How many change listeners have LISTEN active on the test's database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND query LIKE 'LISTEN%%'",
            (LISTENER_APPLICATION_NAME,),
        ).fetchone()[0]


def bucket_queries_waiting_for_a_lock(dsn: str) -> int:
    """How many QueryTimeSeries statements on the test's database wait for a lock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
            " AND query LIKE '/* edgecom buckets */%%'"
        ).fetchone()[0]


def lock_points(dsn: str) -> psycopg.Connection:
    """A connection whose open transaction holds points in ACCESS EXCLUSIVE mode.

    Every query of points waits until the transaction ends (rollback() or close()).
    """
    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE points IN ACCESS EXCLUSIVE MODE")
    return blocker


# --- cache across replicas ----------------------------------------------------------------


def test_replicas_drop_cached_answers_that_a_write_anywhere_makes_stale(
    start_service, repository, dsn
):
    repository.upsert_points(ASSET, [(T0 + i * 900, float(i)) for i in range(24)])
    metrics_port = free_port()
    a = start_service("a")
    b = start_service("b", EDGECOM_METRICS_PORT=str(metrics_port))
    a.wait_serving()
    b.wait_serving()
    # A write is only heard by a replica that already LISTENs.
    assert wait_for(lambda: listening_replicas(dsn) == 2, timeout_s=10)
    stub_a, stub_b = a.stub(), b.stub()

    def cache_counts() -> tuple[float, float]:
        """B's cache hits and misses so far."""
        samples = scrape(metrics_port)
        hits = samples[("edgecom_cache_hits_total", ())]
        return hits, samples[("edgecom_cache_misses_total", ())]

    first_two_hours = request(T0, T0 + 7200, "1h", "SUM")
    later_hour = request(T0 + 4 * 3600, T0 + 5 * 3600, "1h", "SUM")
    expected = [(T0, 0.0 + 1 + 2 + 3), (T0 + 3600, 4.0 + 5 + 6 + 7)]
    for stub in (stub_a, stub_b, stub_b):
        assert points_of(stub.QueryTimeSeries(first_two_hours)) == expected
    assert points_of(stub_b.QueryTimeSeries(later_hour)) == [(T0 + 4 * 3600, 16.0 + 17 + 18 + 19)]
    assert cache_counts() == (1, 2)

    # A hit does not touch the database: it answers while points is locked, when a query
    # that is not cached waits for the lock until its deadline.
    blocker = lock_points(dsn)
    try:
        assert points_of(stub_b.QueryTimeSeries(first_two_hours, timeout=30)) == expected
        code, _ = status_of(
            lambda: stub_b.QueryTimeSeries(request(T0, T0 + DAY, "1d", "SUM"), timeout=0.5)
        )
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        blocker.close()
    assert cache_counts() == (2, 3)

    # A write through the path ingestion uses, as another replica's ingestion would make it,
    # reaches both replicas' caches within a second.
    repository.upsert_points(ASSET, [(T0 + 900, 100.0)])
    changed = [(T0, 0.0 + 100 + 2 + 3), (T0 + 3600, 4.0 + 5 + 6 + 7)]
    for stub in (stub_a, stub_b):
        assert wait_for(
            lambda stub=stub: points_of(stub.QueryTimeSeries(first_two_hours)) == changed,
            timeout_s=1.0,
        )

    # A write outside a cached range leaves the entry alone. B answered the change from the
    # database, but may have heard of the write only after storing that answer: ask until a
    # hit shows the entry is back.
    def b_answers_from_its_cache() -> bool:
        hits = cache_counts()[0]
        assert points_of(stub_b.QueryTimeSeries(first_two_hours)) == changed
        return cache_counts()[0] == hits + 1

    assert wait_for(b_answers_from_its_cache, timeout_s=5)
    # Notifications arrive in commit order, so once B has dropped later_hour for the second
    # write, it has seen the first.
    repository.upsert_points(ASSET, [(T0 + 3 * 3600, 50.0)])
    repository.upsert_points(ASSET, [(T0 + 4 * 3600, 50.0)])
    assert wait_for(
        lambda: (
            points_of(stub_b.QueryTimeSeries(later_hour)) == [(T0 + 4 * 3600, 50.0 + 17 + 18 + 19)]
        ),
        timeout_s=1.0,
    )
    assert b_answers_from_its_cache()


def test_a_replica_whose_listener_is_down_answers_from_the_database(start_service, repository, dsn):
    repository.upsert_points(ASSET, [(T0 + i * 900, float(i)) for i in range(8)])
    service = start_service()
    service.wait_serving()
    assert wait_for(lambda: listening_replicas(dsn) == 1, timeout_s=10)
    stub = service.stub()
    query = request(T0, T0 + 3600, "1h", "SUM")
    for _ in range(2):
        assert points_of(stub.QueryTimeSeries(query)) == [(T0, 0.0 + 1 + 2 + 3)]

    # Writes made while the listener is away are never heard of, so its cache cannot be
    # trusted until it listens again.
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (LISTENER_APPLICATION_NAME,),
        )

    def listener_down() -> bool:
        lost = "change listener lost its database connection; reconnecting"
        return any(r["message"] == lost for r in service.records())

    assert wait_for(listener_down, timeout_s=5), service.log_text()
    repository.upsert_points(ASSET, [(T0, 100.0)])
    assert points_of(stub.QueryTimeSeries(query)) == [(T0, 100.0 + 1 + 2 + 3)]

    assert wait_for(lambda: listening_replicas(dsn) == 1, timeout_s=10)
    repository.upsert_points(ASSET, [(T0, 200.0)])
    assert wait_for(
        lambda: points_of(stub.QueryTimeSeries(query)) == [(T0, 200.0 + 1 + 2 + 3)],
        timeout_s=1.0,
    )
    queries = [r for r in service.records() if r.get("method") == edgecom.QUERY_METHOD]
    assert [r["cache"] for r in queries[:2]] == ["miss", "hit"]


# --- TLS ----------------------------------------------------------------------------------


class Pki:
    """A test CA with a server certificate for localhost/127.0.0.1 and a client certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._openssl(
            "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=edgecom test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        extensions = {
            "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            "client": "extendedKeyUsage=clientAuth\n",
        }
        for name, text in extensions.items():
            (directory / f"{name}.ext").write_text(text)
            self._openssl(
                "req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=edgecom test {name}",
            )  # fmt: skip
            self._openssl(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            )  # fmt: skip

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def _openssl(self, *args: str) -> None:
        result = subprocess.run(
            ["openssl", *args], cwd=self.dir, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    assert subprocess.run(["openssl", "version"], capture_output=True).returncode == 0, (
        "the openssl command is needed to make test certificates"
    )
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: Pki, *, client_ca: bool = False) -> dict[str, str]:
    env = {
        "EDGECOM_SERVER_TLS_CERT_FILE": pki.path("server.pem"),
        "EDGECOM_SERVER_TLS_KEY_FILE": pki.path("server.key"),
    }
    if client_ca:
        env["EDGECOM_SERVER_TLS_CLIENT_CA_FILE"] = pki.path("ca.pem")
    return env


def health_status(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(start_service, pki, grpcurl):
    service = start_service(**tls_env(pki))
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.read("ca.pem"))
    service.wait_serving(trusted)
    assert list(service.stub(trusted).QueryTimeSeries(request(T0, T0 + DAY)).data) == []

    code, _ = status_of(lambda: health_status(service.channel()))
    assert code == grpc.StatusCode.UNAVAILABLE
    # The system's trust store does not know the test CA.
    code, _ = status_of(lambda: health_status(service.channel(grpc.ssl_channel_credentials())))
    assert code == grpc.StatusCode.UNAVAILABLE

    listed = subprocess.run(
        [grpcurl, "-cacert", pki.path("ca.pem"), service.address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    assert "edgecom.TimeSeriesService" in listed.stdout.split()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_service, pki, grpcurl):
    service = start_service(**tls_env(pki, client_ca=True))
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.read("ca.pem"),
        private_key=pki.read("client.key"),
        certificate_chain=pki.read("client.pem"),
    )
    service.wait_serving(with_cert)
    assert list(service.stub(with_cert).QueryTimeSeries(request(T0, T0 + DAY)).data) == []

    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.read("ca.pem"))
    code, _ = status_of(lambda: health_status(service.channel(without_cert)))
    assert code == grpc.StatusCode.UNAVAILABLE

    # Only with a certificate: grpcurl without one redials until its 10 s connect timeout.
    tls_flags = ["-cacert", pki.path("ca.pem")]
    tls_flags += ["-cert", pki.path("client.pem"), "-key", pki.path("client.key")]
    listed = subprocess.run(
        [grpcurl, *tls_flags, service.address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr


def run_until_exit(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    """Run a service process expected to stop by itself at start-up."""
    defaults = {
        "EDGECOM_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "EDGECOM_METRICS_PORT": "0",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "edgecom.py")],
        env=service_env(**{**defaults, **overrides}),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_a_missing_tls_file_stops_start_up_with_one_clear_line(
    pki, tmp_path, key, stopped_at_start_up
):
    missing = str(tmp_path / "nowhere.pem")
    result = stopped_at_start_up(
        **{**tls_env(pki, client_ca=True), f"EDGECOM_SERVER_TLS_{key.upper()}": missing},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"edgecom: configuration error: server.tls.{key}: cannot read {missing}: "
        "No such file or directory"
    ]


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_a_tls_file_without_pem_content_stops_start_up_with_one_clear_line(
    pki, tmp_path, key, stopped_at_start_up
):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    result = stopped_at_start_up(
        **{**tls_env(pki, client_ca=True), f"EDGECOM_SERVER_TLS_{key.upper()}": str(garbage)},
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"edgecom: configuration error: server.tls.{key}: {garbage} ")
    assert "PEM" in line


def test_a_port_in_use_stops_start_up_with_a_log_line_not_a_traceback(tmp_path, dsn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_until_exit(
            tmp_path,
            EDGECOM_DATABASE_URL=dsn,
            EDGECOM_SERVER_HOST="127.0.0.1",
            EDGECOM_SERVER_PORT=str(port),
            EDGECOM_LOGGING_FORMAT="json",
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [failure] = [r for r in records if r["level"] == "error"]
    assert failure["message"] == "cannot start"
    assert f"cannot listen on 127.0.0.1:{port}" in failure["error"]


# --- authentication -----------------------------------------------------------------------


def test_bearer_tokens_guard_queries_but_not_health_or_reflection(start_service, grpcurl):
    service = start_service(EDGECOM_AUTH_TOKENS="tok1,tok2")
    service.wait_serving()
    stub = service.stub()
    query = request(T0, T0 + DAY)

    for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "tok1"),)):
        code, details = status_of(
            lambda metadata=metadata: stub.QueryTimeSeries(query, metadata=metadata)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in details
    for token in ("tok1", "tok2"):
        reply = stub.QueryTimeSeries(query, metadata=(("authorization", f"Bearer {token}"),))
        assert list(reply.data) == []
    assert health_status(service.channel()) == SERVING

    def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30
        )

    listed = run_grpcurl(service.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "edgecom.TimeSeriesService" in listed.stdout.split()
    body = json.dumps(
        {
            "start": "2023-11-15T00:00:00Z",
            "end": "2023-11-16T00:00:00Z",
            "window": "1h",
            "aggregation": "avg",
        }
    )
    method = "edgecom.TimeSeriesService/QueryTimeSeries"
    refused = run_grpcurl("-d", body, service.address, method)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    answered = run_grpcurl("-H", "authorization: Bearer tok2", "-d", body, service.address, method)
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout) == {}


# --- metrics ------------------------------------------------------------------------------


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator() as sim:
        yield sim


BURST = 3


def test_metrics_endpoint_reports_calls_cache_rate_limit_and_ingestion(
    start_service, simulator, repository
):
    metrics_port = free_port()
    before = time.time()
    service = start_service(
        EDGECOM_UPSTREAM_URL=simulator.url_template,
        EDGECOM_METRICS_PORT=str(metrics_port),
        EDGECOM_UPSTREAM_BOOTSTRAP="2d",
        # BURST calls, then one token every 1000 s: the next call is refused whatever the pace.
        EDGECOM_RATE_LIMIT_RPS="0.001",
        EDGECOM_RATE_LIMIT_BURST=str(BURST),
    )
    service.wait_serving()

    def coverage() -> float | None:
        return scrape(metrics_port).get(("edgecom_coverage_ratio", (("asset_id", ASSET),)))

    assert wait_for(lambda: coverage() == 1.0, timeout_s=30), service.log_text()
    stub = service.stub()
    now = int(time.time())
    query = request(now - 2 * DAY, now, "1h", "AVG")
    first = stub.QueryTimeSeries(query)
    assert len(first.data) >= 47, "two days of ingested points, in hourly buckets"
    for _ in range(BURST - 1):
        assert stub.QueryTimeSeries(query) == first
    code, details = status_of(lambda: stub.QueryTimeSeries(query))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry in" in details
    samples = scrape(metrics_port)
    after = time.time()

    def value(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in samples, f"{key} not in {sorted(samples)}"
        return samples[key]

    method = edgecom.QUERY_METHOD
    assert value("edgecom_grpc_requests_total", method=method, code="OK") == BURST
    assert value("edgecom_grpc_requests_total", method=method, code="RESOURCE_EXHAUSTED") == 1
    assert value("edgecom_grpc_requests_total", method=HEALTH_METHOD, code="OK") >= 1
    assert value("edgecom_grpc_request_duration_seconds_count", method=method) == BURST + 1
    assert value("edgecom_grpc_request_duration_seconds_bucket", method=method, le="+Inf") == (
        BURST + 1
    )
    # The first answer is not stored when ingestion's last write is heard while it runs, so
    # the split between hits and misses is read from the request log.
    looked_up = [r["cache"] for r in service.records() if r.get("method") == method]
    assert looked_up[0] == "miss" and "hit" in looked_up
    assert value("edgecom_cache_hits_total") == looked_up.count("hit")
    assert value("edgecom_cache_misses_total") == looked_up.count("miss")
    assert value("edgecom_cache_entries") == 1
    assert value("edgecom_rate_limited_total") == 1

    # Ingestion: what the simulator served is what was counted and what the database holds.
    fetches = [r for r in simulator.requests if r.asset_id == ASSET]
    assert fetches and all(r.status == 200 for r in fetches)
    served = sum(len(simulator.points(ASSET, r.start_s, r.end_s)) for r in fetches)
    stored = repository.asset_status([ASSET], start_s=0, end_s=int(after))[0].points
    assert served == stored >= 2 * 96
    assert value("edgecom_ingested_points_total", asset_id=ASSET) == served
    assert value("edgecom_skipped_points_total", asset_id=ASSET) == 0
    assert value("edgecom_upstream_requests_total", asset_id=ASSET, outcome="ok") == len(fetches)
    assert value("edgecom_upstream_request_duration_seconds_count") == len(fetches)
    assert before <= value("edgecom_last_successful_fetch_timestamp_seconds", asset_id=ASSET)
    assert value("edgecom_last_successful_fetch_timestamp_seconds", asset_id=ASSET) <= after
    assert value("edgecom_coverage_ratio", asset_id=ASSET) == 1.0


# --- request log --------------------------------------------------------------------------


def test_each_call_logs_one_json_line_with_the_request_id_it_returns(start_service):
    service = start_service()
    service.wait_serving()
    stub = service.stub()
    query = request(T0, T0 + DAY)

    reply, ok = stub.QueryTimeSeries.with_call(query, metadata=(("x-request-id", "req-ok-1"),))
    _, hit = stub.QueryTimeSeries.with_call(query, metadata=(("x-request-id", "req-ok-2"),))
    with pytest.raises(grpc.RpcError) as refused:
        stub.QueryTimeSeries(
            request(T0, T0 + DAY, window="2y"), metadata=(("x-request-id", "req-bad"),)
        )
    _, anonymous = stub.QueryTimeSeries.with_call(request(T0, T0 + 3600))

    def trailer(call: grpc.Call) -> str | None:
        return dict(call.trailing_metadata() or ()).get("x-request-id")

    assert trailer(ok) == "req-ok-1"
    assert trailer(hit) == "req-ok-2"
    assert trailer(refused.value) == "req-bad"
    generated = trailer(anonymous)
    assert generated is not None and len(generated) == 32
    int(generated, 16)

    def rpc_lines(request_id: str) -> list[dict[str, Any]]:
        return [
            r
            for r in service.records()
            if r["message"] == "rpc" and r.get("request_id") == request_id
        ]

    assert wait_for(lambda: rpc_lines(generated), timeout_s=5), service.log_text()
    lines = {rid: rpc_lines(rid) for rid in ("req-ok-1", "req-ok-2", "req-bad", generated)}
    assert all(len(found) == 1 for found in lines.values()), lines
    (first,) = lines["req-ok-1"]
    assert first["method"] == edgecom.QUERY_METHOD
    assert first["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert first["code"] == "OK"
    assert first["duration_ms"] >= 0
    assert (first["cache"], first["points"]) == ("miss", len(reply.data))
    assert (lines["req-ok-2"][0]["cache"], lines["req-ok-2"][0]["code"]) == ("hit", "OK")
    assert lines["req-bad"][0]["code"] == "INVALID_ARGUMENT"
    assert lines[generated][0]["code"] == "OK"


# --- graceful shutdown --------------------------------------------------------------------

IN_FLIGHT = 20
# Generous, so that a loaded machine cannot run the grace period out before the lock is
# released; the exit comes as soon as the calls are done, not at its end.
GRACE_S = 30


def test_sigterm_lets_calls_in_flight_finish_and_refuses_new_ones(start_service, dsn, repository):
    repository.upsert_points(ASSET, [(T0 + i * 900, float(i)) for i in range(96)])
    service = start_service(
        EDGECOM_SERVER_GRACE_PERIOD=f"{GRACE_S}s",
        EDGECOM_SERVER_MAX_WORKERS=str(IN_FLIGHT + 12),
        EDGECOM_DATABASE_MAX_CONNECTIONS=str(IN_FLIGHT + 5),
    )
    service.wait_serving()
    stub = service.stub()
    health_stub = health_pb2_grpc.HealthStub(service.channel())
    watch = health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=60)
    assert next(watch).status == SERVING

    blocker = lock_points(dsn)
    try:
        # Distinct ranges, so no call could be answered from another's cached result.
        calls = [
            stub.QueryTimeSeries.future(request(T0, T0 + (i + 1) * 3600, "1h", "SUM"), timeout=60)
            for i in range(IN_FLIGHT)
        ]
        assert wait_for(lambda: bucket_queries_waiting_for_a_lock(dsn) == IN_FLIGHT, timeout_s=20)
        service.proc.send_signal(signal.SIGTERM)

        statuses = (reply.status for reply in watch)
        assert next(status for status in statuses if status != SERVING) == NOT_SERVING

        def refused() -> bool:
            try:
                health_stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE
            return False

        assert wait_for(refused, timeout_s=5), service.log_text()
        code, _ = status_of(lambda: stub.QueryTimeSeries(request(T0, T0 + DAY), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert not any(call.done() for call in calls)
    finally:
        blocker.close()

    replies = [call.result() for call in calls]
    assert [len(reply.data) for reply in replies] == list(range(1, IN_FLIGHT + 1))
    assert service.proc.wait(GRACE_S + 20) == 0, service.log_text()
    messages = [r["message"] for r in service.records()]
    assert messages.index("shutdown requested") < messages.index("server stopped")
    assert messages[-1] == "stopped"


def test_an_open_health_watch_does_not_hold_the_exit(start_service):
    # A grace period far longer than the wait below: exiting in time shows the server did not
    # wait for the never-ending Watch stream once no call was left.
    service = start_service(EDGECOM_SERVER_GRACE_PERIOD="120s")
    service.wait_serving()
    health_stub = health_pb2_grpc.HealthStub(service.channel())
    watch = health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=300)
    assert next(watch).status == SERVING
    service.proc.send_signal(signal.SIGTERM)
    assert next(reply.status for reply in watch if reply.status != SERVING) == NOT_SERVING
    assert service.proc.wait(60) == 0, service.log_text()


# --- limits: cache memory and rate limit ----------------------------------------------------

QUARTER = 900
ANSWER_POINTS = 1500  # about 31 KB serialized: 32 fit in a 1 MiB cache


def test_many_distinct_large_answers_keep_the_cache_within_its_byte_bound(repository, dsn):
    max_bytes = 2**20
    config = Config(
        upstream=UpstreamConfig(assets=(ASSET,)),
        cache=CacheConfig(max_bytes=max_bytes),
        rate_limit=RateLimitConfig(rps=0),
    )
    metrics = Metrics()
    cache = QueryCache(config.cache.size, max_bytes=config.cache.max_bytes, metrics=metrics)
    interceptors = edgecom.interceptors_for(config, metrics=metrics, cache=cache)
    running = RunningService(
        repository, assets=(ASSET,), max_points=100000, interceptors=interceptors
    )
    distinct = 300
    huge_points = 7000  # about 147 KB: over an eighth of max_bytes
    insert_quarter_hours(dsn, T0, huge_points)

    def held_bytes() -> float:
        return metrics.registry.get_sample_value("edgecom_cache_bytes")

    try:
        for i in range(distinct):
            start_s = T0 + i * QUARTER
            answer = running.stub.QueryTimeSeries(
                request(start_s, start_s + ANSWER_POINTS * QUARTER, "15m", "AVG"), timeout=30
            )
            assert len(answer.data) == ANSWER_POINTS
            assert 0 < held_bytes() <= max_bytes
        # Far fewer than the entry bound, and the most recent answers are the ones kept.
        assert 16 <= len(cache) < distinct // 4
        assert metrics.registry.get_sample_value("edgecom_cache_entries") == len(cache)
        last = request(start_s, start_s + ANSWER_POINTS * QUARTER, "15m", "AVG")
        hits = metrics.registry.get_sample_value("edgecom_cache_hits_total")
        assert running.stub.QueryTimeSeries(last, timeout=30) == answer
        assert metrics.registry.get_sample_value("edgecom_cache_hits_total") == hits + 1

        # An answer of more than an eighth of the bound is served but never stored.
        huge = request(T0, T0 + huge_points * QUARTER, "15m", "AVG")
        entries, held = len(cache), held_bytes()
        for _ in range(2):
            assert len(running.stub.QueryTimeSeries(huge, timeout=30).data) == huge_points
        assert (len(cache), held_bytes()) == (entries, held)
        assert metrics.registry.get_sample_value("edgecom_cache_hits_total") == hits + 1
    finally:
        running.close()


def burst_outcomes(calls: Iterator[Callable[[], object]]) -> list[grpc.StatusCode]:
    """The status code each call ends with, in order."""
    codes = []
    for call in calls:
        try:
            call()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
    return codes


RATE_LIMITED = {"EDGECOM_RATE_LIMIT_RPS": "0.001", "EDGECOM_RATE_LIMIT_BURST": "10"}
OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_fresh_client_id_per_call_does_not_escape_the_rate_limit(start_service):
    service = start_service(**RATE_LIMITED)
    service.wait_serving()
    stub = service.stub()
    codes = burst_outcomes(
        lambda i=i: stub.ListAssets(
            edgecom.protos.ListAssetsRequest(), metadata=(("x-client-id", f"fresh-{i}"),)
        )
        for i in range(100)
    )
    assert codes == [OK] * 10 + [REFUSED] * 90


def test_trusted_client_ids_get_a_bucket_each(start_service):
    service = start_service(**RATE_LIMITED, EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID="true")
    service.wait_serving()
    stub = service.stub()

    def list_assets_as(client_id: str) -> Callable[[], object]:
        metadata = (("x-client-id", client_id),)
        return lambda: stub.ListAssets(edgecom.protos.ListAssetsRequest(), metadata=metadata)

    assert burst_outcomes(list_assets_as(f"meter-{i % 5}") for i in range(50)) == [OK] * 50
    assert burst_outcomes(list_assets_as("meter-0") for _ in range(2)) == [REFUSED] * 2
    assert burst_outcomes([list_assets_as("meter-5")]) == [OK]


def test_wrong_token_guesses_are_rate_limited(start_service):
    service = start_service(**RATE_LIMITED, EDGECOM_AUTH_TOKENS="s3cret")
    service.wait_serving()
    stub = service.stub()
    codes = burst_outcomes(
        lambda i=i: stub.ListAssets(
            edgecom.protos.ListAssetsRequest(), metadata=(("authorization", f"Bearer guess-{i}"),)
        )
        for i in range(50)
    )
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 10 + [REFUSED] * 40
    # The right token from the same peer waits for the refill like any other call.
    code, details = status_of(
        lambda: stub.ListAssets(
            edgecom.protos.ListAssetsRequest(), metadata=(("authorization", "Bearer s3cret"),)
        )
    )
    assert code == REFUSED and "for client '127.0.0.1'" in details


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.slow
def test_service_memory_stays_flat_under_many_distinct_large_answers(start_service, dsn):
    max_bytes = 4 * 2**20
    metrics_port = free_port()
    service = start_service(
        EDGECOM_CACHE_MAX_BYTES=str(max_bytes), EDGECOM_METRICS_PORT=str(metrics_port)
    )
    service.wait_serving()
    half_year = 17_520  # quarter-hours: about 370 KB serialized, 1.5 MB as a parsed message
    distinct, warm_up = 120, 30
    insert_quarter_hours(dsn, T0, half_year + distinct)
    stub = service.stub()
    rss = []
    for i in range(distinct):
        start_s = T0 + i * QUARTER
        answer = stub.QueryTimeSeries(
            request(start_s, start_s + half_year * QUARTER, "15m", "AVG"), timeout=60
        )
        assert len(answer.data) == half_year
        rss.append(process_rss_bytes(service.proc.pid))
    samples = scrape(metrics_port)
    assert 0 < samples[("edgecom_cache_bytes", ())] <= max_bytes
    assert samples[("edgecom_cache_entries", ())] < warm_up
    # Once the cache is full, more distinct answers replace entries instead of adding memory
    # (about 1 MiB in all, measured); without the byte bound each one would add 370 KB held
    # serialized, 1.5 MB held as a message.
    growth = rss[-1] - rss[warm_up - 1]
    assert growth < 12 * 2**20, (
        f"RSS grew {growth / 2**20:.0f} MiB over {distinct - warm_up} answers"
    )


# --- limits: worker threads and queued calls ---------------------------------------------------


def first_reply(stream: Any) -> grpc.StatusCode:
    """OK when the stream answers, else the code it ends with."""
    try:
        next(stream)
        return OK
    except grpc.RpcError as error:
        return error.code()


def open_reflection_stream(channel: grpc.Channel, until: threading.Event) -> Any:
    """A reflection stream that asks once and then keeps its request side open until `until`."""

    def requests() -> Iterator[Any]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        until.wait()

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return stub.ServerReflectionInfo(requests(), timeout=60)


def test_open_health_and_reflection_streams_leave_workers_for_queries(start_service, repository):
    repository.upsert_points(ASSET, [(T0, 1.0)])
    service = start_service(
        EDGECOM_SERVER_MAX_WORKERS="4",
        EDGECOM_SERVER_MAX_OPEN_STREAMS="2",
        EDGECOM_QUERY_MAX_STREAMS="1",
    )
    service.wait_serving()
    # One client opens more never-ending streams than there are workers and never closes them.
    hog, done = service.channel(), threading.Event()
    try:
        health_stub = health_pb2_grpc.HealthStub(hog)
        watches = [health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(6)]
        reflections = [open_reflection_stream(hog, done) for _ in range(6)]
        # Another client still gets its answer, well within a short deadline.
        answer = service.stub().QueryTimeSeries(request(T0, T0 + DAY, "1d", "AVG"), timeout=2)
        assert points_of(answer) == [(T0, 1.0)]
        codes = [first_reply(stream) for stream in (*watches, *reflections)]
        assert sorted(codes, key=lambda code: code.name) == [OK] * 2 + [REFUSED] * 10
        _, details = status_of(lambda: next(health_stub.Watch(health_pb2.HealthCheckRequest())))
        assert "server.max_open_streams" in details
    finally:
        done.set()


def test_calls_beyond_max_concurrent_rpcs_are_refused_instead_of_queued(
    start_service, repository, dsn
):
    repository.upsert_points(ASSET, [(T0, 1.0)])
    service = start_service(
        EDGECOM_SERVER_MAX_WORKERS="3",
        EDGECOM_SERVER_MAX_OPEN_STREAMS="1",
        EDGECOM_QUERY_MAX_STREAMS="1",
        EDGECOM_SERVER_MAX_CONCURRENT_RPCS="4",
    )
    service.wait_serving()
    stub = service.stub()
    query = request(T0, T0 + DAY, "1d", "AVG")
    blocker = lock_points(dsn)
    try:
        # Three queries take every worker and wait for the lock; a fourth waits for a worker.
        running = [stub.QueryTimeSeries.future(query, timeout=30) for _ in range(3)]
        assert wait_for(lambda: bucket_queries_waiting_for_a_lock(dsn) == 3)
        queued = stub.QueryTimeSeries.future(query, timeout=30)
        code, _ = status_of(lambda: stub.QueryTimeSeries(query, timeout=3))
        assert code == REFUSED
        assert not queued.done()
    finally:
        blocker.close()
    for call in (*running, queued):
        assert points_of(call.result()) == [(T0, 1.0)]


def test_go_service_config_with_the_asset_in_its_url_loads_and_ingests(dsn, tmp_path, simulator):
    # The Go service's k8s config names one asset by its literal id in server.url.
    url = simulator.url_template.replace("{asset_id}", ASSET)
    path = tmp_path / "config.yaml"
    path.write_text(f'server:\n  url: "{url}"\n')
    env = service_env(
        EDGECOM_CONFIG=str(path),
        EDGECOM_DATABASE_URL=dsn,
        EDGECOM_SERVER_HOST="127.0.0.1",
        EDGECOM_SERVER_PORT="0",
        EDGECOM_METRICS_PORT="0",
        EDGECOM_LOGGING_FORMAT="json",
        EDGECOM_UPSTREAM_BOOTSTRAP="1d",
    )
    service = ServiceProcess(tmp_path / "edgecom.log", env)
    try:
        service.wait_serving()
        assets = service.stub().ListAssets(edgecom.protos.ListAssetsRequest()).assets
        assert [asset.asset_id for asset in assets] == [ASSET]

        def fetched() -> bool:
            return any(r.asset_id == ASSET and r.status == 200 for r in simulator.requests)

        assert wait_for(fetched, timeout_s=30), service.log_text()
    finally:
        service.close()
