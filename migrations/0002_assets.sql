-- Per-asset ingestion state. `covered` is the union of time ranges whose points were
-- fetched from the upstream and committed; what is missing from it is fetched next time.
CREATE TABLE IF NOT EXISTS assets (
    asset_id text PRIMARY KEY,
    covered tstzmultirange NOT NULL DEFAULT '{}',
    last_success timestamptz,
    last_attempt timestamptz,
    last_error text
);
