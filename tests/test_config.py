"""Configuration loading: defaults, environment overrides, Go-service configs and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import config
import edgecom
from config import ConfigError, load_config, parse_duration


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_repository_config_yaml_matches_the_defaults():
    assert load_config(ROOT / "config.yaml", env={}) == config.Config()


def test_defaults_when_sections_are_missing(tmp_path):
    config = load_config(write(tmp_path, "server: {port: 6000}\n"), env={})
    assert config.server.port == 6000
    assert config.server.grace_period == 10.0
    assert config.upstream.bootstrap == 730 * 86400
    assert config.database.embedded


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("730d", 730 * 86400),
        (42, 42),
        ("42", 42),
        ("1.5s", 1.5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_environment_overrides_every_kind_of_key(tmp_path):
    env = {
        "EDGECOM_DATABASE_URL": "postgresql://u@db/x",
        "EDGECOM_SERVER_PORT": "6001",
        "EDGECOM_SERVER_GRACE_PERIOD": "3s",
        "EDGECOM_UPSTREAM_ASSETS": "a, b,c",
        "EDGECOM_RATE_LIMIT_RPS": "2.5",
        "EDGECOM_SERVER_TLS_CERT_FILE": "/certs/tls.crt",
    }
    config = load_config(ROOT / "config.yaml", env=env)
    assert config.database.url == "postgresql://u@db/x"
    assert not config.database.embedded
    assert config.server.port == 6001
    assert config.server.grace_period == 3
    assert config.upstream.assets == ("a", "b", "c")
    assert config.rate_limit.rps == 2.5
    assert config.server.tls.cert_file == "/certs/tls.crt"


def test_go_service_config_still_works(tmp_path):
    path = write(
        tmp_path,
        """
server:
  url: "https://api.edgecomenergy.net/core/asset/{asset-id}/series"
database:
  host: db.internal
  port: 5433
  name: energy
  user: svc
  password: "s3cr'et"
  ssl_mode: require
  max_connections: 20
  connection_timeout: 10s
""",
    )
    config = load_config(path, env={})
    assert config.upstream.url == "https://api.edgecomenergy.net/core/asset/{asset_id}/series"
    assert config.database.max_connections == 20
    assert config.database.connection_timeout == 10
    dsn = config.database.dsn()
    assert "host='db.internal'" in dsn and "port='5433'" in dsn and "sslmode='require'" in dsn
    assert "password='s3cr\\'et'" in dsn


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("server: {prot: 1}\n", {}, "server.prot: unknown key"),
        ("sever: {}\n", {}, "sever: unknown section"),
        ("server: {port: eighty}\n", {}, "server.port: expected a whole number"),
        ("upstream: {timeout: soon}\n", {}, "upstream.timeout: expected a duration"),
        ("upstream: {url: 'https://x/series'}\n", {}, "upstream.url: upstream url"),
        ("upstream: {url: 'ftp://x/{asset_id}'}\n", {}, "upstream.url"),
        ("", {"EDGECOM_SERVER_PORT": "x"}, "EDGECOM_SERVER_PORT: expected a whole number"),
        ("upstream: {assets: []}\n", {}, "upstream.assets"),
        ("upstream: {assets: ['a', '']}\n", {}, "upstream.assets: an asset id must not be empty"),
        ("", {"EDGECOM_UPSTREAM_ASSETS": "a,b,a"}, "upstream.assets: an asset id is listed twice"),
        ("logging: {format: xml}\n", {}, "logging.format"),
        ("query: {max_streams: 0}\n", {}, "query.max_streams: must be greater than 0"),
        ("database: {max_connections: 4}\n", {}, "query.max_streams: must be less than"),
        ("query: {stream_idle_timeout: 0}\n", {}, "query.stream_idle_timeout: must be greater"),
        ("server: {max_open_streams: 0}\n", {}, "server.max_open_streams: must be greater than 0"),
        ("server: {max_workers: 8}\n", {}, "server.max_open_streams: together with query"),
        ("server: {max_workers: 200}\n", {}, "server.max_concurrent_rpcs: must be at least"),
        ("upstream: {bootstrap: 0}\n", {}, "upstream.bootstrap: must be greater than 0"),
        ("upstream: {bootstrap: 1h, overlap: 2h}\n", {}, "upstream.overlap: must not exceed"),
        ("upstream: {chunk: 1m}\n", {}, "upstream.chunk: must be at least 15m"),
        ("upstream: {max_response_bytes: 0}\n", {}, "upstream.max_response_bytes: must be"),
        ("storage: {retention: 0}\n", {}, "storage.retention"),
        ("storage: {rollup_timezones: [Mars/Olympus]}\n", {}, "storage.rollup_timezones: unknown"),
        ("", {"EDGECOM_STORAGE_ROLLUP_TIMEZONES": "Etc/UTC"}, "storage.rollup_timezones: 'Etc"),
        ("auth: {tokens: ['a', '']}\n", {}, "auth.tokens"),
        ("", {"EDGECOM_UPSTREAM_RETRY_ATTEMPTS": "0"}, "upstream.retry_attempts"),
        ("server: [1, 2]\n", {}, "server: expected a mapping"),
        ("server: {port: 1\n", {}, "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, env, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert expected in str(info.value)


def test_bad_config_stops_start_up_with_one_line_and_exit_code_2(tmp_path):
    path = write(tmp_path, "upstream: {timeout: soon}\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "edgecom.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "upstream.timeout" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "env", "expected"),
    [
        (b"\xff\xfeserver: {}\n", {}, "not UTF-8"),
        (b"1: a\nfoo: b\n", {}, "1: unknown section"),
        (b"server: {1: a, foo: b}\n", {}, "server.1: unknown key"),
        (b"a: [\n", {}, "not valid YAML: line 2"),
        (b"", {"EDGECOM_RATE_LIMIT_RPS": "nan"}, "rate_limit.rps"),
        (b"", {"EDGECOM_RATE_LIMIT_RPS": "inf"}, "rate_limit.rps"),
        (b"rate_limit: {burst: 0}\n", {}, "rate_limit.burst"),
        (b"", {"EDGECOM_UPSTREAM_TIMEOUT": "0"}, "upstream.timeout"),
        (b"", {"EDGECOM_UPSTREAM_RETRY_MAX_BACKOFF": "100ms"}, "upstream.retry_max_backoff"),
        (b"", {"EDGECOM_DATABASE_CONNECTION_TIMEOUT": "0"}, "database.connection_timeout"),
    ],
)
def test_odd_config_stops_start_up_with_one_line_and_exit_code_2(
    tmp_path, monkeypatch, capsys, content, env, expected
):
    # In process: main() is what the command runs; the exit-code path of the real
    # process is the subprocess test above.
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    for key, value in {"EDGECOM_DATABASE_URL": "postgresql://u@127.0.0.1:1/x", **env}.items():
        monkeypatch.setenv(key, value)
    assert edgecom.main(["--config", str(path)]) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert expected in lines[0]


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", env={})


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        edgecom.main(["--help"])
    assert info.value.code == 0
    stdout = capsys.readouterr().out
    assert "--config" in stdout and "EDGECOM_" in stdout


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("rate_limit: {trust_client_id: true}\n", {}, True),
        ("rate_limit: {trust_client_id: no}\n", {}, False),  # a YAML 1.1 boolean
        ("", {"EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID": "true"}, True),
        ("", {"EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID": " 1 "}, True),
        ("", {"EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID": "YES"}, True),
        (
            "rate_limit: {trust_client_id: true}\n",
            {"EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID": "0"},
            False,
        ),
        ("", {"EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID": "False"}, False),
        ("", {"EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID": "no"}, False),
    ],
)
def test_booleans_from_yaml_and_environment(tmp_path, text, env, expected):
    assert load_config(write(tmp_path, text), env=env).rate_limit.trust_client_id is expected


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        (
            "rate_limit: {trust_client_id: 'maybe'}\n",
            {},
            "rate_limit.trust_client_id: expected true or false",
        ),
        (
            "rate_limit: {trust_client_id: 1}\n",
            {},
            "rate_limit.trust_client_id: expected true or false",
        ),
        (
            "",
            {"EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID": "on?"},
            "EDGECOM_RATE_LIMIT_TRUST_CLIENT_ID: expected true or false",
        ),
        ("cache: {max_bytes: -1}\n", {}, "cache.max_bytes: must not be negative"),
        (
            "",
            {"EDGECOM_CACHE_MAX_BYTES": "64MiB"},
            "EDGECOM_CACHE_MAX_BYTES: expected a whole number",
        ),
    ],
)
def test_bad_cache_and_rate_limit_keys_name_the_key(tmp_path, text, env, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_go_service_url_with_a_literal_asset_id_is_that_one_asset(tmp_path):
    url = "https://api.edgecomenergy.net/core/asset/3662953a-1396/series"
    config = load_config(write(tmp_path, f"server:\n  url: {url}\n"), env={})
    assert config.upstream.url == url
    assert config.upstream.assets == ("3662953a-1396",)
    listed = load_config(
        write(tmp_path, f"server: {{url: '{url}'}}\nupstream: {{assets: [x]}}\n"), env={}
    )
    assert listed.upstream.assets == ("x",)


def test_url_without_placeholder_and_several_assets_names_upstream_url(tmp_path):
    text = "upstream: {url: 'https://x/core/asset/a/series', assets: [a, b]}\n"
    with pytest.raises(ConfigError, match=r"^upstream\.url: .*lists 2"):
        load_config(write(tmp_path, text), env={})
