-- Exact aggregates of the points of each asset per UTC hour and per UTC day, so that long
-- ranges are answered from a row per hour or day instead of every point. They are kept in
-- the same transaction as every write of points (Repository.upsert_points calls
-- refresh_rollups for the hours it changed), so a query's snapshot sees both alike.
-- first_* and last_* hold the earliest and latest point, so FIRST and LAST stay exact.
-- Plain tables on PostgreSQL and TimescaleDB alike: they hold a 96th and a 4th of the rows.
CREATE TABLE IF NOT EXISTS points_hourly (
    asset_id text NOT NULL,
    start timestamptz NOT NULL,
    count bigint NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    sum double precision,  -- NULL: too large for a double
    first_time timestamptz NOT NULL,
    first_value double precision NOT NULL,
    last_time timestamptz NOT NULL,
    last_value double precision NOT NULL,
    PRIMARY KEY (asset_id, start)
);

-- The day tables' keys cover every column: a two-year query of one asset is an index-only
-- scan of adjacent index pages, however many assets' rows share each table page.
CREATE TABLE IF NOT EXISTS points_daily (
    LIKE points_hourly,
    PRIMARY KEY (asset_id, start)
        INCLUDE (count, min, max, sum, first_time, first_value, last_time, last_value)
);

-- The local days of the zones in rollup_timezones (storage.rollup_timezones): a day starts
-- at its first instant, local midnight or the end of a DST gap at midnight, and lasts 23 to
-- 25 hours. Zones are added and removed by Repository.sync_rollup_timezones.
CREATE TABLE IF NOT EXISTS rollup_timezones (timezone text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS points_local_daily (
    asset_id text NOT NULL,
    timezone text NOT NULL,
    start timestamptz NOT NULL,
    count bigint NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    sum double precision,
    first_time timestamptz NOT NULL,
    first_value double precision NOT NULL,
    last_time timestamptz NOT NULL,
    last_value double precision NOT NULL,
    PRIMARY KEY (asset_id, timezone, start)
        INCLUDE (count, min, max, sum, first_time, first_value, last_time, last_value)
);

-- Sums are kept as PostgreSQL sums them, value by value in float8, but never fail a write:
-- a sum of the values scaled by 2^-32 cannot overflow (there are fewer than 2^32 of them)
-- and, scaled back, is the same sum bit for bit (for values above 1e-298, which scaling
-- leaves normal). One too large to scale back is kept as NULL, which a query answers with
-- the error summing the points gives.
CREATE OR REPLACE FUNCTION unscaled_sum(scaled double precision) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN abs(scaled) <= 4.1855804968213563e298 OR NOT abs(scaled) < 'Infinity'
                THEN scaled * 4294967296 END
$$;

CREATE OR REPLACE FUNCTION rollup_overflow() RETURNS double precision
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'value out of range: overflow' USING ERRCODE = 'numeric_value_out_of_range';
END
$$;

-- Recompute the rollups of the given hours of one asset from its points, and of the days
-- holding them from the hours. Each run of consecutive hours (a chunk of a bootstrap, say)
-- is read as one range. An hour or day left without points keeps its row: the service never
-- deletes points, and the trigger below removes the rows of points deleted by hand.
-- JIT is off: the planner's estimates for a large array of hours reach its threshold, and
-- compiling took 450 ms of a refresh that runs in 250.
CREATE OR REPLACE FUNCTION refresh_rollups(asset text, hours timestamptz[]) RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    WITH changed AS (
        SELECT DISTINCT start FROM unnest(hours) AS start
    ), runs AS (
        SELECT min(start) AS lo, max(start) + interval '3600 seconds' AS hi
        FROM (
            SELECT start, start - interval '3600 seconds' * row_number() OVER (ORDER BY start)
                AS run
            FROM changed
        ) AS numbered
        GROUP BY run
    )
    INSERT INTO points_hourly
    SELECT asset, date_bin('3600 seconds', p.time, TIMESTAMPTZ 'epoch') AS start,
           count(*), min(p.value), max(p.value),
           unscaled_sum(sum(p.value * 2.3283064365386963e-10)),
           min(p.time), (min(ARRAY[date_part('epoch', p.time), p.value]))[2],
           max(p.time), (max(ARRAY[date_part('epoch', p.time), p.value]))[2]
    FROM runs
    CROSS JOIN LATERAL (
        SELECT time, value FROM points
        WHERE asset_id = asset AND time >= runs.lo AND time < runs.hi
        OFFSET 0  -- a scan of each run's range, never of every point of the asset
    ) AS p
    GROUP BY 2
    ON CONFLICT (asset_id, start) DO UPDATE SET
        count = EXCLUDED.count, min = EXCLUDED.min, max = EXCLUDED.max, sum = EXCLUDED.sum,
        first_time = EXCLUDED.first_time, first_value = EXCLUDED.first_value,
        last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value;

    WITH changed AS (
        SELECT DISTINCT date_bin('86400 seconds', start, TIMESTAMPTZ 'epoch') AS start
        FROM unnest(hours) AS start
    ), runs AS (
        SELECT min(start) AS lo, max(start) + interval '86400 seconds' AS hi
        FROM (
            SELECT start, start - interval '86400 seconds' * row_number() OVER (ORDER BY start)
                AS run
            FROM changed
        ) AS numbered
        GROUP BY run
    )
    INSERT INTO points_daily
    SELECT asset, date_bin('86400 seconds', h.start, TIMESTAMPTZ 'epoch') AS start,
           sum(h.count)::bigint, min(h.min), max(h.max),
           CASE WHEN every(h.sum IS NOT NULL)
                THEN unscaled_sum(sum(h.sum * 2.3283064365386963e-10)) END,
           min(h.first_time),
           (min(ARRAY[date_part('epoch', h.first_time), h.first_value]))[2],
           max(h.last_time), (max(ARRAY[date_part('epoch', h.last_time), h.last_value]))[2]
    FROM runs
    CROSS JOIN LATERAL (
        SELECT * FROM points_hourly
        WHERE asset_id = asset AND start >= runs.lo AND start < runs.hi
        OFFSET 0
    ) AS h
    GROUP BY 2
    ON CONFLICT (asset_id, start) DO UPDATE SET
        count = EXCLUDED.count, min = EXCLUDED.min, max = EXCLUDED.max, sum = EXCLUDED.sum,
        first_time = EXCLUDED.first_time, first_value = EXCLUDED.first_value,
        last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value;

    IF NOT EXISTS (SELECT FROM rollup_timezones) THEN
        RETURN;
    END IF;
    -- An hour can hold the end of one local day and the start of the next (Asia/Kolkata).
    WITH days AS (
        SELECT DISTINCT z.timezone, date_trunc('day', t AT TIME ZONE z.timezone) AS day
        FROM unnest(hours) AS h
        CROSS JOIN unnest(ARRAY[h, h + interval '3599 seconds']) AS t
        CROSS JOIN rollup_timezones AS z
    ), fresh AS (
        SELECT d.timezone, d.day AT TIME ZONE d.timezone AS start, agg.*
        FROM days AS d
        CROSS JOIN LATERAL (
            SELECT count(*) AS count, min(value) AS min, max(value) AS max,
                   unscaled_sum(sum(value * 2.3283064365386963e-10)) AS sum,
                   min(time) AS first_time,
                   (min(ARRAY[date_part('epoch', time), value]))[2] AS first_value,
                   max(time) AS last_time,
                   (max(ARRAY[date_part('epoch', time), value]))[2] AS last_value
            FROM points
            WHERE asset_id = asset AND time >= d.day AT TIME ZONE d.timezone
              AND time < (d.day + interval '1 day') AT TIME ZONE d.timezone
        ) AS agg
    ), emptied AS (
        DELETE FROM points_local_daily AS r USING fresh AS f
        WHERE f.count = 0 AND r.asset_id = asset AND r.timezone = f.timezone
          AND r.start = f.start
    )
    INSERT INTO points_local_daily
    SELECT asset, timezone, start, count, min, max, sum,
           first_time, first_value, last_time, last_value
    FROM fresh WHERE count > 0
    ON CONFLICT (asset_id, timezone, start) DO UPDATE SET
        count = EXCLUDED.count, min = EXCLUDED.min, max = EXCLUDED.max, sum = EXCLUDED.sum,
        first_time = EXCLUDED.first_time, first_value = EXCLUDED.first_value,
        last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value;
END
$$;

-- Build the local days of one zone from the points, replacing any kept.
CREATE OR REPLACE FUNCTION build_local_days(zone text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM points_local_daily WHERE timezone = zone;
    INSERT INTO points_local_daily
    SELECT asset_id, zone, date_trunc('day', time AT TIME ZONE zone) AT TIME ZONE zone AS start,
           count(*), min(value), max(value), unscaled_sum(sum(value * 2.3283064365386963e-10)),
           min(time), (min(ARRAY[date_part('epoch', time), value]))[2],
           max(time), (max(ARRAY[date_part('epoch', time), value]))[2]
    FROM points
    GROUP BY asset_id, start
    ORDER BY start;
END
$$;

-- Rebuild every rollup from the points: for points written by other means than the
-- service (a bulk load with COPY, say). Run as `SELECT rebuild_rollups();`.
CREATE OR REPLACE FUNCTION rebuild_rollups() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Whole tables rewritten at once: one scan of points instead of a refresh per hour.
    TRUNCATE points_hourly, points_daily, points_local_daily;
    INSERT INTO points_hourly
    SELECT asset_id, date_bin('3600 seconds', time, TIMESTAMPTZ 'epoch') AS start,
           count(*), min(value), max(value), unscaled_sum(sum(value * 2.3283064365386963e-10)),
           min(time), (min(ARRAY[date_part('epoch', time), value]))[2],
           max(time), (max(ARRAY[date_part('epoch', time), value]))[2]
    FROM points
    GROUP BY asset_id, start
    -- Interleaved in time, as ingestion writes them.
    ORDER BY start;
    INSERT INTO points_daily
    SELECT asset_id, date_bin('86400 seconds', start, TIMESTAMPTZ 'epoch') AS day,
           sum(count)::bigint, min(min), max(max),
           CASE WHEN every(sum IS NOT NULL)
                THEN unscaled_sum(sum(sum * 2.3283064365386963e-10)) END,
           min(first_time), (min(ARRAY[date_part('epoch', first_time), first_value]))[2],
           max(last_time), (max(ARRAY[date_part('epoch', last_time), last_value]))[2]
    FROM points_hourly
    GROUP BY asset_id, day
    ORDER BY day;
    PERFORM build_local_days(timezone) FROM rollup_timezones;
END
$$;

-- Points deleted by hand (the service itself never deletes one) take their rollups along.
-- TimescaleDB's retention drops whole chunks without firing this: queries read rollups only
-- from the oldest stored point on, and chunks end on whole days.
CREATE OR REPLACE FUNCTION refresh_rollups_of_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hour timestamptz := date_bin('3600 seconds', OLD.time, TIMESTAMPTZ 'epoch');
    day timestamptz := date_bin('86400 seconds', OLD.time, TIMESTAMPTZ 'epoch');
BEGIN
    -- Dropped first, and written again by the refresh if points remain in it.
    DELETE FROM points_hourly WHERE asset_id = OLD.asset_id AND start = hour;
    PERFORM refresh_rollups(OLD.asset_id, ARRAY[hour]);
    DELETE FROM points_daily AS d
    WHERE d.asset_id = OLD.asset_id AND d.start = day AND NOT EXISTS (
        SELECT FROM points_hourly AS h
        WHERE h.asset_id = OLD.asset_id AND h.start >= day
          AND h.start < day + interval '86400 seconds'
    );
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS points_deleted ON points;
CREATE TRIGGER points_deleted AFTER DELETE ON points
FOR EACH ROW EXECUTE FUNCTION refresh_rollups_of_deleted();

SELECT rebuild_rollups();
