-- RabbitMQ's topic permissions: per user, vhost and topic exchange, write and read patterns on
-- routing keys ({username} and {vhost} are expanded when checked).
CREATE TABLE topic_permissions (
    vhost     VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    user_name VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    exchange  VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    write_re  VARCHAR(1024) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    read_re   VARCHAR(1024) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    PRIMARY KEY (vhost, user_name, exchange)
) ENGINE = InnoDB;
