-- Security Event Tokens received (OpenID SSF, RFC 8417): one row per
-- (issuer, jti), inserted before the event takes effect, so that a SET
-- replayed to any replica is refused. `revocation_id` is the revocation
-- the event became.
CREATE TABLE ssf_events (
    issuer         TEXT NOT NULL,
    jti            TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    revocation_id  TEXT,
    PRIMARY KEY (issuer, jti)
);
