-- Warren's schema on MySQL 8 / MariaDB 10.6+. Names use a binary collation: AMQP names are
-- case-sensitive. Bodies over 1 MiB go to message_chunks so no statement nears max_allowed_packet.
CREATE TABLE exchanges (
    vhost       VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    name        VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind        VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    auto_delete SMALLINT NOT NULL,
    internal    SMALLINT NOT NULL,
    arguments   MEDIUMBLOB NOT NULL,
    PRIMARY KEY (vhost, name)
) ENGINE = InnoDB;

CREATE TABLE queues (
    id            BIGINT NOT NULL PRIMARY KEY,
    vhost         VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    name          VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    auto_delete   SMALLINT NOT NULL,
    arguments     MEDIUMBLOB NOT NULL,
    delivered_seq BIGINT NOT NULL DEFAULT 0,
    UNIQUE KEY queues_by_name (vhost, name)
) ENGINE = InnoDB;

CREATE TABLE bindings (
    id               CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
    vhost            VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    source           VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    destination      VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    destination_kind SMALLINT NOT NULL,
    routing_key      VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    arguments        MEDIUMBLOB NOT NULL
) ENGINE = InnoDB;

CREATE TABLE messages (
    id          BIGINT NOT NULL PRIMARY KEY,
    persistent  SMALLINT NOT NULL,
    exchange    VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    routing_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    header      MEDIUMBLOB NOT NULL,
    body        LONGBLOB NOT NULL,
    chunks      INT NOT NULL
) ENGINE = InnoDB;

CREATE TABLE message_chunks (
    message_id BIGINT NOT NULL,
    idx        INT NOT NULL,
    data       LONGBLOB NOT NULL,
    PRIMARY KEY (message_id, idx),
    CONSTRAINT message_chunks_message FOREIGN KEY (message_id) REFERENCES messages (id) ON DELETE CASCADE
) ENGINE = InnoDB;

CREATE TABLE queue_messages (
    queue_id   BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (queue_id, seq),
    KEY queue_messages_by_message (message_id)
) ENGINE = InnoDB;
