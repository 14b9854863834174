-- RabbitMQ's topic permissions: per user, vhost and topic exchange, write and read patterns on
-- routing keys ({username} and {vhost} are expanded when checked).
CREATE TABLE topic_permissions (
    vhost     TEXT NOT NULL,
    user_name TEXT NOT NULL,
    exchange  TEXT NOT NULL,
    write_re  TEXT NOT NULL,
    read_re   TEXT NOT NULL,
    PRIMARY KEY (vhost, user_name, exchange)
);
