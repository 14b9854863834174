-- When a message was published (ms since the Unix epoch): queue TTLs are counted from it, so a
-- paged or recovered message expires when it would have in memory.
ALTER TABLE messages ADD COLUMN published_ms INTEGER NOT NULL DEFAULT 0;
