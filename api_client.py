"""Blocking HTTP client that fetches one asset's time series from the EdgeCom Energy API."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from urllib.parse import quote, urlsplit

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

_PLACEHOLDER = "{asset_id}"
# Configs written for the earlier Go service spell the placeholder this way.
_PLACEHOLDER_ALIAS = "{asset-id}"
_QUERY_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_EXCERPT_CHARS = 200
# Later than this, datetime (and PostgreSQL timestamptz) cannot hold the time: year 9999.
_MAX_TIME_S = 253_402_300_799

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
        body: str,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(asset_id, start, end, detail)
        self.status = status
        self.body = body
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


def validate_url_template(template: str) -> None:
    """Raise ValueError unless template is an http(s) URL with an {asset_id} placeholder."""
    normalized = _normalize_template(template)
    example = f"e.g. {DEFAULT_URL_TEMPLATE!r}"
    parts = urlsplit(normalized)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"upstream url {template!r} must be an http:// or https:// URL, {example}")
    if _PLACEHOLDER not in normalized:
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

    Connection errors, timeouts, 429, 5xx and unusable bodies are retried with exponential
    backoff and jitter (honouring Retry-After up to backoff_max_s); other statuses are not.
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
    ) -> None:
        validate_url_template(url_template)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
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
        self._closed = False
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_keepalive_connections=KEEPALIVE_CONNECTIONS,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            headers={"User-Agent": user_agent, "Accept": "application/json"},
            follow_redirects=True,
        )
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
        try:
            response = self._http.get(call.url)
        except httpx.TimeoutException as exc:
            detail = (
                f"no answer within {self._timeout_s} s on {attempt} ({type(exc).__name__}); "
                "raise the upstream timeout if the API is just slow"
            )
            raise UpstreamUnavailable(
                call.asset_id, call.start, call.end, detail, timed_out=True
            ) from exc
        except httpx.HTTPError as exc:
            detail = (
                f"cannot reach {call.url.host} on {attempt} ({type(exc).__name__}: {exc}); "
                "check the upstream url and the network"
            )
            raise UpstreamUnavailable(
                call.asset_id, call.start, call.end, detail, timed_out=False
            ) from exc
        if not response.is_success:
            raise _status_error(call, response, attempt)
        return _result_items(call, response, attempt)

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
        """Keep valid items (last one per time wins), count and log the others once."""
        by_time: dict[int, float] = {}
        skipped = 0
        example: object = None
        for item in items:
            point = _valid_point(item)
            if point is None:
                skipped += 1
                example = item if skipped == 1 else example
            else:
                by_time[point[0]] = point[1]
        if skipped:
            logger.warning(
                "asset=%s start=%s end=%s skipped %d of %d invalid items, e.g. %.200r",
                call.asset_id,
                _iso(call.start),
                _iso(call.end),
                skipped,
                len(items),
                example,
            )
        return FetchResult(points=sorted(by_time.items()), skipped=skipped)


def _valid_point(item: object) -> tuple[int, float] | None:
    """(time, value) if item is {"time": int seconds, "value": finite number}, else None."""
    if not isinstance(item, dict):
        return None
    t, value = item.get("time"), item.get("value")
    # bool is an int subclass, but true/false is never a time or a reading.
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _MAX_TIME_S:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return (t, number) if math.isfinite(number) else None


def _result_items(call: _Call, response: httpx.Response, attempt: str) -> list[object]:
    try:
        payload = response.json()
    except ValueError:
        content_type = response.headers.get("content-type", "none")
        raise UpstreamBadResponse(
            call.asset_id,
            call.start,
            call.end,
            f"answer is not JSON (content-type {content_type}) on {attempt}; "
            f"body: {_excerpt(response)!r}",
        ) from None
    result = payload.get("result") if isinstance(payload, dict) else None
    if not isinstance(result, list):
        raise UpstreamBadResponse(
            call.asset_id,
            call.start,
            call.end,
            f'answer has no "result" list on {attempt}; body: {_excerpt(response)!r}',
        )
    return result


def _status_error(call: _Call, response: httpx.Response, attempt: str) -> UpstreamStatusError:
    status = response.status_code
    retry_after = _retry_after_s(response.headers.get("retry-after"))
    if _retryable_status(status):
        hint = f"on {attempt}" + (
            "; lower the polling concurrency if this persists" if status == 429 else ""
        )
    else:
        hint = f"not retried; {_STATUS_HINTS.get(status, 'check the request and upstream docs')}"
    body = _excerpt(response)
    detail = f"HTTP {status} {response.reason_phrase} ({hint}); body: {body!r}"
    return UpstreamStatusError(
        call.asset_id,
        call.start,
        call.end,
        detail,
        status=status,
        body=body,
        retry_after_s=retry_after,
    )


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


def _excerpt(response: httpx.Response) -> str:
    """The body's first characters, whitespace squeezed, for error messages."""
    text = " ".join(response.text.split())
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
