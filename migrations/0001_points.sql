-- One row per asset and 15-minute instant. The covering key (INCLUDE value) lets the
-- bucketed query run as an index-only scan, which is several times faster on long ranges
-- than a plain (asset_id, time) key once many assets are interleaved on disk.
CREATE TABLE IF NOT EXISTS points (
    asset_id text NOT NULL,
    time timestamptz NOT NULL,
    value double precision NOT NULL,
    CONSTRAINT points_pkey PRIMARY KEY (asset_id, time) INCLUDE (value)
);

-- TimescaleDB is optional: where the extension can be created the table becomes a
-- hypertable; elsewhere (plain PostgreSQL) the same schema works unchanged.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            -- Installed but not in shared_preload_libraries: run without it.
            RAISE NOTICE 'timescaledb is available but could not be created: %', SQLERRM;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable(
            'points', 'time',
            chunk_time_interval => INTERVAL '30 days',
            if_not_exists => TRUE,
            migrate_data => TRUE
        );
    END IF;
END
$$;
