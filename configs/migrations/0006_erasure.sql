-- Erasure you can prove. Every delete of a face, subject or collection
-- records an erasure (the receipt) and, in the same transaction as the row
-- delete, every copy outside Postgres that must go with it (object_outbox):
-- crop objects and prefixes, index snapshots older than the delete, cache
-- entries. A sweeper in the ingress works the outbox with backoff until the
-- object store (or cache) confirms each copy gone, then stamps the erasure
-- complete. An enrolment writes a guard row (erasure_id NULL) before it
-- uploads its crop and removes it in the transaction that writes the face
-- row, so a crop whose enrolment never committed is swept as well.
CREATE TABLE erasures (
    id               uuid PRIMARY KEY,
    tenant           text NOT NULL,
    collection_id    bigint NOT NULL,   -- no FK: the receipt outlives a deleted collection
    collection_name  text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('face', 'subject', 'collection')),
    target           text NOT NULL,     -- face id, subject id or collection name
    -- the change-log position of the delete: a snapshot below it still
    -- holds the deleted vectors, one at or above it does not
    seq              bigint NOT NULL,
    requested_by     text NOT NULL DEFAULT '',
    requested_at     timestamptz NOT NULL DEFAULT now(),
    removed          jsonb NOT NULL DEFAULT '{}'::jsonb,   -- Postgres rows removed, by table
    completed_at     timestamptz
);
CREATE INDEX erasures_collection_seq_idx ON erasures (collection_id, seq);
CREATE INDEX erasures_tenant_idx ON erasures (tenant, requested_at DESC);

CREATE TABLE object_outbox (
    id           bigserial PRIMARY KEY,
    erasure_id   uuid REFERENCES erasures(id) ON DELETE CASCADE,   -- NULL: an enrolment's guard
    copy         text NOT NULL CHECK (copy IN ('crops', 'snapshots', 'cache')),
    op           text NOT NULL CHECK (op IN ('object', 'prefix', 'snapshots_below', 'cache')),
    target       text NOT NULL,         -- object key, key prefix or snapshot prefix
    items        text[] NOT NULL DEFAULT '{}',   -- cache: subject ids whose Redis keys go
    below_seq    bigint,                -- snapshots_below: snapshots older than this go
    not_before   timestamptz NOT NULL DEFAULT now(),   -- next attempt (a claim leases it)
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    note         text,
    removed      integer NOT NULL DEFAULT 0,      -- objects / entries the sweeper deleted
    created_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz
);
CREATE INDEX object_outbox_due_idx ON object_outbox (not_before) WHERE done_at IS NULL;
CREATE INDEX object_outbox_erasure_idx ON object_outbox (erasure_id);
