-- The access token of each oauth2-client-credentials upstream, shared by
-- every replica: one exchange per upstream, not one per replica. Sealed
-- with the master key (purpose "oauth2-token", bound to its id); leased
-- until `use_until_ms`.
CREATE TABLE oauth2_tokens (
    upstream     TEXT PRIMARY KEY,
    token_id     TEXT NOT NULL,
    sealed       BLOB NOT NULL,
    use_until_ms INTEGER NOT NULL
);
