-- Remediation missions: findings grouped under an objective, owner and
-- deadline, closed when their criteria (computed from runtime data) hold.
CREATE TABLE missions (
    id TEXT PRIMARY KEY,
    objective TEXT NOT NULL,
    owner TEXT NOT NULL,
    deadline_ms INTEGER,
    -- The no-use and no-sightings windows.
    window_ms INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    -- Closed by a responder rather than by its criteria.
    closed_by_hand INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    changed_at_ms INTEGER NOT NULL
);

CREATE TABLE mission_findings (
    mission_id TEXT NOT NULL REFERENCES missions (id),
    seq INTEGER NOT NULL,
    -- The finding as JSON (kind and what it names), one per mission.
    finding TEXT NOT NULL,
    -- Metadata kept with it (where a scanner found a secret); never a secret.
    note TEXT NOT NULL,
    added_at_ms INTEGER NOT NULL,
    added_by TEXT NOT NULL,
    PRIMARY KEY (mission_id, seq),
    UNIQUE (mission_id, finding)
);

CREATE TABLE mission_changes (
    mission_id TEXT NOT NULL REFERENCES missions (id),
    at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL
);
CREATE INDEX mission_changes_by_mission ON mission_changes (mission_id, at_ms);
