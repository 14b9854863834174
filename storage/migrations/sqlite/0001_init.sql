-- Warren's schema on SQLite. Names are compared byte for byte (SQLite's default BINARY collation).
CREATE TABLE exchanges (
    vhost       TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    auto_delete INTEGER NOT NULL,
    internal    INTEGER NOT NULL,
    arguments   BLOB    NOT NULL,
    PRIMARY KEY (vhost, name)
);

CREATE TABLE queues (
    id            INTEGER PRIMARY KEY,
    vhost         TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    auto_delete   INTEGER NOT NULL,
    arguments     BLOB    NOT NULL,
    -- the highest sequence number delivered: recovered messages at or below it are redelivered
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (vhost, name)
);

CREATE TABLE bindings (
    id               TEXT    PRIMARY KEY, -- digest of all the columns below
    vhost            TEXT    NOT NULL,
    source           TEXT    NOT NULL,
    destination      TEXT    NOT NULL,
    destination_kind INTEGER NOT NULL,
    routing_key      TEXT    NOT NULL,
    arguments        BLOB    NOT NULL
);

-- A message is stored once, however many queues hold it.
CREATE TABLE messages (
    id          INTEGER PRIMARY KEY,
    persistent  INTEGER NOT NULL,
    exchange    TEXT    NOT NULL,
    routing_key TEXT    NOT NULL,
    header      BLOB    NOT NULL,
    body        BLOB    NOT NULL, -- empty when the body is in message_chunks
    chunks      INTEGER NOT NULL
);

CREATE TABLE message_chunks (
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;

CREATE TABLE queue_messages (
    queue_id   INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (queue_id, seq)
) WITHOUT ROWID;

CREATE INDEX queue_messages_by_message ON queue_messages (message_id);
