-- Upstreams that sent the injected credential back in a response header
-- (the sidecar removed it before the workload saw it): an echo endpoint, a
-- redirect keeping a query token. Names only, never the value.
CREATE TABLE echoed_credentials (
    workload      TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    header        TEXT NOT NULL,
    count         BIGINT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    PRIMARY KEY (workload, upstream, header)
);
