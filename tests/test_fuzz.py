"""Generated requests, odd and hostile, end with a status a client can act on, in their deadline.

Hypothesis generates requests (timestamps anywhere in int64, nanos out of range, unicode and
huge strings in every field, raw bytes that are no message) and shrinks any that fails to the
smallest such request. EDGECOM_FUZZ_EXAMPLES sets how many each test sends (default 300).
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from conftest import ASSET, OTHER_ASSET, RunningService, fresh_database
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import edgecom
from buckets import FILLS
from config import Config, RateLimitConfig, UpstreamConfig
from interceptors import REQUEST_ID_KEY, QueryCache
from metrics import Metrics
from repository import AGGREGATIONS, Repository
from service import MAX_TIMESTAMP_S, MIN_TIMESTAMP_S

EXAMPLES = int(os.environ.get("EDGECOM_FUZZ_EXAMPLES", "300"))
DEADLINE_S = 2.0
# How long past its deadline a call may take to end, on the client and on the server.
SLACK_S = 1.0
ACCEPTED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
METHODS = {
    "QueryTimeSeries": "unary",
    "StreamTimeSeries": "stream",
    "ListAssets": "unary",
}

MIN_S = MIN_TIMESTAMP_S
MAX_S = MAX_TIMESTAMP_S
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z, where the stored points are
DAY = 86400
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# --- strategies ------------------------------------------------------------------------------


def mostly(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """valid six times in seven: a request reaches the query only when every field is valid."""
    # one_of() would merge repeated branches: weights need a draw of their own.
    return st.sampled_from((True,) * 6 + (False,)).flatmap(
        lambda pick_valid: valid if pick_valid else odd
    )


valid_seconds = st.one_of(st.integers(T0 - 40 * DAY, T0 + 40 * DAY), st.integers(MIN_S, MAX_S))
edge_seconds = st.one_of(
    st.sampled_from([MIN_S - 1, MIN_S, MIN_S + 1, -1, 0, 1, MAX_S - 1, MAX_S, MAX_S + 1, *INT64]),
    st.integers(*INT64),
)
valid_nanos = st.one_of(st.just(0), st.integers(0, 999_999_999))
edge_nanos = st.one_of(
    st.sampled_from([-1, 999_999_999, 1_000_000_000, *INT32]), st.integers(*INT32)
)
timestamps = mostly(
    st.builds(Timestamp, seconds=valid_seconds, nanos=valid_nanos),
    st.one_of(
        st.none(),
        st.builds(
            Timestamp,
            seconds=mostly(valid_seconds, edge_seconds),
            nanos=mostly(valid_nanos, edge_nanos),
        ),
    ),
)
# Lengths from a second to all of time, so that most generated ranges are in order.
lengths = st.one_of(st.integers(1, 400 * DAY), st.integers(1, MAX_S - MIN_S), st.integers(-DAY, 0))


@st.composite
def time_ranges(draw: st.DrawFn) -> tuple[Timestamp | None, Timestamp | None]:
    start = draw(timestamps)
    if start is None or not draw(st.booleans()):
        return start, draw(timestamps)
    seconds = min(INT64[1], max(INT64[0], start.seconds + draw(lengths)))
    return start, Timestamp(seconds=seconds, nanos=draw(mostly(valid_nanos, edge_nanos)))


# Protobuf strings are UTF-8, which cannot hold a lone surrogate: those go as raw bytes below.
characters = st.characters(exclude_categories=("Cs",))
huge = st.builds(lambda char, n: char * n, characters, st.integers(300, 100_000))


def field(*valid: str, odd: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    forms = st.sampled_from(valid).flatmap(
        lambda v: st.sampled_from([v, v.lower(), v.upper(), f" {v}\t", f"{v}\x00"])
    )
    return mostly(
        st.sampled_from(valid),
        st.one_of(forms, st.text(characters), huge, st.nothing() if odd is None else odd),
    )


windows = field(
    "1m", "5m", "15m", "1h", "1d", "7d", "1w", "1mo", "12mo", "366d", "52w",
    odd=st.one_of(
        st.builds(
            "{}{}".format,
            st.integers(-(10**30), 10**30),
            st.sampled_from(["m", "h", "d", "w", "mo", "s", "", "M", "MO"]),
        ),
        # Past Python's int() digit limit.
        st.integers(4301, 5000).map(lambda n: "9" * n + "m"),
    ),
)  # fmt: skip


TIMEZONES = (
    "", "UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe",
    "Pacific/Chatham", "Pacific/Kiritimati", "Etc/GMT+12", "America/St_Johns",
)  # fmt: skip


@st.composite
def requests(draw: st.DrawFn) -> edgecom.protos.TimeSeriesRequest:
    start, end = draw(time_ranges())
    fill = draw(field("", *FILLS))
    return edgecom.protos.TimeSeriesRequest(
        start=start,
        end=end,
        window=draw(windows),
        aggregation=draw(field(*AGGREGATIONS)),
        asset_id=draw(field(ASSET, OTHER_ASSET, "")),
        timezone=draw(field(*TIMEZONES)),
        fill=fill,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _spliced(data: bytes, at: int, junk: bytes) -> bytes:
    at = at % (len(data) + 1)
    return data[:at] + junk + data[at:]


surrogate_text = st.text(st.characters(categories=("Cs",)), min_size=1, max_size=4).map(
    lambda text: text.encode("utf-8", "surrogatepass")
)
raw_bytes = st.one_of(
    st.binary(max_size=300),
    # A string field (3 to 7) holding bytes that are not UTF-8, or a lone surrogate.
    st.builds(_length_delimited, st.integers(3, 7), st.one_of(st.binary(), surrogate_text)),
    # A valid request with junk inserted, or cut short.
    st.builds(
        _spliced, requests().map(lambda r: r.SerializeToString()), st.integers(0), st.binary()
    ),
    requests()
    .map(lambda r: r.SerializeToString())
    .flatmap(lambda data: st.integers(0, len(data)).map(lambda n: data[:n])),
)


# --- the service under fuzz --------------------------------------------------------------


class CallEnds(grpc.ServerInterceptor):
    """Records when the handler of each call returned, by the client's x-request-id."""

    def __init__(self) -> None:
        self._ended: dict[str, float] = {}
        self._changed = threading.Condition()

    def wait(self, request_id: str, timeout_s: float) -> float | None:
        """Block until the call has ended or timeout_s passes; return its monotonic end."""
        with self._changed:
            self._changed.wait_for(lambda: request_id in self._ended, max(0.0, timeout_s))
            return self._ended.pop(request_id, None)

    def _end(self, request_id: str) -> None:
        with self._changed:
            self._ended[request_id] = time.monotonic()
            self._changed.notify_all()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = metadata.get(REQUEST_ID_KEY)
        if handler is None or handler.request_streaming or request_id is None:
            return handler
        if handler.response_streaming:

            def stream(request, context):
                try:
                    yield from handler.unary_stream(request, context)
                finally:
                    self._end(request_id)

            behavior, make = stream, grpc.unary_stream_rpc_method_handler
        else:

            def unary(request, context):
                try:
                    return handler.unary_unary(request, context)
                finally:
                    self._end(request_id)

            behavior, make = unary, grpc.unary_unary_rpc_method_handler
        return make(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class Fuzzed:
    """A real service with stored points behind the interceptor chain run() builds."""

    def __init__(self, repository: Repository) -> None:
        self.ends = CallEnds()
        config = Config(
            upstream=UpstreamConfig(assets=(ASSET, OTHER_ASSET)),
            # Off, so that generated calls reach the servicer rather than the limit.
            rate_limit=RateLimitConfig(rps=0),
        )
        interceptors = edgecom.interceptors_for(config, metrics=Metrics(), cache=QueryCache(100))
        self.running = RunningService(
            repository,
            assets=(ASSET, OTHER_ASSET),
            max_points=100_000,
            interceptors=(self.ends, *interceptors),
        )
        channel = self.running.channel
        # No serializers: requests go as the bytes given, responses come back as bytes.
        self.unary = {
            name: channel.unary_unary(f"/{edgecom.SERVICE_NAME}/{name}")
            for name, kind in METHODS.items()
            if kind == "unary"
        }
        self.stream = channel.unary_stream(f"/{edgecom.SERVICE_NAME}/StreamTimeSeries")

    def call(self, method: str, data: bytes) -> tuple[grpc.StatusCode, float]:
        """Send data to the method with a deadline; return the status code and the seconds
        until the client had its answer and the server had ended the call."""
        request_id = uuid.uuid4().hex
        metadata = ((REQUEST_ID_KEY, request_id),)
        start = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            if METHODS[method] == "stream":
                for _page in self.stream(data, timeout=DEADLINE_S, metadata=metadata):
                    pass
            else:
                self.unary[method](data, timeout=DEADLINE_S, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code()
        client_end = time.monotonic()
        # Waits a little longer than allowed, so that a failure says by how much it overran.
        server_end = self.ends.wait(request_id, start + DEADLINE_S + SLACK_S + 2 - client_end)
        if server_end is None:
            return code, math.inf
        return code, max(client_end, server_end) - start


@pytest.fixture(scope="module")
def fuzzed(server_dsn: str) -> Iterator[Fuzzed]:
    with fresh_database(server_dsn) as dsn, Repository(dsn=dsn, max_connections=4) as repo:
        repo.migrate()
        # 60 days at 15 minutes around T0, and a sparse other asset.
        repo.upsert_points(ASSET, [(T0 - 30 * DAY + i * 900, i % 97 - 40.5) for i in range(5760)])
        repo.upsert_points(OTHER_ASSET, [(T0 + i * 7 * DAY, float(i)) for i in range(10)])
        service = Fuzzed(repo)
        try:
            yield service
        finally:
            service.running.close()


def check(fuzzed: Fuzzed, method: str, data: bytes) -> None:
    code, seconds = fuzzed.call(method, data)
    assert code in ACCEPTED, f"{method} answered {code.name}"
    if seconds > DEADLINE_S + SLACK_S:
        # A loaded machine can stall any call for a second; a call that keeps working past
        # its deadline does so every time.
        code, seconds = fuzzed.call(method, data)
    assert seconds <= DEADLINE_S + SLACK_S, f"{method} ended {seconds:.1f} s after it began"


# Found before: each once ended UNKNOWN or INTERNAL.
KNOWN = edgecom.protos.TimeSeriesRequest(
    start=Timestamp(seconds=T0), end=Timestamp(seconds=T0 + DAY), window="1" * 4301 + "m"
)


@FUZZ_SETTINGS
@given(request=requests(), method=st.sampled_from(sorted(METHODS)))
@example(request=KNOWN, method="QueryTimeSeries")
def test_generated_requests_end_in_an_accepted_status_within_their_deadline(
    fuzzed, request, method
):
    check(fuzzed, method, request.SerializeToString())


@FUZZ_SETTINGS
@given(data=raw_bytes, method=st.sampled_from(sorted(METHODS)))
@example(data=b"\xff", method="ListAssets")
@example(data=b"\x1a\x01\xff", method="StreamTimeSeries")
def test_raw_bytes_end_in_an_accepted_status_within_their_deadline(fuzzed, data, method):
    check(fuzzed, method, data)
