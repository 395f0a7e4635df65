-- Identity of this store: sidecars resume from (store_id, seq), and a
-- different store (restored backup, new data dir) forces a full snapshot.
CREATE TABLE store_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE revocations (
    id             TEXT PRIMARY KEY,
    kind           TEXT NOT NULL,
    workload       TEXT NOT NULL DEFAULT '',
    upstream       TEXT NOT NULL DEFAULT '',
    credential_id  TEXT NOT NULL DEFAULT '',
    reason         TEXT NOT NULL,
    revoked_by     TEXT NOT NULL,
    revoked_at_ms  INTEGER NOT NULL,
    revoke_seq     INTEGER NOT NULL,
    restored_by    TEXT,
    restore_reason TEXT,
    restored_at_ms INTEGER,
    restore_seq    INTEGER
);

-- The monotonic sequence: one row per change (revoke or restore).
CREATE TABLE revocation_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    revocation_id TEXT NOT NULL REFERENCES revocations (id) DEFERRABLE INITIALLY DEFERRED,
    restored      INTEGER NOT NULL,
    at_ms         INTEGER NOT NULL
);

-- Sidecar sessions, kept after they end as the record of who was connected.
CREATE TABLE sessions (
    id                TEXT PRIMARY KEY,
    spiffe_id         TEXT NOT NULL,
    version           TEXT NOT NULL,
    connected_at_ms   INTEGER NOT NULL,
    disconnected_at_ms INTEGER
);

-- Each acknowledgement covers the sequences (from_seq, to_seq].
CREATE TABLE acks (
    session_id  TEXT NOT NULL,
    from_seq    INTEGER NOT NULL,
    to_seq      INTEGER NOT NULL,
    acked_at_ms INTEGER NOT NULL,
    PRIMARY KEY (session_id, to_seq)
);
CREATE INDEX acks_by_seq ON acks (to_seq, from_seq);

CREATE TABLE admin_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    created_by    TEXT NOT NULL
);

-- Append-only: the triggers refuse any change to a written entry.
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    role   TEXT NOT NULL,
    method TEXT NOT NULL,
    path   TEXT NOT NULL,
    action TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
