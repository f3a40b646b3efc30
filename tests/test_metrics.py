"""Tests of the metric definitions and of the HTTP endpoint that serves them."""

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from metrics import Metrics, start_metrics_server

# The exposed names other components and dashboards rely on, with the Prometheus type of each.
EXPOSED = {
    "edgecom_grpc_requests_total": "counter",
    "edgecom_grpc_request_duration_seconds": "histogram",
    "edgecom_cache_hits_total": "counter",
    "edgecom_cache_misses_total": "counter",
    "edgecom_cache_entries": "gauge",
    "edgecom_cache_bytes": "gauge",
    "edgecom_rate_limited_total": "counter",
    "edgecom_ingested_points_total": "counter",
    "edgecom_skipped_points_total": "counter",
    "edgecom_upstream_requests_total": "counter",
    "edgecom_upstream_request_duration_seconds": "histogram",
    "edgecom_last_successful_fetch_timestamp_seconds": "gauge",
    "edgecom_coverage_ratio": "gauge",
}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def _types(text: str) -> dict[str, str]:
    """Map each '# TYPE name kind' line of an exposition to name -> kind."""
    lines = (line.split() for line in text.splitlines() if line.startswith("# TYPE "))
    return {parts[2]: parts[3] for parts in lines}


def test_every_metric_is_exposed_under_its_exact_name_and_type() -> None:
    metrics = Metrics()
    with start_metrics_server(metrics, host="127.0.0.1", port=0) as server:
        text = _scrape(server.port)
    types = _types(text)
    for name, kind in EXPOSED.items():
        assert types.get(name) == kind, name
    families = {family.name for family in text_string_to_metric_families(text)}
    for name in EXPOSED:
        assert name.removesuffix("_total") in families, name


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.cache_hits.inc(3)
    assert first.registry.get_sample_value("edgecom_cache_hits_total") == 3
    assert second.registry.get_sample_value("edgecom_cache_hits_total") == 0


def test_an_injected_registry_is_used() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.ingested_points.labels(asset_id="a").inc(5)
    assert metrics.registry is registry
    assert registry.get_sample_value("edgecom_ingested_points_total", {"asset_id": "a"}) == 5


def test_values_reach_the_endpoint() -> None:
    metrics = Metrics()
    metrics.coverage_ratio.labels(asset_id="a").set(0.5)
    metrics.upstream_request_duration.observe(0.3)
    with start_metrics_server(metrics, host="127.0.0.1", port=0) as server:
        text = _scrape(server.port)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("edgecom_coverage_ratio", (("asset_id", "a"),))] == 0.5
    assert samples[("edgecom_upstream_request_duration_seconds_count", ())] == 1
    assert samples[("edgecom_upstream_request_duration_seconds_bucket", (("le", "0.5"),))] == 1


def test_close_is_idempotent_and_frees_the_port() -> None:
    server = start_metrics_server(Metrics(), host="127.0.0.1", port=0)
    port = server.port
    assert port > 0
    server.close()
    server.close()
    with pytest.raises(OSError):
        _scrape(port)
    # The socket is released: the same port can be bound again at once.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
