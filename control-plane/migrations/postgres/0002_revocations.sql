-- Identity of this store: sidecars resume from (store_id, seq), and a
-- different store (restored backup, new database) forces a full snapshot.
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
    revoked_at_ms  BIGINT NOT NULL,
    revoke_seq     BIGINT NOT NULL,
    restored_by    TEXT,
    restore_reason TEXT,
    restored_at_ms BIGINT,
    restore_seq    BIGINT
);

-- The monotonic sequence: one row per change (revoke or restore). The
-- store assigns seq (the newest plus one, under its write lock): a
-- PostgreSQL sequence would leave gaps where a transaction rolled back.
CREATE TABLE revocation_events (
    seq           BIGINT PRIMARY KEY,
    revocation_id TEXT NOT NULL REFERENCES revocations (id) DEFERRABLE INITIALLY DEFERRED,
    restored      BOOLEAN NOT NULL,
    at_ms         BIGINT NOT NULL
);

-- Sidecar sessions, kept after they end as the record of who was connected.
CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY,
    spiffe_id          TEXT NOT NULL,
    version            TEXT NOT NULL,
    connected_at_ms    BIGINT NOT NULL,
    disconnected_at_ms BIGINT
);

-- Each acknowledgement covers the sequences (from_seq, to_seq].
CREATE TABLE acks (
    session_id  TEXT NOT NULL,
    from_seq    BIGINT NOT NULL,
    to_seq      BIGINT NOT NULL,
    acked_at_ms BIGINT NOT NULL,
    PRIMARY KEY (session_id, to_seq)
);
CREATE INDEX acks_by_seq ON acks (to_seq, from_seq);

CREATE TABLE admin_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    secret_sha256 BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    created_by    TEXT NOT NULL
);

-- Append-only: the triggers refuse any change to a written entry (TRUNCATE
-- too, which skips row triggers). Ids are assigned by the store, in order.
CREATE TABLE audit (
    id     BIGINT PRIMARY KEY,
    at_ms  BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    role   TEXT NOT NULL,
    method TEXT NOT NULL,
    path   TEXT NOT NULL,
    action TEXT NOT NULL,
    status BIGINT NOT NULL,
    detail TEXT NOT NULL
);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END;
$$;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
