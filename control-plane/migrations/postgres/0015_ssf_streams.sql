-- SSF streams a receiver created through the stream configuration API
-- (SSF 1.0 §8.1.1); the streams policy names (ssf.receivers) are not here.
-- `events_requested` is a JSON array of event-type URIs; `endpoint_url`
-- is the receiver's push endpoint (RFC 8935), NULL for a poll stream
-- (RFC 8936), whose receiver authenticates with the bearer token whose
-- SHA-256 is `poll_token_sha256` (shown once, at creation). `status` is
-- enabled, paused or disabled (§8.1.2).
CREATE TABLE ssf_streams (
    stream_id        TEXT PRIMARY KEY,
    audience         TEXT NOT NULL,
    delivery_method  TEXT NOT NULL,
    endpoint_url     TEXT,
    poll_token_sha256 BYTEA,
    events_requested TEXT NOT NULL,
    description      TEXT,
    status           TEXT NOT NULL,
    reason           TEXT,
    created_at_ms    BIGINT NOT NULL,
    created_by       TEXT NOT NULL
);

-- SETs waiting on a stream: every SET of a poll stream until the receiver
-- acknowledges it (or reports an error for it), and the SETs of a paused
-- push stream until it is enabled again. Any replica serves a poll from
-- here.
CREATE TABLE ssf_outbox (
    stream_id     TEXT NOT NULL,
    jti           TEXT NOT NULL,
    set_jwt       TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (stream_id, jti)
);
CREATE INDEX ssf_outbox_by_time ON ssf_outbox (stream_id, created_at_ms);
