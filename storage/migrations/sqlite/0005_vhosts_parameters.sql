-- Virtual hosts (RabbitMQ's vhost record with its metadata), runtime parameters (policies,
-- operator policies, vhost limits and other components, per vhost; the value is JSON text) and
-- global parameters. The default vhost "/" exists from this migration on, as RabbitMQ creates it
-- on first boot.
CREATE TABLE vhosts (
    name               TEXT NOT NULL PRIMARY KEY,
    description        TEXT NOT NULL,
    tags               TEXT NOT NULL, -- comma-separated
    default_queue_type TEXT NOT NULL
);

INSERT INTO vhosts (name, description, tags, default_queue_type)
VALUES ('/', 'Default virtual host', '', 'classic');

CREATE TABLE parameters (
    vhost     TEXT NOT NULL,
    component TEXT NOT NULL,
    name      TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (vhost, component, name)
);

CREATE TABLE global_parameters (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
