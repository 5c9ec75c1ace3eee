-- The rollback drill's "bad migration": a table and an index, applied to a sandbox target and
-- rolled back by the drill. Its version sorts after any real one, so it is always the latest.
-- migrate:up
CREATE TABLE drill_rollback_probe (id INTEGER PRIMARY KEY, created_at TIMESTAMP, note TEXT);
CREATE INDEX drill_rollback_probe_created_at ON drill_rollback_probe (created_at);

-- migrate:down
DROP INDEX drill_rollback_probe_created_at;
DROP TABLE drill_rollback_probe;
