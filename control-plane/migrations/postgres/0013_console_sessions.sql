-- Web console sessions: the cookie holds a random secret, the store only
-- its SHA-256 (hex). A session acts as the admin token it was opened with
-- (its role, its name in the audit log) until it expires, is signed out,
-- or the token is gone. `csrf` is the per-session value every form posts.
CREATE TABLE console_sessions (
    id_sha256     TEXT PRIMARY KEY,
    token_id      TEXT NOT NULL,
    csrf          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    ended_at_ms   BIGINT
);
