-- Virtual hosts (RabbitMQ's vhost record with its metadata), runtime parameters (policies,
-- operator policies, vhost limits and other components, per vhost; the value is JSON text) and
-- global parameters. The default vhost "/" exists from this migration on, as RabbitMQ creates it
-- on first boot.
CREATE TABLE vhosts (
    name               VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    description        TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    tags               TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    default_queue_type VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL
) ENGINE = InnoDB;

INSERT INTO vhosts (name, description, tags, default_queue_type)
VALUES ('/', 'Default virtual host', '', 'classic');

CREATE TABLE parameters (
    vhost     VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    component VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    name      VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    value     MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    PRIMARY KEY (vhost, component, name)
) ENGINE = InnoDB;

CREATE TABLE global_parameters (
    name  VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    value MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL
) ENGINE = InnoDB;
