"""ChangeListener against a real PostgreSQL: notifications from writes, reconnects, shutdown."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest
from conftest import ASSET, OTHER_ASSET, wait_for

from repository import LISTENER_APPLICATION_NAME, NOTIFY_CHANNEL, ChangeListener

T0 = 1_700_006_400
UNREACHABLE_DSN = "postgresql://nobody@127.0.0.1:1/none"


class Recorder:
    """Collects what a listener reports, from its thread."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, int, int]] = []
        self.reconnects = 0

    def on_change(self, asset_id: str, first_s: int, last_s: int) -> None:
        self.changes.append((asset_id, first_s, last_s))

    def on_reconnect(self) -> None:
        self.reconnects += 1

    def listener(self, dsn: str, **kwargs: float) -> ChangeListener:
        kwargs = {"reconnect_delay_s": 0.05, "max_reconnect_delay_s": 0.2, **kwargs}
        return ChangeListener(
            dsn=dsn, on_change=self.on_change, on_reconnect=self.on_reconnect, **kwargs
        )


def listener_backends(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (LISTENER_APPLICATION_NAME,),
        ).fetchall()
    return [pid for (pid,) in rows]


def terminate_listener(dsn: str) -> int:
    """Terminate the listener's backend in this test's database; returns how many were."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # In the select list, not the WHERE clause, so that only the rows the filter keeps
        # are terminated: the planner may evaluate WHERE conditions in any order.
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (LISTENER_APPLICATION_NAME,),
        ).fetchall()
    return sum(terminated for (terminated,) in rows)


def test_a_write_through_another_replica_is_reported(repository, dsn):
    recorder = Recorder()
    with recorder.listener(dsn) as listener:
        assert listener.wait_listening(10)

        repository.upsert_points(ASSET, [(T0, 1.0), (T0 + 900, 2.0), (T0 + 1800, 3.0)])
        assert wait_for(lambda: recorder.changes, timeout_s=1.0)
        assert recorder.changes == [(ASSET, T0, T0 + 1800)]

        revised = repository.upsert_points(ASSET, [(T0, 1.0), (T0 + 900, 2.5), (T0 + 1800, 3.0)])
        assert revised.changed == 1
        assert wait_for(lambda: len(recorder.changes) == 2, timeout_s=1.0)
        assert recorder.changes[1] == (ASSET, T0 + 900, T0 + 900)


def test_a_write_that_changes_nothing_is_not_reported(repository, dsn, caplog):
    caplog.set_level(logging.WARNING, logger="repository")
    points = [(T0, 1.0), (T0 + 900, 2.0)]
    repository.upsert_points(ASSET, points)
    recorder = Recorder()
    with recorder.listener(dsn) as listener:
        assert listener.wait_listening(10)
        assert repository.upsert_points(ASSET, points).changed == 0
        # Notifications arrive in commit order: once this later change is in, a notification
        # from the unchanged write would have arrived before it.
        repository.upsert_points(OTHER_ASSET, [(T0, 5.0)])
        assert wait_for(lambda: recorder.changes, timeout_s=1.0)
        assert recorder.changes == [(OTHER_ASSET, T0, T0)]
    assert caplog.records == [], "nothing else arrived, not even a malformed notification"


def test_malformed_payloads_and_failing_callbacks_do_not_stop_the_listener(dsn, caplog):
    caplog.set_level(logging.WARNING, logger="repository")
    recorder = Recorder()
    calls = []

    def on_change(*change: object) -> None:
        calls.append(change)
        if len(calls) == 1:
            raise RuntimeError("callback broke")
        recorder.on_change(*change)

    listener = ChangeListener(dsn=dsn, on_change=on_change, on_reconnect=recorder.on_reconnect)
    with listener:
        assert listener.wait_listening(10)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for payload in [
                "not json",
                '{"asset_id": "a"}',
                '["a", 1, 2]',
                '{"asset_id": "a", "first_s": "1", "last_s": 2}',
                '{"asset_id": "a", "first_s": 1, "last_s": 2}',
                '{"asset_id": "b", "first_s": 3, "last_s": 4}',
            ]:
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))
        assert wait_for(lambda: recorder.changes, timeout_s=2.0)
        assert calls == [("a", 1, 2), ("b", 3, 4)]
        assert recorder.changes == [("b", 3, 4)]
        assert recorder.reconnects == 0
        assert listener_backends(dsn), "the listener reconnected or died"
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) == 4
    assert [r.callback for r in caplog.records if r.exc_info] == ["on_change"]


def test_a_terminated_connection_is_reopened_and_reported_once(repository, dsn, caplog):
    caplog.set_level(logging.INFO, logger="repository")
    recorder = Recorder()
    with recorder.listener(dsn) as listener:
        assert listener.wait_listening(10)
        assert recorder.reconnects == 0, "the first LISTEN is not a reconnect"
        [first_backend] = listener_backends(dsn)

        assert terminate_listener(dsn) == 1
        assert wait_for(lambda: recorder.reconnects >= 1, timeout_s=5.0)
        assert listener.wait_listening(0)
        [second_backend] = listener_backends(dsn)
        assert second_backend != first_backend

        repository.upsert_points(ASSET, [(T0, 1.0)])
        assert wait_for(lambda: recorder.changes, timeout_s=1.0)
        assert recorder.changes == [(ASSET, T0, T0)]
        assert recorder.reconnects == 1

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "change listener lost its database connection; reconnecting"
    ]
    assert warnings[0].error, "the warning says what went wrong"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "change listener listening",
        "change listener reconnected",
    ]


def test_close_twice_stops_the_thread_and_the_connection(dsn):
    before = set(threading.enumerate())
    listener = Recorder().listener(dsn).start()
    [thread] = set(threading.enumerate()) - before
    assert thread.daemon and thread.name == "change-listener"
    assert listener.wait_listening(10)

    listener.close()
    listener.close()
    assert not thread.is_alive()
    assert not listener.wait_listening(0)
    assert wait_for(lambda: not listener_backends(dsn), timeout_s=5.0)


def test_an_unreachable_database_is_retried_with_backoff_until_closed(caplog):
    caplog.set_level(logging.DEBUG, logger="repository")
    recorder = Recorder()
    before = set(threading.enumerate())
    started = time.monotonic()
    listener = recorder.listener(UNREACHABLE_DSN).start()
    assert time.monotonic() - started < 0.5
    [thread] = set(threading.enumerate()) - before

    def retries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if hasattr(r, "retry_in_s")]

    assert wait_for(lambda: len(retries()) >= 5, timeout_s=5.0)
    assert not listener.wait_listening(0)

    started = time.monotonic()
    listener.close()
    listener.close()
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive()
    started = time.monotonic()
    assert not listener.wait_listening(10), "a closed listener never listens"
    assert time.monotonic() - started < 1.0

    attempts = retries()
    assert [r.retry_in_s for r in attempts[:5]] == pytest.approx([0.05, 0.1, 0.2, 0.2, 0.2])
    # Warned once when the trouble began; each further attempt only at debug level.
    assert [r.levelno for r in attempts[:5]] == [logging.WARNING] + [logging.DEBUG] * 4
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 1
    assert recorder.changes == [] and recorder.reconnects == 0
