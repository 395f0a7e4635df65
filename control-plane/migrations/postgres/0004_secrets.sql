-- Versions of brokered upstream secrets, encrypted with AES-256-GCM under the
-- master key (which is never stored here). The newest unrevoked one is current.
CREATE TABLE secret_versions (
    upstream      TEXT NOT NULL,
    version       BIGINT NOT NULL,
    nonce         BYTEA NOT NULL,
    ciphertext    BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    created_by    TEXT NOT NULL,
    revoked_at_ms BIGINT,
    PRIMARY KEY (upstream, version)
);
