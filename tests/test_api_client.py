"""Tests of the EdgeCom API client against the simulator and a scripted HTTP server."""

import contextlib
import gzip
import json
import logging
import string
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import pytest

from api_client import (
    MAX_ABS_VALUE,
    RETRY_ATTEMPTS,
    VERSION,
    ApiClient,
    FetchResult,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamStatusError,
    UpstreamUnavailable,
    validate_url_template,
)
from simulator import Faults, Simulator

NOW = datetime(2024, 1, 10, 12, 7, 30, tzinfo=UTC)
ASSET = "3662953a-1396-4996-a1b6-99a0c5e7a5de"
DAY = (datetime(2023, 9, 13, tzinfo=UTC), datetime(2023, 9, 14, tzinfo=UTC))
# Valid points at these offsets from the start of DAY, for answers that add one odd item.
PLAIN = [(0, 1.5), (900, 2.5), (2700, 3.5)]
FAST = {"backoff_initial_s": 0.001, "backoff_max_s": 0.01, "timeout_s": 5.0}


def _truth(sim: Simulator, start: datetime, end: datetime, asset: str = ASSET) -> list:
    return sim.points(asset, int(start.timestamp()), int(end.timestamp()))


def _windows(count: int) -> list[tuple[datetime, datetime]]:
    """Distinct six-hour windows, so each fetch is a separate request sequence."""
    first = datetime(2023, 9, 1, tzinfo=UTC)
    step = timedelta(hours=6)
    return [(first + i * step, first + (i + 1) * step) for i in range(count)]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(seed=21, now=NOW.timestamp) as simulator:
        yield simulator


@pytest.fixture
def make_client() -> Iterator[Callable[..., ApiClient]]:
    """Builds clients with tiny backoff (overridable) and closes them after the test."""
    clients: list[ApiClient] = []

    def make(url_template: str, **options: Any) -> ApiClient:
        client = ApiClient(url_template=url_template, **{**FAST, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class _Outcomes:
    """on_request hook that records (asset, outcome, duration) calls from any thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()

    def __call__(self, asset_id: str, outcome: str, duration_s: float) -> None:
        with self._lock:
            self.calls.append((asset_id, outcome, duration_s))

    @property
    def outcomes(self) -> list[str]:
        return [outcome for _, outcome, _ in self.calls]


# -- a scripted server for answers the simulator does not give --------------------------------


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def __init__(self, *args: Any, script: "_Script", **kwargs: Any) -> None:
        self._script = script
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        status, body, headers = self._script.next(self)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Script:
    """Answers requests in order (repeating the last answer) and remembers what came in."""

    def __init__(self, answers: list[tuple[int, Any, dict[str, str]]]) -> None:
        self._answers = answers
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.peers: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def next(self, handler: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            index = min(len(self.paths), len(self._answers) - 1)
            self.paths.append(handler.path)
            self.headers.append(dict(handler.headers))
            self.peers.append(handler.client_address)
        status, body, headers = self._answers[index]
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return status, body, headers


@pytest.fixture
def scripted() -> Iterator[Callable[..., tuple[str, _Script]]]:
    """Starts a server on port 0 that plays a script; yields (url_template, script)."""
    servers: list[ThreadingHTTPServer] = []

    def start(*answers: tuple[int, Any, dict[str, str]] | tuple[int, Any]) -> tuple[str, _Script]:
        script = _Script([(a[0], a[1], a[2] if len(a) > 2 else {}) for a in answers])
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_ScriptedHandler, script=script))
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/core/asset/{{asset_id}}/series", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -- happy path -----------------------------------------------------------------------------


def test_fetch_returns_what_upstream_holds(sim: Simulator, make_client: Callable) -> None:
    start, end = datetime(2023, 9, 10, tzinfo=UTC), datetime(2023, 9, 13, tzinfo=UTC)
    result = make_client(sim.url_template).fetch(ASSET, start, end)
    assert result == FetchResult(points=_truth(sim, start, end), skipped=0)
    assert len(result.points) == 3 * 96
    assert sim.request_count == 1
    record = sim.requests[0]
    assert (record.start_s, record.end_s) == (int(start.timestamp()), int(end.timestamp()))


def test_fetch_stops_at_upstream_now(sim: Simulator, make_client: Callable) -> None:
    result = make_client(sim.url_template).fetch(
        ASSET, NOW - timedelta(hours=1), NOW + timedelta(days=1)
    )
    assert result.points[-1][0] == int(datetime(2024, 1, 10, 12, 0, tzinfo=UTC).timestamp())
    assert len(result.points) == 4


def test_query_uses_exact_utc_format(scripted: Callable, make_client: Callable) -> None:
    url_template, script = scripted((200, {"result": []}))
    client = make_client(url_template)
    paris = timezone(timedelta(hours=2))
    client.fetch(
        ASSET,
        datetime(2023, 9, 13, 2, 0, tzinfo=paris),
        datetime(2023, 9, 13, 3, 0, 0, 500, tzinfo=paris),
    )
    path, query = unquote(script.paths[0]).split("?")
    assert path == f"/core/asset/{ASSET}/series"
    # Converted to UTC without offset; a fractional end rounds up so [start, end) keeps its points.
    assert query == "start=2023-09-13T00:00:00&end=2023-09-13T01:00:01"


def test_asset_id_is_quoted_into_the_path(sim: Simulator, make_client: Callable) -> None:
    make_client(sim.url_template).fetch("plant 7/north", *DAY)
    assert sim.requests[0].asset_id == "plant 7/north"


def test_query_string_in_template_is_kept(scripted: Callable, make_client: Callable) -> None:
    url_template, script = scripted((200, {"result": []}))
    make_client(url_template + "?tenant=acme").fetch(ASSET, *DAY)
    assert unquote(script.paths[0]).endswith(
        "?tenant=acme&start=2023-09-13T00:00:00&end=2023-09-14T00:00:00"
    )


def test_user_agent_and_connection_reuse(scripted: Callable, make_client: Callable) -> None:
    url_template, script = scripted((200, {"result": []}))
    client = make_client(url_template)
    client.fetch(ASSET, *DAY)
    client.fetch(ASSET, *DAY)
    assert {h["User-Agent"] for h in script.headers} == {f"edgecom/{VERSION}"}
    assert script.peers[0] == script.peers[1]  # same client socket: kept alive


def test_empty_window_makes_no_request(sim: Simulator, make_client: Callable) -> None:
    assert make_client(sim.url_template).fetch(ASSET, DAY[0], DAY[0]) == FetchResult([], 0)
    assert sim.request_count == 0


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (datetime(2023, 9, 13), DAY[1], "start must be a timezone-aware"),
        (DAY[0], datetime(2023, 9, 14), "end must be a timezone-aware"),
        (DAY[1], DAY[0], "is before start"),
    ],
)
def test_bad_ranges_are_rejected_before_any_request(
    sim: Simulator, make_client: Callable, start: datetime, end: datetime, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_client(sim.url_template).fetch(ASSET, start, end)
    assert sim.request_count == 0


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"), [(500, "http_5xx"), (503, "http_5xx"), (429, "rate_limited")]
)
def test_retryable_statuses_are_retried_until_success(
    sim: Simulator, make_client: Callable, status: int, outcome: str
) -> None:
    sim.faults = Faults(error_rate=0.5, error_statuses=(status,), retry_after_s=0)
    hook = _Outcomes()
    client = make_client(sim.url_template, max_attempts=12, on_request=hook)
    for start, end in _windows(4):
        assert client.fetch(ASSET, start, end).points == _truth(sim, start, end)
    statuses = [record.status for record in sim.requests]
    assert status in statuses
    assert statuses.count(200) == 4
    assert hook.outcomes == ["ok" if s == 200 else outcome for s in statuses]


def test_exhausted_retries_raise_the_last_status(sim: Simulator, make_client: Callable) -> None:
    sim.faults = Faults(error_rate=1.0, error_statuses=(503,))
    with pytest.raises(UpstreamStatusError) as caught:
        make_client(sim.url_template, max_attempts=3).fetch(ASSET, *DAY)
    assert caught.value.status == 503
    assert "HTTP 503 Service Unavailable" in str(caught.value)
    assert ASSET in str(caught.value)
    assert "attempt 3 of 3" in str(caught.value)
    assert "2023-09-13T00:00:00Z" in str(caught.value)
    assert sim.request_count == 3


def test_retry_after_is_honoured_up_to_the_backoff_cap(
    sim: Simulator, make_client: Callable
) -> None:
    # Retry-After says 30 s; the cap of 0.15 s wins, and each wait is at least that cap
    # (without Retry-After the waits would be about a millisecond).
    sim.faults = Faults(error_rate=1.0, error_statuses=(429,), retry_after_s=30)
    client = make_client(
        sim.url_template, max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.15
    )
    started = time.monotonic()
    with pytest.raises(UpstreamStatusError) as caught:
        client.fetch(ASSET, *DAY)
    elapsed = time.monotonic() - started
    assert caught.value.status == 429
    assert caught.value.retry_after_s == 30
    assert 0.3 <= elapsed < 2.0


def test_default_retry_policy_uses_the_named_constants(sim: Simulator) -> None:
    sim.faults = Faults(error_rate=1.0, error_statuses=(500,))
    with (
        ApiClient(
            url_template=sim.url_template, backoff_initial_s=0.0, backoff_max_s=0.0
        ) as client,
        pytest.raises(UpstreamStatusError),
    ):
        client.fetch(ASSET, *DAY)
    assert sim.request_count == RETRY_ATTEMPTS


def test_timeouts_are_retried(sim: Simulator, make_client: Callable) -> None:
    sim.faults = Faults(slow_rate=0.5, slow_s=2.0)
    hook = _Outcomes()
    client = make_client(sim.url_template, timeout_s=0.2, max_attempts=12, on_request=hook)
    for start, end in _windows(3):
        assert client.fetch(ASSET, start, end).points == _truth(sim, start, end)
    assert "timeout" in hook.outcomes
    assert hook.outcomes.count("ok") == 3


def test_persistent_timeouts_raise_unavailable(sim: Simulator, make_client: Callable) -> None:
    sim.faults = Faults(slow_rate=1.0, slow_s=2.0)
    hook = _Outcomes()
    client = make_client(sim.url_template, timeout_s=0.2, max_attempts=2, on_request=hook)
    with pytest.raises(UpstreamUnavailable, match=r"timed out after 0\.2 s on attempt 2 of 2"):
        client.fetch(ASSET, *DAY)
    assert hook.outcomes == ["timeout", "timeout"]
    assert all(0.15 < duration < 1.0 for _, _, duration in hook.calls)


def test_refused_connections_raise_unavailable(make_client: Callable) -> None:
    with Simulator() as gone:
        url_template = gone.url_template
    hook = _Outcomes()
    client = make_client(url_template, max_attempts=3, on_request=hook)
    with pytest.raises(UpstreamUnavailable, match="check the upstream url") as caught:
        client.fetch(ASSET, *DAY)
    assert caught.value.outcome == "connection_error"
    assert hook.outcomes == ["connection_error"] * 3


def test_garbage_bodies_are_retried(sim: Simulator, make_client: Callable) -> None:
    sim.faults = Faults(garbage_rate=0.5)
    hook = _Outcomes()
    client = make_client(sim.url_template, max_attempts=12, on_request=hook)
    for start, end in _windows(4):
        assert client.fetch(ASSET, start, end).points == _truth(sim, start, end)
    assert "bad_response" in hook.outcomes
    assert hook.outcomes.count("ok") == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b'{"result": [{"time": 1694', "not JSON"),
        (b'{"status": "ok"}', 'no "result" list'),
        (b'{"result": null}', 'no "result" list'),
        (b"[1, 2]", 'no "result" list'),
    ],
)
def test_unusable_bodies_raise_bad_response_when_retries_run_out(
    scripted: Callable, make_client: Callable, body: bytes, message: str
) -> None:
    url_template, script = scripted((200, body))
    with pytest.raises(UpstreamBadResponse, match=message) as caught:
        make_client(url_template, max_attempts=2).fetch(ASSET, *DAY)
    assert body.decode()[:10] not in str(caught.value)
    assert len(script.paths) == 2


# -- statuses that are not retried ---------------------------------------------------------------


def test_unknown_asset_is_not_retried(sim: Simulator, make_client: Callable) -> None:
    sim.faults.not_found_assets.add("ghost")
    hook = _Outcomes()
    with pytest.raises(UpstreamStatusError) as caught:
        make_client(sim.url_template, on_request=hook).fetch("ghost", *DAY)
    assert caught.value.status == 404
    assert "ghost" in str(caught.value)
    assert "check the asset id" in str(caught.value)
    assert "asset ghost not found" not in str(caught.value)
    assert sim.request_count == 1
    assert hook.outcomes == ["http_4xx"]


def test_range_rejection_is_not_retried_and_explained(
    sim: Simulator, make_client: Callable
) -> None:
    sim.faults.max_range_s = 3600
    with pytest.raises(UpstreamStatusError, match="fetch smaller chunks") as caught:
        make_client(sim.url_template).fetch(ASSET, *DAY)
    assert caught.value.status == 400
    assert sim.request_count == 1


def test_all_errors_share_one_base() -> None:
    for error in (UpstreamStatusError, UpstreamUnavailable, UpstreamBadResponse):
        assert issubclass(error, UpstreamError)


# -- validation of items -----------------------------------------------------------------------


def test_invalid_items_are_skipped_counted_and_logged_once(
    sim: Simulator, make_client: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    sim.faults.bad_item_rate = 0.3
    with caplog.at_level(logging.WARNING, logger="api_client"):
        result = make_client(sim.url_template).fetch(ASSET, *DAY)
    truth = _truth(sim, *DAY)
    assert result.skipped > 5
    assert len(result.points) + result.skipped == len(truth)
    assert set(result.points) <= set(truth)
    warnings = [r for r in caplog.records if r.name == "api_client"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"asset={ASSET}" in message
    assert f"skipped {result.skipped} of {len(truth)} items: " in message
    assert "malformed" in message


def test_item_rules(scripted: Callable, make_client: Callable) -> None:
    body = (
        b'{"result": ['
        b'{"time": 1800, "value": 3.5},'
        b'{"time": 900, "value": 2},'  # out of order, integer value
        b'{"time": 1800, "value": 4.25},'  # duplicate: the last one wins
        b'{"time": 99999900, "value": -1.0},'
        b'{"time": true, "value": 1.0},'
        b'{"time": 2700.0, "value": 1.0},'
        b'{"time": "2700", "value": 1.0},'
        b'{"time": -900, "value": 1.0},'
        b'{"time": 2700, "value": null},'
        b'{"time": 2700, "value": "1.0"},'
        b'{"time": 2700, "value": NaN},'
        b'{"time": 2700, "value": Infinity},'
        b'{"time": 2700, "value": 1e999},'
        b'{"time": 2700, "value": false},'
        b'{"time": 2700},'
        b'{"value": 1.0},'
        b"[2700, 1.0],"
        b"null"
        b"]}"
    )
    url_template, _ = scripted((200, body))
    result = make_client(url_template).fetch(ASSET, datetime(1970, 1, 1, tzinfo=UTC), DAY[0])
    assert result.points == [(900, 2.0), (1800, 4.25), (99999900, -1.0)]
    assert all(type(value) is float for _, value in result.points)
    assert result.skipped == 14


@pytest.mark.parametrize(
    "odd",
    [
        '{"time": $t, "value": 1e999}',
        '{"time": $t, "value": NaN}',
        '{"time": $t, "value": -Infinity}',
        '{"time": $t, "value": 1$zeros}',
        '{"time": $t, "value": 1.01e15}',
        '{"time": $t, "value": true}',
        '{"time": true, "value": 1.0}',
        '{"time": $t.0, "value": 1.0}',
        '{"time": $before, "value": 1.0}',
        '{"time": $end, "value": 1.0}',
        '{"time": $later, "value": 1.0}',
        # In time order, where only the bounds tell them.
        '^{"time": $before, "value": 1.0}',
        '{"time": $end, "value": 1.0}$',
        '{"time": $later, "value": 1.0}$',
        '{"time": $t}',
        "[$t, 1.0]",
    ],
)
def test_one_bad_item_among_plain_ones_is_skipped_alone(
    scripted: Callable, make_client: Callable, odd: str
) -> None:
    # Plain answers are checked a whole list at a time; one bad item must make no difference.
    result = _fetch_with(scripted, make_client, odd)
    assert result == FetchResult(points=_plain_points(), skipped=1)


@pytest.mark.parametrize(
    ("odd", "point"),
    [
        ('{"time": $t, "value": 7}', (1800, 7.0)),
        ('{"time": $t, "value": 4.5, "unit": "kW"}', (1800, 4.5)),
        ('{"time": $again, "value": 9.5}', (900, 9.5)),  # the last one wins
    ],
)
def test_one_odd_but_good_item_among_plain_ones_is_kept(
    scripted: Callable, make_client: Callable, odd: str, point: tuple[int, float]
) -> None:
    result = _fetch_with(scripted, make_client, odd)
    start = int(DAY[0].timestamp())
    expected = dict(_plain_points()) | {start + point[0]: point[1]}
    assert result == FetchResult(points=sorted(expected.items()), skipped=0)
    assert all(type(value) is float for _, value in result.points)


def _plain_points() -> list[tuple[int, float]]:
    start = int(DAY[0].timestamp())
    return [(start + offset, value) for offset, value in PLAIN]


def _fetch_with(scripted: Callable, make_client: Callable, odd: str) -> FetchResult:
    """Fetch DAY at HALF_DAY from an answer of the PLAIN points with `odd` among them, first
    if it starts with ^, last if it ends with $, else between the second and the third; odd
    is JSON with $t standing for start + 1800 (and $again, $before, $end, $later, $zeros)."""
    start, end, now = (int(moment.timestamp()) for moment in (*DAY, HALF_DAY))
    at = 0 if odd.startswith("^") else len(PLAIN) if odd.endswith("$") else 2
    odd = string.Template(odd.removeprefix("^").removesuffix("$")).substitute(
        t=start + 1800,
        again=start + 900,
        zeros="0" * 400,
        before=start - 900,
        end=end,
        later=now + 900,
    )
    plain = [f'{{"time": {t}, "value": {value}}}' for t, value in _plain_points()]
    body = f'{{"result": [{", ".join([*plain[:at], odd, *plain[at:]])}]}}'
    url_template, _ = scripted((200, body.encode()))
    return make_client(url_template, clock=HALF_DAY.timestamp).fetch(ASSET, *DAY)


def test_hook_failure_does_not_break_fetch(sim: Simulator, make_client: Callable) -> None:
    def broken(asset_id: str, outcome: str, duration_s: float) -> None:
        raise RuntimeError("metrics backend down")

    assert make_client(sim.url_template, on_request=broken).fetch(ASSET, *DAY).points


def test_scripted_outcomes_are_reported_in_order(scripted: Callable, make_client: Callable) -> None:
    url_template, _ = scripted(
        (500, {"error": "boom"}),
        (429, {"error": "slow down"}, {"Retry-After": "0"}),
        (200, b"not json"),
        (200, {"result": [{"time": int(DAY[0].timestamp()), "value": 1.0}]}),
    )
    hook = _Outcomes()
    result = make_client(url_template, on_request=hook).fetch(ASSET, *DAY)
    assert result.points == [(int(DAY[0].timestamp()), 1.0)]
    assert hook.outcomes == ["http_5xx", "rate_limited", "bad_response", "ok"]
    assert {asset for asset, _, _ in hook.calls} == {ASSET}
    assert all(duration >= 0 for _, _, duration in hook.calls)


def test_client_can_be_shared_between_threads(sim: Simulator, make_client: Callable) -> None:
    sim.faults = Faults(error_rate=0.3, retry_after_s=0)
    client = make_client(sim.url_template, max_attempts=12)
    windows = _windows(16)
    results: dict[int, list] = {}

    def worker(index: int) -> None:
        results[index] = client.fetch(ASSET, *windows[index]).points

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(windows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: _truth(sim, *w) for i, w in enumerate(windows)}


# -- configuration and lifecycle ---------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "https://api.edgecomenergy.net/core/asset/{asset_id}/series",
        "http://127.0.0.1:8080/core/asset/{asset_id}/series?tenant=acme",
        "https://api.edgecomenergy.net/core/asset/{asset-id}/series",
    ],
)
def test_valid_url_templates(template: str) -> None:
    validate_url_template(template)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("ftp://host/{asset_id}", "http:// or https://"),
        ("api.edgecomenergy.net/core/asset/{asset_id}/series", "http:// or https://"),
        ("https:///core/asset/{asset_id}/series", "http:// or https://"),
        ("https://api.edgecomenergy.net/core/asset/series", "lacks the {asset_id} placeholder"),
        ("https://api.edgecomenergy.net/core/asset/{assetId}/series", "lacks the {asset_id}"),
        ("https://host/{asset_id}/{kind}", "placeholder other than {asset_id}"),
    ],
)
def test_invalid_url_templates(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        validate_url_template(template)
    assert template in str(caught.value)
    with pytest.raises(ValueError):
        ApiClient(url_template=template)


def test_old_placeholder_spelling_is_normalized(sim: Simulator, make_client: Callable) -> None:
    client = make_client(sim.url_template.replace("{asset_id}", "{asset-id}"))
    assert "{asset_id}" in client.url_template
    assert "{asset-id}" not in client.url_template
    client.fetch(ASSET, *DAY)
    assert sim.requests[0].asset_id == ASSET


def test_close_is_idempotent(sim: Simulator) -> None:
    with ApiClient(url_template=sim.url_template) as client:
        client.fetch(ASSET, *DAY)
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.fetch(ASSET, *DAY)


def test_stop_event_ends_retries_at_once():
    stop = threading.Event()
    with (
        Simulator(faults=Faults(outage=True)).start() as sim,
        ApiClient(
            url_template=sim.url_template,
            max_attempts=50,
            backoff_initial_s=5,
            backoff_max_s=5,
            stop=stop,
        ) as client,
    ):
        threading.Timer(0.5, stop.set).start()
        with pytest.raises(UpstreamError):
            client.fetch(ASSET, *DAY)
        # One attempt before the stop, none after: the 5 s backoff was cut short.
        assert len(sim.requests) == 1


# -- hostile upstreams -------------------------------------------------------------------------

SECRET = "s3cr3t-internal-token"
LIMIT = 1024 * 1024
HALF_DAY = DAY[0] + timedelta(hours=12)


class _HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *args: Any, answer: Callable, requests: list, **kwargs: Any) -> None:
        self._answer = answer
        self._requests = requests
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._requests.append(self.path)
        with contextlib.suppress(OSError):  # the client hung up, as it should
            self._answer(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[Callable[[Callable], tuple[str, list]]]:
    """Starts a server on port 0 whose handler calls answer(handler); yields (url, requests)."""
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Callable) -> tuple[str, list]:
        requests: list[str] = []
        handler = partial(_HostileHandler, answer=answer, requests=requests)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return (
            f"http://127.0.0.1:{server.server_address[1]}/core/asset/{{asset_id}}/series",
            requests,
        )

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _service_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the service would log: it keeps httpx's own request lines at WARNING and above."""
    return "\n".join(
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith("httpx") or record.levelno >= logging.WARNING
    )


def _headers(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()


def _huge(handler: BaseHTTPRequestHandler, *, declared: bool) -> None:
    """A 50 MB answer, written in pieces so the server itself holds little; with its length
    declared, or in chunked encoding so that only reading can tell its size."""
    size, piece = 50 * 1024 * 1024, b" " * 65536
    if declared:
        _headers(handler, 200, {"Content-Length": str(size)})
        frame = piece
    else:
        _headers(handler, 200, {"Transfer-Encoding": "chunked"})
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    for _ in range(size // len(piece)):
        handler.wfile.write(frame)


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """About 0.3 MB of gzip that decodes to 300 MB of JSON whitespace."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(b'{"result": [')]
    spaces = b" " * (1024 * 1024)
    parts += [packer.compress(spaces) for _ in range(300)]
    parts.append(packer.compress(b"]}") + packer.flush())
    return b"".join(parts)


def _peak_bytes(action: Callable[[], Any]) -> tuple[int, BaseException | None]:
    """Peak traced memory while action runs (server threads included) and what it raised."""
    tracemalloc.start()
    try:
        action()
        failure = None
    except Exception as exc:
        failure = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, failure


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_huge_answer_is_refused_while_reading(
    hostile: Callable, make_client: Callable, declared: bool
) -> None:
    url_template, requests = hostile(partial(_huge, declared=declared))
    client = make_client(url_template, max_response_bytes=LIMIT, max_attempts=3)
    peak, failure = _peak_bytes(lambda: client.fetch(ASSET, *DAY))
    assert isinstance(failure, UpstreamBadResponse)
    assert f"answer larger than {LIMIT} bytes" in str(failure)
    assert "upstream.max_response_bytes" in str(failure)
    assert len(requests) == 1  # as large next time: not retried
    assert peak < 4 * LIMIT


def test_a_gzip_bomb_is_refused_while_decoding(
    hostile: Callable, make_client: Callable, gzip_bomb: bytes
) -> None:
    def bomb(handler: BaseHTTPRequestHandler) -> None:
        _headers(handler, 200, {"Content-Length": str(len(gzip_bomb)), "Content-Encoding": "gzip"})
        handler.wfile.write(gzip_bomb)

    assert len(gzip_bomb) < 400_000
    url_template, requests = hostile(bomb)
    client = make_client(url_template, max_response_bytes=LIMIT, max_attempts=3)
    peak, failure = _peak_bytes(lambda: client.fetch(ASSET, *DAY))
    assert isinstance(failure, UpstreamBadResponse)
    assert f"answer larger than {LIMIT} bytes" in str(failure)
    assert len(requests) == 1
    assert peak < 4 * LIMIT


def test_gzip_answers_within_the_limit_are_decoded(
    hostile: Callable, make_client: Callable
) -> None:
    body = json.dumps({"result": [{"time": int(DAY[0].timestamp()), "value": 1.5}]}).encode()

    def gzipped(handler: BaseHTTPRequestHandler) -> None:
        packed = gzip.compress(body)
        _headers(handler, 200, {"Content-Length": str(len(packed)), "Content-Encoding": "gzip"})
        handler.wfile.write(packed)

    url_template, _ = hostile(gzipped)
    result = make_client(url_template, max_response_bytes=len(body)).fetch(ASSET, *DAY)
    assert result.points == [(int(DAY[0].timestamp()), 1.5)]


def _drip(handler: BaseHTTPRequestHandler, *, in_headers: bool) -> None:
    """One byte a second, for at most 20 s: the status line's headers or the body."""
    body = b'{"result": []}' + b" " * 20
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    if not in_headers:
        handler.wfile.write(f"Content-Length: {len(body)}\r\n\r\n".encode())
    head = b"X-Slow: " + b"a" * 20 if in_headers else b""
    for byte in (head or body)[:20]:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(1.0)


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "headers"])
def test_a_dripping_answer_ends_at_the_timeout(
    hostile: Callable, make_client: Callable, in_headers: bool
) -> None:
    url_template, _ = hostile(partial(_drip, in_headers=in_headers))
    hook = _Outcomes()
    client = make_client(url_template, timeout_s=2.0, max_attempts=1, on_request=hook)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=r"timed out after 2 s") as caught:
        client.fetch(ASSET, *DAY)
    assert time.monotonic() - started < 3.0
    assert caught.value.outcome == "timeout"
    assert hook.outcomes == ["timeout"]


def test_deep_nesting_is_a_bad_response(scripted: Callable, make_client: Callable) -> None:
    depth = 100_000
    url_template, _ = scripted((200, b'{"result": ' + b"[" * depth + b"]" * depth + b"}"))
    with pytest.raises(UpstreamBadResponse, match="not JSON") as caught:
        make_client(url_template, max_attempts=1).fetch(ASSET, *DAY)
    assert ASSET in str(caught.value)
    assert "2023-09-13T00:00:00Z" in str(caught.value)


def test_redirects_are_not_followed(
    hostile: Callable, make_client: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    def secret(handler: BaseHTTPRequestHandler) -> None:
        body = SECRET.encode()
        _headers(handler, 200, {"Content-Length": str(len(body))})
        handler.wfile.write(body)

    inner_template, inner_requests = hostile(secret)
    inner = inner_template.split("/core/")[0]

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        location = f"{inner}/internal?token={SECRET}"
        _headers(handler, 302, {"Location": location, "Content-Length": "0"})

    url_template, _ = hostile(redirect)
    with caplog.at_level(logging.INFO), pytest.raises(UpstreamStatusError) as caught:
        make_client(url_template, max_attempts=3).fetch(ASSET, *DAY)
    assert caught.value.status == 302
    assert "redirect" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert inner_requests == []
    assert SECRET not in _service_log(caplog)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, f"<html>internal error, token={SECRET}</html>"),
        (403, f"denied: {SECRET}"),
        (200, f"<html>login page {SECRET}</html>"),
        (200, json.dumps({"result": SECRET})),
        (200, json.dumps({"result": [{"time": SECRET, "value": 1.0}]})),
    ],
)
def test_upstream_bodies_are_not_echoed(
    scripted: Callable,
    make_client: Callable,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: str,
) -> None:
    url_template, _ = scripted((status, body.encode()))
    with caplog.at_level(logging.INFO):
        try:
            make_client(url_template, max_attempts=2).fetch(ASSET, *DAY)
        except UpstreamError as exc:
            assert SECRET not in str(exc)
            if status != 200:
                assert f"HTTP {status} " in str(exc)
    assert caplog.records
    assert SECRET not in _service_log(caplog)


@pytest.mark.parametrize(
    ("status_line", "error"),
    [
        (f"HTTP/1.1 {SECRET}", UpstreamUnavailable),
        (f"HTTP/1.1 500 {SECRET}", UpstreamStatusError),
    ],
    ids=["garbled", "reason"],
)
def test_the_status_line_is_not_echoed(
    hostile: Callable,
    make_client: Callable,
    caplog: pytest.LogCaptureFixture,
    status_line: str,
    error: type[UpstreamError],
) -> None:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(f"{status_line}\r\nContent-Length: 0\r\n\r\n".encode())

    url_template, _ = hostile(answer)
    with caplog.at_level(logging.INFO), pytest.raises(error) as caught:
        make_client(url_template, max_attempts=2).fetch(ASSET, *DAY)
    assert SECRET not in str(caught.value)
    assert SECRET not in _service_log(caplog)


def test_points_outside_the_range_in_the_future_or_absurd_are_skipped(
    scripted: Callable, make_client: Callable
) -> None:
    start = int(DAY[0].timestamp())
    now = int(HALF_DAY.timestamp())
    kept = [(start, 1.0), (start + 900, -5.0), (start + 1800, MAX_ABS_VALUE), (now, 2.0)]
    refused = [
        (0, 1.0),  # 1970
        (int(datetime(2100, 1, 1, tzinfo=UTC).timestamp()), 1.0),
        (253_402_300_799, 1.0),  # 9999-12-31T23:59:59Z
        (start - 900, 1.0),  # before the range
        (int(DAY[1].timestamp()), 1.0),  # the range's end is not in it
        (now + 900, 1.0),  # later than now
        (start + 2700, 1e308),
        (start + 3600, -1.7e308),
        (start + 4500, MAX_ABS_VALUE * 1.01),
    ]
    items = [{"time": t, "value": v} for t, v in kept + refused]
    url_template, _ = scripted((200, {"result": items}))
    client = make_client(url_template, clock=HALF_DAY.timestamp)
    result = client.fetch(ASSET, *DAY)
    assert result.points == kept
    assert result.skipped == len(refused)
