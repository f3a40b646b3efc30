"""ChangeListener against a real PostgreSQL: notifications from writes, reconnects, shutdown."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import psycopg
import pytest
from conftest import ASSET, OTHER_ASSET, wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from change_listener import LISTENER_APPLICATION_NAME, ChangeListener
from repository import NOTIFY_CHANNEL

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


class CuttableProxy:
    """A loopback TCP proxy to a PostgreSQL server that can drop its connections at will.

    Stands in for the network between a replica and the database: cut() drops every
    connection, and while `down` is set new ones are closed as soon as they are accepted.
    """

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        host, port = params.get("host") or "127.0.0.1", int(params.get("port") or 5432)
        if host.startswith("/"):
            self._target: tuple[int, object] = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
        else:
            self._target = (socket.AF_INET, (host, port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=self._server.getsockname()[1])
        self.down = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            # shutdown() wakes the pump blocked in recv() on it; close() alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._server.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.socket(self._target[0], socket.SOCK_STREAM)
            upstream.connect(self._target[1])
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


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
    caplog.set_level(logging.WARNING, logger="change_listener")
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
    caplog.set_level(logging.WARNING, logger="change_listener")
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
    caplog.set_level(logging.INFO, logger="change_listener")
    recorder = Recorder()
    with recorder.listener(dsn) as listener:
        assert listener.wait_listening(10)
        assert recorder.reconnects == 0, "the first LISTEN is not a reconnect"
        [first_backend] = listener_backends(dsn)

        assert terminate_listener(dsn) == 1
        assert wait_for(lambda: recorder.reconnects >= 1, timeout_s=5.0)
        assert listener.wait_listening(5)
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


def test_an_outage_is_logged_once_and_ends_in_one_reconnect(repository, dsn, caplog):
    caplog.set_level(logging.DEBUG, logger="change_listener")
    recorder = Recorder()
    proxy = CuttableProxy(dsn)
    try:
        with recorder.listener(proxy.dsn) as listener:
            assert listener.wait_listening(10)
            proxy.down.set()
            proxy.cut()

            def failed_attempts() -> int:
                return sum("still cannot connect" in r.getMessage() for r in caplog.records)

            assert wait_for(lambda: failed_attempts() >= 3, timeout_s=5.0)
            assert not listener.wait_listening(0)
            # Written while the listener is away: never reported, which is why on_reconnect
            # must let the wiring drop everything it cached.
            repository.upsert_points(ASSET, [(T0, 1.0)])
            assert recorder.reconnects == 0

            proxy.down.clear()
            assert wait_for(lambda: recorder.reconnects == 1, timeout_s=5.0)
            repository.upsert_points(OTHER_ASSET, [(T0, 2.0)])
            assert wait_for(lambda: recorder.changes, timeout_s=1.0)
            assert recorder.changes == [(OTHER_ASSET, T0, T0)]
            assert recorder.reconnects == 1
    finally:
        proxy.close()

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["change listener lost its database connection; reconnecting"]
    [recovery] = [r for r in caplog.records if r.getMessage() == "change listener reconnected"]
    assert recovery.failed_attempts >= 3


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
    caplog.set_level(logging.DEBUG, logger="change_listener")
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
