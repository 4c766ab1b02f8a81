-- Outbox of domain events for Directus Flows (see docs/events.md).
--
-- Rows are inserted by processor.adapters.outbox.record_events inside the transaction
-- that writes the domain rows they describe, and delivered by the dispatcher.
-- IF NOT EXISTS keeps the file safe to apply to a database where a test fixture or an
-- earlier run already created the table.

CREATE TABLE IF NOT EXISTS processor.outbox (
    id              bigserial PRIMARY KEY,
    -- Idempotency key for receivers: uuid5 over type, subject, version and fingerprint.
    event_id        uuid NOT NULL,
    type            text NOT NULL,
    -- What the event is about: the row family and its natural key ("stage_result:3:45").
    subject         text NOT NULL,
    -- 1, 2, 3 ... per subject: a change equal to the subject's last one is not recorded.
    version         integer NOT NULL CHECK (version > 0),
    fingerprint     text NOT NULL,
    -- Ordering key: "<event id>:<entry number>"; delivery is in id order per key.
    entry_key       text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    body            jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'dead', 'skipped')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- A dispatcher owns a pending event until leased_until; after a crash it expires.
    leased_until    timestamptz,
    lease_token     uuid,
    last_error      text,
    delivered_at    timestamptz,
    CONSTRAINT outbox_event_id_key UNIQUE (event_id)
);

-- The dispatcher's claim: pending events in id order, without walking delivered history…
CREATE INDEX IF NOT EXISTS outbox_pending_id
    ON processor.outbox (id) WHERE status = 'pending';

-- …and, per candidate, whether an older pending event of its entry exists.
CREATE INDEX IF NOT EXISTS outbox_pending_by_entry
    ON processor.outbox (entry_key, id) WHERE status = 'pending';

-- record_events: the last version of a subject.
CREATE INDEX IF NOT EXISTS outbox_subject_version
    ON processor.outbox (subject, version DESC, id DESC);

-- Operators and gauges: events by status.
CREATE INDEX IF NOT EXISTS outbox_status_id
    ON processor.outbox (status, id);
