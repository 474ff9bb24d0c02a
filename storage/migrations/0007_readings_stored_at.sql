-- When each reading row was written: the timestamp of the statement that stored it (the sink
-- sets statement_timestamp(); other writers get now() from the default). For freshness
-- monitoring (stored_at - ts = device to database) and the end-to-end benchmark. Rows stored
-- before this migration keep NULL (unknown); a replayed row keeps its first stored_at.
ALTER TABLE readings ADD COLUMN stored_at timestamptz;
ALTER TABLE readings ALTER COLUMN stored_at SET DEFAULT now();
COMMENT ON COLUMN readings.stored_at IS
    'when the row was written (the storing statement''s timestamp); NULL for rows stored before migration 0007';
