-- PostgreSQL history of the store's schema: version for version the same
-- schema as migrations/sqlite/ (INTEGER is BIGINT, BLOB is BYTEA, flags are
-- BOOLEAN; SQLite's implicit rowid, where queries order by it, is an
-- explicit identity column of the same name).

-- JWT signing keys. The newest is the active one; older ones stay published
-- in the JWKS until every token they signed has expired.
CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY,
    alg           TEXT NOT NULL,
    pkcs8         BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    rowid         BIGINT GENERATED ALWAYS AS IDENTITY
);

-- Metadata of every issued credential (never the secret).
CREATE TABLE credentials (
    id            TEXT PRIMARY KEY,
    workload      TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    issued_at_ms  BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX credentials_by_workload ON credentials (workload, issued_at_ms);
