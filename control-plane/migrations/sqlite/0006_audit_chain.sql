-- Tamper evidence: each audit entry carries the SHA-256 of the previous
-- entry's hash and its own content, so editing, deleting or reordering any
-- entry (even with the triggers dropped, straight in the file) breaks the
-- chain from there on, and `leashctl audit verify` says where. Entries
-- written before this migration have no hash and are reported as unchained.
ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;
