"""Blocking HTTP client that fetches one asset's time series from the EdgeCom Energy API."""

from __future__ import annotations

import itertools
import json
import logging
import math
import operator
import random
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpcore
import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
)

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
DEFAULT_URL_TEMPLATE = "https://api.edgecomenergy.net/core/asset/{asset_id}/series"
RETRY_ATTEMPTS = 5
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
KEEPALIVE_CONNECTIONS = 8
KEEPALIVE_EXPIRY_S = 30.0
# The largest answer read, counted after decompression. A 7-day chunk of 15-minute points is
# 672 points of about 40 bytes, 27 KB; 4 MiB leaves room for a finer series, a verbose
# upstream or a chunk of up to two years. It is kept this low because the parsed answer takes
# more room than its text (about 6 times for real points, up to about 25 times for hostile
# JSON such as millions of empty objects), so one answer stays near 100 MB at worst.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Readings of larger magnitude are refused as implausible: 1e15 is above any energy reading
# (1e15 Wh is a petawatt-hour, a large country's yearly use) or power, yet a SUM over a
# trillion such points (1e27) stays far below double precision's overflow at 1.8e308.
MAX_ABS_VALUE = 1e15

_PLACEHOLDER = "{asset_id}"
# Configs written for the earlier Go service spell the placeholder this way.
_PLACEHOLDER_ALIAS = "{asset-id}"
_QUERY_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_EXCERPT_CHARS = 200
# We decode answers ourselves (see _decoded), so we offer only what zlib can bound.
_ACCEPT_ENCODING = "gzip"
_ZLIB_ENCODINGS = ("gzip", "x-gzip", "deflate")
_MALFORMED = "malformed"
_OUTSIDE = "outside the range asked for"
_FUTURE = "later than now"
_IMPLAUSIBLE = f"not finite or beyond {MAX_ABS_VALUE:g} in magnitude"

OUTCOMES = (
    "ok",
    "http_4xx",
    "http_5xx",
    "rate_limited",
    "timeout",
    "connection_error",
    "bad_response",
)

_STATUS_HINTS = {
    400: "the upstream rejected the request; if it names the range, fetch smaller chunks",
    401: "the upstream wants credentials; check the url template and access rights",
    403: "the upstream refused access to this asset; check access rights",
    404: "unknown asset or wrong path; check the asset id and the upstream url template",
}


class UpstreamError(Exception):
    """A fetch from the EdgeCom Energy API failed; the message names asset, range and cause.

    `outcome` is the on_request label of the attempt that failed (e.g. "timeout").
    """

    outcome = "connection_error"

    def __init__(self, asset_id: str, start: datetime, end: datetime, detail: str) -> None:
        self.asset_id = asset_id
        self.start = start
        self.end = end
        self.detail = detail
        super().__init__(f"EdgeCom API, asset {asset_id}, {_iso(start)} to {_iso(end)}: {detail}")


class UpstreamStatusError(UpstreamError):
    """The API answered with an HTTP error status (not retried, or retries used up)."""

    def __init__(
        self,
        asset_id: str,
        start: datetime,
        end: datetime,
        detail: str,
        *,
        status: int,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(asset_id, start, end, detail)
        self.status = status
        self.retry_after_s = retry_after_s
        self.outcome = _status_outcome(status)


class UpstreamUnavailable(UpstreamError):
    """The API could not be reached or did not answer in time, after every attempt."""

    def __init__(
        self, asset_id: str, start: datetime, end: datetime, detail: str, *, timed_out: bool
    ) -> None:
        super().__init__(asset_id, start, end, detail)
        self.outcome = "timeout" if timed_out else "connection_error"


class UpstreamBadResponse(UpstreamError):
    """The API answered 2xx with a body that is not JSON or has no "result" list."""

    outcome = "bad_response"


class UpstreamTooLarge(UpstreamBadResponse):
    """The answer passed max_response_bytes; not retried, as it would be as large again."""


@dataclass(frozen=True)
class FetchResult:
    """Valid points of one answer, ascending by time, one per time (last one wins)."""

    points: list[tuple[int, float]]
    skipped: int


@dataclass(frozen=True)
class _Call:
    """What one fetch asks for; shared by its attempts."""

    asset_id: str
    start: datetime
    end: datetime
    url: httpx.URL


def validate_url_template(template: str, *, one_asset: bool = False) -> None:
    """Raise ValueError unless template is an http(s) URL with an {asset_id} placeholder.

    With one_asset, a URL without the placeholder is fine too: the URL of the one asset.
    """
    normalized = _normalize_template(template)
    example = f"e.g. {DEFAULT_URL_TEMPLATE!r}"
    parts = urlsplit(normalized)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"upstream url {template!r} must be an http:// or https:// URL, {example}")
    if _PLACEHOLDER not in normalized and not one_asset:
        raise ValueError(
            f"upstream url {template!r} lacks the {_PLACEHOLDER} placeholder for the asset, "
            f"{example}"
        )
    rest = normalized.replace(_PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        raise ValueError(
            f"upstream url {template!r} has a placeholder other than {_PLACEHOLDER}, {example}"
        )


def _normalize_template(template: str) -> str:
    return template.strip().replace(_PLACEHOLDER_ALIAS, _PLACEHOLDER)


class ApiClient:
    """Fetches series over one keep-alive connection pool; safe to share between threads.

    With one_asset, url_template may be a URL without the {asset_id} placeholder, fetched
    as it is: the service then keeps exactly one asset (the Go service's configuration).

    Connection errors, timeouts, 429, 5xx and unusable bodies are retried with exponential
    backoff and jitter (honouring Retry-After up to backoff_max_s); other statuses, redirects
    (never followed) and answers over max_response_bytes are not. Each attempt, body
    included, ends within timeout_s. Errors and logs above debug level carry the status and
    its standard reason, never text the upstream sent.
    """

    def __init__(
        self,
        *,
        url_template: str,
        timeout_s: float = 30.0,
        max_attempts: int = RETRY_ATTEMPTS,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        user_agent: str = f"edgecom/{VERSION}",
        on_request: Callable[[str, str, float], None] | None = None,
        stop: threading.Event | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = time.time,
        one_asset: bool = False,
    ) -> None:
        validate_url_template(url_template, one_asset=one_asset)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be at least 1, got {max_response_bytes}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if backoff_initial_s < 0 or backoff_max_s < backoff_initial_s:
            raise ValueError(
                f"need 0 <= backoff_initial_s <= backoff_max_s, "
                f"got {backoff_initial_s} and {backoff_max_s}"
            )
        self._url_template = _normalize_template(url_template)
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._on_request = on_request
        self._max_response_bytes = max_response_bytes
        self._clock = clock
        self._closed = False
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_keepalive_connections=KEEPALIVE_CONNECTIONS,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            headers={
                "User-Agent": user_agent,
                "Accept": "application/json",
                "Accept-Encoding": _ACCEPT_ENCODING,
            },
            # A redirect could send the request, and its answer into our errors, to any host
            # the service can reach: the configured url must be the one that answers.
            follow_redirects=False,
        )
        _bound_by_deadline(self._http)
        # Once `stop` is set (the service is shutting down) no further attempt starts and
        # a backoff wait ends at once, so a failing upstream cannot hold up the exit.
        self._stop = stop or threading.Event()
        self._retrying = Retrying(
            stop=stop_after_attempt(max_attempts) | stop_when_event_set(self._stop),
            wait=self._wait_s,
            sleep=self._stop.wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=_log_retry,
            reraise=True,
        )

    @property
    def url_template(self) -> str:
        """The template in use, with {asset-id} already turned into {asset_id}."""
        return self._url_template

    def fetch(self, asset_id: str, start: datetime, end: datetime) -> FetchResult:
        """Return the points upstream holds for [start, end); blocks through all retries.

        start and end must be timezone-aware. Raises UpstreamError subclasses on failure and
        ValueError for naive datetimes or end before start.
        """
        if self._closed:
            raise RuntimeError("ApiClient is closed; create a new one to fetch again")
        start_q, end_q = _query_bounds(start, end)
        if start_q == end_q:
            return FetchResult(points=[], skipped=0)
        filled = self._url_template.replace(_PLACEHOLDER, quote(asset_id, safe=""))
        params = {
            "start": start_q.strftime(_QUERY_TIME_FORMAT),
            "end": end_q.strftime(_QUERY_TIME_FORMAT),
        }
        # Merge, because httpx's params= would drop a query string the template carries.
        call = _Call(asset_id, start_q, end_q, httpx.URL(filled).copy_merge_params(params))
        # A copy per fetch: a Retrying keeps per-run state and the client is shared by threads.
        last_error: UpstreamError | None = None
        for attempt in self._retrying.copy():
            if last_error is not None and self._stop.is_set():
                raise last_error
            with attempt:
                try:
                    items = self._attempt(call, attempt.retry_state.attempt_number)
                except UpstreamError as exc:
                    last_error = exc
                    raise
        return self._collect(call, items)

    def close(self) -> None:
        """Close the connection pool; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- one attempt -----------------------------------------------------------------------

    def _attempt(self, call: _Call, number: int) -> list[object]:
        """One HTTP exchange; returns the raw "result" items and reports its outcome."""
        started = time.monotonic()
        try:
            items = self._exchange(call, f"attempt {number} of {self._max_attempts}")
        except UpstreamError as exc:
            self._report(call.asset_id, exc.outcome, time.monotonic() - started)
            raise
        self._report(call.asset_id, "ok", time.monotonic() - started)
        return items

    def _exchange(self, call: _Call, attempt: str) -> list[object]:
        # The whole exchange, body included, shares one deadline (see _DeadlineStream).
        _deadline.at = time.monotonic() + self._timeout_s
        try:
            with self._http.stream("GET", call.url) as response:
                if not response.is_success:
                    _log_body_excerpt(call, response)
                    raise _status_error(call, response, attempt)
                body = _read_body(call, response, self._max_response_bytes, attempt)
        except httpx.TimeoutException as exc:
            detail = (
                f"timed out after {self._timeout_s:g} s on {attempt} ({type(exc).__name__}); "
                "raise upstream.timeout if the API is just slow"
            )
            raise UpstreamUnavailable(
                call.asset_id, call.start, call.end, detail, timed_out=True
            ) from exc
        except httpx.HTTPError as exc:
            # Only connect errors have a message free of what the server sent.
            cause = f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.ConnectError) else ""
            detail = (
                f"cannot reach {call.url.host} on {attempt} ({cause or type(exc).__name__}); "
                "check the upstream url and the network"
            )
            raise UpstreamUnavailable(
                call.asset_id, call.start, call.end, detail, timed_out=False
            ) from exc
        finally:
            _deadline.at = None
        return _result_items(call, body, attempt)

    def _report(self, asset_id: str, outcome: str, duration_s: float) -> None:
        if self._on_request is None:
            return
        # Metrics must never break ingestion, so a failing hook is logged and ignored.
        try:
            self._on_request(asset_id, outcome, duration_s)
        except Exception:
            logger.exception("on_request hook failed for asset=%s outcome=%s", asset_id, outcome)

    def _wait_s(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: capped exponential with jitter, or Retry-After."""
        exponential = min(
            self._backoff_max_s, self._backoff_initial_s * 2 ** (state.attempt_number - 1)
        )
        # Up to 100 % jitter spreads out concurrent fetches that failed together.
        wait = min(self._backoff_max_s, exponential * (1.0 + random.random()))
        failure = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(failure, "retry_after_s", None)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self._backoff_max_s))
        return wait

    # -- validation ------------------------------------------------------------------------

    def _collect(self, call: _Call, items: list[object]) -> FetchResult:
        """Keep plausible points asked for (last one per time wins), count the others."""
        first, end = int(call.start.timestamp()), int(call.end.timestamp())
        now = math.floor(self._clock())
        plain = _plain_points(items, first, min(end, now + 1))
        if plain is not None:
            return FetchResult(points=plain, skipped=0)
        by_time: dict[int, float] = {}
        refused: dict[str, int] = {}
        example: object = None
        for item in items:
            checked = _check_point(item, first, end, now)
            if isinstance(checked, str):
                refused[checked] = refused.get(checked, 0) + 1
                example = item if example is None else example
            else:
                by_time[checked[0]] = checked[1]
        skipped = sum(refused.values())
        if skipped:
            # Counts only: item text is upstream body text, which stays out of the logs.
            logger.warning(
                "asset=%s start=%s end=%s skipped %d of %d items: %s",
                call.asset_id,
                _iso(call.start),
                _iso(call.end),
                skipped,
                len(items),
                ", ".join(f"{count} {why}" for why, count in refused.items()),
            )
            logger.debug("asset=%s first skipped item: %.200r", call.asset_id, example)
        return FetchResult(points=sorted(by_time.items()), skipped=skipped)


def _plain_points(items: list[object], first: int, stop: int) -> list[tuple[int, float]] | None:
    """The points of items if each is a valid point in [first, stop) and their times ascend;
    None if any is not, to be sorted out item by item.

    What _check_point does per item, done per list by built-ins: the answers of a
    well-behaved upstream take this way, at a fraction of the cost.
    """
    try:
        times = [item["time"] for item in items]  # type: ignore[index]
        values = [item["value"] for item in items]  # type: ignore[index]
    except (TypeError, KeyError):
        return None
    # Exact types: bool is an int subclass, but true/false is never a time or a reading.
    if not times or not set(map(type, times)) <= {int}:
        return None
    kinds = set(map(type, values))
    if not kinds <= {float, int}:
        return None
    if int in kinds:
        try:
            values = [float(value) for value in values]
        except OverflowError:
            return None
    if not (first <= times[0] and times[-1] < stop and _ascending(times)):
        return None
    # A sum that is not finite means a NaN or infinity among them (or a sum too large).
    if not math.isfinite(sum(values)) or max(map(abs, values)) > MAX_ABS_VALUE:
        return None
    return list(zip(times, values, strict=True))


def _ascending(times: list[int]) -> bool:
    return all(map(operator.lt, times, itertools.islice(times, 1, None)))


def _check_point(item: object, first: int, end: int, now: int) -> tuple[int, float] | str:
    """(time, value) if item is {"time": int seconds, "value": number} with a time in
    [first, end) and not after now and a plausible value; else the reason it is refused."""
    if not isinstance(item, dict):
        return _MALFORMED
    t, value = item.get("time"), item.get("value")
    # bool is an int subclass, but true/false is never a time or a reading.
    if isinstance(t, bool) or not isinstance(t, int):
        return _MALFORMED
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _MALFORMED
    if not first <= t < end:
        return _OUTSIDE
    if t > now:
        return _FUTURE
    try:
        number = float(value)
    except OverflowError:
        return _IMPLAUSIBLE
    return (t, number) if abs(number) <= MAX_ABS_VALUE else _IMPLAUSIBLE


def _result_items(call: _Call, body: bytearray, attempt: str) -> list[object]:
    try:
        payload = json.loads(body)
    except RecursionError:
        why = "nested too deeply"
    except json.JSONDecodeError as exc:
        why = f"{exc.msg} at character {exc.pos}"
    except ValueError:
        why = "text that is not UTF-8 or a number too long"
    else:
        result = payload.get("result") if isinstance(payload, dict) else None
        if isinstance(result, list):
            return result
        _log_excerpt(call, body)
        raise UpstreamBadResponse(
            call.asset_id, call.start, call.end, f'answer has no "result" list on {attempt}'
        )
    _log_excerpt(call, body)
    raise UpstreamBadResponse(
        call.asset_id, call.start, call.end, f"answer is not JSON ({why}) on {attempt}"
    )


def _status_error(call: _Call, response: httpx.Response, attempt: str) -> UpstreamStatusError:
    status = response.status_code
    retry_after = _retry_after_s(response.headers.get("retry-after"))
    if _retryable_status(status):
        hint = f"on {attempt}" + (
            "; lower the polling concurrency if this persists" if status == 429 else ""
        )
    elif 300 <= status <= 399:
        hint = (
            f"not retried; redirect to {_redirect_host(call, response)} refused: "
            "set upstream.url to the address that answers"
        )
    else:
        hint = f"not retried; {_STATUS_HINTS.get(status, 'check the request and upstream docs')}"
    # The status and its standard reason only: the body, and even the reason phrase the
    # server sent, could hold anything, secrets included.
    detail = f"HTTP {status} {httpx.codes.get_reason_phrase(status) or 'Unknown'} ({hint})"
    return UpstreamStatusError(
        call.asset_id,
        call.start,
        call.end,
        detail,
        status=status,
        retry_after_s=retry_after,
    )


def _redirect_host(call: _Call, response: httpx.Response) -> str:
    try:
        host = call.url.join(response.headers.get("location", "")).host
    except httpx.InvalidURL:
        host = ""
    return host or "an unreadable location"


def _retry_after_s(header: str | None) -> float | None:
    """Seconds from a Retry-After header in delta-seconds form; None for dates or nonsense."""
    if header is None:
        return None
    try:
        seconds = float(header.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _retryable_status(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


def _status_outcome(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if 400 <= status <= 499:
        return "http_4xx"
    if 500 <= status <= 599:
        return "http_5xx"
    return "bad_response"


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, UpstreamStatusError):
        return _retryable_status(exc.status)
    if isinstance(exc, UpstreamTooLarge):
        return False
    return isinstance(exc, UpstreamUnavailable | UpstreamBadResponse)


def _log_retry(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    logger.info("retrying in %.2f s: %s", wait, failure)


def _query_bounds(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """UTC bounds rounded up to whole seconds, so [start, end) keeps exactly its points."""
    bounds = []
    for name, moment in (("start", start), ("end", end)):
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"{name} must be a timezone-aware datetime, got naive {moment}")
        utc = moment.astimezone(UTC)
        if utc.microsecond:
            utc = utc.replace(microsecond=0) + timedelta(seconds=1)
        bounds.append(utc)
    if bounds[1] < bounds[0]:
        raise ValueError(f"end {end.isoformat()} is before start {start.isoformat()}")
    return bounds[0], bounds[1]


def _read_body(call: _Call, response: httpx.Response, limit: int, attempt: str) -> bytearray:
    """The decoded body; raises UpstreamTooLarge as soon as it passes limit bytes."""
    too_large = UpstreamTooLarge(
        call.asset_id,
        call.start,
        call.end,
        f"answer larger than {limit} bytes on {attempt}, not retried; "
        "raise upstream.max_response_bytes or lower upstream.chunk",
    )
    declared = response.headers.get("content-length", "")
    # Known too large without a byte read (when the length is not that of a compressed body).
    if (
        not response.headers.get("content-encoding")
        and declared.isdigit()
        and int(declared) > limit
    ):
        raise too_large
    body = bytearray()
    try:
        for piece in _decoded(response, limit):
            body += piece
    except (zlib.error, ValueError) as exc:
        raise UpstreamBadResponse(
            call.asset_id, call.start, call.end, f"answer cannot be decoded ({exc}) on {attempt}"
        ) from None
    if len(body) > limit:
        raise too_large
    return body


def _decoded(response: httpx.Response, budget: int) -> Iterator[bytes]:
    """The body's decoded pieces, at most budget + 1 bytes in all: one byte more than budget
    tells that the body is longer. Raises ValueError for an encoding other than gzip.

    httpx decodes each network read whole, so 64 KB of gzip could become 64 MB in one piece;
    zlib's max_length keeps every piece within what is left of the budget instead.
    """
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in _ZLIB_ENCODINGS:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
    elif encoding == "identity":
        inflater = None
    else:
        raise ValueError("a content-encoding other than gzip")
    left = budget + 1
    for raw in response.iter_raw():
        data = raw
        while data and left > 0:
            if inflater is None:
                piece, data = data[:left], b""
            else:
                piece = inflater.decompress(data, left)
                data = inflater.unconsumed_tail
            left -= len(piece)
            yield piece
        if left <= 0:
            return


def _log_excerpt(call: _Call, body: bytes | bytearray) -> None:
    """The start of an unusable body, at debug level only: it may hold anything."""
    if logger.isEnabledFor(logging.DEBUG):
        text = " ".join(bytes(body[:_EXCERPT_CHARS]).decode("utf-8", "replace").split())
        logger.debug("asset=%s answer starts: %r", call.asset_id, text)


def _log_body_excerpt(call: _Call, response: httpx.Response) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        try:
            _log_excerpt(call, b"".join(_decoded(response, _EXCERPT_CHARS)))
        except (httpx.HTTPError, zlib.error, ValueError) as exc:
            logger.debug("asset=%s answer unreadable: %s", call.asset_id, type(exc).__name__)


# -- one deadline per request --------------------------------------------------------------
#
# httpx's timeout limits each network read, so an answer that drips a byte a second never
# times out. Each exchange sets a deadline for its thread (httpx's sync client does all I/O in
# the calling thread), and every connection of the client cuts its reads, writes and
# connects to what is left of it.

_deadline = threading.local()


def _left_s(timeout: float | None, expired: type[Exception]) -> float | None:
    """timeout, cut to what is left of the calling thread's deadline; raises expired if none."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left_s(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left_s(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _left_s(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _left_s(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        timeout = _left_s(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _bound_by_deadline(client: httpx.Client) -> None:
    """Make every connection of client, direct or through a proxy, honour the deadline.

    httpx takes no network backend, so this wraps the one of each connection pool it built;
    a version of httpx without these attributes fails here, at start-up, not silently.
    """
    for transport in (client._transport, *client._mounts.values()):
        if transport is not None:
            pool = transport._pool  # type: ignore[attr-defined]
            pool._network_backend = _DeadlineBackend(pool._network_backend)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
