-- Leaked values are registered as revocations of kind 'leaked' carrying only
-- a keyed fingerprint (hex), never the value.
ALTER TABLE revocations ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';

-- Who still sends a leaked value, to what: the forgotten consumers.
CREATE TABLE leak_sightings (
    revocation_id TEXT NOT NULL,
    workload      TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    host          TEXT NOT NULL,
    location      TEXT NOT NULL,
    count         BIGINT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    PRIMARY KEY (revocation_id, workload, upstream, host, location)
);

-- Workloads that still send their own credential to a managed upstream
-- (the sidecar strips it): they still hold a secret somewhere.
CREATE TABLE stripped_credentials (
    workload      TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    count         BIGINT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    PRIMARY KEY (workload, upstream)
);
