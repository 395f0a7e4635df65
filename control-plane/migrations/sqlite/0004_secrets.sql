-- Versions of brokered upstream secrets, encrypted with AES-256-GCM under the
-- master key (which is never stored here). The newest unrevoked one is current.
CREATE TABLE secret_versions (
    upstream      TEXT NOT NULL,
    version       INTEGER NOT NULL,
    nonce         BLOB NOT NULL,
    ciphertext    BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    created_by    TEXT NOT NULL,
    revoked_at_ms INTEGER,
    PRIMARY KEY (upstream, version)
);
