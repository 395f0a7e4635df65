-- Usage batches received from sidecars: one row per (sidecar process,
-- batch), written in the same transaction as the counts it carried, so a
-- batch resent after a reconnect is recognised and not counted twice.
CREATE TABLE usage_batches (
    sidecar_id       TEXT NOT NULL,
    batch_seq        INTEGER NOT NULL,
    workload         TEXT NOT NULL,
    received_at_ms   INTEGER NOT NULL,
    requests         INTEGER NOT NULL,
    dropped_requests INTEGER NOT NULL,
    dropped_records  INTEGER NOT NULL,
    PRIMARY KEY (sidecar_id, batch_seq)
);
CREATE INDEX usage_batches_by_time ON usage_batches (received_at_ms);

-- What was forwarded, per minute bucket (of the first use in the batch).
-- The workload is the session's verified peer, never a message field.
CREATE TABLE usage (
    bucket_ms       INTEGER NOT NULL,
    workload        TEXT NOT NULL,
    upstream        TEXT NOT NULL,
    credential_id   TEXT NOT NULL,
    credential_kind TEXT NOT NULL,
    method          TEXT NOT NULL,
    status_class    TEXT NOT NULL,
    requests        INTEGER NOT NULL,
    bytes_sent      INTEGER NOT NULL,
    bytes_received  INTEGER NOT NULL,
    first_seen_ms   INTEGER NOT NULL,
    last_seen_ms    INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, workload, upstream, credential_id, method, status_class)
);
CREATE INDEX usage_by_credential ON usage (credential_id, last_seen_ms);
CREATE INDEX usage_by_edge ON usage (workload, upstream, last_seen_ms);
CREATE INDEX usage_by_time ON usage (last_seen_ms);
