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

CREATE TABLE IF NOT EXISTS points_daily (LIKE points_hourly INCLUDING ALL);

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
-- holding them from the hours: an hour or day left without points loses its row.
CREATE OR REPLACE FUNCTION refresh_rollups(asset text, hours timestamptz[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    WITH fresh AS (
        SELECT h.start, agg.*
        FROM (SELECT DISTINCT start FROM unnest(hours) AS start) AS h
        CROSS JOIN LATERAL (
            SELECT count(*) AS count, min(value) AS min, max(value) AS max,
                   unscaled_sum(sum(value * 2.3283064365386963e-10)) AS sum,
                   min(time) AS first_time,
                   (min(ARRAY[date_part('epoch', time), value]))[2] AS first_value,
                   max(time) AS last_time,
                   (max(ARRAY[date_part('epoch', time), value]))[2] AS last_value
            FROM points
            WHERE asset_id = asset AND time >= h.start AND time < h.start + interval '3600 seconds'
        ) AS agg
    ), emptied AS (
        DELETE FROM points_hourly AS r USING fresh AS f
        WHERE f.count = 0 AND r.asset_id = asset AND r.start = f.start
    )
    INSERT INTO points_hourly
    SELECT asset, start, count, min, max, sum, first_time, first_value, last_time, last_value
    FROM fresh WHERE count > 0
    ON CONFLICT (asset_id, start) DO UPDATE SET
        count = EXCLUDED.count, min = EXCLUDED.min, max = EXCLUDED.max, sum = EXCLUDED.sum,
        first_time = EXCLUDED.first_time, first_value = EXCLUDED.first_value,
        last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value;

    WITH fresh AS (
        SELECT d.start, agg.*
        FROM (
            SELECT DISTINCT date_bin('86400 seconds', start, TIMESTAMPTZ 'epoch') AS start
            FROM unnest(hours) AS start
        ) AS d
        CROSS JOIN LATERAL (
            SELECT coalesce(sum(count), 0)::bigint AS count, min(min) AS min, max(max) AS max,
                   CASE WHEN every(sum IS NOT NULL)
                        THEN unscaled_sum(sum(sum * 2.3283064365386963e-10)) END AS sum,
                   min(first_time) AS first_time,
                   (min(ARRAY[date_part('epoch', first_time), first_value]))[2] AS first_value,
                   max(last_time) AS last_time,
                   (max(ARRAY[date_part('epoch', last_time), last_value]))[2] AS last_value
            FROM points_hourly
            WHERE asset_id = asset AND start >= d.start
              AND start < d.start + interval '86400 seconds'
        ) AS agg
    ), emptied AS (
        DELETE FROM points_daily AS r USING fresh AS f
        WHERE f.count = 0 AND r.asset_id = asset AND r.start = f.start
    )
    INSERT INTO points_daily
    SELECT asset, start, count, min, max, sum, first_time, first_value, last_time, last_value
    FROM fresh WHERE count > 0
    ON CONFLICT (asset_id, start) DO UPDATE SET
        count = EXCLUDED.count, min = EXCLUDED.min, max = EXCLUDED.max, sum = EXCLUDED.sum,
        first_time = EXCLUDED.first_time, first_value = EXCLUDED.first_value,
        last_time = EXCLUDED.last_time, last_value = EXCLUDED.last_value;
END
$$;

-- Rebuild every rollup from the points: for points written by other means than the
-- service (a bulk load with COPY, say). Run as `SELECT rebuild_rollups();`.
CREATE OR REPLACE FUNCTION rebuild_rollups() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- Whole tables rewritten at once: one scan of points instead of a refresh per hour.
    TRUNCATE points_hourly, points_daily;
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
END
$$;

-- Points deleted by hand (the service itself never deletes one) take their rollups along.
-- TimescaleDB's retention drops whole chunks without firing this: queries read rollups only
-- from the oldest stored point on, and chunks end on whole days.
CREATE OR REPLACE FUNCTION refresh_rollups_of_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM refresh_rollups(
        OLD.asset_id, ARRAY[date_bin('3600 seconds', OLD.time, TIMESTAMPTZ 'epoch')]
    );
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS points_deleted ON points;
CREATE TRIGGER points_deleted AFTER DELETE ON points
FOR EACH ROW EXECUTE FUNCTION refresh_rollups_of_deleted();

SELECT rebuild_rollups();
