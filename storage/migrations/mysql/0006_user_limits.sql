-- Per-user limits (RabbitMQ's user limits: max-connections, max-channels) as a JSON object;
-- '{}' is no limit.
ALTER TABLE users ADD COLUMN limits VARCHAR(1024) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL DEFAULT '{}';
