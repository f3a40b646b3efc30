"""EdgeCom's query layer: request parsing, the query plan, the cache key and the servicer."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import zoneinfo
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, tzinfo
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import grpc

from buckets import FILLS, POINTS, Buckets, Source, Window, fill_gaps, fillable, sources
from interceptors import CacheKey
from repository import (
    AGGREGATIONS,
    Bucket,
    BucketGrid,
    Cancellation,
    DatabaseUnavailable,
    DataOutOfRange,
    Extent,
    QueryCancelled,
    Repository,
    Snapshot,
)
from wire import encode_points

# The .proto stays the single source of truth: it is compiled at import time, never checked in.
sys.path.insert(0, str(Path(__file__).resolve().parent / "proto"))
protos, services = grpc.protos_and_services("edgecom.proto")

SERVICE_NAME = "edgecom.TimeSeriesService"
# The Go service's name for the same API: its health probes keep working.
GO_SERVICE_NAME = "timeseries.TimeSeriesService"
QUERY_METHOD = f"/{SERVICE_NAME}/QueryTimeSeries"
MAX_WINDOW_S = 366 * 86400
MAX_WINDOW_WEEKS = 52
MAX_WINDOW_MONTHS = 12
# Defaults of the servicer's bounds (query.page_points, query.max_streams,
# query.stream_idle_timeout) and of the range it measures coverage against (upstream.bootstrap).
PAGE_POINTS = 10000
MAX_STREAMS = 4
STREAM_IDLE_TIMEOUT_S = 30.0
KEPT_S = 730 * 86400

log = logging.getLogger("edgecom")


# --- request errors ------------------------------------------------------------------------


class InvalidRequest(ValueError):
    """The client sent something the service cannot answer; the message says what to change."""


class UnknownAsset(LookupError):
    """The requested asset is not one the service keeps."""


class TooManyPoints(Exception):
    """The answer would exceed query.max_points."""


# One table maps every failure to the status a client sees; nothing a client sent is INTERNAL.
_STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownAsset, grpc.StatusCode.NOT_FOUND),
    (TooManyPoints, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DatabaseUnavailable, grpc.StatusCode.UNAVAILABLE),
    # Not INTERNAL: the request is what the database cannot compute (a sum past the largest
    # double, a time past its calendar), and a smaller window or range can succeed.
    (DataOutOfRange, grpc.StatusCode.OUT_OF_RANGE),
)


@contextmanager
def _status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn service exceptions into a gRPC status carrying their message."""
    try:
        yield
    except QueryCancelled:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    except tuple(error for error, _ in _STATUS_BY_ERROR) as exc:
        code = next(code for error, code in _STATUS_BY_ERROR if isinstance(exc, error))
        details = str(exc)
        if len(details) > _MAX_DETAILS_CHARS:
            details = details[:_MAX_DETAILS_CHARS] + "..."
        context.abort(code, details)


# Client values quoted in error messages are cut to this many characters: the message
# travels in a trailer, and one over the client's metadata limit (8 KiB by default)
# turns the refusal into RESOURCE_EXHAUSTED or INTERNAL.
_SHOWN_CHARS = 64
_SHOWN_ASSETS = 5
_MAX_DETAILS_CHARS = 2000
# The longest window, aggregation, timezone or fill the parsers look at; every valid value
# is far shorter (the longest IANA zone name has 32 characters).
MAX_FIELD_CHARS = 256


def _shown(value: str) -> str:
    """repr() of a client-sent string, cut short when long."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"


def _check_length(name: str, value: str) -> None:
    if len(value) > MAX_FIELD_CHARS:
        raise InvalidRequest(
            f"{name} {_shown(value)} is longer than {MAX_FIELD_CHARS} characters: "
            f"no valid {name} is"
        )


def _known_assets(assets: Sequence[str]) -> str:
    shown = ", ".join(assets[:_SHOWN_ASSETS])
    more = len(assets) - _SHOWN_ASSETS
    return f"{shown} and {more} more" if more > 0 else shown


# --- queries ------------------------------------------------------------------------------


# Six digits hold the largest valid count (527040m is 366d); more would only feed int() numbers
# past its digit limit, which raises ValueError rather than refusing the window.
_WINDOW_RE = re.compile(r"^([1-9][0-9]{0,5})(mo|[mhdw])$")
_WINDOW_UNITS = {"m": 60, "h": 3600, "d": 86400}
ACCEPTED_WINDOWS = (
    '"1m", "5m", "15m", "1h", "1d", "1w" (weeks from Monday), "1mo" (calendar months), '
    'or any "<N>m", "<N>h", "<N>d" up to 366d, "<N>w" up to 52w, "<N>mo" up to 12mo'
)
# Names of UTC in the IANA database: they all mean the service's original, epoch-aligned
# buckets, and share one cache key.
_UTC_NAMES = frozenset(
    {
        "",
        "UTC",
        "Etc/UTC",
        "UCT",
        "Etc/UCT",
        "Universal",
        "Etc/Universal",
        "Zulu",
        "Etc/Zulu",
        "GMT",
        "Etc/GMT",
        "GMT0",
        "Etc/GMT0",
        "GMT+0",
        "Etc/GMT+0",
        "GMT-0",
        "Etc/GMT-0",
        "Greenwich",
        "Etc/Greenwich",
    }
)


def parse_bucket_window(window: str) -> Window:
    """Parse `5m`, `1h`, `1d`, `1w`, `1mo` and their multiples into a Window."""
    _check_length("window", window)
    match = _WINDOW_RE.match(window.strip().lower())
    if match:
        count, unit = int(match.group(1)), match.group(2)
        if unit in _WINDOW_UNITS and count * _WINDOW_UNITS[unit] <= MAX_WINDOW_S:
            return Window(count * _WINDOW_UNITS[unit], "s")
        if unit == "w" and count <= MAX_WINDOW_WEEKS:
            return Window(count, "w")
        if unit == "mo" and count <= MAX_WINDOW_MONTHS:
            return Window(count, "mo")
    raise InvalidRequest(f"unknown window {_shown(window)}: use {ACCEPTED_WINDOWS}")


def parse_aggregation(aggregation: str) -> str:
    """Return the canonical (upper-case) aggregation name."""
    _check_length("aggregation", aggregation)
    name = aggregation.strip().upper()
    if name not in AGGREGATIONS:
        raise InvalidRequest(
            f"unknown aggregation {_shown(aggregation)}: use one of {', '.join(AGGREGATIONS)}"
        )
    return name


def parse_timezone(name: str) -> tuple[str, tzinfo]:
    """Return the canonical name and the zone of an IANA time zone name; empty is UTC.

    Every name of UTC becomes "UTC". Names are case-sensitive, as in the IANA database.
    """
    _check_length("timezone", name)
    name = name.strip()
    if name in _UTC_NAMES:
        return "UTC", UTC
    try:
        return name, zoneinfo.ZoneInfo(name)
    except (KeyError, ValueError, OSError):
        # KeyError is ZoneInfoNotFoundError; ValueError and OSError are malformed names
        # (absolute or parent paths, directories such as "Europe").
        raise InvalidRequest(
            f"unknown timezone {_shown(name)}: use an IANA time zone name such as "
            "Europe/Berlin, America/New_York or Asia/Kolkata, or leave it empty for UTC"
        ) from None


def parse_fill(fill: str) -> str:
    """Return the canonical (lower-case) fill mode; empty is "none"."""
    _check_length("fill", fill)
    name = fill.strip().lower() or "none"
    if name not in FILLS:
        raise InvalidRequest(f"unknown fill {_shown(fill)}: use one of {', '.join(FILLS)}")
    return name


# The range of a valid google.protobuf.Timestamp, which is also what datetime can hold:
# 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799
_NANOS_PER_S = 1_000_000_000


def _check_timestamp(name: str, timestamp: Any) -> None:
    if not MIN_TIMESTAMP_S <= timestamp.seconds <= MAX_TIMESTAMP_S:
        raise InvalidRequest(
            f"{name} ({timestamp.seconds} s) is outside the range of a Timestamp: "
            "use a time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"
        )
    if not 0 <= timestamp.nanos < _NANOS_PER_S:
        raise InvalidRequest(
            f"{name} has nanos {timestamp.nanos}: a Timestamp's nanos must be 0 to 999999999"
        )


def _ceil_seconds(timestamp: Any) -> int:
    # Points sit on whole seconds, so [start, end) holds the same points as
    # [ceil(start), ceil(end)) and the query can work in integers. Past the last second
    # of year 9999 there are no points, and no datetime to query with.
    return min(MAX_TIMESTAMP_S, timestamp.seconds + (1 if timestamp.nanos > 0 else 0))


@dataclass(frozen=True)
class Query:
    """A validated, normalized QueryTimeSeries request."""

    asset_id: str
    start_s: int
    end_s: int
    window: Window
    aggregation: str
    timezone: str  # canonical: "UTC" for every name of UTC
    fill: str
    buckets: Buckets


def parse_query(request: Any, assets: Sequence[str]) -> Query:
    """Validate a TimeSeriesRequest against the configured assets; raises InvalidRequest."""
    missing = [name for name in ("start", "end") if not request.HasField(name)]
    if missing:
        raise InvalidRequest(f"{' and '.join(missing)} required: set start and end timestamps")
    _check_timestamp("start", request.start)
    _check_timestamp("end", request.end)
    start_s, end_s = _ceil_seconds(request.start), _ceil_seconds(request.end)
    if (request.start.seconds, request.start.nanos) >= (request.end.seconds, request.end.nanos):
        raise InvalidRequest(
            f"start ({request.start.ToJsonString()}) must be before end "
            f"({request.end.ToJsonString()})"
        )
    window = parse_bucket_window(request.window)
    aggregation = parse_aggregation(request.aggregation)
    timezone, zone = parse_timezone(request.timezone)
    fill = parse_fill(request.fill)
    try:
        buckets = Buckets(window, zone)
    except ValueError as exc:
        raise InvalidRequest(
            f"window {_shown(request.window)} in timezone {timezone}: {exc}"
        ) from None
    if buckets.layout != "epoch":
        try:
            list(buckets.edges(start_s, start_s + 1))
            list(buckets.edges(end_s - 1, end_s))
        except (OverflowError, ValueError, OSError):
            raise InvalidRequest(
                "start and end are too close to the limits of the calendar (years 1 and "
                f"9999) for buckets in timezone {timezone}"
            ) from None
    asset_id = request.asset_id or assets[0]
    if asset_id not in assets:
        raise UnknownAsset(
            f"asset {_shown(asset_id)} is not configured (known: {_known_assets(assets)})"
        )
    return Query(asset_id, start_s, end_s, window, aggregation, timezone, fill, buckets)


# --- the query plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryPlan:
    """How a query is answered: which buckets to read, and which empty ones to fill.

    `grid` lays out the buckets the stored points are read into (None: the range holds no
    stored point, nothing is read). Without `fill_range` the answer is the buckets as read;
    with it, every bucket start in [fill_range) is answered, the empty ones filled from the
    neighbours `before` and `after`. `sources` says where to read each part of the range
    from, the rollups included (see Snapshot.buckets); None: from the points alone.
    """

    grid: BucketGrid | None
    fill_range: tuple[int, int] | None = None
    before: tuple[int, float] | None = None
    after: tuple[int, float] | None = None
    sources: tuple[Source, ...] | None = None


# Laying out edges is Python work (two years of Europe/Berlin days: about 2 ms), and a
# dashboard asks for the same span on every refresh until new points move its end. The
# last few short layouts are kept: at most 32 x 4,096 edges, about 5 MB.
_EDGE_LAYOUTS = 32
_EDGE_LAYOUT_MAX = 4096
_edge_layouts: OrderedDict[tuple[str, str, int, int], tuple[int, ...]] = OrderedDict()
_edge_layouts_lock = threading.Lock()


def _laid_out_edges(
    buckets: Buckets, lo: int, hi: int, guard: Callable[[Iterable[int]], Iterable[int]]
) -> tuple[int, ...]:
    """buckets.edges(lo, hi) through `guard`, or as laid out for an earlier query."""
    key = (str(buckets.window), str(buckets.zone), lo, hi)
    with _edge_layouts_lock:
        edges = _edge_layouts.get(key)
        if edges is not None:
            _edge_layouts.move_to_end(key)
            return edges
    edges = tuple(guard(buckets.edges(lo, hi)))
    if len(edges) <= _EDGE_LAYOUT_MAX:
        with _edge_layouts_lock:
            _edge_layouts[key] = edges
            while len(_edge_layouts) > _EDGE_LAYOUTS:
                _edge_layouts.popitem(last=False)
    return edges


def needs_extent(query: Query) -> bool:
    """Whether plan_query needs the extent of the stored points around the query's range."""
    return not (query.buckets.layout == "epoch" and query.fill == "none")


def plan_query(
    query: Query,
    extent: Extent | None,
    *,
    now_s: float,
    guard: Callable[[Iterable[int]], Iterable[int]] = iter,
    rollups: bool = True,
    local_days: bool = False,
) -> QueryPlan:
    """Plan the answer to `query` from the extent of its stored points (when needs_extent).

    `guard` wraps the laying out of bucket edges, which can take long, so that it can stop
    (by raising) when the call ends. Without `rollups` the plan reads the points alone;
    `local_days` says the query's zone has local-day rollups.
    """

    def where_from(lo: int, hi: int, edges: Sequence[int]) -> tuple[Source, ...] | None:
        # From the points alone, one plain statement over the range is faster than the
        # rollup statement's ranges.
        found = tuple(sources(buckets, lo, hi, edges, local_days=local_days)) if rollups else ()
        return None if all(kind == POINTS for kind, _, _ in found) else found

    buckets = query.buckets
    if extent is None:
        # The original query, alone: answers to requests without the newer fields stay
        # exactly what they were.
        return QueryPlan(
            BucketGrid(window_s=buckets.stride_s),
            sources=where_from(query.start_s, query.end_s, ()),
        )
    grid = plan_sources = None
    if extent.first_s is not None and extent.last_s is not None:
        # Edges only for the stored points' part of the range: a long range holding little
        # data costs nothing extra. Stored points millennia apart would take minutes.
        lo, hi = extent.first_s, extent.last_s + 1
        edges = _laid_out_edges(buckets, lo, hi, guard)
        grid = BucketGrid(window_s=buckets.stride_s, edges_s=edges)
        plan_sources = where_from(lo, hi, edges)
    fill_end = query.end_s
    if extent.after is None and query.end_s > now_s:
        # Nothing is invented past the last stored point while end is still ahead: the
        # fill ends with the bucket holding it, which may be the one holding start.
        last_s = extent.last_s
        if last_s is None and extent.before is not None:
            last_s = extent.before[0]
        fill_end = query.start_s
        if last_s is not None and last_s >= buckets.start_of(query.start_s):
            fill_end = min(query.end_s, max(last_s, query.start_s) + 1)
    fill_range = fillable(
        query.fill,
        query.start_s,
        fill_end,
        first_s=extent.first_s,
        last_s=extent.last_s,
        before=extent.before,
        after=extent.after,
    )
    return QueryPlan(grid, fill_range, extent.before, extent.after, plan_sources)


# --- the cache key -------------------------------------------------------------------------

# Invalidation spans of cache keys that depend on every point before or after the range.
_FAR_PAST_S = -(2**63)
_FAR_FUTURE_S = 2**63


def query_cache_key(request: Any, assets: Sequence[str], *, now_s: float) -> CacheKey:
    """The cache key of a QueryTimeSeries request; raises what parse_query raises.

    The key's start_s and end_s are the span whose changes invalidate the entry.
    """
    query = parse_query(request, assets)
    start_s, end_s = query.start_s, query.end_s
    extra: tuple[object, ...] = (query.timezone, query.fill)
    if query.fill != "none":
        # A filled answer also depends on points outside the range ("previous" on the
        # one before start, "linear" on both neighbours, any fill on whether a point
        # follows an end still ahead) and on whether end is still ahead.
        future = query.end_s > now_s
        extra += (query.start_s, query.end_s, future)
        if query.fill in ("previous", "linear"):
            start_s = _FAR_PAST_S
        if query.fill == "linear" or future:
            end_s = _FAR_FUTURE_S
    return CacheKey(query.asset_id, start_s, end_s, str(query.window), query.aggregation, extra)


# --- streams -------------------------------------------------------------------------------


T = TypeVar("T")
# How many buckets an answer is built between checks that its call is still on: a few
# milliseconds of work.
_CHECK_EVERY = 4096


def _until_call_ends(items: Iterable[T], context: grpc.ServicerContext) -> Iterator[T]:
    """`items`, ending with QueryCancelled once the call is cancelled or past its deadline.

    An answer of millions of buckets is built in Python, where nothing else would notice
    that its client has gone: it would keep a core busy and a shutdown waiting.
    """
    for chunk in _chunks_until_call_ends(items, context):
        yield from chunk


def _chunks_until_call_ends(items: Iterable[T], context: grpc.ServicerContext) -> Iterator[list[T]]:
    """`items` in lists of up to _CHECK_EVERY, as _until_call_ends() ends them.

    Taken and checked a list at a time, the items pass without Python code run for each.
    """
    items = iter(items)
    while chunk := list(islice(items, _CHECK_EVERY)):
        remaining = context.time_remaining()
        if not context.is_active() or (remaining is not None and remaining <= 0):
            raise QueryCancelled("the call ended before its answer did")
        yield chunk


def _response(encoded: bytes) -> Any:
    """The TimeSeriesResponse of points encode_points() encoded."""
    # Parsed from bytes encoded in bulk: for two years of minutes (70,080 points), 13 to 15 ms
    # to encode and parse, against 38 to 40 ms with one data.add() and three field sets a
    # point and 150 ms with a message a point; for 96 points 0.03 against 0.04 ms
    # (benchmarks/answer_build.py). The parsed message serializes to the same bytes.
    return protos.TimeSeriesResponse.FromString(encoded)


class StreamLimiter:
    """Runs at most `max_streams` streams at once and ends those whose client stops reading.

    A stream holds a database connection until it ends (its cursor lives in a snapshot's
    transaction), so streams without a bound, or left unread, would take the connections
    queries need.
    """

    def __init__(self, *, max_streams: int, idle_timeout_s: float) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {max_streams!r}")
        if not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be positive, not {idle_timeout_s!r}")
        self._max_streams = max_streams
        self._idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_streams)

    def serve(self, context: grpc.ServicerContext, pages: Iterator[Any]) -> Iterator[Any]:
        """Yield `pages` to the client while holding a slot; closes `pages` when done.

        Aborts RESOURCE_EXHAUSTED at once when every slot is taken, and ends the call
        DEADLINE_EXCEEDED when the client has not taken a page for `idle_timeout_s`.
        """
        if not self._slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many streams: at most {self._max_streams} run at once "
                "(query.max_streams); retry later, or ask QueryTimeSeries for answers "
                "up to query.max_points points",
            )
        idle = f"{self._idle_timeout_s:g}s"

        def end_idle_stream() -> None:
            log.info(
                "ended a stream whose client stopped reading",
                extra={"peer": context.peer(), "idle": idle},
            )
            _end_call(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the stream was ended: its client took no page for {idle} "
                "(query.stream_idle_timeout); read pages as they arrive",
            )

        try:
            # Exits in reverse: the watch stops, then `pages` closes and gives its connection
            # back, and only then is the slot free for another stream.
            with closing(pages), _IdleWatch(self._idle_timeout_s, end_idle_stream) as watch:
                for page in pages:
                    # grpcio asks for the next page once the client's flow control has taken
                    # this one, so the time spent here is the time the client takes to read.
                    with watch.waiting():
                        yield page
        finally:
            self._slots.release()


class _IdleWatch:
    """Calls `on_idle` once, from a thread of its own, when one waiting() lasts `timeout_s`."""

    def __init__(self, timeout_s: float, on_idle: Callable[[], None]) -> None:
        self._timeout_s = timeout_s
        self._on_idle = on_idle
        self._state = threading.Condition()
        self._waiting_since: float | None = None
        self._done = False
        self._thread = threading.Thread(target=self._run, name="stream-idle-watch", daemon=True)

    def __enter__(self) -> _IdleWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._state:
            self._done = True
            self._state.notify()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        with self._state:
            self._waiting_since = time.monotonic()
            self._state.notify()
        try:
            yield
        finally:
            with self._state:
                self._waiting_since = None

    def _run(self) -> None:
        with self._state:
            while not self._done:
                if self._waiting_since is None:
                    self._state.wait()
                    continue
                left = self._waiting_since + self._timeout_s - time.monotonic()
                if left <= 0:
                    break
                self._state.wait(left)
            if self._done:
                return
        self._on_idle()


def _end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread, even while its handler is blocked sending a message.

    abort() works only in the handler's own thread, and cancel() tells the client no more
    than CANCELLED; grpcio's call object cancels with a status of our choosing. Where that
    private attribute is missing, a plain cancel() still ends the call.
    """
    # Recorded on the context too, so the metrics and the request log show this code.
    context.set_code(code)
    context.set_details(details)
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)
    except (AttributeError, TypeError):
        context.cancel()


# --- the servicer --------------------------------------------------------------------------


def _default_window() -> tuple[int, int]:
    now = int(time.time())
    return now - KEPT_S, now


class TimeSeriesServicer(services.TimeSeriesServiceServicer):
    """Answers TimeSeriesService calls from the repository."""

    def __init__(
        self,
        *,
        repository: Repository,
        assets: Sequence[str],
        max_points: int,
        page_points: int = PAGE_POINTS,
        window: Callable[[], tuple[int, int]] | None = None,
        clock: Callable[[], float] = time.time,
        max_streams: int = MAX_STREAMS,
        stream_idle_timeout_s: float = STREAM_IDLE_TIMEOUT_S,
        rollups: bool = True,
    ) -> None:
        """`rollups`: read the hourly and daily rollups where they answer exactly; without,
        every answer aggregates the points themselves (the equivalence tests compare both).
        """
        self._repository = repository
        self._assets = tuple(assets)
        self._max_points = max_points
        self._page_points = page_points
        self._streams = StreamLimiter(max_streams=max_streams, idle_timeout_s=stream_idle_timeout_s)
        self._clock = clock
        self._rollups = rollups
        # The [start, end) range ingestion keeps complete; coverage is measured against it.
        self._window = window or _default_window

    def ListAssets(self, request: Any, context: grpc.ServicerContext) -> Any:
        with _status_on_error(context):
            start_s, end_s = self._window()
            with self._snapshot(context) as snapshot:
                statuses = snapshot.asset_status(self._assets, start_s=start_s, end_s=end_s)
            response = protos.ListAssetsResponse()
            for status in statuses:
                info = response.assets.add(
                    asset_id=status.asset_id,
                    point_count=status.points,
                    coverage=status.coverage,
                    last_error=status.last_error or "",
                )
                for name, seconds in (
                    ("first_point_time", status.first_s),
                    ("last_point_time", status.last_s),
                    ("last_successful_fetch", status.last_success_s),
                ):
                    if seconds is not None:
                        getattr(info, name).seconds = seconds
            return response

    def QueryTimeSeries(self, request: Any, context: grpc.ServicerContext) -> Any:
        with _status_on_error(context):
            query = parse_query(request, self._assets)
            with (
                self._snapshot(context) as snapshot,
                closing(
                    self._series(snapshot, query, limit=self._max_points + 1, context=context)
                ) as series,
            ):
                # Encoded a chunk at a time, as the rows arrive: the database computes and
                # sends the rest meanwhile.
                encoded = []
                points = 0
                for chunk in _chunks_until_call_ends(series, context):
                    points += len(chunk)
                    if points > self._max_points:
                        raise TooManyPoints(
                            f"the answer has more than {self._max_points} points, filled "
                            "buckets included: widen the window or shorten the range, or "
                            "read it with StreamTimeSeries"
                        )
                    encoded.append(encode_points(chunk))
            return _response(b"".join(encoded))

    def StreamTimeSeries(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._streams.serve(context, self._stream_pages(request, context))

    def _stream_pages(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with _status_on_error(context):
            query = parse_query(request, self._assets)
            # The server-side cursor lives in the snapshot's transaction, so the stream holds
            # its connection until the last page is sent or the call ends.
            with (
                self._snapshot(context) as snapshot,
                closing(self._series(snapshot, query, limit=None, context=context)) as series,
            ):
                points = _until_call_ends(series, context)
                while page := list(islice(points, self._page_points)):
                    yield _response(encode_points(page))

    def _snapshot(self, context: grpc.ServicerContext) -> AbstractContextManager[Snapshot]:
        """A database snapshot whose statements stop when the call ends or its deadline passes."""
        cancellation = Cancellation()
        context.add_callback(cancellation.cancel)
        remaining = context.time_remaining()
        return self._repository.snapshot(
            timeout_s=remaining if remaining is not None and remaining < 1e8 else None,
            cancellation=cancellation,
        )

    def _series(
        self,
        snapshot: Snapshot,
        query: Query,
        *,
        limit: int | None,
        context: grpc.ServicerContext,
    ) -> Iterator[Bucket]:
        """The buckets of the answer, ascending, with empty ones filled as the query asks.

        Raises QueryCancelled when the call ends while it is laying out the buckets.

        With a `limit`, reads at most that many non-empty buckets in one go; without, reads
        them through a server-side cursor, a page at a time.
        """
        extent = None
        if needs_extent(query):
            extent = snapshot.extent(
                asset_id=query.asset_id, start_s=query.start_s, end_s=query.end_s
            )
        plan = plan_query(
            query,
            extent,
            now_s=self._clock(),
            guard=lambda edges: _until_call_ends(edges, context),
            rollups=self._rollups,
            local_days=query.timezone in self._repository.rollup_timezones,
        )
        rows: Iterable[Bucket] = ()
        if plan.grid is not None:
            rows = snapshot.buckets(
                asset_id=query.asset_id,
                start_s=query.start_s,
                end_s=query.end_s,
                grid=plan.grid,
                aggregation=query.aggregation,
                limit=limit,
                # A bounded answer comes back sooner in one read; see Snapshot.buckets.
                batch_size=self._page_points if limit is None else None,
                sources=plan.sources,
                timezone=query.timezone,
            )
        if plan.fill_range is None:
            yield from rows
            return
        lo, hi = plan.fill_range
        yield from fill_gaps(
            rows, query.buckets.starts(lo, hi), query.fill, before=plan.before, after=plan.after
        )
