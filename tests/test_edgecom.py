"""The gRPC service end to end: real server on loopback, real stubs, real grpcurl."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import psycopg
import pytest
from conftest import (
    ASSET,
    DAY,
    OTHER_ASSET,
    ROOT,
    T0,
    RunningService,
    assert_same,
    free_port,
    points_of,
    process_env,
    reference,
    request,
    run_grpcurl,
    series,
    status_of,
    wait_for,
)
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

import edgecom
from repository import Repository
from service import parse_bucket_window
from simulator import Simulator

TimeSeriesRequest = edgecom.protos.TimeSeriesRequest


def ts(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize("window", ["1m", "5m", "15m", "1h", "1d"])
@pytest.mark.parametrize("aggregation", ["MIN", "MAX", "AVG", "SUM"])
def test_query_matches_the_reference(service, window, aggregation):
    points = [*series(T0 - DAY, 3 * 96), (T0 + 30, 5.5), (T0 + 60, -2.0)]
    service.repository.upsert_points(ASSET, points)
    window_s = parse_bucket_window(window).count
    response = service.stub.QueryTimeSeries(
        request(T0 - DAY, T0 + DAY, window, aggregation.lower())
    )
    assert_same(points_of(response), reference(points, T0 - DAY, T0 + DAY, window_s, aggregation))


def test_empty_asset_id_means_the_first_configured_asset(service):
    service.repository.upsert_points(ASSET, [(T0, 1.0)])
    service.repository.upsert_points(OTHER_ASSET, [(T0, 2.0)])
    assert points_of(service.stub.QueryTimeSeries(request(T0, T0 + 900))) == [(T0, 1.0)]
    other = service.stub.QueryTimeSeries(request(T0, T0 + 900, asset_id=OTHER_ASSET))
    assert points_of(other) == [(T0, 2.0)]


def test_equivalent_windows_agree(service):
    service.repository.upsert_points(ASSET, series(T0, 96))
    hourly = service.stub.QueryTimeSeries(request(T0, T0 + DAY, "1h", "sum"))
    minutes = service.stub.QueryTimeSeries(request(T0, T0 + DAY, "60m", "SUM"))
    assert points_of(hourly) == points_of(minutes) and len(hourly.data) == 24


def test_fractional_timestamps_keep_the_half_open_range(service):
    service.repository.upsert_points(ASSET, [(T0, 1.0), (T0 + 900, 2.0)])
    # start just after T0 excludes it; end just after T0+900 includes it.
    req = TimeSeriesRequest(start=ts(T0, 1), end=ts(T0 + 900, 1), window="1h", aggregation="SUM")
    assert points_of(service.stub.QueryTimeSeries(req)) == [(T0, 2.0)]


def test_empty_store_returns_empty_data(service):
    response = service.stub.QueryTimeSeries(request(T0, T0 + DAY))
    assert list(response.data) == []


@pytest.mark.parametrize(
    ("req", "code", "hint"),
    [
        (
            TimeSeriesRequest(end=ts(T0), window="1h", aggregation="AVG"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "start",
        ),
        (
            TimeSeriesRequest(start=ts(T0), window="1h", aggregation="AVG"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "end",
        ),
        (request(T0, T0), grpc.StatusCode.INVALID_ARGUMENT, "before end"),
        (request(T0 + 10, T0), grpc.StatusCode.INVALID_ARGUMENT, "before end"),
        (request(T0, T0 + DAY, window="2y"), grpc.StatusCode.INVALID_ARGUMENT, '"1m", "5m"'),
        (request(T0, T0 + DAY, window="0m"), grpc.StatusCode.INVALID_ARGUMENT, "window"),
        (request(T0, T0 + DAY, window="367d"), grpc.StatusCode.INVALID_ARGUMENT, "366d"),
        (request(T0, T0 + DAY, window=""), grpc.StatusCode.INVALID_ARGUMENT, "window"),
        (
            request(T0, T0 + DAY, aggregation="MEDIAN"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MIN, MAX, AVG, SUM",
        ),
        (request(T0, T0 + DAY, asset_id="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    ],
)
def test_errors_have_status_codes_and_say_what_to_fix(service, req, code, hint):
    got, details = status_of(lambda: service.stub.QueryTimeSeries(req))
    assert got == code
    assert hint in details


def test_too_many_points_is_resource_exhausted(repository):
    running = RunningService(repository, assets=(ASSET,), max_points=10)
    try:
        repository.upsert_points(ASSET, series(T0, 96))
        code, details = status_of(
            lambda: running.stub.QueryTimeSeries(request(T0, T0 + DAY, "15m"))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "widen the window or shorten the range" in details
        # Exactly at the cap is fine.
        assert len(running.stub.QueryTimeSeries(request(T0, T0 + 10 * 900, "15m")).data) == 10
    finally:
        running.close()


def test_database_down_is_unavailable_and_health_not_serving():
    repo = Repository(dsn="postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1).open()
    health_servicer = edgecom.health.HealthServicer()
    servicer = edgecom.TimeSeriesServicer(repository=repo, assets=(ASSET,), max_points=10)
    server, port = edgecom.create_server(
        address="127.0.0.1:0", servicer=servicer, health_servicer=health_servicer
    )
    watch = edgecom.DatabaseWatch(repository=repo, health_servicer=health_servicer, interval_s=0.2)
    server.start()
    watch.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = edgecom.services.TimeSeriesServiceStub(channel)
            code, details = status_of(lambda: stub.QueryTimeSeries(request(T0, T0 + DAY)))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "database" in details
            health_stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", "edgecom.TimeSeriesService"):
                status = health_stub.Check(health_pb2.HealthCheckRequest(service=name)).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0).wait()
        watch.close()
        repo.close()


def test_health_stays_serving_while_every_pool_connection_is_busy(dsn):
    with Repository(dsn=dsn, max_connections=2, connect_timeout_s=1) as repo:
        repo.migrate()
        running = RunningService(repo, assets=(ASSET,), max_points=100000)
        health_stub = health_pb2_grpc.HealthStub(running.channel)
        # Both pool connections wait for the lock in a bucket query until it is released.
        blocker = psycopg.connect(dsn)
        blocker.execute("LOCK TABLE points IN ACCESS EXCLUSIVE MODE")
        calls = [
            running.stub.QueryTimeSeries.future(request(T0, T0 + DAY, window=f"{n}h"), timeout=30)
            for n in (1, 2)
        ]
        try:
            with psycopg.connect(dsn, autocommit=True) as watcher:

                def waiting_queries() -> int:
                    return watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query LIKE '/* edgecom buckets */%%'"
                    ).fetchone()[0]

                assert wait_for(lambda: waiting_queries() == 2)
            # Longer than the pool's wait for a connection, several health checks over.
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                status = health_stub.Check(health_pb2.HealthCheckRequest(service="")).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                time.sleep(0.1)
        finally:
            blocker.close()
            for call in calls:
                call.result()
            running.close()


def test_health_is_serving_once_migrated(service):
    health_stub = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", "edgecom.TimeSeriesService"):
        status = health_stub.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_health_answers_for_the_go_service_name_too(service):
    # Probes written for the Go service ask for its service name.
    health_stub = health_pb2_grpc.HealthStub(service.channel)
    request = health_pb2.HealthCheckRequest(service="timeseries.TimeSeriesService")
    assert health_stub.Check(request).status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("call", "statement"),
    [
        (lambda stub: stub.QueryTimeSeries(request(T0, T0 + DAY), timeout=0.5), "%date_bin%"),
        (lambda stub: stub.ListAssets(edgecom.protos.ListAssetsRequest(), timeout=0.5), "%wanted%"),
    ],
    ids=["QueryTimeSeries", "ListAssets"],
)
def test_deadline_cancels_the_database_query(service, dsn, call, statement):
    service.repository.upsert_points(ASSET, series(T0, 10))
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE points IN ACCESS EXCLUSIVE MODE")
        code, _ = status_of(lambda: call(service.stub))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED

        def running_queries() -> int:
            with psycopg.connect(dsn, autocommit=True) as conn:
                return conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'active' AND query LIKE %s",
                    (statement,),
                ).fetchone()[0]

        assert wait_for(lambda: running_queries() == 0, timeout_s=5)


def test_grpcurl_list_describe_and_query(service, grpcurl):
    service.repository.upsert_points(ASSET, series(T0, 8))

    listed = run_grpcurl(grpcurl, service.address, "list").split()
    assert "edgecom.TimeSeriesService" in listed and "grpc.health.v1.Health" in listed
    described = run_grpcurl(grpcurl, service.address, "describe", "edgecom.TimeSeriesService")
    assert "rpc QueryTimeSeries ( .edgecom.TimeSeriesRequest )" in described
    body = json.dumps(
        {
            "start": "2023-11-15T00:00:00Z",
            "end": "2023-11-15T02:00:00Z",
            "window": "1h",
            "aggregation": "max",
        }
    )
    answer = json.loads(
        run_grpcurl(
            grpcurl, "-d", body, service.address, "edgecom.TimeSeriesService/QueryTimeSeries"
        )
    )
    expected = reference(series(T0, 8), T0, T0 + 7200, 3600, "MAX")
    assert [(p["time"], p["value"]) for p in answer["data"]] == [
        ("2023-11-15T00:00:00Z", expected[0][1]),
        ("2023-11-15T01:00:00Z", expected[1][1]),
    ]


def test_process_serves_and_stops_gracefully_on_sigterm(dsn, tmp_path):
    port = free_port()
    env = process_env(dsn, port)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "edgecom.py")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    reply = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            assert wait_for(serving, timeout_s=60)
            stub = edgecom.services.TimeSeriesServiceStub(channel)
            assert list(stub.QueryTimeSeries(request(T0, T0 + DAY)).data) == []
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    events = [json.loads(line)["message"] for line in stderr.splitlines() if line.startswith("{")]
    assert "serving" in events and events[-1] == "stopped"
    assert not (tmp_path / ".edgecom").exists(), "with a database URL, nothing embedded starts"


@pytest.mark.slow
def test_demo_bootstraps_two_years_and_answers_with_the_simulators_data(dsn, grpcurl):
    port = free_port()
    # The test polls ListAssets far faster than a client would.
    env = process_env(dsn, port, EDGECOM_RATE_LIMIT_RPS="0")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "edgecom.py"), "--demo"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = edgecom.services.TimeSeriesServiceStub(channel)

            def bootstrapped() -> bool:
                try:
                    assets = stub.ListAssets(edgecom.protos.ListAssetsRequest(), timeout=5).assets
                except grpc.RpcError:
                    return False
                return len(assets) == 2 and all(a.coverage == 1.0 for a in assets)

            assert wait_for(bootstrapped, timeout_s=300)
            assets = stub.ListAssets(edgecom.protos.ListAssetsRequest()).assets
        assert [a.asset_id for a in assets] == list(edgecom.DEMO_ASSETS)
        for asset in assets:
            # Two years of quarter-hours, give or take the partial step at either end.
            assert abs(asset.point_count - 730 * 96) <= 2
            assert asset.last_error == ""

        # The simulator is deterministic, so the test can compute the same series itself.
        end_s = int(time.time()) // DAY * DAY - DAY
        start_s = end_s - 30 * DAY
        expected = reference(
            Simulator().points(edgecom.DEMO_ASSETS[1], start_s, end_s), start_s, end_s, DAY, "SUM"
        )
        body = json.dumps(
            {
                "start": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(start_s))}",
                "end": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(end_s))}",
                "window": "1d",
                "aggregation": "SUM",
                "asset_id": edgecom.DEMO_ASSETS[1],
            }
        )
        output = run_grpcurl(
            grpcurl, "-d", body, f"127.0.0.1:{port}", "edgecom.TimeSeriesService/QueryTimeSeries"
        )
        answer = json.loads(output)["data"]
        assert len(answer) == 30
        got = [(p["time"], p["value"]) for p in answer]
        want = [(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), v) for t, v in expected]
        assert [t for t, _ in got] == [t for t, _ in want]
        for (_, g), (_, w) in zip(got, want, strict=True):
            assert g == pytest.approx(w, rel=1e-9)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def test_queries_after_the_pools_connections_were_dropped_get_new_ones(service, dsn):
    req = request(T0, T0 + DAY)
    service.stub.QueryTimeSeries(req, timeout=10)
    # What a database restart does to connections idle in the pool.
    with psycopg.connect(dsn, autocommit=True) as admin:
        dropped = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert dropped >= 1
    for _ in range(4):
        service.stub.QueryTimeSeries(req, timeout=10)


@pytest.mark.parametrize("aggregation", ["SUM", "AVG"])
def test_sums_beyond_the_range_of_a_double_are_out_of_range_not_unknown(service, aggregation):
    # Stored data the database cannot aggregate: two readings near the largest double.
    service.repository.upsert_points(ASSET, [(T0, 1e308), (T0 + 900, 1e308)])
    code, details = status_of(
        lambda: service.stub.QueryTimeSeries(request(T0, T0 + DAY, "1d", aggregation))
    )
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert "out of range" in details and "stored values" in details
    # The same data at a finer window, one point per bucket, still answers.
    reply = service.stub.QueryTimeSeries(request(T0, T0 + DAY, "15m", aggregation))
    assert points_of(reply) == [(T0, 1e308), (T0 + 900, 1e308)]
