-- Signed heads of the audit chain, every 1,000 entries (see anchor.rs): the
-- signing key is derived from the master key and stored nowhere, so a
-- rewritten chain cannot carry valid anchors.
CREATE TABLE audit_anchors (
    id          BIGINT PRIMARY KEY,
    hash        TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    public_key  TEXT NOT NULL,
    signature   TEXT NOT NULL
);
