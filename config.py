"""EdgeCom configuration: frozen dataclasses read from config.yaml with EDGECOM_* overrides."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from api_client import (
    BACKOFF_MAX_S,
    MAX_RESPONSE_BYTES,
    RETRY_ATTEMPTS,
    validate_url_template,
)
from interceptors import DEFAULT_CACHE_MAX_BYTES
from scheduler import STEP_S
from service import MAX_STREAMS, PAGE_POINTS, STREAM_IDLE_TIMEOUT_S, InvalidRequest, parse_timezone

HERE = Path(__file__).resolve().parent


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
    page_points: int = PAGE_POINTS
    # Each open stream holds a pool connection: fewer streams than database.max_connections
    # leaves connections for unary queries however many clients stream.
    max_streams: int = MAX_STREAMS
    stream_idle_timeout: float = _duration(STREAM_IDLE_TIMEOUT_S)


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
    # IANA zones whose local days are rolled up, for fast day, week and month buckets there.
    rollup_timezones: tuple[str, ...] = ()

    @property
    def retention_s(self) -> float | None:
        """storage.retention in seconds, None to keep everything. Raises ValueError."""
        return parse_duration(self.retention) if self.retention else None


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


# Where the EdgeCom API puts the asset id in a series URL.
_ASSET_IN_URL_RE = re.compile(r"/asset/([^/]+)/series/?$")


def _one_asset_url(upstream: UpstreamConfig, *, assets_set: bool) -> UpstreamConfig:
    """A url without the {asset_id} placeholder, as the Go service's config has it, is the
    URL of exactly one asset: the one upstream.assets lists or, when assets is not set,
    the one the URL's path names (.../asset/<id>/series). Raises ConfigError.
    """
    if "{asset_id}" in upstream.url:
        return upstream
    if assets_set:
        if len(upstream.assets) > 1:
            raise ConfigError(
                f"upstream.url: {upstream.url!r} has no {{asset_id}} placeholder, so it is the "
                f"URL of one asset, but upstream.assets lists {len(upstream.assets)}: put "
                "{asset_id} where the asset id goes, or list one asset"
            )
        return upstream
    match = _ASSET_IN_URL_RE.search(urlsplit(upstream.url.strip()).path)
    if not match:
        try:
            validate_url_template(upstream.url)
        except ValueError as exc:
            raise ConfigError(f"upstream.url: {exc}") from None
        return upstream
    return dataclasses.replace(upstream, assets=(unquote(match.group(1)),))


def _validate(config: Config) -> None:
    try:
        validate_url_template(config.upstream.url, one_asset=len(config.upstream.assets) == 1)
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
    if config.cache.max_bytes < 0:
        raise ConfigError(f"cache.max_bytes: must not be negative, got {config.cache.max_bytes}")
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
    if config.upstream.overlap > config.upstream.bootstrap:
        raise ConfigError(
            f"upstream.overlap: must not exceed upstream.bootstrap "
            f"({config.upstream.overlap:g}s > {config.upstream.bootstrap:g}s)"
        )
    try:
        retention_s = config.storage.retention_s
    except ValueError as exc:
        raise ConfigError(f"storage.retention: {exc}") from None
    if retention_s is not None and retention_s <= 0:
        raise ConfigError(
            "storage.retention: must be greater than 0; leave it empty to keep everything"
        )
    for zone in config.storage.rollup_timezones:
        try:
            name, _ = parse_timezone(zone)
        except InvalidRequest as exc:
            raise ConfigError(f"storage.rollup_timezones: {exc}") from None
        if name == "UTC":
            raise ConfigError(
                f"storage.rollup_timezones: {zone!r} is UTC, whose days are always rolled up: "
                "list only other zones"
            )
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
    assets_set = "assets" in (raw.get("upstream") or {}) or "EDGECOM_UPSTREAM_ASSETS" in env
    sections["upstream"] = _one_asset_url(sections["upstream"], assets_set=assets_set)
    config = Config(**sections)
    _validate(config)
    return config


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
