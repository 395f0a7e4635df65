-- Tamper evidence: each audit entry carries the SHA-256 of the previous
-- entry's hash and its own content, so editing, deleting or reordering any
-- entry (even with the triggers dropped) breaks the chain from there on, and
-- `leashctl audit verify` says where.
ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;
