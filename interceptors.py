"""gRPC server interceptors (request log, metrics, limits, authentication, query cache) and the
request decoding every handler is registered with."""

from __future__ import annotations

import contextvars
import functools
import hmac
import logging
import math
import re
import threading
import time
import urllib.parse
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from metrics import Metrics

REQUEST_ID_KEY = "x-request-id"
CLIENT_ID_KEY = "x-client-id"
AUTHORIZATION_KEY = "authorization"

# Health probes and reflection must work without credentials and never be throttled, so that
# load balancers and grpcurl keep working while clients are refused.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
HEALTH_WATCH_METHOD = "/grpc.health.v1.Health/Watch"

# A client-sent request id is echoed into logs and trailers, so only short printable ones are kept.
_REQUEST_ID_RE = re.compile(r"[!-~]{1,128}")
# Client ids are keys of the bucket table; capping their length bounds its memory.
_MAX_CLIENT_KEY_CHARS = 256
# Refills are sums of float products; without slack, a refill meant to add exactly one token
# can fall short by 1e-15 and refuse a call that is due.
_TOKEN_SLACK = 1e-9

_LOG = logging.getLogger(__name__)

Proceed = Callable[[], Iterator[Any]]
Around = Callable[[Any, grpc.ServicerContext, Proceed], Iterator[Any]]


@dataclass(frozen=True)
class Serialized:
    """A response already serialized: every handler wrapped here sends its bytes as they are.

    Cached answers are sent so, neither parsed nor serialized again per call.
    """

    message: bytes
    points: int | None = None  # data points in the message, for the request log

    @classmethod
    def of(cls, response: Any) -> Serialized:
        """`response`, a protobuf message, serialized."""
        data = getattr(response, "data", None)
        return cls(response.SerializeToString(), None if data is None else len(data))


class _SendingSerialized:
    """A handler's response serializer that sends a Serialized response's bytes as they are."""

    def __init__(self, serialize: Callable[[Any], bytes] | None) -> None:
        self._serialize = serialize

    def __call__(self, response: Any) -> bytes:
        if type(response) is Serialized:
            return response.message
        if self._serialize is None:
            return response
        return self._serialize(response)


def _sending_serialized(
    serialize: Callable[[Any], bytes] | None,
) -> Callable[[Any], bytes]:
    if isinstance(serialize, _SendingSerialized):
        return serialize
    return _SendingSerialized(serialize)


@dataclass
class CallInfo:
    """Facts about one call shared between interceptors and the servicer."""

    request_id: str
    method: str
    cache: str | None = None  # "hit" or "miss" when the cache looked at the call
    points: int | None = None  # data points sent, summed over stream pages

    def count_points(self, response: Any) -> None:
        if isinstance(response, Serialized):
            points = response.points
        else:
            data = getattr(response, "data", None)
            points = None if data is None else len(data)
        if points is not None:
            self.points = (self.points or 0) + points


# The handler of a call, stream pages included, runs on one worker thread in a contextvars.Context
# grpcio creates for that call; a worker runs one call at a time and the var is reset when the call
# ends, so the value is private to the call.
_CALL: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "edgecom_call", default=None
)


def current_call() -> CallInfo | None:
    """Return the CallInfo of the call running here, or None outside RequestLogInterceptor."""
    return _CALL.get()


def handler_kind(
    handler: grpc.RpcMethodHandler,
) -> tuple[Callable[..., Any], Callable[..., grpc.RpcMethodHandler]]:
    """The behavior of a handler and the grpc factory that makes a handler of its kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def _wrap(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """Return a handler of the same kind whose behavior runs inside the generator around.

    around(request, context, proceed) runs its checks, calls proceed() to run the wrapped
    behavior, whose responses come back as an iterator (one item for a unary response), and
    yields what the client gets; it may also abort or yield a response of its own without
    calling proceed(). Code after its last yield runs when the call ends, so one generator
    serves unary and streaming calls alike.
    """
    behavior, make = handler_kind(handler)
    if handler.response_streaming:

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            yield from around(request, context, lambda: iter(behavior(request, context)))

    else:

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            responses = around(request, context, lambda: iter((behavior(request, context),)))
            # Unpacking runs the generator to its end, so its after-call code runs before the
            # single response is sent, and a generator that yields twice fails loudly.
            (response,) = responses
            return response

    return make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        # Any interceptor may answer with a Serialized response.
        response_serializer=_sending_serialized(handler.response_serializer),
    )


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """Return the one behavior function of a handler, whatever its kind."""
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


class _WrappingInterceptor(grpc.ServerInterceptor):
    """Base of the interceptors below: wraps each handler they apply to with their _around()."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        # Unknown methods (handler None) are answered UNIMPLEMENTED by grpcio itself; leaving them
        # alone also keeps arbitrary method names out of the metric labels.
        if handler is None or not self._applies_to(method, handler):
            return handler
        # The work happens inside the call, on a worker thread with the ServicerContext at hand:
        # intercept_service itself runs on the server's polling thread, where blocking stalls
        # every call.
        return _wrap(handler, functools.partial(self._around, method))

    def _applies_to(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        return True

    def _around(
        self, method: str, request: Any, context: grpc.ServicerContext, proceed: Proceed
    ) -> Iterator[Any]:
        raise NotImplementedError


def _final_code(context: grpc.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """Return the status code the call ends with, given the exception it ended with, if any."""
    # abort() and set_code() record the code on the context; grpcio sends that one.
    code = context.code()
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, GeneratorExit):
        # grpcio drops a response stream before its end only when the client has gone away.
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return str(value)
    return None


def _is_open(method: str) -> bool:
    return method.startswith(OPEN_METHOD_PREFIXES)


def _when_call_ends(context: grpc.ServicerContext, callback: Callable[[], None]) -> None:
    """Run callback once grpcio has sent the call's status; at once if it already has.

    The call ends then, not when the handler returns: a large answer may still be in flight.
    """
    if not context.add_callback(callback):
        callback()


class RequestLogInterceptor(_WrappingInterceptor):
    """Give each call a request id, return it in the trailers and log one line when it ends.

    The id is the client's ``x-request-id`` when it sends a short printable one, else a new
    uuid4 hex. The line is ``logger.info("rpc", extra=...)`` with the fields request_id, method,
    peer, code, duration_ms, cache and points (WARNING for codes that mean a server fault).
    Must be outside every interceptor that fills in the CallInfo it starts (only the drain
    is outside it).
    """

    _SERVER_FAULTS = frozenset(
        {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
    )

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger if logger is not None else _LOG

    def _around(
        self, method: str, request: Any, context: grpc.ServicerContext, proceed: Proceed
    ) -> Iterator[Any]:
        sent = _metadata_value(context, REQUEST_ID_KEY)
        request_id = sent if sent and _REQUEST_ID_RE.fullmatch(sent) else uuid.uuid4().hex
        info = CallInfo(request_id=request_id, method=method)
        token = _CALL.set(info)
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            for response in proceed():
                info.count_points(response)
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            duration_ms = (time.perf_counter() - start) * 1000
            _CALL.reset(token)
            # Set last and appended, so trailers the handler set are kept; grpcio sends the
            # trailers after this generator ends, for aborts too.
            trailers = tuple(context.trailing_metadata() or ())
            context.set_trailing_metadata((*trailers, (REQUEST_ID_KEY, request_id)))
            code = _final_code(context, error)
            level = logging.WARNING if code in self._SERVER_FAULTS else logging.INFO
            self._logger.log(
                level,
                "rpc",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "peer": context.peer(),
                    "code": code.name,
                    "duration_ms": round(duration_ms, 3),
                    "cache": info.cache,
                    "points": info.points,
                },
            )


class MetricsInterceptor(_WrappingInterceptor):
    """Count finished calls by method and status code and time them until their last response.

    Rejections by inner interceptors are counted with their code, exceptions as UNKNOWN.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # The metrics of each method and code, looked up once: labels() takes about 2 us a
        # call, a sizeable share of what this whole chain costs a small call. Methods are
        # the registered ones, and codes few, so this stays small.
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._timers: dict[str, Any] = {}

    def _around(
        self, method: str, request: Any, context: grpc.ServicerContext, proceed: Proceed
    ) -> Iterator[Any]:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield from proceed()
        except BaseException as exc:
            error = exc
            raise
        finally:
            code = _final_code(context, error)
            self._counter(method, code).inc()
            self._timer(method).observe(time.perf_counter() - start)

    def _counter(self, method: str, code: grpc.StatusCode) -> Any:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._metrics.grpc_requests.labels(method=method, code=code.name)
            self._counters[method, code] = counter
        return counter

    def _timer(self, method: str) -> Any:
        timer = self._timers.get(method)
        if timer is None:
            timer = self._timers[method] = self._metrics.grpc_request_duration.labels(method=method)
        return timer


class AuthInterceptor(_WrappingInterceptor):
    """Require ``authorization: Bearer <token>`` with one of tokens; no tokens: allow all.

    Health and reflection stay open. A refused call ends UNAUTHENTICATED.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of strings, not one string")
        # An empty token would let "Bearer " through and must not silently turn auth off.
        if any(not token.strip() for token in tokens):
            raise ValueError("authentication tokens must not be empty")
        self._tokens = tuple(token.encode() for token in tokens)

    def _applies_to(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        return bool(self._tokens) and not _is_open(method)

    def _around(
        self, method: str, request: Any, context: grpc.ServicerContext, proceed: Proceed
    ) -> Iterator[Any]:
        header = _metadata_value(context, AUTHORIZATION_KEY)
        if header is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                'missing credentials: send metadata "authorization: Bearer <token>"',
            )
        elif not self._accepts(header):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                'credentials not accepted: send metadata "authorization: Bearer <token>" '
                "with a token configured on the server",
            )
        yield from proceed()

    def _accepts(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # Compare with every token, without stopping at a match, so the time taken tells
        # nothing about which token (or how much of one) matched.
        accepted = False
        for expected in self._tokens:
            accepted |= hmac.compare_digest(given, expected)
        return accepted


def client_key(client_id: str | None, peer: str) -> str:
    """Return the rate-limit key: the client id when given, else the peer address without port.

    ``ipv4:10.0.0.1:5555`` -> ``10.0.0.1``, ``ipv6:[::1]:5555`` -> ``::1``; other peers
    (``unix:...``) are used whole.
    """
    if client_id:
        return client_id[:_MAX_CLIENT_KEY_CHARS]
    # grpc core may percent-encode the brackets of IPv6 peers.
    peer = urllib.parse.unquote(peer)
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0] or address
    if kind == "ipv6":
        host = address.rpartition(":")[0] if "]" in address else address
        return host.strip("[]")
    return peer


class OpenStreamLimitInterceptor(_WrappingInterceptor):
    """Run at most max_streams health Watch and reflection streams at once.

    These methods need no credentials and are not rate limited, and each open stream holds a
    worker thread until the client leaves: without a bound, one client could take every worker
    and leave queries waiting. A stream counts until it ends; one more is refused
    RESOURCE_EXHAUSTED at once.
    """

    def __init__(self, max_streams: int) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self.max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams)

    def _applies_to(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        return _is_open(method) and handler.response_streaming

    def _around(
        self, method: str, request: Any, context: grpc.ServicerContext, proceed: Proceed
    ) -> Iterator[Any]:
        if not self._slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open streams: at most {self.max_streams} health Watch and "
                "reflection streams run at once (server.max_open_streams); close one, "
                "or poll health with Check",
            )
        _when_call_ends(context, self._slots.release)
        yield from proceed()


class RateLimitInterceptor(_WrappingInterceptor):
    """Limit each client to rps calls per second with bursts of burst calls; rps 0: no limit.

    Clients are told apart by peer IP. The ``x-client-id`` metadata is honoured only with
    trust_client_id, for a server behind a proxy that sets it: otherwise any client could
    pick a fresh id per call and never be limited. A refused call ends RESOURCE_EXHAUSTED
    with a retry hint. Health and reflection are not limited. At most max_clients buckets
    are kept; the least recently seen is dropped first, which at worst hands that client a
    full bucket again.
    """

    def __init__(
        self,
        rps: float,
        burst: int,
        max_clients: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        *,
        trust_client_id: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        if rps < 0 or not math.isfinite(rps):
            raise ValueError(f"rate limit rps must be a finite number >= 0, got {rps}")
        if rps > 0 and burst < 1:
            raise ValueError(f"rate limit burst must be >= 1 to allow any call, got {burst}")
        if max_clients < 1:
            raise ValueError(f"rate limit max_clients must be >= 1, got {max_clients}")
        self.rps = rps
        self.burst = burst
        self.max_clients = max_clients
        self.trust_client_id = trust_client_id
        self._clock = clock
        self._metrics = metrics
        # client key -> [tokens, time of last refill], least recently seen first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # One lock around a constant-time update: calls of all clients pass through here.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    @property
    def client_count(self) -> int:
        """Number of clients whose bucket is kept."""
        return len(self._buckets)

    def check(self, client: str) -> float:
        """Take one token from client's bucket: return 0.0 if allowed, else seconds to wait."""
        if self.rps <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = [float(self.burst), now]
                if len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(client)
                bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rps)
                bucket[1] = now
            if bucket[0] >= 1.0 - _TOKEN_SLACK:
                bucket[0] = max(0.0, bucket[0] - 1.0)
                return 0.0
            return (1.0 - bucket[0]) / self.rps

    def _applies_to(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        return self.rps > 0 and not _is_open(method)

    def _around(
        self, method: str, request: Any, context: grpc.ServicerContext, proceed: Proceed
    ) -> Iterator[Any]:
        client_id = _metadata_value(context, CLIENT_ID_KEY) if self.trust_client_id else None
        client = client_key(client_id, context.peer())
        wait_s = self.check(client)
        if wait_s > 0:
            if self._metrics is not None:
                self._metrics.rate_limited.inc()
            # Rounded up to whole milliseconds, so the hint is never "retry in 0 s".
            retry_s = max(0.001, math.ceil(round(wait_s * 1000, 6)) / 1000)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of {self.rps:g} requests/s (burst {self.burst}) exceeded for "
                f"client {client!r}; retry in {retry_s:g} s",
            )
        yield from proceed()


@dataclass(frozen=True)
class CacheKey:
    """Normalized identity of a query; asset_id and [start_s, end_s) drive invalidation."""

    asset_id: str
    start_s: int
    end_s: int
    window: str
    aggregation: str
    extra: tuple[Any, ...] = ()


# Answers are held serialized: a parsed 70,000-point answer (upb protobuf) takes about 4x its
# ByteSize() in memory, its serialized bytes about 1x, so counting bytes bounds what it holds.
# A hit sends the bytes held as they are.
DEFAULT_CACHE_MAX_BYTES = 64 * 2**20
# Besides its answer, an entry holds its key (a few small objects), the LRU's link and the
# value tuple: measured at about 450 bytes, counted as this much.
ENTRY_OVERHEAD_BYTES = 512
# No answer may take more than this share of max_bytes: storing one then evicts at most an
# eighth of the cache, so one client asking for huge answers cannot flush everyone's entries,
# and at least 8 answers always fit.
LARGEST_ENTRY_SHARE = 8


class QueryCache:
    """Thread-safe LRU of query responses that never keeps a result older than its data.

    Bounded twice: at most size entries and at most max_bytes bytes, counting each entry as
    its serialized answer plus ENTRY_OVERHEAD_BYTES; the least recently used entries go first.
    An entry larger than max_bytes / LARGEST_ENTRY_SHARE is not stored. Answers are Serialized
    responses.

    Each asset has a generation that invalidate() and clear() advance. Read it with
    generation() before running a query and hand it to put(): a result computed from rows that
    changed meanwhile is then not stored. size 0 or max_bytes 0 disables the cache.
    """

    def __init__(
        self,
        size: int,
        *,
        max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        if size < 0:
            raise ValueError(f"cache size must be >= 0, got {size}")
        if max_bytes < 0:
            raise ValueError(f"cache max_bytes must be >= 0, got {max_bytes}")
        self.size = size
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // LARGEST_ENTRY_SHARE
        self._metrics = metrics
        # Least recently used first.
        self._entries: OrderedDict[CacheKey, Serialized] = OrderedDict()
        self._bytes = 0
        # Generations come from one counter: an asset's is the later of its last invalidation
        # and the last clear(), so clear() advances every asset, even ones never seen, and
        # the table only holds assets that were invalidated since.
        self._counter = 0
        self._cleared_at = 0
        self._invalidated_at: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        """Whether anything can be stored at all."""
        return self.size > 0 and self.max_bytes > 0

    @property
    def held_bytes(self) -> int:
        """Bytes held, as counted against max_bytes."""
        with self._lock:
            return self._bytes

    def generation(self, asset_id: str) -> int:
        """Return the asset's current generation, to pass to put()."""
        with self._lock:
            return self._generation(asset_id)

    def get(self, key: CacheKey) -> Serialized | None:
        """Return the answer stored for key, marking it recently used, or None."""
        with self._lock:
            answer = self._entries.get(key)
            if answer is not None:
                self._entries.move_to_end(key)
            return answer

    def put(self, key: CacheKey, answer: Serialized, generation: int) -> bool:
        """Store an answer unless it is too large or key's asset was invalidated after
        generation; return whether it was stored.
        """
        if not self.enabled or _entry_bytes(answer) > self.max_entry_bytes:
            return False
        with self._lock:
            if self._generation(key.asset_id) != generation:
                return False
            self._drop(key)
            self._entries[key] = answer
            self._bytes += _entry_bytes(answer)
            while len(self._entries) > self.size or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._update_gauges()
            return True

    def invalidate(self, asset_id: str, start_s: int, end_s: int) -> int:
        """Drop the asset's entries overlapping [start_s, end_s); return how many were dropped.

        Also advances the asset's generation, so queries already running do not store.
        Takes time linear in the number of entries.
        """
        with self._lock:
            self._counter += 1
            self._invalidated_at[asset_id] = self._counter
            stale = [
                key
                for key in self._entries
                if key.asset_id == asset_id and key.start_s < end_s and start_s < key.end_s
            ]
            for key in stale:
                self._drop(key)
            self._update_gauges()
            return len(stale)

    def clear(self) -> None:
        """Drop every entry and advance every asset's generation."""
        with self._lock:
            self._counter += 1
            self._cleared_at = self._counter
            self._invalidated_at.clear()
            self._entries.clear()
            self._bytes = 0
            self._update_gauges()

    def _drop(self, key: CacheKey) -> None:
        answer = self._entries.pop(key, None)
        if answer is not None:
            self._bytes -= _entry_bytes(answer)

    def _generation(self, asset_id: str) -> int:
        return max(self._cleared_at, self._invalidated_at.get(asset_id, 0))

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_entries.set(len(self._entries))
            self._metrics.cache_bytes.set(self._bytes)


def _entry_bytes(answer: Serialized) -> int:
    return len(answer.message) + ENTRY_OVERHEAD_BYTES


class DrainInterceptor(grpc.ServerInterceptor):
    """Counts the calls in flight, so that shutdown can end as soon as the last one is done.

    A call counts from its arrival, before it waits for a worker thread, until grpcio has
    sent its status, or until grpcio drops it without running it (a call refused for the
    server's maximum_concurrent_rpcs). Health Watch streams are left out: they last until
    the client leaves, and would otherwise hold every shutdown for the whole grace period.
    """

    def __init__(self) -> None:
        self._active = 0
        self._idle = threading.Condition()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not self._applies_to(handler_call_details.method, handler):
            return handler
        started = threading.Event()

        def around(request: Any, context: grpc.ServicerContext, proceed: Proceed) -> Iterator[Any]:
            started.set()
            # Counted until the answer is sent, not until the handler returns: stopping the
            # server while a large answer is still being sent would cancel it.
            _when_call_ends(context, self._call_ended)
            yield from proceed()

        def dropped() -> None:
            if not started.is_set():
                self._call_ended()

        # Counted here, on arrival: a call queued for a busy worker is in flight too.
        with self._idle:
            self._active += 1
        wrapped = _wrap(handler, around)
        # grpcio refuses a call beyond maximum_concurrent_rpcs after the interceptors have
        # seen it, and drops its handler unrun: no status callback will ever end its count.
        # The handler's behavior lives until grpcio has run it, or dropped it unrun.
        weakref.finalize(_behavior(wrapped), dropped)
        return wrapped

    @property
    def active(self) -> int:
        """Calls that arrived and have not ended yet."""
        with self._idle:
            return self._active

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no counted call is in flight, or timeout_s passes; returns whether idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout_s)

    def _applies_to(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        return method != HEALTH_WATCH_METHOD

    def _call_ended(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()


class CacheInterceptor(_WrappingInterceptor):
    """Answer repeated unary queries from a QueryCache.

    key_fn(method, request) returns the CacheKey of a call, or None for calls not to cache (it
    sees every unary call, so it must return None for other methods); when it raises, the call
    goes to the handler untouched, which reports the problem. Only calls that end OK are stored.
    """

    def __init__(
        self,
        cache: QueryCache,
        key_fn: Callable[[str, Any], CacheKey | None],
        metrics: Metrics | None = None,
    ) -> None:
        self._cache = cache
        self._key_fn = key_fn
        self._metrics = metrics

    def _applies_to(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        unary = not handler.request_streaming and not handler.response_streaming
        return unary and self._cache.enabled

    def _around(
        self, method: str, request: Any, context: grpc.ServicerContext, proceed: Proceed
    ) -> Iterator[Any]:
        try:
            key = self._key_fn(method, request)
        except Exception:
            # The handler validates the same request and answers with the right status code.
            key = None
        if key is None:
            yield from proceed()
            return
        info = current_call()
        cached = self._cache.get(key)
        if cached is not None:
            if self._metrics is not None:
                self._metrics.cache_hits.inc()
            if info is not None:
                info.cache = "hit"
            yield cached
            return
        if self._metrics is not None:
            self._metrics.cache_misses.inc()
        if info is not None:
            info.cache = "miss"
        # Read before the query runs: an invalidation while it runs must stop the store.
        generation = self._cache.generation(key.asset_id)
        (response,) = proceed()
        # A handler may end a call with set_code() and no exception; only OK results are kept.
        if context.code() in (None, grpc.StatusCode.OK) and response is not None:
            # Sent as stored: serialized once, for the cache and the client alike.
            if not isinstance(response, Serialized):
                response = Serialized.of(response)
            self._cache.put(key, response, generation)
        yield response


# --- request decoding -----------------------------------------------------------------------

# How much of a decoder's error a refusal quotes.
_SHOWN_ERROR_CHARS = 256


@dataclass(frozen=True)
class _Undecodable:
    """Request bytes that are not a valid message of the method's request type."""

    error: str


def _total(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that returns _Undecodable instead of raising."""

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            # Whatever the bytes make a decoder raise, the client chose them.
            return _Undecodable(str(exc) or type(exc).__name__)

    return decode


def _decoded(request: Any, context: grpc.ServicerContext) -> Any:
    """Return the request, or abort the call with INVALID_ARGUMENT if it did not decode."""
    if isinstance(request, _Undecodable):
        _LOG.debug("request does not decode: %s", request.error)
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request does not decode ({request.error[:_SHOWN_ERROR_CHARS]}): send a "
            "serialized protobuf message of the method's request type, strings in UTF-8",
        )
    return request


def _decoding(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """The handler with a deserializer that never raises; its behavior refuses what did not
    decode. grpcio answers a raising deserializer with INTERNAL and an ERROR traceback per call.

    Interceptors between see an _Undecodable request and pass it on; the call ends here.
    """
    if handler is None or handler.request_deserializer is None:
        return handler
    behavior, make = handler_kind(handler)

    if handler.request_streaming:

        def refusing(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behavior((_decoded(request, context) for request in requests), context)

    else:

        def refusing(request: Any, context: grpc.ServicerContext) -> Any:
            return behavior(_decoded(request, context), context)

    return make(
        refusing,
        request_deserializer=_total(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class _DecodingGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.GenericRpcHandler) -> None:
        self._handler = handler

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return _decoding(self._handler.service(handler_call_details))


class DecodingRegistrar:
    """Stands in for the server in the generated add_*_to_server functions, so that every
    handler they register decodes requests with _decoding."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(map(_DecodingGenericHandler, handlers)))

    def add_registered_method_handlers(
        self, service_name: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {name: _decoding(handler) for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service_name, wrapped)
