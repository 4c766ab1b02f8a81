-- Progress of `processor backfill attributes` runs, so an interrupted run resumes where it
-- stopped. One row per run key (a digest of the run's range and device selection); the
-- row is updated in the transaction that writes each chunk (see docs/backfill.md).
CREATE TABLE IF NOT EXISTS processor.backfill_progress (
    run_key        text        PRIMARY KEY,
    spec           jsonb       NOT NULL,
    last_device_id bigint,
    last_ts        timestamptz,
    rows_seen      bigint      NOT NULL DEFAULT 0,
    rows_changed   bigint      NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
