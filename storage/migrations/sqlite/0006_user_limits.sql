-- Per-user limits (RabbitMQ's user limits: max-connections, max-channels) as a JSON object;
-- '{}' is no limit.
ALTER TABLE users ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
