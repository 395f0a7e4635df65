-- Control-plane replicas on one store (one row each, SQLite: the one
-- process, a new row per start). `seen_at_ms` is written every second or
-- so while the replica reads the store; a replica not seen for a few
-- seconds is taken for dead, and its sidecar sessions are not counted as
-- connected.
CREATE TABLE replicas (
    id            TEXT PRIMARY KEY,
    version       TEXT NOT NULL,
    sidecar_addr  TEXT NOT NULL,
    admin_addr    TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    seen_at_ms    INTEGER NOT NULL,
    stopped_at_ms INTEGER
);

-- Which replica holds each session ('' for sessions of older versions).
ALTER TABLE sessions ADD COLUMN replica_id TEXT NOT NULL DEFAULT '';
CREATE INDEX sessions_open ON sessions (replica_id) WHERE disconnected_at_ms IS NULL;
