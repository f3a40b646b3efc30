"""EdgeCom time-series service: the wiring and lifecycle of the gRPC server, and main()."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from api_client import ApiClient
from change_listener import ChangeListener
from config import (
    Config,
    ConfigError,
    LoggingConfig,
    ServerConfig,
    TlsConfig,
    load_config,
    with_file_tokens,
)
from interceptors import (
    AuthInterceptor,
    CacheInterceptor,
    CacheKey,
    DecodingRegistrar,
    DrainInterceptor,
    MetricsInterceptor,
    OpenStreamLimitInterceptor,
    QueryCache,
    RateLimitInterceptor,
    RequestLogInterceptor,
)
from metrics import IngestMetrics, Metrics, start_metrics_server
from repository import DatabaseUnavailable, EmbeddedPostgres, Repository
from scheduler import Ingestor, Scheduler
from service import (
    GO_SERVICE_NAME,
    QUERY_METHOD,
    SERVICE_NAME,
    TimeSeriesServicer,
    protos,
    query_cache_key,
    services,
)
from simulator import Simulator

VERSION = "0.1.0"
# How often the database watch re-checks the database once it is up.
HEALTH_CHECK_INTERVAL_S = 5.0
# How long closing the database watch waits for its thread, which may be in a check.
WATCH_JOIN_TIMEOUT_S = 10.0

log = logging.getLogger("edgecom")


# --- server --------------------------------------------------------------------------------


def create_server(
    *,
    address: str,
    servicer: TimeSeriesServicer,
    health_servicer: health.HealthServicer,
    max_workers: int = 16,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    max_concurrent_rpcs: int | None = None,
) -> tuple[grpc.Server, int]:
    """Build a gRPC server bound to `address`, not yet started; returns it and its port.

    Beyond max_concurrent_rpcs calls running or waiting for a worker (None: no bound),
    grpcio refuses new calls RESOURCE_EXHAUSTED at once.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=tuple(interceptors),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    registrar: Any = DecodingRegistrar(server)
    services.add_TimeSeriesServiceServicer_to_server(servicer, registrar)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    service_names = (
        protos.DESCRIPTOR.services_by_name["TimeSeriesService"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(service_names, registrar)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        # grpcio raises where it used to return 0, with no more detail than the address.
        port = 0
    if port == 0:
        reason = "the address is in use or not available"
        if credentials is not None:
            reason += ", or the server.tls key does not belong to the certificate"
        raise OSError(f"cannot listen on {address}: {reason}")
    return server, port


class DatabaseWatch:
    """Readies the database once it answers (migrations, storage policies), then keeps the
    health status in line with it: SERVING while it answers, NOT_SERVING while it does not.

    Without compress_after_s it only migrates. Health is NOT_SERVING from construction;
    start() (or entering it) starts the watch thread, close() (or leaving it) stops it.
    """

    def __init__(
        self,
        *,
        repository: Repository,
        health_servicer: health.HealthServicer,
        compress_after_s: float | None = None,
        retention_s: float | None = None,
        interval_s: float = HEALTH_CHECK_INTERVAL_S,
    ) -> None:
        self._repository = repository
        self._compress_after_s = compress_after_s
        self._retention_s = retention_s
        self._health = health_servicer
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="database-watch", daemon=True)
        self._set(serving=False)

    def start(self) -> DatabaseWatch:
        """Start the watch thread; returns without waiting for the database."""
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the database is migrated and reachable; returns whether it is."""
        return self._ready.wait(timeout_s)

    def close(self, timeout_s: float = WATCH_JOIN_TIMEOUT_S) -> None:
        """Stop the watch thread; safe to call twice.

        Blocks up to `timeout_s` (a check may be waiting on the database), then logs a
        warning and returns with the thread still running (it is a daemon).
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("database watch did not stop in time", extra={"timeout_s": timeout_s})

    def __enter__(self) -> DatabaseWatch:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _prepare(self) -> list[str]:
        applied = self._repository.migrate()
        # Without compress_after_s the storage policies are left as they are.
        if self._compress_after_s is not None:
            self._repository.apply_storage_policies(
                compress_after_s=self._compress_after_s, retention_s=self._retention_s
            )
        return applied

    def _set(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME, GO_SERVICE_NAME):
            self._health.set(name, status)

    def _run(self) -> None:
        migrated = False
        while not self._stop.is_set():
            try:
                if not migrated:
                    applied = self._prepare()
                    migrated = True
                    log.info("database ready", extra={"migrations_applied": applied})
                else:
                    self._repository.ping()
                if not self._ready.is_set():
                    self._ready.set()
                    self._set(serving=True)
            except DatabaseUnavailable as exc:
                if self._ready.is_set() or not migrated:
                    log.warning("database unavailable", extra={"error": str(exc)})
                self._ready.clear()
                self._set(serving=False)
            except Exception:
                log.exception("health check failed")
                # Cleared, so that the next good check turns health back to SERVING.
                self._ready.clear()
                self._set(serving=False)
            self._stop.wait(self._interval_s)


# --- logging -------------------------------------------------------------------------------

_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable single lines with `key=value` extras, for terminals."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return f"{line} {extras}" if extras else line


def setup_logging(config: LoggingConfig, stream: Any = None) -> bool:
    """Send log records to stderr as text on a terminal and as JSON lines otherwise.

    Returns whether the output is JSON.
    """
    stream = stream or sys.stderr
    use_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # One line per request from the HTTP client would drown everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return use_json


# --- main ----------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="edgecom.py",
        description="Serve EdgeCom asset time series over gRPC (QueryTimeSeries).",
        epilog="Every config key can be overridden by EDGECOM_<SECTION>_<KEY>, "
        "e.g. EDGECOM_DATABASE_URL or EDGECOM_SERVER_PORT.",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="serve two demo assets from a built-in EdgeCom API simulator, fully offline",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("EDGECOM_CONFIG") or None,
        metavar="PATH",
        help="configuration file (default: $EDGECOM_CONFIG or config.yaml beside edgecom.py)",
    )
    parser.add_argument(
        "--health-check",
        action="store_true",
        help="ask the service running on this host (server.port, over TLS when server.tls is "
        "set) for its health and exit: 0 when SERVING, 1 otherwise",
    )
    return parser.parse_args(argv)


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: object) -> None:
        log.info("shutdown requested", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


DEMO_ASSETS = ("00000000-0000-4000-8000-00000000d001", "00000000-0000-4000-8000-00000000d002")


# What each server.tls file must hold, and a line of PEM that such a file contains.
_TLS_PEM = {
    "cert_file": ("PEM certificate", b"-----BEGIN CERTIFICATE-----"),
    "key_file": ("PEM private key", b"PRIVATE KEY-----"),
    "client_ca_file": ("PEM CA certificate", b"-----BEGIN CERTIFICATE-----"),
}


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """Read the TLS files named in server.tls; None when TLS is off. Raises ConfigError."""
    if not tls.cert_file and not tls.key_file and not tls.client_ca_file:
        return None
    if not tls.cert_file or not tls.key_file:
        raise ConfigError("server.tls: set both cert_file and key_file to turn TLS on")

    def read(key: str, path: str) -> bytes:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"server.tls.{key}: cannot read {path}: {exc.strerror}") from None
        # grpcio only looks at the contents when binding the port, and then says nothing useful.
        wanted, marker = _TLS_PEM[key]
        if marker not in data:
            raise ConfigError(f"server.tls.{key}: {path} holds no {wanted} ({marker.decode()})")
        return data

    pair = (read("key_file", tls.key_file), read("cert_file", tls.cert_file))
    if tls.client_ca_file:
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=read("client_ca_file", tls.client_ca_file),
            require_client_auth=True,
        )
    return grpc.ssl_server_credentials([pair])


# Probes run the health check every few seconds with a 5 s timeout; Python needs about 1 s to
# start, so the call itself gets the rest.
HEALTH_CHECK_TIMEOUT_S = 3.0
# Addresses that mean "every interface": the check asks over loopback then.
_ANY_HOST = frozenset({"", "0.0.0.0", "::", "[::]"})


def _certificate_name(cert_file: str) -> str | None:
    """The first DNS name (else IP address, else common name) the certificate names."""
    # The standard library decodes a PEM file only through this long-standing private
    # helper; without it the check falls back to the address it connects to.
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    try:
        decoded = decode(cert_file) if decode else {}
    except (OSError, ValueError):
        decoded = {}
    names = decoded.get("subjectAltName", ())
    for kind in ("DNS", "IP Address"):
        for name_kind, name in names:
            if name_kind == kind:
                # A wildcard covers any one label in its place.
                return name.replace("*", "edgecom", 1) if name.startswith("*.") else name
    for rdn in decoded.get("subject", ()):
        for attribute, value in rdn:
            if attribute == "commonName":
                return value
    return None


def health_channel(server: ServerConfig) -> grpc.Channel:
    """A channel to this host's service on server.port, over TLS when server.tls is set.

    With TLS the server's own certificate is the trust anchor and the name checked is one it
    holds: the check connects over loopback, to an address the certificate need not name.
    With mutual TLS it presents that same certificate, so server.tls.cert_file must then be
    issued by the client CA and allow client authentication. Raises OSError when a file is
    unreadable.
    """
    host = "127.0.0.1" if server.host in _ANY_HOST else server.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    target = f"{host}:{server.port}"
    # A container-wide http_proxy must not capture a call to this host.
    options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
    tls = server.tls
    if not tls.cert_file:
        return grpc.insecure_channel(target, options=options)
    cert = Path(tls.cert_file).read_bytes()
    key = Path(tls.key_file).read_bytes() if tls.client_ca_file else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=cert, private_key=key, certificate_chain=cert if key else None
    )
    name = _certificate_name(tls.cert_file)
    if name:
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(target, credentials, options=options)


def health_check(server: ServerConfig, *, timeout_s: float = HEALTH_CHECK_TIMEOUT_S) -> str | None:
    """Ask the service on this host for its overall health. Blocks up to timeout_s.

    Returns None when it answers SERVING, else a line saying what is wrong.
    """
    if server.port == 0:
        return "server.port is 0 (any free port): there is no known port to ask"
    try:
        channel = health_channel(server)
    except OSError as exc:
        return f"cannot read a server.tls file: {exc.filename}: {exc.strerror}"
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return f"no answer from port {server.port}: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None


def build_interceptors(
    *,
    metrics: Metrics,
    cache: QueryCache,
    cache_key: Callable[[str, Any], CacheKey | None],
    max_open_streams: int,
    rps: float,
    burst: int,
    trust_client_id: bool = False,
    tokens: Sequence[str] = (),
    drain: DrainInterceptor | None = None,
) -> tuple[grpc.ServerInterceptor, ...]:
    """The interceptor chain, outermost first: every call passes them in this order.

    Raises ValueError when an argument is out of range (each interceptor checks its own).
    """
    return (
        # Outside the rest, so that every call it counts is also seen to its end.
        drain or DrainInterceptor(),
        RequestLogInterceptor(),
        MetricsInterceptor(metrics),
        # Open streams bypass the rate limit and authentication: bounded here, before they
        # settle on a worker, and inside the log and metrics, so that refusals are seen there.
        OpenStreamLimitInterceptor(max_open_streams),
        # Before authentication, so that every call takes a token: wrong token guesses are
        # limited like any other call.
        RateLimitInterceptor(rps, burst, trust_client_id=trust_client_id, metrics=metrics),
        AuthInterceptor(tokens),
        CacheInterceptor(cache, cache_key, metrics),
    )


def cache_key_function(
    assets: Sequence[str], usable: Callable[[], bool] = lambda: True
) -> Callable[[str, Any], CacheKey | None]:
    """The cache key of each call: QueryTimeSeries calls only, and only while usable()."""

    def cache_key(method: str, request: Any) -> CacheKey | None:
        if method != QUERY_METHOD or not usable():
            return None
        return query_cache_key(request, assets, now_s=time.time())

    return cache_key


def interceptors_for(
    config: Config,
    *,
    metrics: Metrics,
    cache: QueryCache,
    drain: DrainInterceptor | None = None,
    cache_usable: Callable[[], bool] = lambda: True,
) -> tuple[grpc.ServerInterceptor, ...]:
    """The interceptor chain run() builds from `config`. Raises ConfigError naming the key.

    While cache_usable() is false, queries neither read nor fill the cache.
    """
    keys = {
        "max_streams": "server.max_open_streams",
        "rps": "rate_limit.rps",
        "burst": "rate_limit.burst",
        "tokens": "auth.tokens",
    }
    with _naming_keys(keys):
        return build_interceptors(
            metrics=metrics,
            cache=cache,
            cache_key=cache_key_function(config.upstream.assets, cache_usable),
            max_open_streams=config.server.max_open_streams,
            rps=config.rate_limit.rps,
            burst=config.rate_limit.burst,
            trust_client_id=config.rate_limit.trust_client_id,
            tokens=config.auth.tokens,
            drain=drain,
        )


@contextmanager
def _naming_keys(keys: Mapping[str, str]) -> Iterator[None]:
    """Report a constructor's ValueError as a ConfigError naming the config key.

    `keys` maps each argument the constructor checks to its key; the constructors' messages
    name the argument that is out of range.
    """
    try:
        yield
    except ValueError as exc:
        message = str(exc)
        named = [key for argument, key in keys.items() if re.search(rf"\b{argument}\b", message)]
        raise ConfigError(f"{named[0] if named else ', '.join(keys.values())}: {message}") from None


@dataclass
class _Parts:
    """What run() builds before it opens anything, so that a bad value stops it first."""

    metrics: Metrics
    observer: IngestMetrics
    cache: QueryCache
    drain: DrainInterceptor
    interceptors: tuple[grpc.ServerInterceptor, ...]
    client: ApiClient


def _build_parts(
    config: Config,
    stop: threading.Event,
    *,
    progress_stream: Any,
    cache_usable: Callable[[], bool],
) -> _Parts:
    """Build the objects whose constructors check config values. Raises ConfigError."""
    metrics = Metrics()
    observer = IngestMetrics(metrics, progress_stream=progress_stream)
    with _naming_keys({"size": "cache.size", "max_bytes": "cache.max_bytes"}):
        cache = QueryCache(config.cache.size, max_bytes=config.cache.max_bytes, metrics=metrics)
    drain = DrainInterceptor()
    interceptors = interceptors_for(
        config, metrics=metrics, cache=cache, drain=drain, cache_usable=cache_usable
    )
    upstream = config.upstream
    with _naming_keys(
        {
            "upstream url": "upstream.url",
            "timeout_s": "upstream.timeout",
            "max_attempts": "upstream.retry_attempts",
            "backoff_max_s": "upstream.retry_max_backoff",
            "max_response_bytes": "upstream.max_response_bytes",
        }
    ):
        client = ApiClient(
            url_template=upstream.url,
            timeout_s=upstream.timeout,
            max_attempts=upstream.retry_attempts,
            backoff_max_s=upstream.retry_max_backoff,
            on_request=observer.upstream_request,
            stop=stop,
            max_response_bytes=upstream.max_response_bytes,
            # load_config accepts a url without the placeholder for exactly one asset.
            one_asset=len(upstream.assets) == 1,
        )
    return _Parts(metrics, observer, cache, drain, interceptors, client)


def _open_database(stack: ExitStack, config: Config, parts: _Parts) -> tuple[str, Repository]:
    """Start the embedded PostgreSQL when no server is configured, and open the pool.

    Returns the DSN and the repository; the schema is migrated later, by the DatabaseWatch.
    """
    if config.database.embedded:
        embedded = stack.enter_context(EmbeddedPostgres(data_dir=config.database.data_dir))
        dsn = embedded.dsn
    else:
        dsn = config.database.dsn()
    if config.metrics.port:
        metrics_server = stack.enter_context(
            start_metrics_server(parts.metrics, host=config.metrics.host, port=config.metrics.port)
        )
        log.info(
            "metrics served",
            extra={"host": config.metrics.host, "port": metrics_server.port, "path": "/metrics"},
        )
    repository = stack.enter_context(
        Repository(
            dsn=dsn,
            max_connections=config.database.max_connections,
            connect_timeout_s=config.database.connection_timeout,
            # One connection for each chunk stored at once.
            write_connections=config.upstream.concurrency,
            rollup_timezones=config.storage.rollup_timezones,
        )
    )
    return dsn, repository


def _listen_for_changes(stack: ExitStack, dsn: str, cache: QueryCache) -> ChangeListener:
    """Drop cached answers when any replica writes points they hold."""
    return stack.enter_context(
        ChangeListener(
            dsn=dsn,
            # A change to the point at last_s must drop entries whose range holds it.
            on_change=lambda asset_id, first_s, last_s: cache.invalidate(
                asset_id, first_s, last_s + 1
            ),
            on_reconnect=cache.clear,
        )
    )


def _ingestor(stack: ExitStack, config: Config, parts: _Parts, repository: Repository) -> Ingestor:
    """The ingestor that keeps the database an exact copy of the upstream's series."""
    stack.enter_context(parts.client)
    upstream = config.upstream
    return stack.enter_context(
        Ingestor(
            client=parts.client,
            repository=repository,
            assets=upstream.assets,
            bootstrap_s=upstream.bootstrap,
            chunk_s=upstream.chunk,
            concurrency=upstream.concurrency,
            overlap_s=upstream.overlap,
            observer=parts.observer,
        )
    )


def _serve(
    config: Config,
    parts: _Parts,
    servicer: TimeSeriesServicer,
    health_servicer: health.HealthServicer,
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.Server, int]:
    """Start the gRPC server on server.host:server.port; returns it and its port."""
    server, port = create_server(
        address=f"{config.server.host}:{config.server.port}",
        servicer=servicer,
        health_servicer=health_servicer,
        max_workers=config.server.max_workers,
        max_concurrent_rpcs=config.server.max_concurrent_rpcs,
        interceptors=parts.interceptors,
        credentials=credentials,
    )
    server.start()
    log.info(
        "serving",
        extra={
            "address": f"{config.server.host}:{port}",
            "tls": credentials is not None,
            "version": VERSION,
        },
    )
    return server, port


def _start_ingestion(
    stack: ExitStack, ingestor: Ingestor, watch: DatabaseWatch, interval_s: float
) -> None:
    """Start a round of ingestion every `interval_s`, each once the database is ready."""

    def ingest(stop_ingest: threading.Event) -> None:
        # Ingestion needs the migrated schema: wait for it, but never past a shutdown.
        while not watch.wait_ready(1.0):
            if stop_ingest.is_set():
                return
        # Starts the syncs and returns: an asset stuck on its upstream must not delay
        # the next poll of the others.
        ingestor.start_round()

    stack.enter_context(Scheduler(ingest, interval_s=interval_s, name="ingest"))


def _shut_down(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    drain: DrainInterceptor,
    grace_period_s: float,
) -> None:
    """Stop taking calls and let those in flight finish within the grace period. Blocks."""
    # Probes see NOT_SERVING first, so load balancers stop sending before the port closes.
    health_servicer.enter_graceful_shutdown()
    stopped = server.stop(grace_period_s)
    # Calls get the whole grace period, but once none is left, open-ended health Watch
    # streams need not hold the exit: a smaller grace makes grpcio stop at once.
    if drain.wait_idle(grace_period_s):
        server.stop(0)
    stopped.wait()
    log.info("server stopped")


def run(
    config: Config,
    stop: threading.Event,
    *,
    credentials: grpc.ServerCredentials | None = None,
    progress_stream: Any = None,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Run the service until `stop` is set, then shut it down in order. Blocks.

    Raises ConfigError, before opening anything, when a value is out of range. Resources
    are entered in dependency order so the ExitStack closes them in reverse: scheduler,
    database watch, ingestor (its asset syncs), upstream client, change listener, pool,
    embedded database.
    """
    listener: ChangeListener | None = None
    parts = _build_parts(
        config,
        stop,
        progress_stream=progress_stream,
        # Writes by other replicas go unheard while the listener is not listening (before
        # its first LISTEN, or after a drop): its cache is stale then.
        cache_usable=lambda: listener is not None and listener.wait_listening(0),
    )
    with ExitStack() as stack:
        # Closed in its place below; this is for a failure before it gets there.
        stack.callback(parts.client.close)
        dsn, repository = _open_database(stack, config, parts)
        listener = _listen_for_changes(stack, dsn, parts.cache)
        health_servicer = health.HealthServicer()
        ingestor = _ingestor(stack, config, parts, repository)
        servicer = TimeSeriesServicer(
            repository=repository,
            assets=config.upstream.assets,
            max_points=config.query.max_points,
            page_points=config.query.page_points,
            window=ingestor.window,
            max_streams=config.query.max_streams,
            stream_idle_timeout_s=config.query.stream_idle_timeout,
        )
        server, port = _serve(config, parts, servicer, health_servicer, credentials)
        watch = stack.enter_context(
            DatabaseWatch(
                repository=repository,
                health_servicer=health_servicer,
                compress_after_s=config.storage.compress_after,
                retention_s=config.storage.retention_s,
            )
        )
        _start_ingestion(stack, ingestor, watch, config.upstream.poll_interval)
        if on_ready:
            on_ready(port)
        stop.wait()
        _shut_down(server, health_servicer, parts.drain, config.server.grace_period)


def _demo_config(config: Config, url_template: str) -> Config:
    upstream = dataclasses.replace(config.upstream, url=url_template, assets=DEMO_ASSETS)
    return dataclasses.replace(config, upstream=upstream)


def _health_check_main(config_path: str | None) -> int:
    # Exit 1 for every failure: Docker reserves exit code 2 of a health check.
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"edgecom: health check: configuration error: {exc}", file=sys.stderr)
        return 1
    problem = health_check(config.server)
    if problem:
        print(f"edgecom: health check: {problem}", file=sys.stderr)
        return 1
    return 0


def _config_error(exc: ConfigError) -> int:
    print(f"edgecom: configuration error: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse flags, load config, serve until SIGINT/SIGTERM. Returns the exit code."""
    args = _parse_args(argv)
    if args.health_check:
        return _health_check_main(args.config)
    try:
        config = with_file_tokens(load_config(args.config))
        credentials = server_credentials(config.server.tls)
    except ConfigError as exc:
        return _config_error(exc)
    use_json = setup_logging(config.logging)
    stop = threading.Event()
    _install_signal_handlers(stop)
    with ExitStack() as stack:
        if args.demo:
            simulator = stack.enter_context(Simulator(host="127.0.0.1", port=0).start())
            config = _demo_config(config, simulator.url_template)
            log.info(
                "demo mode: serving simulated EdgeCom data",
                extra={"upstream": simulator.url_template, "assets": list(DEMO_ASSETS)},
            )
        try:
            run(
                config,
                stop,
                credentials=credentials,
                progress_stream=None if use_json else sys.stderr,
            )
        except ConfigError as exc:
            return _config_error(exc)
        except (OSError, DatabaseUnavailable) as exc:
            log.error("cannot start", extra={"error": str(exc)})
            return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
