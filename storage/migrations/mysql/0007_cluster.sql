-- Cluster membership (CLUSTER.md): one row per node with its incarnation (bumped at every
-- start, which fences any older process of the same name), its state and its lease on the
-- database clock; `fence_seq` is what every writer transaction of the node updates first, so
-- the transaction proves the node is still the live incarnation. `cluster_active` names the one
-- active node (step 1: active/standby).
CREATE TABLE cluster_nodes (
    name        VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    incarnation BIGINT NOT NULL,
    state       VARCHAR(16) NOT NULL,
    lease_until DATETIME(6) NOT NULL,
    advertised  VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    fence_seq   BIGINT NOT NULL DEFAULT 0
) ENGINE = InnoDB;

CREATE TABLE cluster_active (
    id          INT NOT NULL PRIMARY KEY,
    node        VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    incarnation BIGINT NOT NULL
) ENGINE = InnoDB;
