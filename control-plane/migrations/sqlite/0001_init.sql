-- JWT signing keys. The newest is the active one; older ones stay published
-- in the JWKS until every token they signed has expired.
CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY,
    alg           TEXT NOT NULL,
    pkcs8         BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL
);

-- Metadata of every issued credential (never the secret).
CREATE TABLE credentials (
    id            TEXT PRIMARY KEY,
    workload      TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    issued_at_ms  INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE INDEX credentials_by_workload ON credentials (workload, issued_at_ms);
