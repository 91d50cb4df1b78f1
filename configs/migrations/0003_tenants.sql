-- Tenants, their API keys, and an audit log of every write.
-- A collection belongs to one tenant; another tenant's collections (and so
-- their subjects and faces) are invisible to it: lookups are by (tenant, name).
CREATE TABLE tenants (
    name                text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    -- The weakest liveness policy an enrolment in this tenant may ask for.
    min_enrol_liveness  text NOT NULL DEFAULT 'off' CHECK (min_enrol_liveness IN ('off', 'flag', 'block')),
    -- Ceiling on all of the tenant's keys together, per minute (0 = none).
    requests_per_minute integer NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
    created_at          timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tenants (name) VALUES ('default');

ALTER TABLE collections ADD COLUMN tenant text NOT NULL DEFAULT 'default' REFERENCES tenants(name);
ALTER TABLE collections DROP CONSTRAINT collections_name_key;
ALTER TABLE collections ADD CONSTRAINT collections_tenant_name_key UNIQUE (tenant, name);

-- A key is "fsk_<key_id>_<secret>"; only the secret's sha256 is stored (the
-- secret is 32 random bytes, so a fast hash is enough).
CREATE TABLE api_keys (
    key_id              text PRIMARY KEY,
    tenant              text NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    secret_sha256       bytea NOT NULL,
    scopes              text[] NOT NULL CHECK (scopes <@ ARRAY['read', 'enrol', 'admin']::text[]),
    name                text NOT NULL DEFAULT '',
    requests_per_minute integer NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    revoked_at          timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant);

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    tenant    text NOT NULL,
    actor     text NOT NULL,          -- key id, "bootstrap" or "open:<ip>"
    action    text NOT NULL,          -- e.g. subject.create, face.delete, key.revoke
    target    text NOT NULL DEFAULT '',
    trace_id  text,
    details   jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_tenant_at_idx ON audit_log (tenant, at DESC);
