"""Tests of the EdgeCom API simulator over real HTTP on port 0."""

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from simulator import Faults, RequestRecord, Simulator

ROOT = Path(__file__).resolve().parents[1]

# A fixed "now" in the middle of a 15-minute step keeps future-data checks exact.
NOW = datetime(2024, 1, 10, 12, 7, 30, tzinfo=UTC).timestamp()
ASSET = "3662953a-1396-4996-a1b6-99a0c5e7a5de"
DAY_S = 86_400


def _ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def _query(start: str, end: str) -> dict[str, str]:
    return {"start": start, "end": end}


@pytest.fixture
def http() -> httpx.Client:
    with httpx.Client(timeout=5.0) as client:
        yield client


@pytest.fixture
def sim() -> Simulator:
    with Simulator(seed=7, now=lambda: NOW) as simulator:
        yield simulator


def _get(
    http: httpx.Client, sim: Simulator, start: str, end: str, asset: str = ASSET
) -> httpx.Response:
    url = sim.url_template.replace("{asset_id}", asset)
    return http.get(url, params=_query(start, end))


def _is_valid(item: object) -> bool:
    if not isinstance(item, dict) or set(item) != {"time", "value"}:
        return False
    t, value = item["time"], item["value"]
    return type(t) is int and type(value) in (int, float) and math.isfinite(value) and t % 900 == 0


# -- profile and determinism ---------------------------------------------------------------


def test_same_seed_gives_same_answers_whatever_the_order(http: httpx.Client) -> None:
    windows = [
        ("2023-09-13T00:00:00", "2023-09-14T00:00:00"),
        ("2023-01-01T00:00:00", "2023-01-02T00:00:00"),
    ]
    with Simulator(seed=3, now=lambda: NOW) as first, Simulator(seed=3, now=lambda: NOW) as second:
        forward = [_get(http, first, *w).content for w in windows]
        backward = [_get(http, second, *w).content for w in reversed(windows)]
    assert forward == list(reversed(backward))


def test_seed_and_asset_change_the_values(sim: Simulator) -> None:
    start, end = _ts("2023-09-13T00:00:00"), _ts("2023-09-14T00:00:00")
    with Simulator(seed=8, now=lambda: NOW) as other_seed:
        assert other_seed.points(ASSET, start, end) != sim.points(ASSET, start, end)
    assert sim.points("other-asset", start, end) != sim.points(ASSET, start, end)


def test_profile_looks_like_a_load_curve(sim: Simulator) -> None:
    winter = sim.points(ASSET, _ts("2023-01-09T00:00:00"), _ts("2023-01-16T00:00:00"))
    summer = sim.points(ASSET, _ts("2023-07-10T00:00:00"), _ts("2023-07-17T00:00:00"))
    values = [v for _, v in winter + summer]
    assert all(10.0 < v < 5000.0 for v in values)
    assert all(round(v, 3) == v for v in values)
    assert len(set(values)) > len(values) * 0.9  # noisy, not a flat line

    def mean_at(points: list[tuple[int, float]], hours: range) -> float:
        chosen = [v for t, v in points if (t % DAY_S) // 3600 in hours]
        return sum(chosen) / len(chosen)

    evening, night = mean_at(winter, range(17, 21)), mean_at(winter, range(1, 5))
    assert evening > 1.3 * night
    assert mean_at(winter, range(24)) > 1.2 * mean_at(summer, range(24))


# -- range semantics and format ------------------------------------------------------------


def test_answer_format_matches_the_api(http: httpx.Client, sim: Simulator) -> None:
    response = _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T06:00:00")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    items = response.json()["result"]
    assert len(items) == 24
    assert all(_is_valid(item) for item in items)
    expected = sim.points(ASSET, _ts("2023-09-13T00:00:00"), _ts("2023-09-13T06:00:00"))
    assert [(i["time"], i["value"]) for i in items] == expected


def test_range_is_half_open_and_aligned_to_15_minutes(http: httpx.Client, sim: Simulator) -> None:
    items = _get(http, sim, "2023-09-13T00:07:00", "2023-09-13T01:00:00").json()["result"]
    times = [item["time"] for item in items]
    assert times == [
        _ts("2023-09-13T00:15:00"),
        _ts("2023-09-13T00:30:00"),
        _ts("2023-09-13T00:45:00"),
    ]
    empty = _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T00:00:00").json()
    assert empty == {"result": []}


def test_no_points_after_now(http: httpx.Client, sim: Simulator) -> None:
    items = _get(http, sim, "2024-01-10T11:00:00", "2024-01-11T00:00:00").json()["result"]
    assert [item["time"] for item in items][-1] == _ts("2024-01-10T12:00:00")
    assert sim.points(ASSET, _ts("2024-01-10T12:15:00"), _ts("2024-01-12T00:00:00")) == []


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        ({"start": "2023-09-13T00:00:00"}, "end"),
        ({"end": "2023-09-13T00:00:00"}, "start"),
        (_query("2023-09-13", "2023-09-14T00:00:00"), "start"),
        (_query("2023-09-13T00:00:00", "2023-09-13T00:00:00+02:00"), "end"),
        (_query("2023-09-14T00:00:00", "2023-09-13T00:00:00"), "before"),
    ],
)
def test_bad_query_answers_400_with_a_json_error(
    http: httpx.Client, sim: Simulator, query: dict[str, str], mentions: str
) -> None:
    response = http.get(sim.url_template.replace("{asset_id}", ASSET), params=query)
    assert response.status_code == 400
    assert mentions in response.json()["error"]


@pytest.mark.parametrize(
    "path", ["/", "/core/asset/x/values", "/core/asset//series", "/core/asset/a/b/series"]
)
def test_unknown_paths_answer_404(http: httpx.Client, sim: Simulator, path: str) -> None:
    response = http.get(f"http://127.0.0.1:{sim.port}{path}")
    assert response.status_code == 404
    assert "expected /core/asset/{asset_id}/series" in response.json()["error"]


def test_asset_id_is_url_decoded(http: httpx.Client, sim: Simulator) -> None:
    _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00", asset="a%2Fb%20c")
    assert sim.requests[-1].asset_id == "a/b c"


# -- faults -----------------------------------------------------------------------------


def test_not_found_assets_answer_404(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.not_found_assets.add("ghost")
    assert _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00", "ghost").status_code == 404
    assert _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00").status_code == 200


def test_max_range_rejects_longer_requests(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.max_range_s = DAY_S
    assert _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00").status_code == 200
    response = _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:15:00")
    assert response.status_code == 400
    assert "too large" in response.json()["error"]
    assert str(DAY_S) in response.json()["error"]


def test_outage_fails_every_request_until_lifted(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.outage = True
    statuses = {
        _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00").status_code for _ in range(5)
    }
    assert statuses == {503}
    sim.faults.outage = False
    assert _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00").status_code == 200


def test_error_rate_mixes_failures_into_answers(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.error_rate = 0.5
    statuses = [
        _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00").status_code for _ in range(60)
    ]
    assert set(statuses) == {200, 429, 500, 503}
    assert 15 < statuses.count(200) < 45


def test_rate_limit_answers_carry_retry_after(http: httpx.Client, sim: Simulator) -> None:
    sim.faults = Faults(error_rate=1.0, error_statuses=(429,), retry_after_s=7)
    response = _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"


def test_fault_sequence_is_deterministic_per_seed(http: httpx.Client) -> None:
    def statuses(seed: int) -> list[int]:
        with Simulator(seed=seed, faults=Faults(error_rate=0.5), now=lambda: NOW) as simulator:
            for _ in range(30):
                _get(http, simulator, "2023-09-13T00:00:00", "2023-09-13T01:00:00")
            return [record.status for record in simulator.requests]

    assert statuses(11) == statuses(11)
    assert statuses(11) != statuses(12)


def test_slow_answers_are_delayed(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.slow_rate, sim.faults.slow_s = 1.0, 0.3
    started = time.monotonic()
    assert _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00").status_code == 200
    assert time.monotonic() - started >= 0.3
    with pytest.raises(httpx.ReadTimeout):
        http.get(
            sim.url_template.replace("{asset_id}", ASSET),
            params=_query("2023-09-13T00:00:00", "2023-09-13T01:00:00"),
            timeout=0.1,
        )
    sim.faults.slow_rate = 0.0
    started = time.monotonic()
    _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00")
    assert time.monotonic() - started < 0.25


def test_garbage_bodies_are_unusable(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.garbage_rate = 1.0
    kinds = set()
    for _ in range(30):
        response = _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00")
        assert response.status_code == 200
        try:
            payload = response.json()
        except ValueError:
            kinds.add("html" if response.text.startswith("<") else "truncated")
            continue
        assert not isinstance(payload.get("result"), list)
        kinds.add("no result")
    assert kinds == {"html", "truncated", "no result"}


def test_bad_items_replace_a_share_of_points(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.bad_item_rate = 0.3
    items = _get(http, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00").json()["result"]
    truth = sim.points(ASSET, _ts("2023-09-13T00:00:00"), _ts("2023-09-14T00:00:00"))
    valid = [(i["time"], i["value"]) for i in items if _is_valid(i)]
    assert len(items) == len(truth)
    assert 10 < len(items) - len(valid) < 50
    assert set(valid) <= set(truth)


def test_revise_changes_later_answers(http: httpx.Client, sim: Simulator) -> None:
    t = _ts("2023-09-13T00:30:00")
    before = _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00").json()["result"]
    sim.revise(ASSET, t, 1234.5)
    after = _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00").json()["result"]
    assert {i["time"]: i["value"] for i in after}[t] == 1234.5
    assert [i for i in after if i["time"] != t] == [i for i in before if i["time"] != t]
    assert dict(sim.points(ASSET, t, t + 900)) == {t: 1234.5}
    assert sim.points("other-asset", t, t + 900)[0][1] != 1234.5
    with pytest.raises(ValueError, match="multiple of 900"):
        sim.revise(ASSET, t + 1, 1.0)


# -- request log and lifecycle --------------------------------------------------------------


def test_requests_are_recorded_and_can_be_reset(http: httpx.Client, sim: Simulator) -> None:
    sim.faults.not_found_assets.add("ghost")
    _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00")
    _get(http, sim, "2023-09-13T00:00:00", "2023-09-13T01:00:00", "ghost")
    http.get(f"http://127.0.0.1:{sim.port}/nowhere")
    assert sim.requests == [
        RequestRecord(ASSET, _ts("2023-09-13T00:00:00"), _ts("2023-09-13T01:00:00"), 200),
        RequestRecord("ghost", None, None, 404),
        RequestRecord(None, None, None, 404),
    ]
    assert sim.request_count == 3
    sim.reset_counts()
    assert sim.requests == []
    assert sim.request_count == 0


def test_concurrent_requests_are_counted_and_consistent(sim: Simulator) -> None:
    bodies: list[bytes] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=5.0) as client:
            for _ in range(5):
                body = _get(client, sim, "2023-09-13T00:00:00", "2023-09-14T00:00:00").content
                with lock:
                    bodies.append(body)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sim.request_count == 40
    assert len(set(bodies)) == 1
    assert json.loads(bodies[0])["result"]


def test_close_is_idempotent_and_frees_the_port() -> None:
    simulator = Simulator()
    simulator.close()  # never started
    with pytest.raises(RuntimeError, match="not running"):
        simulator.url_template  # noqa: B018
    simulator.start()
    port = simulator.port
    simulator.close()
    simulator.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_close_does_not_wait_for_slow_answers(http: httpx.Client) -> None:
    simulator = Simulator(faults=Faults(slow_rate=1.0, slow_s=30.0)).start()
    thread = threading.Thread(
        target=lambda: _get(http, simulator, "2023-09-13T00:00:00", "2023-09-13T01:00:00"),
        daemon=True,
    )
    thread.start()
    while simulator.request_count == 0:
        time.sleep(0.01)
    started = time.monotonic()
    simulator.close()
    thread.join(5.0)
    assert time.monotonic() - started < 2.0
    assert not thread.is_alive()


def test_command_line_serves_until_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "simulator.py"), "--port", str(port), "--seed", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/core/asset/{ASSET}/series"
        deadline = time.monotonic() + 10.0
        while True:
            try:
                response = httpx.get(
                    url, params=_query("2023-09-13T00:00:00", "2023-09-13T01:00:00")
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "simulator did not start listening"
                time.sleep(0.05)
        assert response.status_code == 200
        assert len(response.json()["result"]) == 4
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=5.0)
    finally:
        process.kill()
    assert process.returncode == 0
    assert f"127.0.0.1:{port}" in output
    assert "GET" not in output  # quiet: no access log by default
