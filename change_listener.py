"""Hears of every change to the points, from any replica, through PostgreSQL LISTEN/NOTIFY."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from repository import NOTIFY_CHANNEL, connect

log = logging.getLogger(__name__)

# The listener's connection shows up under this name in pg_stat_activity.
LISTENER_APPLICATION_NAME = "edgecom-listener"
RECONNECT_DELAY_S = 1.0
MAX_RECONNECT_DELAY_S = 30.0
LISTENER_CONNECT_TIMEOUT_S = 5.0
LISTENER_JOIN_TIMEOUT_S = 10.0
# How long the listener waits for notifications before looking at its stop event again:
# bounds how long close() takes while nothing happens.
_LISTEN_POLL_S = 0.2
# A LISTEN connection only reads, so a network that drops silently (no reset) would go
# unnoticed for the OS default of two hours; keepalives notice within about a minute.
_LISTENER_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


class ChangeListener:
    """LISTENs on NOTIFY_CHANNEL on its own connection and reports point changes.

    Every replica runs one, so a write through any replica reaches them all. The connection
    is not from a pool: it stays in LISTEN for the life of the listener. When it drops, the
    listener reconnects with exponential backoff, and because notifications sent while it
    was away are lost, calls `on_reconnect` once LISTEN is active again. wait_listening(0)
    tells whether changes are heard right now: it turns true again only after on_reconnect
    has returned.
    """

    def __init__(
        self,
        *,
        dsn: str,
        on_change: Callable[[str, int, int], None],
        on_reconnect: Callable[[], None],
        reconnect_delay_s: float = RECONNECT_DELAY_S,
        max_reconnect_delay_s: float = MAX_RECONNECT_DELAY_S,
        connect_timeout_s: float = LISTENER_CONNECT_TIMEOUT_S,
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._on_reconnect = on_reconnect
        self._reconnect_delay_s = reconnect_delay_s
        self._max_reconnect_delay_s = max(reconnect_delay_s, max_reconnect_delay_s)
        self._connect_timeout_s = connect_timeout_s
        self._stop = threading.Event()
        # Guards _listening; notified when it changes and on close, for wait_listening().
        self._state = threading.Condition()
        self._listening = False
        self._thread = threading.Thread(target=self._run, name="change-listener", daemon=True)

    def start(self) -> ChangeListener:
        """Start the listener thread; returns at once, without waiting for the database."""
        self._thread.start()
        return self

    def wait_listening(self, timeout_s: float | None = None) -> bool:
        """Block until LISTEN is active, the listener is closed or `timeout_s` passes.

        Returns whether LISTEN is active.
        """
        with self._state:
            self._state.wait_for(lambda: self._listening or self._stop.is_set(), timeout_s)
            return self._listening

    def close(self, timeout_s: float = LISTENER_JOIN_TIMEOUT_S) -> None:
        """Stop the thread and close its connection; waits up to `timeout_s`. Safe to call twice."""
        with self._state:
            self._stop.set()
            self._state.notify_all()
        # A callback may close the listener from the listener thread, which cannot join itself.
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning(
                    "change listener thread did not stop in time",
                    extra={"thread": self._thread.name, "timeout_s": timeout_s},
                )

    def __enter__(self) -> ChangeListener:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        delay_s = self._reconnect_delay_s
        listened_before = False
        # When the connection was lost or first failed; None while all is well.
        down_since: float | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                failures += 1
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "change listener cannot connect to the database; retrying",
                        extra={"error": str(exc).strip(), "retry_in_s": delay_s},
                    )
                else:
                    log.debug(
                        "change listener still cannot connect",
                        extra={"error": str(exc).strip(), "retry_in_s": delay_s},
                    )
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, self._max_reconnect_delay_s)
                continue
            try:
                if listened_before:
                    # Before the flag goes up: whoever trusts it must not see what was
                    # cached while no notification could arrive.
                    self._call("on_reconnect", self._on_reconnect)
                self._set_listening(True)
                if down_since is None:
                    log.info("change listener listening", extra={"channel": NOTIFY_CHANNEL})
                else:
                    recovered = "reconnected" if listened_before else "connected"
                    log.info(
                        f"change listener {recovered}",
                        extra={
                            "down_s": round(time.monotonic() - down_since, 3),
                            "failed_attempts": failures,
                        },
                    )
                listened_before = True
                down_since, failures, delay_s = None, 0, self._reconnect_delay_s
                self._receive(conn)
            except psycopg.Error as exc:
                # Down before the warning is out, so that whoever reads it finds it down.
                self._set_listening(False)
                log.warning(
                    "change listener lost its database connection; reconnecting",
                    extra={"error": str(exc).strip(), "retry_in_s": delay_s},
                )
                down_since = time.monotonic()
            except Exception:
                self._set_listening(False)
                log.exception("change listener failed; reconnecting")
                down_since = time.monotonic()
            finally:
                self._set_listening(False)
                conn.close()
            # Waiting before the first reconnect too keeps a server that accepts connections
            # and drops them at once from turning this loop into a busy one.
            self._stop.wait(delay_s)
            delay_s = min(delay_s * 2, self._max_reconnect_delay_s)

    def _connect(self) -> psycopg.Connection:
        conn = connect(
            self._dsn,
            timeout_s=self._connect_timeout_s,
            application_name=LISTENER_APPLICATION_NAME,
            **_LISTENER_KEEPALIVES,
        )
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _receive(self, conn: psycopg.Connection) -> None:
        """Report notifications until stopped; raises psycopg.Error when the connection fails."""
        while not self._stop.is_set():
            for notify in conn.notifies(timeout=_LISTEN_POLL_S):
                try:
                    change = _parse_change(notify.payload)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning(
                        "ignored a malformed change notification",
                        extra={"payload": notify.payload[:200], "error": str(exc)},
                    )
                    continue
                self._call("on_change", self._on_change, *change)

    def _call(self, name: str, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("change listener callback failed", extra={"callback": name})

    def _set_listening(self, listening: bool) -> None:
        with self._state:
            self._listening = listening
            self._state.notify_all()


def _parse_change(payload: str) -> tuple[str, int, int]:
    """(asset_id, first_s, last_s) from a notification payload; raises ValueError if malformed."""
    change = json.loads(payload)
    asset_id, first_s, last_s = change["asset_id"], change["first_s"], change["last_s"]
    if not isinstance(asset_id, str) or not all(type(s) is int for s in (first_s, last_s)):
        raise ValueError("expected a string asset_id and integer first_s and last_s")
    return asset_id, first_s, last_s
