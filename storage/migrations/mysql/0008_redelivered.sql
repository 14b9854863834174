-- A position marked redelivered: a message moved by the message browser keeps its flag in
-- its new queue (past that queue's delivered_seq).
ALTER TABLE queue_messages ADD COLUMN redelivered SMALLINT NOT NULL DEFAULT 0;
