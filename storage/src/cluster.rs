//! Cluster membership on the database clock (CLUSTER.md, step 1): each node's row in
//! `cluster_nodes` (incarnation, state, lease), the one active node in `cluster_active`, the
//! takeover of an active node whose lease has expired, and the fence: once a store is fenced by
//! a node's identity (`SqlStore::fence_with`), every transaction it commits first updates that
//! node's row on the condition that the incarnation is still live, and rolls back with
//! `StoreError::Fenced` otherwise. Leases are compared with `NOW(6)` on the database, never
//! with a node's clock. MySQL/MariaDB only.

use sqlx::Row;

use crate::sql::unavailable;
use crate::{Backend, SqlStore, StoreError};

/// One incarnation of a node: what the fence proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    pub name: String,
    pub incarnation: i64,
}

/// A member as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub incarnation: i64,
    /// "live" or "dead".
    pub state: String,
    /// Lease left, in ms on the database clock (negative: expired that long ago).
    pub lease_left_ms: i64,
    pub advertised: String,
}

impl SqlStore {
    fn require_mysql(&self) -> Result<(), StoreError> {
        if self.backend() == Backend::Mysql {
            Ok(())
        } else {
            Err(StoreError::Config(
                "cluster mode needs a MySQL or MariaDB store (--storage mysql://...)".into(),
            ))
        }
    }

    /// Joins as `name`: a new incarnation (the previous one's + 1), live, with a lease of
    /// `lease_ms` from now. The bump alone fences any older process of the same name.
    pub async fn join_cluster(
        &self,
        name: &str,
        advertised: &str,
        lease_ms: u64,
    ) -> Result<NodeId, StoreError> {
        self.require_mysql()?;
        let lease_us = (lease_ms * 1000) as i64;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO cluster_nodes (name, incarnation, state, lease_until, advertised) \
             VALUES (?, 1, 'live', NOW(6) + INTERVAL ? MICROSECOND, ?) \
             ON DUPLICATE KEY UPDATE incarnation = incarnation + 1, state = 'live', \
             lease_until = VALUES(lease_until), advertised = VALUES(advertised)",
        )
        .bind(name.to_string())
        .bind(lease_us)
        .bind(advertised.to_string())
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let row = sqlx::query("SELECT incarnation FROM cluster_nodes WHERE name = ?")
            .bind(name.to_string())
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let incarnation: i64 = row.try_get(0).map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(NodeId {
            name: name.to_string(),
            incarnation,
        })
    }

    /// Extends the lease to `lease_ms` from now. False: this incarnation is no longer live (a
    /// newer one started, or another node took over): the node is fenced.
    pub async fn renew_lease(&self, me: &NodeId, lease_ms: u64) -> Result<bool, StoreError> {
        self.require_mysql()?;
        let r = sqlx::query(
            "UPDATE cluster_nodes SET lease_until = NOW(6) + INTERVAL ? MICROSECOND \
             WHERE name = ? AND incarnation = ? AND state = 'live'",
        )
        .bind((lease_ms * 1000) as i64)
        .bind(me.name.clone())
        .bind(me.incarnation)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(r.rows_affected() == 1)
    }

    /// Every member, by name, with its lease measured on the database clock.
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.require_mysql()?;
        let rows = sqlx::query(
            "SELECT name, incarnation, state, advertised, \
             CAST(TIMESTAMPDIFF(MICROSECOND, NOW(6), lease_until) AS SIGNED) AS left_us \
             FROM cluster_nodes ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(Member {
                    name: r.try_get("name")?,
                    incarnation: r.try_get("incarnation")?,
                    state: r.try_get("state")?,
                    advertised: r.try_get("advertised")?,
                    lease_left_ms: r.try_get::<i64, _>("left_us")? / 1000,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(unavailable)
    }

    /// The active node, if one has been chosen.
    pub async fn active_node(&self) -> Result<Option<NodeId>, StoreError> {
        self.require_mysql()?;
        let row = sqlx::query("SELECT node, incarnation FROM cluster_active WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.map(|r| {
            Ok(NodeId {
                name: r.try_get(0)?,
                incarnation: r.try_get(1)?,
            })
        })
        .transpose()
        .map_err(unavailable)
    }

    /// Becomes the active node if there is none yet, or if the active one is fenced: its
    /// incarnation is no longer live, or its lease has expired (it is marked dead first, in
    /// the same transaction, which fences its writer). True if `me` is now active.
    pub async fn claim_active(&self, me: &NodeId) -> Result<bool, StoreError> {
        self.require_mysql()?;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let current =
            sqlx::query("SELECT node, incarnation FROM cluster_active WHERE id = 1 FOR UPDATE")
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
        let Some(current) = current else {
            let r = sqlx::query(
                "INSERT IGNORE INTO cluster_active (id, node, incarnation) VALUES (1, ?, ?)",
            )
            .bind(me.name.clone())
            .bind(me.incarnation)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            return Ok(r.rows_affected() == 1);
        };
        let holder = NodeId {
            name: current.try_get(0).map_err(unavailable)?,
            incarnation: current.try_get(1).map_err(unavailable)?,
        };
        if holder == *me {
            tx.commit().await.map_err(unavailable)?;
            return Ok(true);
        }
        // Fence the holder if its lease is over (a no-op if it is already dead or gone).
        sqlx::query(
            "UPDATE cluster_nodes SET state = 'dead' \
             WHERE name = ? AND incarnation = ? AND state = 'live' AND lease_until < NOW(6)",
        )
        .bind(holder.name.clone())
        .bind(holder.incarnation)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let live = sqlx::query(
            "SELECT COUNT(*) FROM cluster_nodes \
             WHERE name = ? AND incarnation = ? AND state = 'live' FOR UPDATE",
        )
        .bind(holder.name.clone())
        .bind(holder.incarnation)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        if live.try_get::<i64, _>(0).map_err(unavailable)? > 0 {
            tx.commit().await.map_err(unavailable)?;
            return Ok(false);
        }
        sqlx::query("UPDATE cluster_active SET node = ?, incarnation = ? WHERE id = 1")
            .bind(me.name.clone())
            .bind(me.incarnation)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        tracing::warn!(
            fenced = %holder.name,
            fenced_incarnation = holder.incarnation,
            node = %me.name,
            "took over as the active node"
        );
        Ok(true)
    }

    /// From now on every transaction this store commits proves `me` first.
    pub fn fence_with(&self, me: NodeId) -> Result<(), StoreError> {
        self.require_mysql()?;
        self.fence
            .set(me)
            .map_err(|_| StoreError::Config("the store is already fenced by a node".into()))
    }

    /// The fence statement, first in a transaction: one row matched, or the node is fenced.
    pub(crate) async fn prove_fence(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ) -> Result<(), StoreError> {
        let Some(me) = self.fence.get() else {
            return Ok(());
        };
        let r = sqlx::query(
            "UPDATE cluster_nodes SET fence_seq = fence_seq + 1 \
             WHERE name = ? AND incarnation = ? AND state = 'live'",
        )
        .bind(me.name.clone())
        .bind(me.incarnation)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
        if r.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced(format!(
                "node {} incarnation {} is no longer the live one",
                me.name, me.incarnation
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::suite::{mysql_scratch_url, queue};
    use crate::{MessageStore, MetaStore, Op, Plan, Writer, WriterSettings};

    const LEASE_MS: u64 = 300;

    /// Two stores on one database, as two nodes: the first active and fenced by its identity;
    /// once its lease has run out the second takes over, and the first one's next commit is
    /// refused with `Fenced` and writes nothing; its writer stops without confirming.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_taken_over_node_commits_nothing() {
        let url = mysql_scratch_url().await;
        let a = Arc::new(SqlStore::open(&url, true).await.unwrap());
        let b = SqlStore::open(&url, true).await.unwrap();
        let n1 = a
            .join_cluster("n1", "127.0.0.1:5672", LEASE_MS)
            .await
            .unwrap();
        assert_eq!(n1.incarnation, 1);
        assert!(a.claim_active(&n1).await.unwrap());
        a.fence_with(n1.clone()).unwrap();
        let n2 = b
            .join_cluster("n2", "127.0.0.1:5673", LEASE_MS)
            .await
            .unwrap();
        // n1's lease runs: n2 cannot take over, and n1 commits.
        assert!(!b.claim_active(&n2).await.unwrap());
        a.apply(&Plan::from_ops([&Op::PutQueue(queue(1, "before"))]))
            .await
            .unwrap();
        assert!(a.renew_lease(&n1, LEASE_MS).await.unwrap());
        // n1 stops renewing; past its lease n2 takes over.
        tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
        let members = b.members().await.unwrap();
        assert!(members[0].lease_left_ms < 0, "{members:?}");
        assert!(b.claim_active(&n2).await.unwrap());
        assert_eq!(b.active_node().await.unwrap(), Some(n2.clone()));
        let members = b.members().await.unwrap();
        assert_eq!(members[0].state, "dead");
        // n1's commits are refused and write nothing; its lease cannot be renewed.
        let e = a
            .apply(&Plan::from_ops([&Op::PutQueue(queue(2, "after"))]))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Fenced(_)), "{e:?}");
        assert!(!a.renew_lease(&n1, LEASE_MS).await.unwrap());
        // Its writer stops at the first fenced commit: the ticket is never committed.
        let (w, task) = Writer::start(a.clone(), WriterSettings::default());
        let t = w.submit(Op::PutQueue(queue(3, "via-writer")));
        assert!(!tokio::time::timeout(Duration::from_secs(5), w.wait(t))
            .await
            .unwrap());
        assert!(w.fenced());
        task.await.unwrap();
        let names: Vec<String> = b
            .load_meta()
            .await
            .unwrap()
            .queues
            .iter()
            .map(|q| q.name.clone())
            .collect();
        assert_eq!(names, vec!["before".to_string()]);
        // A restart of n1 is a new incarnation: live again, but not active while n2 renews.
        assert!(b.renew_lease(&n2, LEASE_MS).await.unwrap());
        let n1b = a
            .join_cluster("n1", "127.0.0.1:5672", LEASE_MS)
            .await
            .unwrap();
        assert_eq!(n1b.incarnation, 2);
        assert!(!a.claim_active(&n1b).await.unwrap());
    }

    #[tokio::test]
    async fn cluster_mode_needs_mysql() {
        let dir = std::env::temp_dir().join(format!("warren-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = SqlStore::open(&SqlStore::sqlite_url(&dir), false)
            .await
            .unwrap();
        assert!(matches!(
            s.join_cluster("n1", "x", 1000).await,
            Err(StoreError::Config(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
