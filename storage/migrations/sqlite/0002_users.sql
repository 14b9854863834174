-- Users and their per-vhost permissions (RabbitMQ's model). The broker reads them through its
-- data cache; the default user is written on the first start of an empty store.
CREATE TABLE users (
    name          TEXT NOT NULL PRIMARY KEY,
    password_hash BLOB NOT NULL, -- RabbitMQ's rabbit_password_hashing_sha256: salt(4) ++ sha256(salt ++ password)
    tags          TEXT NOT NULL
);

CREATE TABLE permissions (
    vhost        TEXT NOT NULL,
    user_name    TEXT NOT NULL,
    configure_re TEXT NOT NULL,
    write_re     TEXT NOT NULL,
    read_re      TEXT NOT NULL,
    PRIMARY KEY (vhost, user_name)
);
