-- Fencing for domain shard ownership: a shard's result rows are written only by the holder
-- of its newest lease token (leases live in Redis; see docs/scaling.md).
CREATE TABLE IF NOT EXISTS processor.domain_shards (
    shard      integer     PRIMARY KEY,
    token      bigint      NOT NULL,
    owner      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
