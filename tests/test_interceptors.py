"""Tests of the server interceptors against a real gRPC server on loopback with real stubs."""

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import wait_for
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

# The modules under test sit at the repository root; the proto is loaded at run time.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proto"))

import edgecom
from interceptors import (
    ENTRY_OVERHEAD_BYTES,
    AuthInterceptor,
    CacheInterceptor,
    CacheKey,
    CallInfo,
    DrainInterceptor,
    MetricsInterceptor,
    OpenStreamLimitInterceptor,
    QueryCache,
    RateLimitInterceptor,
    RequestLogInterceptor,
    Serialized,
    client_key,
    current_call,
)
from metrics import Metrics, start_metrics_server

protos, services = grpc.protos_and_services("edgecom.proto")

QUERY = "/edgecom.TimeSeriesService/QueryTimeSeries"
# A test-only server-streaming method, served by a generic handler with the real messages.
STREAM_SERVICE = "edgecom.test.Streams"
STREAM = f"/{STREAM_SERVICE}/StreamTimeSeries"
POINTS_PER_RESPONSE = 3
STREAM_PAGES = 3
TOKEN = "s3cret-token"
BEARER = (("authorization", f"Bearer {TOKEN}"),)
LOGGER = "test.rpc"


class _Servicer(services.TimeSeriesServiceServicer):
    """Answers POINTS_PER_RESPONSE points whose value is the call number; asset ids pick faults.

    "abort": INVALID_ARGUMENT, "raise": an exception, "set-code": NOT_FOUND without raising,
    "block": waits for release after setting entered; "endless": streams until cancelled.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.stream_calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[CallInfo | None] = []
        self.stream_threads: list[int] = []
        self.records: list[str] | None = None
        self._lock = threading.Lock()

    def QueryTimeSeries(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.calls += 1
            number = self.calls
        self.seen.append(current_call())
        if self.records is not None:
            self.records.append("servicer")
        if request.asset_id == "abort":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown asset")
        if request.asset_id == "raise":
            raise RuntimeError("database went away")
        if request.asset_id == "set-code":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return protos.TimeSeriesResponse()
        if request.asset_id == "block":
            self.entered.set()
            assert self.release.wait(10)
        return _response(float(number), request.start.seconds)

    def StreamTimeSeries(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self._lock:
            self.stream_calls += 1
        self.seen.append(current_call())
        while request.asset_id == "endless" and context.is_active():
            time.sleep(0.005)
            yield _response(0.0, request.start.seconds)
        for page in range(STREAM_PAGES):
            self.stream_threads.append(threading.get_ident())
            if request.asset_id == "abort" and page == 1:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "gap in the data")
            yield _response(float(page), request.start.seconds)


def _response(value: float, start_s: int) -> Any:
    points = [
        protos.TimeSeriesDataPoint(time={"seconds": start_s + 3600 * i}, value=value)
        for i in range(POINTS_PER_RESPONSE)
    ]
    return protos.TimeSeriesResponse(data=points)


def _window_s(window: str) -> int:
    return int(window[:-1]) * {"m": 60, "h": 3600, "d": 86400}[window[-1]]


def _key_fn(method: str, request: Any) -> CacheKey | None:
    """Cache key of a test query: "60m" and "1h", "avg" and "AVG" are the same query."""
    if method != QUERY:
        return None
    if request.asset_id == "bad-key":
        raise ValueError("no such window")
    return CacheKey(
        asset_id=request.asset_id,
        start_s=request.start.seconds,
        end_s=request.end.seconds,
        window=str(_window_s(request.window)),
        aggregation=request.aggregation.upper(),
    )


class _Clock:
    """A clock that moves only when told to, so token refills are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Client:
    def __init__(self, channel: grpc.Channel, port: int) -> None:
        self.port = port
        self.stub = services.TimeSeriesServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.stream = channel.unary_stream(
            STREAM,
            request_serializer=protos.TimeSeriesRequest.SerializeToString,
            response_deserializer=protos.TimeSeriesResponse.FromString,
        )
        # Bytes in, bytes out: the answer as sent.
        self.raw_query = channel.unary_unary(QUERY)

    def query(self, metadata: Sequence[tuple[str, str]] = (), **fields: Any) -> Any:
        response, _ = self.query_with_call(metadata, **fields)
        return response

    def query_with_call(
        self, metadata: Sequence[tuple[str, str]] = (), **fields: Any
    ) -> tuple[Any, grpc.Call]:
        return self.stub.QueryTimeSeries.with_call(
            _request(**fields), metadata=metadata, timeout=10
        )

    def list_services(self) -> list[str]:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = self.reflection.ServerReflectionInfo(iter([request]), timeout=10)
        return [service.name for service in reply.list_services_response.service]

    def check_health(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _request(
    asset_id: str = "a",
    start_s: int = 0,
    end_s: int = 86400,
    window: str = "1h",
    aggregation: str = "AVG",
) -> Any:
    return protos.TimeSeriesRequest(
        start={"seconds": start_s},
        end={"seconds": end_s},
        window=window,
        aggregation=aggregation,
        asset_id=asset_id,
    )


@contextlib.contextmanager
def _serve(
    interceptors: Sequence[grpc.ServerInterceptor], servicer: _Servicer | None = None
) -> Iterator[_Client]:
    servicer = servicer if servicer is not None else _Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=interceptors)
    services.add_TimeSeriesServiceServicer_to_server(servicer, server)
    stream_handler = grpc.unary_stream_rpc_method_handler(
        servicer.StreamTimeSeries,
        request_deserializer=protos.TimeSeriesRequest.FromString,
        response_serializer=protos.TimeSeriesResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                STREAM_SERVICE, {"StreamTimeSeries": stream_handler}
            ),
        )
    )
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        protos.DESCRIPTOR.services_by_name["TimeSeriesService"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield _Client(channel, port)
    finally:
        channel.close()
        server.stop(None)


def _error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


# Rate limit


def test_rate_limit_admits_exactly_the_burst_then_what_the_refill_allows() -> None:
    clock, metrics = _Clock(), Metrics()
    limiter = RateLimitInterceptor(
        rps=5, burst=10, clock=clock, trust_client_id=True, metrics=metrics
    )
    alice = (("x-client-id", "alice"),)
    with _serve([limiter]) as client:
        calls = [
            client.stub.QueryTimeSeries.future(_request(), metadata=alice, timeout=10)
            for _ in range(30)
        ]
        errors = [call.exception() for call in calls]
        refused = [error for error in errors if error is not None]
        assert len(refused) == 20
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == (
                "rate limit of 5 requests/s (burst 10) exceeded for client 'alice'; retry in 0.2 s"
            )
        assert _sample(metrics, "edgecom_rate_limited_total") == 20

        # Another client has its own bucket.
        assert len(client.query(metadata=(("x-client-id", "bob"),)).data) == POINTS_PER_RESPONSE

        # 0.4 s at 5 tokens/s refills exactly two calls.
        clock.now += 0.4
        client.query(metadata=alice)
        client.query(metadata=alice)
        error = _error(lambda: client.query(metadata=alice))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_rate_limit_keys_on_peer_ip_without_client_id() -> None:
    limiter = RateLimitInterceptor(rps=0.001, burst=2, clock=_Clock())
    with _serve([limiter]) as client:
        client.query()
        client.query()
        error = _error(client.query)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "for client '127.0.0.1'" in error.details()
    assert "retry in 1000 s" in error.details()


def test_client_ids_are_ignored_unless_trusted() -> None:
    limiter = RateLimitInterceptor(rps=0.001, burst=2, clock=_Clock())
    with _serve([limiter]) as client:
        client.query(metadata=(("x-client-id", "first"),))
        client.query(metadata=(("x-client-id", "second"),))
        error = _error(lambda: client.query(metadata=(("x-client-id", "third"),)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "for client '127.0.0.1'" in error.details()


def test_client_key_strips_the_port_of_the_peer() -> None:
    assert client_key(None, "ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert client_key(None, "ipv6:[::1]:5555") == "::1"
    assert client_key(None, "ipv6:%5B2001:db8::7%5D:5555") == "2001:db8::7"
    assert client_key(None, "unix:/run/edgecom.sock") == "unix:/run/edgecom.sock"
    assert client_key("meter-7", "ipv4:10.1.2.3:5555") == "meter-7"
    assert len(client_key("x" * 10_000, "ipv4:10.1.2.3:5555")) == 256


def test_rate_limit_table_stays_at_its_bound_and_drops_the_least_recently_seen() -> None:
    limiter = RateLimitInterceptor(rps=0.001, burst=1, max_clients=1000, clock=_Clock())
    assert limiter.check("hot") == 0
    for i in range(999):
        limiter.check(f"client-{i}")
    # "hot" is the least recently seen now; seeing it again keeps it (and it is still empty).
    assert limiter.check("hot") > 0
    limiter.check("one-more")
    assert limiter.check("hot") > 0
    for i in range(100_000):
        limiter.check(f"flood-{i}")
    assert len(limiter) == limiter.client_count == 1000
    # Evicted after the flood, "hot" starts again from a full bucket.
    assert limiter.check("hot") == 0


def test_rate_limit_zero_rps_is_off() -> None:
    limiter = RateLimitInterceptor(rps=0, burst=0)
    with _serve([limiter]) as client:
        for _ in range(40):
            client.query()
    assert limiter.check("anyone") == 0
    assert len(limiter) == 0


def test_health_and_reflection_are_not_rate_limited() -> None:
    limiter = RateLimitInterceptor(rps=0.001, burst=1, clock=_Clock())
    with _serve([limiter]) as client:
        for _ in range(20):
            assert client.check_health() == health_pb2.HealthCheckResponse.SERVING
            assert "edgecom.TimeSeriesService" in client.list_services()
        client.query()
        assert _error(client.query).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_rate_limit_applies_to_streams() -> None:
    limiter = RateLimitInterceptor(rps=0.001, burst=1, clock=_Clock())
    with _serve([limiter]) as client:
        assert len(list(client.stream(_request(), timeout=10))) == STREAM_PAGES
        error = _error(lambda: list(client.stream(_request(), timeout=10)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# Cache


def _cached(size: int = 100, metrics: Metrics | None = None) -> tuple[QueryCache, list[Any]]:
    metrics = metrics if metrics is not None else Metrics()
    cache = QueryCache(size, metrics=metrics)
    return cache, [RequestLogInterceptor(), CacheInterceptor(cache, _key_fn, metrics)]


def test_repeated_query_is_answered_from_the_cache() -> None:
    metrics, servicer = Metrics(), _Servicer()
    cache, chain = _cached(metrics=metrics)
    with _serve(chain, servicer) as client:
        first = client.query()
        second = client.query()
    assert servicer.calls == 1
    assert second == first
    assert _sample(metrics, "edgecom_cache_misses_total") == 1
    assert _sample(metrics, "edgecom_cache_hits_total") == 1
    assert _sample(metrics, "edgecom_cache_entries") == 1 == len(cache)
    assert servicer.seen[0] is not None and servicer.seen[0].cache == "miss"


def test_equivalent_spellings_share_one_entry() -> None:
    servicer = _Servicer()
    _, chain = _cached()
    with _serve(chain, servicer) as client:
        client.query(window="60m", aggregation="avg")
        client.query(window="1h", aggregation="AVG")
        client.query(window="1h", aggregation="MAX")
    assert servicer.calls == 2


def test_invalidation_drops_only_overlapping_entries() -> None:
    servicer = _Servicer()
    cache, chain = _cached()
    with _serve(chain, servicer) as client:
        client.query(start_s=0, end_s=86400)
        # Ranges are half-open: [86400, ...) and [..., 0) touch the query's range but miss it.
        assert cache.invalidate("a", 86400, 90000) == 0
        assert cache.invalidate("a", -3600, 0) == 0
        assert cache.invalidate("b", 0, 86400) == 0
        client.query(start_s=0, end_s=86400)
        assert servicer.calls == 1
        assert cache.invalidate("a", 86399, 86400) == 1
        assert client.query(start_s=0, end_s=86400).data[0].value == 2
        assert servicer.calls == 2


def test_query_running_across_an_invalidation_is_not_stored() -> None:
    servicer = _Servicer()
    cache, chain = _cached()
    with _serve(chain, servicer) as client:
        running = client.stub.QueryTimeSeries.future(_request(asset_id="block"), timeout=10)
        assert servicer.entered.wait(5)
        cache.invalidate("block", 0, 3600)
        servicer.release.set()
        assert running.result().data[0].value == 1
        assert len(cache) == 0
        assert client.query(asset_id="block").data[0].value == 2
        assert client.query(asset_id="block").data[0].value == 2
    assert servicer.calls == 2


def test_failed_calls_are_not_cached() -> None:
    servicer = _Servicer()
    cache, chain = _cached()
    with _serve(chain, servicer) as client:
        for asset_id, code in [
            ("abort", grpc.StatusCode.INVALID_ARGUMENT),
            ("raise", grpc.StatusCode.UNKNOWN),
            ("set-code", grpc.StatusCode.NOT_FOUND),
        ]:
            for _ in range(2):
                assert _error(lambda a=asset_id: client.query(asset_id=a)).code() == code
    assert servicer.calls == 6
    assert len(cache) == 0


def test_a_failing_key_function_passes_the_call_through() -> None:
    servicer = _Servicer()
    _, chain = _cached()
    with _serve(chain, servicer) as client:
        client.query(asset_id="bad-key")
        client.query(asset_id="bad-key")
    assert servicer.calls == 2


def test_least_recently_used_entry_is_evicted_at_size() -> None:
    servicer = _Servicer()
    cache, chain = _cached(size=2)
    with _serve(chain, servicer) as client:
        client.query(asset_id="a")
        client.query(asset_id="b")
        client.query(asset_id="a")  # hit: "a" is now the most recently used
        client.query(asset_id="c")  # evicts "b"
        assert servicer.calls == 3
        client.query(asset_id="a")
        assert servicer.calls == 3
        client.query(asset_id="b")
        assert servicer.calls == 4
    assert len(cache) == 2


def test_size_zero_disables_the_cache() -> None:
    metrics, servicer = Metrics(), _Servicer()
    cache, chain = _cached(size=0, metrics=metrics)
    with _serve(chain, servicer) as client:
        client.query()
        client.query()
    assert servicer.calls == 2
    assert len(cache) == 0
    assert _sample(metrics, "edgecom_cache_misses_total") == 0
    assert servicer.seen[1] is not None and servicer.seen[1].cache is None


def test_streams_are_not_cached() -> None:
    servicer = _Servicer()
    _, chain = _cached()
    with _serve(chain, servicer) as client:
        list(client.stream(_request(), timeout=10))
        list(client.stream(_request(), timeout=10))
    assert servicer.stream_calls == 2


def test_clear_drops_everything_and_stops_stores_begun_before_it() -> None:
    metrics = Metrics()
    cache = QueryCache(10, metrics=metrics)
    key = CacheKey("a", 0, 60, "60", "AVG")
    assert cache.put(key, Serialized.of(_response(1.0, 0)), cache.generation("a"))
    generation = cache.generation("never-seen")
    cache.clear()
    assert cache.get(key) is None
    never_seen = CacheKey("never-seen", 0, 60, "60", "AVG")
    assert not cache.put(never_seen, Serialized.of(_response(1.0, 0)), generation)
    assert _sample(metrics, "edgecom_cache_entries") == 0
    assert _sample(metrics, "edgecom_cache_bytes") == 0 == cache.held_bytes
    assert cache.put(key, Serialized.of(_response(2.0, 0)), cache.generation("a"))
    assert cache.get(key) == Serialized.of(_response(2.0, 0))


def _points(count: int, value: float = 1.0) -> Serialized:
    """An answer of count points, serialized to about 21 bytes a point."""
    points = [
        protos.TimeSeriesDataPoint(time={"seconds": 1_700_000_000 + 900 * i}, value=value, count=1)
        for i in range(count)
    ]
    return Serialized.of(protos.TimeSeriesResponse(data=points))


def _entry_bytes(answer: Serialized) -> int:
    return len(answer.message) + ENTRY_OVERHEAD_BYTES


def test_least_recently_used_entries_are_evicted_at_max_bytes() -> None:
    metrics = Metrics()
    entry = _entry_bytes(_points(1000))
    # Room for exactly eight entries of this size (the largest allowed).
    cache = QueryCache(1000, max_bytes=8 * entry, metrics=metrics)
    keys = [CacheKey("a", i, i + 60, "60", "AVG") for i in range(10)]
    for key in keys[:8]:
        assert cache.put(key, _points(1000, key.start_s + 1), cache.generation("a"))
    assert cache.held_bytes == 8 * entry == _sample(metrics, "edgecom_cache_bytes")
    assert cache.get(keys[0]) == _points(1000, 1)  # keys[0] is now the most recently used
    assert cache.put(keys[8], _points(1000, 9), cache.generation("a"))
    # Read in order, which leaves keys[0] the least recently used.
    assert [cache.get(key) is not None for key in keys[:9]] == [True, False] + [True] * 7
    # A small answer evicts by bytes too, only as many entries as it needs.
    assert cache.put(keys[9], _points(10), cache.generation("a"))
    assert len(cache) == 8 and cache.get(keys[0]) is None
    assert cache.held_bytes == 7 * entry + _entry_bytes(_points(10))
    assert _sample(metrics, "edgecom_cache_bytes") == cache.held_bytes
    assert _sample(metrics, "edgecom_cache_entries") == 8
    # Storing a key again replaces its bytes instead of adding them.
    assert cache.put(keys[9], _points(10, 2.0), cache.generation("a"))
    assert cache.held_bytes == 7 * entry + _entry_bytes(_points(10))
    assert cache.invalidate("a", 0, 4) == 2  # keys 2 and 3 are held and overlap [0, 4)
    assert cache.held_bytes == 5 * entry + _entry_bytes(_points(10))
    assert _sample(metrics, "edgecom_cache_bytes") == cache.held_bytes


def test_an_answer_over_an_eighth_of_max_bytes_is_not_cached() -> None:
    metrics = Metrics()
    answer = _points(1000)
    cache = QueryCache(100, max_bytes=8 * _entry_bytes(answer), metrics=metrics)
    key = CacheKey("a", 0, 60, "60", "AVG")
    assert cache.put(key, answer, cache.generation("a"))
    assert not cache.put(CacheKey("a", 60, 120, "60", "AVG"), _points(1001), cache.generation("a"))
    # The small entry already held stays.
    assert len(cache) == 1 and cache.get(key) == answer
    assert _sample(metrics, "edgecom_cache_bytes") == _entry_bytes(answer)


def test_a_hit_is_sent_as_stored_without_parsing_it() -> None:
    # Bytes that do not parse as a TimeSeriesResponse: a hit that parsed them would fail.
    stored = Serialized(b"\xff\xff", points=7)
    cache, chain = _cached()
    servicer = _Servicer()
    with _serve(chain, servicer) as client:
        key = _key_fn(QUERY, _request())
        assert key is not None and cache.put(key, stored, cache.generation(key.asset_id))
        raw = client.raw_query(_request().SerializeToString(), timeout=10)
    assert raw == stored.message and servicer.calls == 0


def test_max_bytes_zero_disables_the_cache() -> None:
    servicer = _Servicer()
    cache = QueryCache(100, max_bytes=0)
    with _serve([CacheInterceptor(cache, _key_fn)], servicer) as client:
        client.query()
        client.query()
    assert servicer.calls == 2 and len(cache) == 0


# Auth


def test_calls_without_the_right_token_are_unauthenticated() -> None:
    with _serve([AuthInterceptor(["other", TOKEN])]) as client:
        missing = _error(client.query)
        wrong = _error(lambda: client.query(metadata=(("authorization", "Bearer guess-1"),)))
        wrong_scheme = _error(lambda: client.query(metadata=(("authorization", TOKEN),)))
        assert len(client.query(metadata=BEARER).data) == POINTS_PER_RESPONSE
        lower = (("authorization", f"bearer {TOKEN}"),)
        assert len(client.query(metadata=lower).data) == POINTS_PER_RESPONSE
        stream_error = _error(lambda: list(client.stream(_request(), timeout=10)))
        assert len(list(client.stream(_request(), metadata=BEARER, timeout=10))) == STREAM_PAGES
    for error in (missing, wrong, wrong_scheme, stream_error):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert '"authorization: Bearer <token>"' in error.details()
    assert "guess-1" not in wrong.details()


def test_health_and_reflection_stay_open_without_a_token() -> None:
    with _serve([AuthInterceptor([TOKEN])]) as client:
        assert client.check_health() == health_pb2.HealthCheckResponse.SERVING
        assert "edgecom.TimeSeriesService" in client.list_services()
        assert _error(client.query).code() == grpc.StatusCode.UNAUTHENTICATED


def test_no_tokens_lets_every_call_through() -> None:
    with _serve([AuthInterceptor([])]) as client:
        client.query()
    with pytest.raises(ValueError):
        AuthInterceptor(["", TOKEN])


def test_grpcurl_with_a_bearer_token(grpcurl: str) -> None:
    body = json.dumps({"asset_id": "a", "window": "1h", "aggregation": "AVG"})
    with _serve([AuthInterceptor([TOKEN])]) as client:
        # Without -proto grpcurl learns the schema by reflection, which must stay open.
        command = [grpcurl, "-plaintext", "-d", body]
        target = [f"127.0.0.1:{client.port}", "edgecom.TimeSeriesService/QueryTimeSeries"]
        accepted = subprocess.run(
            [*command, "-H", f"authorization: Bearer {TOKEN}", *target],
            capture_output=True,
            text=True,
            timeout=30,
        )
        refused = subprocess.run([*command, *target], capture_output=True, text=True, timeout=30)
    assert accepted.returncode == 0, accepted.stderr
    assert len(json.loads(accepted.stdout)["data"]) == POINTS_PER_RESPONSE
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr


# Metrics


def test_metrics_count_calls_by_method_and_final_code() -> None:
    clock, metrics = _Clock(), Metrics()
    cache = QueryCache(100, metrics=metrics)
    chain = [
        RequestLogInterceptor(),
        MetricsInterceptor(metrics),
        AuthInterceptor([TOKEN]),
        RateLimitInterceptor(rps=1, burst=7, clock=clock, metrics=metrics),
        CacheInterceptor(cache, _key_fn, metrics),
    ]
    with _serve(chain) as client:
        client.query(metadata=BEARER)
        client.query(metadata=BEARER)  # cache hit
        _error(lambda: client.query(metadata=BEARER, asset_id="abort"))
        _error(lambda: client.query(metadata=BEARER, asset_id="raise"))
        _error(client.query)  # no token
        list(client.stream(_request(), metadata=BEARER, timeout=10))
        _error(lambda: list(client.stream(_request(asset_id="abort"), metadata=BEARER)))
        client.query(metadata=BEARER, asset_id="b")  # the 7th and last token
        _error(lambda: client.query(metadata=BEARER))  # rate limited
        client.check_health()
        with start_metrics_server(metrics, host="127.0.0.1", port=0) as endpoint:
            url = f"http://127.0.0.1:{endpoint.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()

    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }

    def requests(method: str, code: str) -> float:
        return samples.get(
            ("edgecom_grpc_requests_total", (("code", code), ("method", method))), 0.0
        )

    assert requests(QUERY, "OK") == 3
    assert requests(QUERY, "INVALID_ARGUMENT") == 1
    assert requests(QUERY, "UNKNOWN") == 1
    assert requests(QUERY, "UNAUTHENTICATED") == 1
    assert requests(QUERY, "RESOURCE_EXHAUSTED") == 1
    assert requests(STREAM, "OK") == 1
    assert requests(STREAM, "FAILED_PRECONDITION") == 1
    assert requests("/grpc.health.v1.Health/Check", "OK") == 1
    duration_count = ("edgecom_grpc_request_duration_seconds_count", (("method", QUERY),))
    assert samples[duration_count] == 7
    assert samples[("edgecom_cache_hits_total", ())] == 1
    assert samples[("edgecom_cache_misses_total", ())] == 4
    assert samples[("edgecom_cache_entries", ())] == 2
    assert samples[("edgecom_rate_limited_total", ())] == 1
    # Families fed by other components are declared even before they have samples.
    for name in (
        "edgecom_ingested_points",
        "edgecom_skipped_points",
        "edgecom_upstream_requests",
        "edgecom_upstream_request_duration_seconds",
        "edgecom_last_successful_fetch_timestamp_seconds",
        "edgecom_coverage_ratio",
    ):
        assert name in families, name


def test_a_stream_the_client_cancels_is_counted_cancelled() -> None:
    metrics = Metrics()
    labels = {"method": STREAM, "code": "CANCELLED"}
    with _serve([MetricsInterceptor(metrics)]) as client:
        call = client.stream(_request(asset_id="endless"), timeout=10)
        next(call)
        call.cancel()
        deadline = time.monotonic() + 5
        while not _sample(metrics, "edgecom_grpc_requests_total", labels):
            assert time.monotonic() < deadline, "the cancelled stream was never counted"
            time.sleep(0.01)
    assert _sample(metrics, "edgecom_grpc_requests_total", labels) == 1
    assert _sample(metrics, "edgecom_grpc_request_duration_seconds_count", {"method": STREAM}) == 1


# Logs


def _rpc_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == LOGGER]


def _trailer(call: grpc.Call | grpc.RpcError, key: str) -> str | None:
    return dict(call.trailing_metadata() or ()).get(key)


def test_one_log_line_per_call_with_the_client_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    logger = logging.getLogger(LOGGER)
    cache = QueryCache(10)
    chain = [RequestLogInterceptor(logger=logger), CacheInterceptor(cache, _key_fn)]
    with _serve(chain) as client:
        _, call = client.query_with_call(metadata=(("x-request-id", "req-1"),))
        client.query(metadata=(("x-request-id", "req-2"),))
    assert _trailer(call, "x-request-id") == "req-1"
    first, second = _rpc_records(caplog)
    assert first.getMessage() == "rpc"
    assert first.request_id == "req-1"
    assert first.method == QUERY
    assert first.peer.startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert first.code == "OK"
    assert 0 <= first.duration_ms < 10_000
    assert (first.cache, first.points) == ("miss", POINTS_PER_RESPONSE)
    assert (second.request_id, second.cache, second.points) == ("req-2", "hit", POINTS_PER_RESPONSE)


def test_a_request_id_is_generated_when_none_usable_is_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with _serve([RequestLogInterceptor(logger=logging.getLogger(LOGGER))]) as client:
        _, plain = client.query_with_call()
        _, spaced = client.query_with_call(metadata=(("x-request-id", "has spaces"),))
    generated = [_trailer(plain, "x-request-id"), _trailer(spaced, "x-request-id")]
    for request_id in generated:
        assert request_id is not None and len(request_id) == 32
        int(request_id, 16)
    assert generated[0] != generated[1]
    assert [record.request_id for record in _rpc_records(caplog)] == generated


def test_rejected_and_failed_calls_are_logged_with_their_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    chain = [RequestLogInterceptor(logger=logging.getLogger(LOGGER)), AuthInterceptor([TOKEN])]
    with _serve(chain) as client:
        refused = _error(lambda: client.query(metadata=(("x-request-id", "no-token"),)))
        _, ok = client.query_with_call(metadata=(*BEARER, ("x-request-id", "fine")))
        failed = _error(
            lambda: client.query(metadata=(*BEARER, ("x-request-id", "boom")), asset_id="raise")
        )
    assert _trailer(refused, "x-request-id") == "no-token"
    assert _trailer(ok, "x-request-id") == "fine"
    assert _trailer(failed, "x-request-id") == "boom"
    records = _rpc_records(caplog)
    assert [(r.code, r.levelno) for r in records] == [
        ("UNAUTHENTICATED", logging.INFO),
        ("OK", logging.INFO),
        ("UNKNOWN", logging.WARNING),
    ]
    assert records[0].points is None


def test_stream_runs_on_one_thread_with_the_call_info_and_sums_points(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    servicer = _Servicer()
    with _serve([RequestLogInterceptor(logger=logging.getLogger(LOGGER))], servicer) as client:
        call = client.stream(_request(), metadata=(("x-request-id", "s-1"),), timeout=10)
        pages = list(call)
        aborted = client.stream(_request(asset_id="abort"), metadata=(("x-request-id", "s-2"),))
        error = _error(lambda: list(aborted))
    assert len(pages) == STREAM_PAGES
    assert _trailer(call, "x-request-id") == "s-1"
    assert _trailer(error, "x-request-id") == "s-2"
    ok_info = servicer.seen[0]
    assert ok_info is not None and ok_info.request_id == "s-1"
    assert len(set(servicer.stream_threads[:STREAM_PAGES])) == 1
    ok, failed = _rpc_records(caplog)
    assert (ok.request_id, ok.code, ok.points) == ("s-1", "OK", STREAM_PAGES * POINTS_PER_RESPONSE)
    assert (failed.request_id, failed.code, failed.points) == (
        "s-2",
        "FAILED_PRECONDITION",
        POINTS_PER_RESPONSE,
    )


# Open streams


def test_open_streams_beyond_the_bound_are_refused_until_one_ends() -> None:
    with _serve([OpenStreamLimitInterceptor(max_streams=2)]) as client:
        watches = [
            client.health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2)
        ]
        assert [next(watch).status for watch in watches] == [
            health_pb2.HealthCheckResponse.SERVING
        ] * 2
        refused = _error(lambda: next(client.health.Watch(health_pb2.HealthCheckRequest())))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2" in refused.details() and "server.max_open_streams" in refused.details()
        assert _error(client.list_services).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Unary health checks and other methods hold no slot.
        assert client.check_health() == health_pb2.HealthCheckResponse.SERVING
        assert len(client.query().data) == POINTS_PER_RESPONSE
        # A stream the client leaves frees its slot.
        watches[0].cancel()
        assert wait_for(lambda: _list_services_or_none(client) is not None)
        assert "grpc.health.v1.Health" in client.list_services()


def _list_services_or_none(client: _Client) -> list[str] | None:
    try:
        return client.list_services()
    except grpc.RpcError:
        return None


# Order


class _Probe(grpc.ServerInterceptor):
    """Records entering and leaving a QueryTimeSeries call, and what it sees at each point."""

    def __init__(self, name: str, records: list[str], metrics: Metrics) -> None:
        self._name = name
        self._records = records
        self._metrics = metrics

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method != QUERY:
            return handler

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            logged = "logged" if current_call() is not None else "unlogged"
            self._records.append(f"{self._name} {logged}")
            try:
                return handler.unary_unary(request, context)
            finally:
                counted = int(
                    _sample(
                        self._metrics,
                        "edgecom_grpc_requests_total",
                        {"method": QUERY, "code": context.code().name if context.code() else "OK"},
                    )
                )
                self._records.append(f"{self._name} done counted={counted}")

        return grpc.unary_unary_rpc_method_handler(
            behavior, handler.request_deserializer, handler.response_serializer
        )


def test_interceptors_run_in_the_declared_order() -> None:
    records: list[str] = []
    metrics, servicer = Metrics(), _Servicer()
    servicer.records = records
    # The chain as production builds it; the real clock refills a token every 1000 s.
    declared = edgecom.build_interceptors(
        metrics=metrics,
        cache=QueryCache(10),
        cache_key=_key_fn,
        max_open_streams=4,
        rps=0.001,
        burst=3,
        tokens=[TOKEN],
    )
    # A probe before each interceptor and one after the last shows where each one acts.
    probes = [_Probe(f"p{i}", records, metrics) for i in range(len(declared) + 1)]
    chain = [probes[0]]
    for interceptor, probe in zip(declared, probes[1:], strict=True):
        chain += [interceptor, probe]

    def run(call: Callable[[], Any]) -> list[str]:
        records.clear()
        with contextlib.suppress(grpc.RpcError):
            call()
        return list(records)

    def entered(*names: str) -> list[str]:
        # The drain sits between p0 and p1, the request log between p1 and p2.
        return [f"{n} {'unlogged' if n in ('p0', 'p1') else 'logged'}" for n in names]

    def left(count: int, *names: str) -> list[str]:
        # The metrics interceptor sits between p2 and p3: only p2 to p0 see the call counted.
        return [f"{n} done counted={count - (n not in ('p0', 'p1', 'p2'))}" for n in names]

    assert [type(i) for i in declared] == [
        DrainInterceptor,
        RequestLogInterceptor,
        MetricsInterceptor,
        OpenStreamLimitInterceptor,
        RateLimitInterceptor,
        AuthInterceptor,
        CacheInterceptor,
    ]
    with _serve(chain, servicer) as client:
        assert run(lambda: client.query(metadata=BEARER)) == [
            *entered("p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"),
            "servicer",
            *left(1, "p7", "p6", "p5", "p4", "p3", "p2", "p1", "p0"),
        ]
        # Cache hit: the cache, between p6 and p7, answers.
        assert run(lambda: client.query(metadata=BEARER)) == [
            *entered("p0", "p1", "p2", "p3", "p4", "p5", "p6"),
            *left(2, "p6", "p5", "p4", "p3", "p2", "p1", "p0"),
        ]
        # No token: auth, between p5 and p6, refuses, after the rate limit took a token.
        assert run(client.query) == [
            *entered("p0", "p1", "p2", "p3", "p4", "p5"),
            *left(1, "p5", "p4", "p3", "p2", "p1", "p0"),
        ]
        # All three tokens spent: the rate limit, between p4 and p5, refuses, token or not.
        for count, metadata in enumerate((BEARER, ()), start=1):
            assert run(lambda m=metadata: client.query(metadata=m)) == [
                *entered("p0", "p1", "p2", "p3", "p4"),
                *left(count, "p4", "p3", "p2", "p1", "p0"),
            ]


# Drain


def test_a_call_counts_as_in_flight_until_its_answer_is_sent() -> None:
    # Shutdown stops the server at once when no call is in flight: a call whose handler has
    # returned but whose large answer is still being sent must hold it, or the client gets
    # UNAVAILABLE instead of its answer.
    drain = DrainInterceptor()
    big = protos.TimeSeriesResponse(
        data=[protos.TimeSeriesDataPoint(time={"seconds": i}, value=i) for i in range(300_000)]
    )

    answered = threading.Event()

    class _Big(_Servicer):
        def QueryTimeSeries(self, request: Any, context: grpc.ServicerContext) -> Any:
            answered.set()
            return big

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=(drain,))
    services.add_TimeSeriesServiceServicer_to_server(_Big(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=(("grpc.max_receive_message_length", 64 << 20),)
    ) as channel:
        call = services.TimeSeriesServiceStub(channel).QueryTimeSeries.future(
            _request(), timeout=30
        )
        assert answered.wait(10)
        assert drain.wait_idle(20)
        server.stop(0).wait()
        assert len(call.result().data) == len(big.data)


def test_a_call_refused_for_the_concurrency_bound_is_not_left_in_flight() -> None:
    # grpcio refuses calls beyond maximum_concurrent_rpcs after the interceptors have seen
    # them, without running their handler: counted forever, one would hold every later
    # shutdown for the whole grace period.
    drain, servicer = DrainInterceptor(), _Servicer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=1), interceptors=(drain,), maximum_concurrent_rpcs=1
    )
    services.add_TimeSeriesServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = _Client(channel, port)
            blocked = client.stub.QueryTimeSeries.future(_request("block"), timeout=10)
            assert servicer.entered.wait(10)
            assert _error(client.query).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            servicer.release.set()
            assert len(blocked.result().data) == POINTS_PER_RESPONSE
            assert drain.wait_idle(5), f"{drain.active} calls left in flight"
    finally:
        server.stop(0).wait()
