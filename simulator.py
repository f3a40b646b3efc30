"""Deterministic stand-in for the EdgeCom Energy API: 15-minute series with injectable faults."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import random
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

STEP_S = 900
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
PATH_PREFIX = "/core/asset/"
PATH_SUFFIX = "/series"
_DAY_S = 86_400
_YEAR_DAYS = 365.25
_SLOTS = _DAY_S // STEP_S
_NOISE_PER_UNIT = 0.16 / 2**64  # a 64-bit hash to a noise factor in [0.92, 1.08)
_SHUTDOWN_POLL_S = 0.05
_JOIN_TIMEOUT_S = 5.0
_NOT_JSON_BODY = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


@dataclass
class Faults:
    """Misbehaviour the simulator injects; fields may be changed while it runs.

    Rates are shares in [0, 1] drawn per request (or per item for bad_item_rate).
    """

    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 503, 429)
    retry_after_s: int = 1
    slow_rate: float = 0.0
    slow_s: float = 0.0
    garbage_rate: float = 0.0
    bad_item_rate: float = 0.0
    outage: bool = False
    max_range_s: int | None = None
    not_found_assets: set[str] = field(default_factory=set)


class RequestRecord(NamedTuple):
    """One request the simulator answered; fields it could not parse are None."""

    asset_id: str | None
    start_s: int | None
    end_s: int | None
    status: int


class _Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0


class Simulator:
    """HTTP server on a daemon thread that answers like the EdgeCom Energy API.

    Values depend only on (seed, asset id, time) and revisions, so every request for the same
    range gets the same points whatever the order or concurrency; faults are drawn from a
    generator keyed by (seed, request sequence number).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        faults: Faults | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.faults = faults if faults is not None else Faults()
        self._host = host
        self._port = port
        self._seed = seed
        self._now = now
        # One lock guards the sequence number, the request log and the revisions: handler
        # threads touch all three and none of it is slow.
        self._lock = threading.Lock()
        self._sequence = 0
        self._requests: list[RequestRecord] = []
        self._revisions: dict[tuple[str, int], float] = {}
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Bind the port and serve on a daemon thread; returns self. Does nothing if running."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = ThreadingHTTPServer((self._host, self._port), partial(_Handler, simulator=self))
        httpd.daemon_threads = True
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": _SHUTDOWN_POLL_S},
            name=f"edgecom-simulator-{httpd.server_address[1]}",
            daemon=True,
        )
        thread.start()
        self._httpd, self._thread = httpd, thread
        return self

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice or before start()."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._httpd = self._thread = None
        # Wakes handlers sleeping on a slow fault so they do not outlive the server.
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            logger.warning(
                "simulator thread %s did not stop within %.1f s", thread.name, _JOIN_TIMEOUT_S
            )

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The bound TCP port; raises RuntimeError before start()."""
        if self._httpd is None:
            raise RuntimeError("Simulator is not running: call start() or use it in a with block")
        return int(self._httpd.server_address[1])

    @property
    def url_template(self) -> str:
        """Series URL with a literal {asset_id} placeholder, as the client expects."""
        return f"http://{self._host}:{self.port}{PATH_PREFIX}{{asset_id}}{PATH_SUFFIX}"

    # -- ground truth ------------------------------------------------------------------------

    def points(self, asset_id: str, start_s: int, end_s: int) -> list[tuple[int, float]]:
        """Return the (unix seconds, value) points in [start_s, end_s) that exist by now()."""
        first = -(-start_s // STEP_S) * STEP_S
        stop = min(end_s, math.floor(self._now()) + 1)
        with self._lock:
            revised = {t: v for (a, t), v in self._revisions.items() if a == asset_id}
        times = range(first, stop, STEP_S)
        values = _profile(self._seed, asset_id, first, stop)
        if not revised:
            return list(zip(times, values, strict=True))
        return [(t, revised.get(t, v)) for t, v in zip(times, values, strict=True)]

    def revise(self, asset_id: str, time_s: int, value: float) -> None:
        """Change one stored value, as upstream does for late corrections."""
        if time_s % STEP_S:
            raise ValueError(f"revision time {time_s} is not a multiple of {STEP_S} s")
        with self._lock:
            self._revisions[(asset_id, time_s)] = value

    # -- request log ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Copy of every request answered so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def reset_counts(self) -> None:
        """Forget the request log; the fault sequence goes on where it was."""
        with self._lock:
            self._requests.clear()

    # -- answering -------------------------------------------------------------------------

    def _answer(self, raw_path: str) -> _Answer:
        """Decide the full answer to one GET, recording it; called from handler threads."""
        with self._lock:
            sequence = self._sequence
            self._sequence += 1
        # A generator per request keyed by its sequence number keeps the draws reproducible
        # even when concurrent handlers finish out of order.
        rng = random.Random(f"{self._seed}|{sequence}")
        faults = self.faults
        delay_s = faults.slow_s if rng.random() < faults.slow_rate else 0.0
        asset_id, start_s, end_s, answer = self._decide(raw_path, faults, rng)
        answer = answer._replace(delay_s=delay_s)
        with self._lock:
            self._requests.append(RequestRecord(asset_id, start_s, end_s, answer.status))
        return answer

    def _decide(
        self, raw_path: str, faults: Faults, rng: random.Random
    ) -> tuple[str | None, int | None, int | None, _Answer]:
        url = urlsplit(raw_path)
        asset_id = _asset_from_path(url.path)
        if asset_id is None:
            expected = f"{PATH_PREFIX}{{asset_id}}{PATH_SUFFIX}"
            return None, None, None, _error(404, f"no such path {url.path}; expected {expected}")
        if faults.outage:
            return asset_id, None, None, _error(503, "service unavailable (outage)")
        if asset_id in faults.not_found_assets:
            return asset_id, None, None, _error(404, f"asset {asset_id} not found")
        try:
            start_s, end_s = _parse_range(url.query)
        except ValueError as exc:
            return asset_id, None, None, _error(400, str(exc))
        if faults.max_range_s is not None and end_s - start_s > faults.max_range_s:
            message = (
                f"range of {end_s - start_s} s is too large; at most {faults.max_range_s} s"
                " per request"
            )
            return asset_id, start_s, end_s, _error(400, message)
        error_roll, garbage_roll = rng.random(), rng.random()
        if faults.error_statuses and error_roll < faults.error_rate:
            answer = _status_fault(rng.choice(faults.error_statuses), faults.retry_after_s)
        elif garbage_roll < faults.garbage_rate:
            answer = _garbage(self._series_body(asset_id, start_s, end_s, 0.0, rng), rng)
        else:
            body = self._series_body(asset_id, start_s, end_s, faults.bad_item_rate, rng)
            answer = _Answer(200, body)
        return asset_id, start_s, end_s, answer

    def _series_body(
        self, asset_id: str, start_s: int, end_s: int, bad_item_rate: float, rng: random.Random
    ) -> bytes:
        points = self.points(asset_id, start_s, end_s)
        if bad_item_rate:
            items = [
                _json(
                    _bad_item(t, value, rng)
                    if rng.random() < bad_item_rate
                    else {"time": t, "value": value}
                )
                for t, value in points
            ]
        else:
            # Formatted inline, as json.dumps of a dict per point or a call per point took
            # most of an answer's time; a finite float's repr is its JSON text.
            items = [
                f'{{"time":{t},"value":{value!r}}}'
                if math.isfinite(value)
                else _json({"time": t, "value": value})
                for t, value in points
            ]
        return f'{{"result":[{",".join(items)}]}}'.encode()


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP requests into Simulator._answer calls; keeps connections alive."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, delayed ACKs add ~40 ms.
    disable_nagle_algorithm = True

    def __init__(self, *args: Any, simulator: Simulator, **kwargs: Any) -> None:
        # Set before super().__init__, which handles the request straight away.
        self._simulator = simulator
        super().__init__(*args, **kwargs)

    def handle(self) -> None:
        # A client that gave up (timeout) closes its socket; that is normal here, not an error.
        try:
            super().handle()
        except ConnectionError:
            self.close_connection = True

    def do_GET(self) -> None:
        answer = self._simulator._answer(self.path)
        if answer.delay_s > 0:
            self._simulator._stopping.wait(answer.delay_s)
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def _profile(seed: int, asset_id: str, first: int, stop: int) -> list[float]:
    """Load in kW at each quarter-hour in [first, stop), first on one: asset base x daily x
    seasonal x weekly shape x noise, 3 decimals."""
    base, daily = _asset_shape(seed, asset_id)
    values: list[float] = []
    for day in range(first // _DAY_S, -(-stop // _DAY_S)):
        start = day * _DAY_S
        lower = max(0, first - start) // STEP_S
        upper = -(-min(_DAY_S, stop - start) // STEP_S)
        # Seasonal and weekly factors change by the day, so one value serves a whole day.
        day_of_year = (day + 0.5) % _YEAR_DAYS
        seasonal = 1.0 + 0.25 * math.cos(2.0 * math.pi * (day_of_year - 15.0) / _YEAR_DAYS)
        weekday = (day + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
        level = base * seasonal * (0.8 if weekday >= 5 else 1.0)
        noise = _day_noise(seed, asset_id, day)
        # round(x * 1000) / 1000 is the value round(x, 3) gives, at half its cost.
        values += [
            round(level * shape * factor * 1000.0) / 1000.0
            for shape, factor in zip(daily[lower:upper], noise[lower:upper], strict=True)
        ]
    return values


@functools.lru_cache(maxsize=1024)
def _asset_shape(seed: int, asset_id: str) -> tuple[float, tuple[float, ...]]:
    """An asset's base load in kW and its daily factor at each quarter-hour of a day."""
    base = 150.0 + 650.0 * _unit(seed, asset_id, "base")
    shift_h = 2.0 * _unit(seed, asset_id, "shift") - 1.0
    daily = []
    for slot in range(_SLOTS):
        hour = slot * STEP_S / 3600.0 - shift_h
        daily.append(
            0.45
            + 0.35 * math.exp(-(((hour - 9.0) / 2.5) ** 2))
            + 0.50 * math.exp(-(((hour - 18.5) / 2.0) ** 2))
        )
    return base, tuple(daily)


def _day_noise(seed: int, asset_id: str, day: int) -> list[float]:
    """A factor in [0.92, 1.08) for each quarter-hour of one day, fixed by (seed, asset id,
    day): hash-based, so order-free, and one hash a day rather than one a point."""
    digest = hashlib.shake_128(f"{seed}|{asset_id}|day {day}".encode()).digest(8 * _SLOTS)
    return [0.92 + _NOISE_PER_UNIT * n for n in struct.unpack(f">{_SLOTS}Q", digest)]


def _unit(seed: int, asset_id: str, key: str) -> float:
    """Uniform number in [0, 1) fixed by (seed, asset id, key); hash-based, so order-free."""
    digest = hashlib.blake2b(f"{seed}|{asset_id}|{key}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64


def _json(item: Any) -> str:
    return json.dumps(item, separators=(",", ":"))


def _asset_from_path(path: str) -> str | None:
    if not (path.startswith(PATH_PREFIX) and path.endswith(PATH_SUFFIX)):
        return None
    raw = path[len(PATH_PREFIX) : -len(PATH_SUFFIX)]
    if not raw or "/" in raw:
        return None
    return unquote(raw)


def _parse_range(query: str) -> tuple[int, int]:
    """Return (start_s, end_s) from the query string; ValueError says what is wrong."""
    params = parse_qs(query, keep_blank_values=True)
    bounds = []
    for name in ("start", "end"):
        values = params.get(name)
        if not values or len(values) > 1:
            raise ValueError(f"query parameter {name!r} is required once, as {TIME_FORMAT} (UTC)")
        try:
            moment = datetime.strptime(values[0], TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(
                f"query parameter {name}={values[0]!r} is not {TIME_FORMAT} (UTC)"
            ) from None
        bounds.append(int(moment.timestamp()))
    start_s, end_s = bounds
    if end_s < start_s:
        raise ValueError(f"end {params['end'][0]} is before start {params['start'][0]}")
    return start_s, end_s


def _error(status: int, message: str) -> _Answer:
    return _Answer(status, json.dumps({"error": message}).encode())


def _status_fault(status: int, retry_after_s: int) -> _Answer:
    if status == 429:
        return _Answer(
            429,
            json.dumps({"error": "too many requests"}).encode(),
            headers=(("Retry-After", str(retry_after_s)),),
        )
    return _error(status, f"injected upstream failure {status}")


def _garbage(body: bytes, rng: random.Random) -> _Answer:
    """A 200 answer a client cannot use: cut-off JSON, an HTML error page, or no result list."""
    kind = rng.randrange(3)
    if kind == 0:
        return _Answer(200, body[: max(1, len(body) // 2)])
    if kind == 1:
        return _Answer(200, _NOT_JSON_BODY, content_type="text/html")
    return _Answer(200, b'{"status":"ok"}')


def _bad_item(t: int, value: float, rng: random.Random) -> Any:
    """One invalid item of a kind seen from real APIs; json renders nan as NaN."""
    variants: list[Any] = [
        {"value": value},
        {"time": str(t), "value": value},
        {"time": t + 0.5, "value": value},
        {"time": True, "value": value},
        {"time": t},
        {"time": t, "value": None},
        {"time": t, "value": "NaN"},
        {"time": t, "value": str(value)},
        {"time": t, "value": float("nan")},
        {"time": t, "value": float("inf")},
        [t, value],
    ]
    return rng.choice(variants)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator in the foreground until SIGINT or SIGTERM; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    with Simulator(host=args.host, port=args.port, seed=args.seed) as simulator:
        logger.info("EdgeCom simulator serving %s", simulator.url_template)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
