"""EdgeCom time-series service: configuration, wiring and lifecycle of the gRPC server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import ssl
import sys
import threading
import time
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from api_client import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    MAX_RESPONSE_BYTES,
    RETRY_ATTEMPTS,
    ApiClient,
    validate_url_template,
)
from buckets import FILLS, Buckets, Window, fill_gaps, fillable
from interceptors import (
    DEFAULT_CACHE_MAX_BYTES,
    AuthInterceptor,
    CacheInterceptor,
    CacheKey,
    DrainInterceptor,
    MetricsInterceptor,
    OpenStreamLimitInterceptor,
    QueryCache,
    RateLimitInterceptor,
    RequestLogInterceptor,
)
from metrics import Metrics, start_metrics_server
from repository import (
    AGGREGATIONS,
    Bucket,
    BucketGrid,
    Cancellation,
    ChangeListener,
    DatabaseUnavailable,
    DataOutOfRange,
    EmbeddedPostgres,
    QueryCancelled,
    Repository,
    Snapshot,
)
from scheduler import STEP_S, Ingestor, Progress, Scheduler
from simulator import Simulator

HERE = Path(__file__).resolve().parent
VERSION = "0.1.0"
SERVICE_NAME = "edgecom.TimeSeriesService"
QUERY_METHOD = f"/{SERVICE_NAME}/QueryTimeSeries"
MAX_WINDOW_S = 366 * 86400
MAX_WINDOW_WEEKS = 52
MAX_WINDOW_MONTHS = 12
# How often the health watch re-checks the database once it is up.
HEALTH_CHECK_INTERVAL_S = 5.0

# The .proto stays the single source of truth: it is compiled at import time, never checked in.
sys.path.insert(0, str(HERE / "proto"))
protos, services = grpc.protos_and_services("edgecom.proto")

log = logging.getLogger("edgecom")


# --- configuration -------------------------------------------------------------------------


class ConfigError(Exception):
    """A configuration value is missing, unknown or malformed; the message names the key."""


def _duration(seconds: float) -> Any:
    return field(default=seconds, metadata={"duration": True})


@dataclass(frozen=True)
class TlsConfig:
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    max_workers: int = 16
    grace_period: float = _duration(10.0)
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Each open health Watch or reflection stream holds a worker until the client leaves:
    # together with query.max_streams fewer than max_workers, so unary calls keep workers.
    max_open_streams: int = 4
    # Calls running or waiting for a worker; beyond it grpcio refuses calls instead of
    # queueing them without bound.
    max_concurrent_rpcs: int = 100


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 9090
    # Loopback: a bare run does not publish its metrics to the network. Containers and pods
    # set 0.0.0.0 so Prometheus can scrape the pod address.
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "https://api.edgecomenergy.net/core/asset/{asset_id}/series"
    assets: tuple[str, ...] = ("3662953a-1396-4996-a1b6-99a0c5e7a5de",)
    timeout: float = _duration(30.0)
    poll_interval: float = _duration(300.0)
    bootstrap: float = _duration(730 * 86400.0)
    chunk: float = _duration(7 * 86400.0)
    concurrency: int = 4
    overlap: float = _duration(3600.0)
    retry_attempts: int = RETRY_ATTEMPTS
    retry_max_backoff: float = _duration(BACKOFF_MAX_S)
    max_response_bytes: int = MAX_RESPONSE_BYTES


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""
    host: str = ""
    port: int = 5432
    name: str = "edgecom"
    user: str = "edgecom"
    password: str = ""
    ssl_mode: str = "prefer"
    max_connections: int = 10
    connection_timeout: float = _duration(5.0)
    data_dir: str = ".edgecom/pgdata"

    @property
    def embedded(self) -> bool:
        """True when no server is configured and the service runs its own PostgreSQL."""
        return not self.url and not self.host

    def dsn(self) -> str:
        """The libpq connection string for a configured server (url wins over the keys)."""
        if self.url:
            return self.url
        return _conninfo(
            host=self.host,
            port=self.port,
            dbname=self.name,
            user=self.user,
            password=self.password,
            sslmode=self.ssl_mode,
        )


@dataclass(frozen=True)
class QueryConfig:
    max_points: int = 100000
    page_points: int = 10000
    # Each open stream holds a pool connection: fewer streams than database.max_connections
    # leaves connections for unary queries however many clients stream.
    max_streams: int = 4
    stream_idle_timeout: float = _duration(30.0)


@dataclass(frozen=True)
class CacheConfig:
    size: int = 1000
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES


@dataclass(frozen=True)
class RateLimitConfig:
    rps: float = 5.0
    burst: int = 10
    # Only behind a proxy that sets x-client-id itself: clients could otherwise pick a fresh
    # id per call and never be limited.
    trust_client_id: bool = False


@dataclass(frozen=True)
class StorageConfig:
    compress_after: float = _duration(7 * 86400.0)
    retention: str = ""  # a duration, or empty to keep everything


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[str, ...] = ()
    tokens_file: str = ""  # one token per line, added to tokens; read at start-up


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _conninfo(**params: object) -> str:
    def quote(value: object) -> str:
        text = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"'{text}'"

    return " ".join(f"{key}={quote(value)}" for key, value in params.items() if value != "")


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """Parse `300ms`, `30s`, `5m`, `1h`, `730d` or a plain number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(
                f"expected a duration such as 300ms, 30s, 5m, 1h or 730d, got {value!r}"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number >= 0, got {value!r}")
    return seconds


def _convert(value: object, f: dataclasses.Field, *, from_env: bool) -> object:
    kind = f.type
    if f.metadata.get("duration"):
        return parse_duration(value)
    if kind == "tuple[str, ...]":
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ValueError(f"expected a list of strings, got {value!r}")
    if kind == "bool":
        return _convert_bool(value, from_env=from_env)
    if kind == "int":
        if from_env and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected a whole number, got {value!r}")
    if kind == "float":
        if from_env and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"expected a number, got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    raise AssertionError(f"unhandled config type {kind}")


_ENV_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert_bool(value: object, *, from_env: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_env and isinstance(value, str) and value.strip().lower() in _ENV_BOOLEANS:
        return _ENV_BOOLEANS[value.strip().lower()]
    raise ValueError(f"expected true or false, got {value!r}")


def _build(cls: type, raw: object, env: Mapping[str, str], path: str) -> Any:
    """Build dataclass `cls` from a YAML mapping, then apply EDGECOM_<PATH>_<KEY> overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # key=str: YAML keys may be numbers or null, which do not compare with strings.
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}: unknown key (known keys in {path}: {', '.join(fields)})"
        )
    values: dict[str, object] = {}
    for name, f in fields.items():
        key = f"{path}.{name}"
        env_name = "EDGECOM_" + key.upper().replace(".", "_")
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            values[name] = _build(f.default_factory, raw.get(name), env, key)
            continue
        try:
            if env_name in env:
                values[name] = _convert(env[env_name], f, from_env=True)
            elif name in raw:
                values[name] = _convert(raw[name], f, from_env=False)
        except ValueError as exc:
            source = env_name if env_name in env else key
            raise ConfigError(f"{source}: {exc}") from None
    return cls(**values)


def _from_go_layout(raw: dict) -> dict:
    """Accept a config.yaml written for the Go service: its server.url is our upstream.url."""
    server = raw.get("server")
    if isinstance(server, dict) and "url" in server:
        server = dict(server)
        upstream = dict(raw.get("upstream") or {})
        upstream.setdefault("url", server.pop("url"))
        raw = {**raw, "server": server, "upstream": upstream}
    return raw


def _validate(config: Config) -> None:
    try:
        validate_url_template(config.upstream.url)
    except ValueError as exc:
        raise ConfigError(f"upstream.url: {exc}") from None
    if not config.upstream.assets:
        raise ConfigError("upstream.assets: configure at least one asset id")
    if any(not asset.strip() for asset in config.upstream.assets):
        raise ConfigError("upstream.assets: an asset id must not be empty")
    if len(set(config.upstream.assets)) != len(config.upstream.assets):
        raise ConfigError("upstream.assets: an asset id is listed twice")
    for key, value in (
        ("server.port", config.server.port),
        ("metrics.port", config.metrics.port),
        ("database.port", config.database.port),
    ):
        if not 0 <= value <= 65535:
            raise ConfigError(f"{key}: expected a port number 0-65535, got {value}")
    positive = {
        "server.max_workers": config.server.max_workers,
        "server.max_open_streams": config.server.max_open_streams,
        "upstream.concurrency": config.upstream.concurrency,
        "upstream.chunk": config.upstream.chunk,
        "upstream.poll_interval": config.upstream.poll_interval,
        "upstream.retry_attempts": config.upstream.retry_attempts,
        "upstream.bootstrap": config.upstream.bootstrap,
        "upstream.timeout": config.upstream.timeout,
        "upstream.max_response_bytes": config.upstream.max_response_bytes,
        "database.connection_timeout": config.database.connection_timeout,
        "database.max_connections": config.database.max_connections,
        "query.max_points": config.query.max_points,
        "query.page_points": config.query.page_points,
        "query.max_streams": config.query.max_streams,
        "query.stream_idle_timeout": config.query.stream_idle_timeout,
        "storage.compress_after": config.storage.compress_after,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value}")
    for key, value in (
        ("cache.size", config.cache.size),
        ("cache.max_bytes", config.cache.max_bytes),
        ("rate_limit.rps", config.rate_limit.rps),
    ):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    if not math.isfinite(config.rate_limit.rps):
        raise ConfigError(f"rate_limit.rps: must be a finite number, got {config.rate_limit.rps}")
    if config.rate_limit.rps > 0 and config.rate_limit.burst < 1:
        raise ConfigError(
            f"rate_limit.burst: must be at least 1 while rate_limit.rps is on, "
            f"got {config.rate_limit.burst}"
        )
    if config.query.max_streams >= config.database.max_connections:
        raise ConfigError(
            f"query.max_streams: must be less than database.max_connections "
            f"({config.database.max_connections}), so that queries keep a connection while "
            f"streams are open, got {config.query.max_streams}"
        )
    held_workers = config.server.max_open_streams + config.query.max_streams
    if held_workers >= config.server.max_workers:
        raise ConfigError(
            f"server.max_open_streams: together with query.max_streams "
            f"({config.query.max_streams}) must be less than server.max_workers "
            f"({config.server.max_workers}), so that unary calls keep a worker while streams "
            f"are open, got {config.server.max_open_streams}"
        )
    if config.server.max_concurrent_rpcs < config.server.max_workers:
        raise ConfigError(
            f"server.max_concurrent_rpcs: must be at least server.max_workers "
            f"({config.server.max_workers}), got {config.server.max_concurrent_rpcs}"
        )
    if config.upstream.retry_max_backoff < BACKOFF_INITIAL_S:
        raise ConfigError(
            f"upstream.retry_max_backoff: must be at least {BACKOFF_INITIAL_S * 1000:g}ms "
            f"(the first wait), got {config.upstream.retry_max_backoff:g}s"
        )
    if config.upstream.overlap > config.upstream.bootstrap:
        raise ConfigError(
            f"upstream.overlap: must not exceed upstream.bootstrap "
            f"({config.upstream.overlap:g}s > {config.upstream.bootstrap:g}s)"
        )
    if config.storage.retention:
        try:
            if parse_duration(config.storage.retention) <= 0:
                raise ValueError("must be greater than 0; leave it empty to keep everything")
        except ValueError as exc:
            raise ConfigError(f"storage.retention: {exc}") from None
    if not config.metrics.host.strip():
        raise ConfigError(
            "metrics.host: must not be empty: 127.0.0.1 listens on loopback only, "
            "0.0.0.0 on every interface"
        )
    if any(not token for token in config.auth.tokens):
        raise ConfigError("auth.tokens: a token must not be empty")
    if config.upstream.chunk < STEP_S:
        raise ConfigError(f"upstream.chunk: must be at least 15m, got {config.upstream.chunk}s")
    if config.logging.level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(f"logging.level: unknown level {config.logging.level!r}")
    if config.logging.format not in ("auto", "text", "json"):
        raise ConfigError(
            f"logging.format: expected auto, text or json, got {config.logging.format!r}"
        )


def _one_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read config.yaml (or `path`), apply EDGECOM_* overrides from `env` and validate.

    Raises ConfigError with one line that names the key and the problem.
    """
    env = os.environ if env is None else env
    path = Path(path) if path else HERE / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines; the error must stay on one.
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections")
    raw = _from_go_layout(raw)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(fields)})")
    sections = {
        name: _build(f.default_factory, raw.get(name), env, name) for name, f in fields.items()
    }
    # The Go service spelled the placeholder {asset-id}.
    url = sections["upstream"].url.replace("{asset-id}", "{asset_id}")
    sections["upstream"] = dataclasses.replace(sections["upstream"], url=url)
    config = Config(**sections)
    _validate(config)
    return config


# --- queries -------------------------------------------------------------------------------


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


class InvalidRequest(ValueError):
    """The client sent something the service cannot answer; the message says what to change."""


class UnknownAsset(LookupError):
    """The requested asset is not one the service keeps."""


class TooManyPoints(Exception):
    """The answer would exceed query.max_points."""


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


def parse_window(window: str) -> int:
    """Return the length of a window such as `5m`, `1h` or `1d` in seconds.

    Raises InvalidRequest for calendar weeks and months, which have no fixed length.
    """
    parsed = parse_bucket_window(window)
    if parsed.unit != "s":
        raise InvalidRequest(f"window {_shown(window)} is calendar weeks or months, not a length")
    return parsed.count


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


def _default_window() -> tuple[int, int]:
    now = int(time.time())
    return now - int(UpstreamConfig.bootstrap), now


class TimeSeriesServicer(services.TimeSeriesServiceServicer):
    """Answers TimeSeriesService calls from the repository."""

    def __init__(
        self,
        *,
        repository: Repository,
        assets: Sequence[str],
        max_points: int,
        page_points: int = QueryConfig.page_points,
        window: Callable[[], tuple[int, int]] | None = None,
        clock: Callable[[], float] = time.time,
        max_streams: int = QueryConfig.max_streams,
        stream_idle_timeout_s: float = QueryConfig.stream_idle_timeout,
    ) -> None:
        self._repository = repository
        self._assets = tuple(assets)
        self._max_points = max_points
        self._page_points = page_points
        self._streams = StreamLimiter(max_streams=max_streams, idle_timeout_s=stream_idle_timeout_s)
        self._clock = clock
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
            response = protos.TimeSeriesResponse()
            data = response.data
            with (
                self._snapshot(context) as snapshot,
                closing(
                    self._series(snapshot, query, limit=self._max_points + 1, context=context)
                ) as series,
            ):
                for bucket, value, count in _until_call_ends(series, context):
                    if len(data) == self._max_points:
                        raise TooManyPoints(
                            f"the answer has more than {self._max_points} points, filled "
                            "buckets included: widen the window or shorten the range, or "
                            "read it with StreamTimeSeries"
                        )
                    point = data.add()
                    # Setting seconds directly is ~5x faster than Timestamp.FromDatetime.
                    point.time.seconds = bucket
                    point.value = value
                    point.count = count
            return response

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
                page = protos.TimeSeriesResponse()
                for bucket, value, count in _until_call_ends(series, context):
                    point = page.data.add()
                    point.time.seconds = bucket
                    point.value = value
                    point.count = count
                    if len(page.data) == self._page_points:
                        yield page
                        page = protos.TimeSeriesResponse()
                if page.data:
                    yield page

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
        buckets = query.buckets

        def read(grid: BucketGrid) -> Iterator[Bucket]:
            kwargs = dict(
                asset_id=query.asset_id,
                start_s=query.start_s,
                end_s=query.end_s,
                grid=grid,
                aggregation=query.aggregation,
            )
            if limit is None:
                return snapshot.iter_buckets(**kwargs, batch_size=self._page_points)
            return iter(snapshot.buckets(**kwargs, limit=limit))

        if buckets.layout == "epoch" and query.fill == "none":
            # The original query, alone: answers to requests without the newer fields stay
            # exactly what they were.
            yield from read(BucketGrid(window_s=buckets.stride_s))
            return
        extent = snapshot.extent(asset_id=query.asset_id, start_s=query.start_s, end_s=query.end_s)
        rows: Iterable[Bucket] = ()
        if extent.first_s is not None and extent.last_s is not None:
            # Edges only for the stored points' part of the range: a long range holding little
            # data costs nothing extra. Stored points millennia apart would take minutes.
            laid_out = buckets.edges(extent.first_s, extent.last_s + 1)
            edges = list(_until_call_ends(laid_out, context))
            rows = read(BucketGrid(window_s=buckets.stride_s, edges_s=edges))
        fill_end = query.end_s
        if extent.after is None and query.end_s > self._clock():
            # Nothing is invented past the last stored point while end is still ahead: the
            # fill ends with the bucket holding it, which may be the one holding start.
            last_s = extent.last_s
            if last_s is None and extent.before is not None:
                last_s = extent.before[0]
            fill_end = query.start_s
            if last_s is not None and last_s >= buckets.start_of(query.start_s):
                fill_end = min(query.end_s, max(last_s, query.start_s) + 1)
        lo, hi = fillable(
            query.fill,
            query.start_s,
            fill_end,
            first_s=extent.first_s,
            last_s=extent.last_s,
            before=extent.before,
            after=extent.after,
        )
        yield from fill_gaps(
            rows, buckets.starts(lo, hi), query.fill, before=extent.before, after=extent.after
        )


T = TypeVar("T")
# How many buckets an answer is built between checks that its call is still on: a few
# milliseconds of work.
_CHECK_EVERY = 4096


def _until_call_ends(items: Iterable[T], context: grpc.ServicerContext) -> Iterator[T]:
    """`items`, ending with QueryCancelled once the call is cancelled or past its deadline.

    An answer of millions of buckets is built in Python, where nothing else would notice
    that its client has gone: it would keep a core busy and a shutdown waiting.
    """
    for n, item in enumerate(items):
        if n % _CHECK_EVERY == 0:
            remaining = context.time_remaining()
            if not context.is_active() or (remaining is not None and remaining <= 0):
                raise QueryCancelled("the call ended before its answer did")
        yield item


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


# --- server --------------------------------------------------------------------------------


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
        log.debug("request does not decode: %s", request.error)
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request does not decode ({request.error[: _SHOWN_CHARS * 4]}): send a "
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
    if handler.request_streaming and handler.response_streaming:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler

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


class _DecodingRegistrar:
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
    registrar: Any = _DecodingRegistrar(server)
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


class HealthWatch:
    """Migrates the database once it answers, then keeps the health status in line with it."""

    def __init__(
        self,
        *,
        repository: Repository,
        health_servicer: health.HealthServicer,
        interval_s: float = HEALTH_CHECK_INTERVAL_S,
        prepare: Callable[[], object] | None = None,
    ) -> None:
        self._repository = repository
        # Runs once the database answers: migrations, then whatever else the schema needs.
        self._prepare = prepare or repository.migrate
        self._health = health_servicer
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._set(serving=False)

    def start(self) -> HealthWatch:
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the database is migrated and reachable; returns whether it is."""
        return self._ready.wait(timeout_s)

    def close(self) -> None:
        """Stop the watch thread; safe to call twice."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _set(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
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
            log.info(
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


def with_file_tokens(config: Config) -> Config:
    """config with the tokens of auth.tokens_file added to auth.tokens. Raises ConfigError.

    The file holds one token per line; blank lines and lines starting with # are ignored.
    """
    path = config.auth.tokens_file
    if not path:
        return config
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"auth.tokens_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"auth.tokens_file: {path} is not UTF-8 text") from None
    lines = (line.strip() for line in text.splitlines())
    tokens = tuple(line for line in lines if line and not line.startswith("#"))
    # An empty file must not quietly leave the API open: it is a Secret that did not arrive.
    if not tokens:
        raise ConfigError(
            f"auth.tokens_file: {path} holds no token (one per line; blank lines and # comments "
            "are ignored)"
        )
    auth = dataclasses.replace(config.auth, tokens=config.auth.tokens + tokens)
    return dataclasses.replace(config, auth=auth)


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


# Invalidation spans of cache keys that depend on every point before or after the range.
_FAR_PAST_S = -(2**63)
_FAR_FUTURE_S = 2**63


def build_interceptors(
    config: Config,
    *,
    metrics: Metrics,
    cache: QueryCache,
    drain: DrainInterceptor | None = None,
    cache_usable: Callable[[], bool] = lambda: True,
) -> tuple[grpc.ServerInterceptor, ...]:
    """The interceptor chain, outermost first: every call passes them in this order.

    While cache_usable() is false, queries neither read nor fill the cache.
    """
    assets = config.upstream.assets

    def cache_key(method: str, request: Any) -> CacheKey | None:
        if method != QUERY_METHOD or not cache_usable():
            return None
        query = parse_query(request, assets)
        # start_s and end_s of the key are the span whose changes invalidate the entry.
        start_s, end_s = query.start_s, query.end_s
        extra: tuple[object, ...] = (query.timezone, query.fill)
        if query.fill != "none":
            # A filled answer also depends on points outside the range ("previous" on the
            # one before start, "linear" on both neighbours, any fill on whether a point
            # follows an end still ahead) and on whether end is still ahead.
            future = query.end_s > time.time()
            extra += (query.start_s, query.end_s, future)
            if query.fill in ("previous", "linear"):
                start_s = _FAR_PAST_S
            if query.fill == "linear" or future:
                end_s = _FAR_FUTURE_S
        return CacheKey(query.asset_id, start_s, end_s, str(query.window), query.aggregation, extra)

    return (
        # Outside the rest, so that every call it counts is also seen to its end.
        drain or DrainInterceptor(),
        RequestLogInterceptor(),
        MetricsInterceptor(metrics),
        # Open streams bypass the rate limit and authentication: bounded here, before they
        # settle on a worker, and inside the log and metrics, so that refusals are seen there.
        OpenStreamLimitInterceptor(config.server.max_open_streams),
        # Before authentication, so that every call takes a token: wrong token guesses are
        # limited like any other call.
        RateLimitInterceptor(
            config.rate_limit.rps,
            config.rate_limit.burst,
            trust_client_id=config.rate_limit.trust_client_id,
            metrics=metrics,
        ),
        AuthInterceptor(config.auth.tokens),
        CacheInterceptor(cache, cache_key, metrics),
    )


def run(
    config: Config,
    stop: threading.Event,
    *,
    credentials: grpc.ServerCredentials | None = None,
    progress_stream: Any = None,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Run the service until `stop` is set, then shut it down in order. Blocks.

    Resources are entered in dependency order so the ExitStack closes them in reverse:
    scheduler, ingestor (its asset syncs), upstream client, change listener, pool,
    embedded database.
    """
    with ExitStack() as stack:
        if config.database.embedded:
            embedded = stack.enter_context(EmbeddedPostgres(data_dir=config.database.data_dir))
            dsn = embedded.dsn
        else:
            dsn = config.database.dsn()
        metrics = Metrics()
        if config.metrics.port:
            metrics_server = stack.enter_context(
                start_metrics_server(metrics, host=config.metrics.host, port=config.metrics.port)
            )
            log.info(
                "metrics served",
                extra={
                    "host": config.metrics.host,
                    "port": metrics_server.port,
                    "path": "/metrics",
                },
            )
        repository = stack.enter_context(
            Repository(
                dsn=dsn,
                max_connections=config.database.max_connections,
                connect_timeout_s=config.database.connection_timeout,
                # One connection for each chunk stored at once.
                write_connections=config.upstream.concurrency,
            )
        )
        cache = QueryCache(config.cache.size, max_bytes=config.cache.max_bytes, metrics=metrics)
        listener = stack.enter_context(
            ChangeListener(
                dsn=dsn,
                # A change to the point at last_s must drop entries whose range holds it.
                on_change=lambda asset_id, first_s, last_s: cache.invalidate(
                    asset_id, first_s, last_s + 1
                ),
                on_reconnect=cache.clear,
            )
        )
        health_servicer = health.HealthServicer()
        retention = config.storage.retention

        def prepare_database() -> list[str]:
            applied = repository.migrate()
            repository.apply_storage_policies(
                compress_after_s=config.storage.compress_after,
                retention_s=parse_duration(retention) if retention else None,
            )
            return applied

        watch = stack.enter_context(
            closing(
                HealthWatch(
                    repository=repository,
                    health_servicer=health_servicer,
                    prepare=prepare_database,
                )
            )
        )
        observer = IngestMetrics(metrics, progress_stream=progress_stream)
        client = stack.enter_context(
            ApiClient(
                url_template=config.upstream.url,
                timeout_s=config.upstream.timeout,
                max_attempts=config.upstream.retry_attempts,
                backoff_max_s=config.upstream.retry_max_backoff,
                on_request=observer.upstream_request,
                stop=stop,
                max_response_bytes=config.upstream.max_response_bytes,
            )
        )
        ingestor = stack.enter_context(
            Ingestor(
                client=client,
                repository=repository,
                assets=config.upstream.assets,
                bootstrap_s=config.upstream.bootstrap,
                chunk_s=config.upstream.chunk,
                concurrency=config.upstream.concurrency,
                overlap_s=config.upstream.overlap,
                observer=observer,
            )
        )
        servicer = TimeSeriesServicer(
            repository=repository,
            assets=config.upstream.assets,
            max_points=config.query.max_points,
            page_points=config.query.page_points,
            window=ingestor.window,
            max_streams=config.query.max_streams,
            stream_idle_timeout_s=config.query.stream_idle_timeout,
        )
        drain = DrainInterceptor()
        server, port = create_server(
            address=f"{config.server.host}:{config.server.port}",
            servicer=servicer,
            health_servicer=health_servicer,
            max_workers=config.server.max_workers,
            max_concurrent_rpcs=config.server.max_concurrent_rpcs,
            interceptors=build_interceptors(
                config,
                metrics=metrics,
                cache=cache,
                # Writes by other replicas go unheard while the listener is not listening
                # (before its first LISTEN, or after a drop): its cache is stale then.
                cache_usable=lambda: listener.wait_listening(0),
                drain=drain,
            ),
            credentials=credentials,
        )
        server.start()
        watch.start()
        log.info(
            "serving",
            extra={
                "address": f"{config.server.host}:{port}",
                "tls": credentials is not None,
                "version": VERSION,
            },
        )

        def ingest(stop_ingest: threading.Event) -> None:
            # Ingestion needs the migrated schema: wait for it, but never past a shutdown.
            while not watch.wait_ready(1.0):
                if stop_ingest.is_set():
                    return
            # Starts the syncs and returns: an asset stuck on its upstream must not delay
            # the next poll of the others.
            ingestor.start_round()

        stack.enter_context(
            Scheduler(ingest, interval_s=config.upstream.poll_interval, name="ingest")
        )
        if on_ready:
            on_ready(port)
        stop.wait()
        # Probes see NOT_SERVING first, so load balancers stop sending before the port closes.
        health_servicer.enter_graceful_shutdown()
        stopped = server.stop(config.server.grace_period)
        # Calls get the whole grace period, but once none is left, open-ended health Watch
        # streams need not hold the exit: a smaller grace makes grpcio stop at once.
        if drain.wait_idle(config.server.grace_period):
            server.stop(0)
        stopped.wait()
        log.info("server stopped")


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse flags, load config, serve until SIGINT/SIGTERM. Returns the exit code."""
    args = _parse_args(argv)
    if args.health_check:
        return _health_check_main(args.config)
    try:
        config = with_file_tokens(load_config(args.config))
        credentials = server_credentials(config.server.tls)
    except ConfigError as exc:
        print(f"edgecom: configuration error: {exc}", file=sys.stderr)
        return 2
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
        except (OSError, DatabaseUnavailable) as exc:
            log.error("cannot start", extra={"error": str(exc)})
            return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
