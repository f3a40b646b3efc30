"""Prometheus metrics of the service, in one injectable registry, and the endpoint serving them."""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from scheduler import Progress

_LOG = logging.getLogger(__name__)
# Progress lines belong to the service's log, as they always have.
_PROGRESS_LOG = logging.getLogger("edgecom")

# gRPC answers range from a cached reply (well under 1 ms) to a large aggregate (seconds).
GRPC_DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Upstream fetches are bounded by the HTTP client timeout (30 s by default), with retries on top.
UPSTREAM_DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

SERVER_JOIN_TIMEOUT_S = 5.0


class Metrics:
    """Every metric the service exposes, registered in one registry.

    The ``method`` label of the gRPC metrics is the full method path, e.g.
    ``/edgecom.TimeSeriesService/QueryTimeSeries``, so two services with a method of the same
    name never share a series; ``code`` is the status code name, e.g. ``OK``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A private registry by default: tests and embedded uses never collide on the global one.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # prometheus_client appends _total to counter names itself.
        self.grpc_requests = Counter(
            "edgecom_grpc_requests",
            "gRPC calls finished, by full method path and status code name.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_request_duration = Histogram(
            "edgecom_grpc_request_duration_seconds",
            "Time from the start of a gRPC call to its last response, by full method path.",
            ["method"],
            buckets=GRPC_DURATION_BUCKETS_S,
            registry=r,
        )
        self.cache_hits = Counter(
            "edgecom_cache_hits", "Queries answered from the response cache.", registry=r
        )
        self.cache_misses = Counter(
            "edgecom_cache_misses", "Cacheable queries that had to run.", registry=r
        )
        self.cache_entries = Gauge(
            "edgecom_cache_entries", "Responses held in the query cache.", registry=r
        )
        self.cache_bytes = Gauge(
            "edgecom_cache_bytes",
            "Bytes held by the query cache, counted as against cache.max_bytes.",
            registry=r,
        )
        self.rate_limited = Counter(
            "edgecom_rate_limited", "gRPC calls refused by the per-client rate limit.", registry=r
        )
        self.ingested_points = Counter(
            "edgecom_ingested_points",
            "Data points written to the database, by asset.",
            ["asset_id"],
            registry=r,
        )
        self.skipped_points = Counter(
            "edgecom_skipped_points",
            "Upstream data points dropped as invalid, by asset.",
            ["asset_id"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "edgecom_upstream_requests",
            "Requests made to the upstream API, by asset and outcome.",
            ["asset_id", "outcome"],
            registry=r,
        )
        self.upstream_request_duration = Histogram(
            "edgecom_upstream_request_duration_seconds",
            "Duration of one upstream API request, retries counted separately.",
            buckets=UPSTREAM_DURATION_BUCKETS_S,
            registry=r,
        )
        self.last_successful_fetch = Gauge(
            "edgecom_last_successful_fetch_timestamp_seconds",
            "Unix time of the last upstream fetch that succeeded, by asset.",
            ["asset_id"],
            registry=r,
        )
        self.coverage_ratio = Gauge(
            "edgecom_coverage_ratio",
            "Share of the configured history window held in the database, 0 to 1, by asset.",
            ["asset_id"],
            registry=r,
        )


class MetricsServer:
    """The running HTTP endpoint that serves a registry; close() stops it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self._thread.name = "metrics-http"
        self._closed = False
        self._lock = threading.Lock()
        self.host: str = host
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        """Stop serving, release the socket and join the thread; blocks up to a few seconds."""
        # The lock makes a second close(), from any thread, a no-op instead of a double shutdown.
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(SERVER_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                _LOG.warning(
                    "metrics HTTP thread did not stop within %.0f s", SERVER_JOIN_TIMEOUT_S
                )

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_metrics_server(metrics: Metrics, *, host: str, port: int) -> MetricsServer:
    """Serve metrics.registry over HTTP on host:port (0: any free port, see ``.port``).

    Returns once the socket is bound; requests are answered on a daemon thread.
    """
    return MetricsServer(host, port, metrics.registry)


class IngestMetrics:
    """Turns what ingestion and the upstream client report into metrics and progress output."""

    def __init__(self, metrics: Metrics, *, progress_stream: Any = None) -> None:
        self._metrics = metrics
        # On a terminal, progress is one line redrawn in place; elsewhere, periodic log lines.
        self._progress_stream = progress_stream

    def upstream_request(self, asset_id: str, outcome: str, duration_s: float) -> None:
        self._metrics.upstream_requests.labels(asset_id, outcome).inc()
        self._metrics.upstream_request_duration.observe(duration_s)

    def chunk_stored(self, asset_id: str, points: int, skipped: int) -> None:
        self._metrics.ingested_points.labels(asset_id).inc(points)
        self._metrics.skipped_points.labels(asset_id).inc(skipped)
        self._metrics.last_successful_fetch.labels(asset_id).set(time.time())

    def asset_synced(self, asset_id: str, *, ok: bool, coverage: float | None) -> None:
        if coverage is not None:
            self._metrics.coverage_ratio.labels(asset_id).set(coverage)

    def progress(self, progress: Progress) -> None:
        if self._progress_stream is None:
            _PROGRESS_LOG.info(
                "bootstrap progress",
                extra={
                    "asset_id": progress.asset_id,
                    "chunks_done": progress.chunks_done,
                    "chunks_total": progress.chunks_total,
                    "points": progress.points,
                    "points_per_s": round(progress.rate),
                    "eta_s": None if progress.eta_s is None else round(progress.eta_s),
                },
            )
            return
        end = "\n" if progress.chunks_done == progress.chunks_total else ""
        self._progress_stream.write(f"\r\x1b[K{progress.describe()}{end}")
        self._progress_stream.flush()
