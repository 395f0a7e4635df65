-- Deactivation probes: after a secret version is revoked, one request with
-- the old value to the provider itself, and what it answered. Never the
-- value, never the answer's body.
CREATE TABLE deactivation_probes (
    id        INTEGER PRIMARY KEY,
    upstream  TEXT NOT NULL,
    version   INTEGER NOT NULL,
    at_ms     INTEGER NOT NULL,
    status    INTEGER,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX deactivation_probes_by_version ON deactivation_probes (upstream, version, at_ms);
