-- Upstreams that sent the injected credential back in a response header
-- (the sidecar removed it before the workload saw it): an echo endpoint, a
-- redirect keeping a query token. Names only, never the value.
CREATE TABLE echoed_credentials (
    workload      TEXT NOT NULL,
    upstream      TEXT NOT NULL,
    header        TEXT NOT NULL,
    count         INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (workload, upstream, header)
);
