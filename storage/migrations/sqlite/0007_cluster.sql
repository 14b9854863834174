-- Cluster membership (CLUSTER.md). Cluster mode needs MySQL/MariaDB; the tables exist on SQLite
-- too so that both backends have one schema.
CREATE TABLE cluster_nodes (
    name        TEXT NOT NULL PRIMARY KEY,
    incarnation INTEGER NOT NULL,
    state       TEXT NOT NULL,
    lease_until TEXT NOT NULL,
    advertised  TEXT NOT NULL,
    fence_seq   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE cluster_active (
    id          INTEGER NOT NULL PRIMARY KEY,
    node        TEXT NOT NULL,
    incarnation INTEGER NOT NULL
);
