"""Ingestion on a schedule: fetch every part of each asset's series that is not stored yet."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import schedule

from api_client import FetchResult, UpstreamError, UpstreamUnavailable

log = logging.getLogger(__name__)

STEP_S = 900  # the upstream's resolution: one point every 15 minutes
# The most of a series stored in one transaction: adjacent chunks are fetched one after
# another and stored together. A transaction has a fixed cost of a few milliseconds (its
# temporary table, the coverage, the commit), as much as 500 points take to write; at
# 8,700 points per transaction it is a few per cent, and a batch still lands within
# seconds unless the upstream is slow.
STORE_SPAN_S = 91 * 86_400
# A run for one asset gives up after this many chunks in a row fail: the upstream is
# probably down, and the next run tries again from where this one stopped.
MAX_CONSECUTIVE_FAILURES = 3
PROGRESS_INTERVAL_S = 5.0
JOIN_TIMEOUT_S = 30.0
_MIN_PROGRESS_WAIT_S = 0.05


@dataclass(frozen=True)
class Progress:
    """Where one asset's run stands: chunks done of total, points stored, rate and ETA."""

    asset_id: str
    chunks_done: int
    chunks_total: int
    points: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Points stored per second so far."""
        return self.points / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        """One human-readable line, for a terminal."""
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None else "?"
        return (
            f"{self.asset_id}: {self.chunks_done}/{self.chunks_total} chunks, "
            f"{self.points} points, {self.rate:.0f} points/s, ETA {eta}"
        )

    @property
    def eta_s(self) -> float | None:
        """Seconds until the run is expected to finish, or None before the first chunk."""
        if not self.chunks_done:
            return None
        per_chunk = self.elapsed_s / self.chunks_done
        return per_chunk * (self.chunks_total - self.chunks_done)


class IngestObserver(Protocol):
    """Receives what ingestion does; the wiring turns it into metrics and progress output."""

    def chunk_stored(self, asset_id: str, points: int, skipped: int) -> None: ...

    def asset_synced(self, asset_id: str, *, ok: bool, coverage: float | None) -> None: ...

    def progress(self, progress: Progress) -> None: ...


class _QuietObserver:
    def chunk_stored(self, asset_id: str, points: int, skipped: int) -> None:
        pass

    def asset_synced(self, asset_id: str, *, ok: bool, coverage: float | None) -> None:
        pass

    def progress(self, progress: Progress) -> None:
        pass


def plan_chunks(gaps: Sequence[tuple[int, int]], *, chunk_s: int) -> list[tuple[int, int]]:
    """Split [start, end) gaps into ranges of at most chunk_s, newest first."""
    chunks = []
    for start, end in gaps:
        upper = end
        while upper > start:
            lower = max(start, upper - chunk_s)
            chunks.append((lower, upper))
            upper = lower
    return sorted(chunks, key=lambda chunk: chunk[1], reverse=True)


def plan_batches(
    chunks: Sequence[tuple[int, int]], *, span_s: int, workers: int
) -> list[list[tuple[int, int]]]:
    """Group chunks, in their order, into runs of adjacent ones stored together.

    A batch spans at most span_s (but holds at least one chunk), and holds no more than
    its share of the chunks when spread over `workers`, so that every worker has work.
    The first chunk, the newest, is a batch of its own: the most recent data is stored
    after one request, however slow the upstream.
    """
    size = max(1, -(-len(chunks) // max(1, workers)))
    batches: list[list[tuple[int, int]]] = []
    for chunk in chunks:
        batch = batches[-1] if len(batches) > 1 else None
        if (
            batch is not None
            and len(batch) < size
            and _adjacent(batch[-1], chunk)
            and max(batch[0][1], chunk[1]) - min(batch[0][0], chunk[0]) <= span_s
        ):
            batch.append(chunk)
        else:
            batches.append([chunk])
    return batches


def _adjacent(one: tuple[int, int], other: tuple[int, int]) -> bool:
    return one[0] == other[1] or one[1] == other[0]


class Ingestor:
    """Brings each asset's stored series up to date with the upstream, one run at a time.

    One algorithm serves bootstrap, polling and catch-up: fetch what the repository has not
    recorded as covered in [now - bootstrap, now), plus the last `overlap` again for late
    and revised points. Each asset syncs on a thread of its own, several at once, and
    `concurrency` bounds the upstream requests in flight across all of them.
    """

    def __init__(
        self,
        *,
        client: Any,
        repository: Any,
        assets: Sequence[str],
        bootstrap_s: float,
        chunk_s: float,
        concurrency: int,
        overlap_s: float,
        observer: IngestObserver | None = None,
        clock: Callable[[], float] = time.time,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
    ) -> None:
        if chunk_s < STEP_S:
            raise ValueError(
                f"chunk_s must be at least {STEP_S} s, the upstream's step, got {chunk_s:g}"
            )
        self._client = client
        self._repository = repository
        self._assets = tuple(assets)
        self._bootstrap_s = int(bootstrap_s)
        self._chunk_s = int(chunk_s)
        self._concurrency = max(1, concurrency)
        self._overlap_s = int(overlap_s)
        self._observer = observer or _QuietObserver()
        self._clock = clock
        self._progress_interval_s = progress_interval_s
        # Fixed shares that add up to `concurrency`, one per asset syncing at a time: a
        # sync takes one for its fetches and gives it back after. A stuck upstream holds
        # only its own share, so the other assets keep theirs.
        self._shares: queue.SimpleQueue[int] = queue.SimpleQueue()
        workers = min(self._concurrency, len(self._assets))
        for worker in range(workers):
            self._shares.put(self._concurrency // workers + (worker < self._concurrency % workers))
        self._syncs: dict[str, threading.Thread] = {}  # each asset's latest sync
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def window(self) -> tuple[int, int]:
        """The [start, end) range in Unix seconds that ingestion keeps complete right now."""
        now = int(self._clock())
        return (now - self._bootstrap_s) // STEP_S * STEP_S, now

    def start_round(self) -> None:
        """Start a sync for every asset that is not syncing already; returns at once.

        This is what the scheduler runs every poll interval. An asset whose previous sync
        is still going (a bootstrap, or a stuck upstream retrying until it gives up) is
        skipped this round rather than started twice, and holds up no other asset's poll.
        The syncs stop soon after close().
        """
        if not self._stop.is_set():
            self._start_syncs(self._stop)

    def run_once(self, stop: threading.Event | None = None) -> None:
        """Sync every asset once, several at a time; blocks until all are done.

        An asset already syncing (from start_round) is waited for, not started again.
        Returns soon after `stop` (default: the one close() sets) is set.
        """
        for sync in self._start_syncs(stop or self._stop):
            sync.join()

    def close(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Stop the syncs after their current chunk and join them; safe to call twice.

        Blocks up to `timeout_s`, then logs a warning and returns with the stuck ones still
        running (daemon threads, so they do not keep the process alive).
        """
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            syncs = list(self._syncs.values())
        for sync in syncs:
            sync.join(max(0.0, deadline - time.monotonic()))
        stuck = sorted(sync.name for sync in syncs if sync.is_alive())
        if stuck:
            log.warning(
                "asset syncs did not stop in time",
                extra={"threads": stuck, "timeout_s": timeout_s},
            )

    def __enter__(self) -> Ingestor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_syncs(self, stop: threading.Event) -> list[threading.Thread]:
        """Start a thread for each asset not syncing yet; returns every asset's thread."""
        syncs = []
        # Under the lock, so two callers never both find an asset idle and start it twice.
        with self._lock:
            for asset_id in self._assets:
                sync = self._syncs.get(asset_id)
                if sync is not None and sync.is_alive():
                    log.info(
                        "asset still syncing; skipped this round", extra={"asset_id": asset_id}
                    )
                else:
                    sync = threading.Thread(
                        target=self._sync_in_share,
                        args=(asset_id, stop),
                        name=f"sync-{asset_id[:8]}",
                        daemon=True,
                    )
                    sync.start()
                    self._syncs[asset_id] = sync
                syncs.append(sync)
        return syncs

    def _sync_in_share(self, asset_id: str, stop: threading.Event) -> None:
        if stop.is_set():
            return
        # With more assets than shares, a sync waits here for one: the requests in flight
        # never exceed `concurrency`, however many rounds overlap.
        share = self._shares.get()
        try:
            if not stop.is_set():
                self.sync_asset(asset_id, stop, concurrency=share)
        except Exception:
            log.exception("ingestion run failed", extra={"asset_id": asset_id})
        finally:
            self._shares.put(share)

    def sync_asset(
        self, asset_id: str, stop: threading.Event, *, concurrency: int | None = None
    ) -> None:
        """Fetch what is missing for one asset, unless another replica is on it. Blocks.

        At most `concurrency` fetches (default: the ingestor's) are in flight. Returns soon
        after `stop` is set: chunks in flight are finished and stored, no new ones start.
        """
        with self._repository.asset_lock(asset_id) as acquired:
            if not acquired:
                log.info("asset busy in another replica; skipped", extra={"asset_id": asset_id})
                return
            # Inside the lock, so what is planned reflects everything other replicas stored.
            start, end = self.window()
            chunks = self._chunks(asset_id, start, end)
            error, left = self._fetch_all(asset_id, chunks, stop, concurrency or self._concurrency)
            # A run cut short by shutdown is neither a success nor a failure worth recording.
            if error is not None or not left:
                self._repository.record_attempt(asset_id, error=error)
            status = self._repository.asset_status([asset_id], start_s=start, end_s=end)[0]
            _notify(
                self._observer.asset_synced, asset_id, ok=error is None, coverage=status.coverage
            )

    def _chunks(self, asset_id: str, start: int, end: int) -> list[tuple[int, int]]:
        gaps = self._repository.uncovered(asset_id, start, end)
        recent = (max(start, end - self._overlap_s), end)
        return plan_chunks(_union([*gaps, recent]), chunk_s=self._chunk_s)

    def _fetch_all(
        self, asset_id: str, chunks: list[tuple[int, int]], stop: threading.Event, concurrency: int
    ) -> tuple[str | None, int]:
        """Fetch and store chunks with bounded concurrency, adjacent ones in batches.

        Returns the last error (None if every chunk attempted was stored) and how many
        chunks were not attempted, because of `stop` or because too many failed in a row.
        """
        tracker = _ProgressTracker(asset_id, len(chunks), self._observer, self._progress_interval_s)
        pending: Iterator[list[tuple[int, int]]] = iter(
            plan_batches(chunks, span_s=STORE_SPAN_S, workers=concurrency)
        )
        left = len(chunks)
        in_flight: dict[Future[_Batch], list[tuple[int, int]]] = {}
        error: str | None = None
        failures = 0
        with ThreadPoolExecutor(concurrency, thread_name_prefix=f"fetch-{asset_id[:8]}") as pool:
            while True:
                while (
                    len(in_flight) < concurrency
                    and failures < MAX_CONSECUTIVE_FAILURES
                    and not stop.is_set()
                    and (batch := next(pending, None)) is not None
                ):
                    in_flight[pool.submit(self._fetch_batch, asset_id, batch, stop)] = batch
                    left -= len(batch)
                if not in_flight:
                    break
                # Woken on time as well, so a slow batch does not hold back progress reports.
                done, _ = wait(
                    in_flight, timeout=tracker.seconds_to_report(), return_when=FIRST_COMPLETED
                )
                for future in done:
                    finished = in_flight.pop(future)
                    outcome = _outcome(future, finished)
                    tracker.chunks_done(outcome.chunks, outcome.points)
                    if outcome.failure is None:
                        failures = 0
                    else:
                        failures = 1 if outcome.chunks else failures + 1
                        error = str(outcome.failure)
                        _log_chunk_failure(
                            asset_id, outcome.failed or _span(finished), outcome.failure
                        )
                    if outcome.untried:
                        # The rest of a batch cut short goes back in line, as a batch of
                        # its own: a failed chunk does not cost the others their turn.
                        pending = itertools.chain([outcome.untried], pending)
                        left += len(outcome.untried)
                tracker.report_if_due()
        tracker.finish()
        if failures >= MAX_CONSECUTIVE_FAILURES and left:
            log.warning(
                "chunks failing; stopped this run early",
                extra={"asset_id": asset_id, "chunks_left": left},
            )
        return error, left

    def _fetch_batch(
        self, asset_id: str, batch: list[tuple[int, int]], stop: threading.Event
    ) -> _Batch:
        """Fetch adjacent chunks one after another until one fails or `stop` is set, then
        store those fetched in one transaction."""
        results: list[FetchResult] = []
        failure: Exception | None = None
        for start, end in batch:
            if results and stop.is_set():
                break
            try:
                results.append(self._client.fetch(asset_id, _utc(start), _utc(end)))
            except Exception as exc:
                failure = exc
                break
        fetched = batch[: len(results)]
        untried = batch[len(results) + (failure is not None) :]
        failed = batch[len(results)] if failure is not None else None
        if not fetched:
            return _Batch(0, 0, untried, failure, failed)
        span = _span(fetched)
        # Each result is in ascending time, and the batch's chunks are newest first.
        points = list(itertools.chain.from_iterable(r.points for r in reversed(results)))
        try:
            # One transaction: the points and the coverage of their range land together.
            self._repository.upsert_points(asset_id, points, covered=span)
        except Exception as exc:
            if failure is not None and failed is not None:
                # Reported here, as the batch's outcome can carry one failure only.
                _log_chunk_failure(asset_id, failed, failure)
            where = f"[{_utc(span[0])}, {_utc(span[1])})"
            return _Batch(0, 0, untried, _StoreError(f"storing {asset_id} {where}: {exc}"), span)
        for result in results:
            _notify(self._observer.chunk_stored, asset_id, len(result.points), result.skipped)
        return _Batch(len(fetched), len(points), untried, failure, failed)


@dataclass(frozen=True)
class _Batch:
    """What became of a batch: chunks and points stored, chunks not tried, and the failure
    that cut it short, with the range that failed."""

    chunks: int
    points: int
    untried: list[tuple[int, int]]
    failure: Exception | None
    failed: tuple[int, int] | None


def _outcome(future: Future[_Batch], batch: list[tuple[int, int]]) -> _Batch:
    try:
        return future.result()
    except Exception as exc:
        # A defect rather than a failed fetch or write: the whole batch counts as failed.
        return _Batch(0, 0, [], exc, _span(batch))


def _span(chunks: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The range from the oldest chunk's start to the newest one's end."""
    return min(start for start, _ in chunks), max(end for _, end in chunks)


class _StoreError(Exception):
    """Fetched points could not be written; the chunk stays uncovered."""


def _log_chunk_failure(asset_id: str, chunk: tuple[int, int], exc: Exception) -> None:
    where = {
        "asset_id": asset_id,
        "start": _utc(chunk[0]).isoformat(),
        "end": _utc(chunk[1]).isoformat(),
    }
    if isinstance(exc, UpstreamUnavailable) and exc.outcome == "timeout":
        log.warning("upstream fetch timed out", extra={**where, "error": str(exc)})
        return
    known = isinstance(exc, UpstreamError | _StoreError)
    log.warning("chunk failed", extra={**where, "error": str(exc)}, exc_info=not known)


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _notify(callback: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Call an observer method; metrics and progress output must never break ingestion."""
    try:
        callback(*args, **kwargs)
    except Exception:
        log.exception("ingest observer failed", extra={"callback": callback.__name__})


def _union(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class _ProgressTracker:
    """Counts finished chunks and reports progress at most every `interval_s`.

    Used from the one thread that collects chunk results, so it needs no lock.
    """

    def __init__(self, asset_id: str, total: int, observer: IngestObserver, interval_s: float):
        self._asset_id = asset_id
        self._total = total
        self._observer = observer
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._last_report = self._started
        self._reported = False
        self._done = 0
        self._points = 0

    def chunks_done(self, chunks: int, points: int) -> None:
        self._done += chunks
        self._points += points

    def seconds_to_report(self) -> float:
        """How long to wait for chunks before the next report is due; never below 50 ms."""
        due = self._last_report + self._interval_s - time.monotonic()
        return max(_MIN_PROGRESS_WAIT_S, due)

    def report_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_report >= self._interval_s:
            self._report(now)

    def finish(self) -> None:
        # A routine poll (a chunk or two) stays quiet; a bootstrap or catch-up always ends
        # with a summary, however fast it was.
        if self._reported or self._total > 2:
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        self._last_report = now
        self._reported = True
        progress = Progress(
            self._asset_id, self._done, self._total, self._points, now - self._started
        )
        _notify(self._observer.progress, progress)


class Scheduler:
    """Runs a job on one daemon thread: at once, then every `interval_s`, until closed.

    The job gets the stop event and should return soon after it is set. Runs never overlap:
    the interval counts from the end of the previous run, so a run that takes longer than
    the interval is followed by the next one straight away, never by two at once. A job
    whose work may outlast the interval starts it on threads of its own and returns, so
    the rhythm holds (the service's ingestion job does so).
    """

    def __init__(
        self, job: Callable[[threading.Event], None], *, interval_s: float, name: str = "ingest"
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._job = job
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._schedule = schedule.Scheduler()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._name = name

    def start(self) -> Scheduler:
        """Start the thread, which runs the job at once; returns without waiting for it."""
        self._thread.start()
        return self

    def close(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Stop after the current chunk and join the thread; safe to call twice.

        Blocks up to `timeout_s`, then logs a warning and returns with the thread still
        running (it is a daemon, so it does not keep the process alive).
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning(
                    "scheduler thread did not stop in time",
                    extra={"scheduler": self._name, "timeout_s": timeout_s},
                )

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run_job(self) -> None:
        try:
            self._job(self._stop)
        except Exception:
            log.exception("scheduled job failed", extra={"scheduler": self._name})

    def _loop(self) -> None:
        if self._stop.is_set():
            return
        self._run_job()
        # Registered only now, so the first interval counts from the end of the first run
        # rather than from construction; schedule then reschedules after each run ends.
        self._schedule.every(self._interval_s).seconds.do(self._run_job)
        while not self._stop.is_set():
            self._schedule.run_pending()
            idle = self._schedule.idle_seconds
            self._stop.wait(min(1.0, max(0.0, idle if idle is not None else 1.0)))
