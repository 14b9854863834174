//! Cluster step 1 (CLUSTER.md): several Warren nodes over one MySQL/MariaDB, one active. A node
//! joins with a new incarnation, renews its lease on the database clock every quarter of it,
//! and tries to take the active role (free, or held by a node whose lease has expired, which is
//! fenced in the same transaction). Until it is active it is a standby: it accepts AMQP
//! connections and proxies each one byte for byte to the active node. Once active, the store it
//! opens proves the node's incarnation in every transaction (`warren_storage::cluster`), and
//! `Node::keep` renews the lease; when the node is fenced or cannot renew within its lease it
//! reports why, and the binary closes its clients with 320 and exits with `EXIT_FENCED`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use warren_core::broker::ClusterMember;
use warren_core::config::Config;
use warren_storage::cluster::NodeId;
use warren_storage::{SqlStore, StoreError};

/// The exit code of a node that stopped because it was fenced or lost its lease: its
/// supervisor should restart it (it comes back as a standby with a new incarnation).
pub const EXIT_FENCED: i32 = 3;

/// Why an active node stops serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Another node took over, or a newer process of this name started: nothing more may be
    /// committed or confirmed.
    Fenced,
    /// The lease could not be renewed for a whole lease period (the database is unreachable):
    /// another node may take over at any moment.
    LeaseLost,
}

/// This node's membership.
pub struct Node {
    /// A small pool of its own, for membership (the active node's data store is another).
    store: SqlStore,
    me: NodeId,
    lease: Duration,
    /// The active node's advertised address, as last read (for the proxy).
    active_addr: Mutex<Option<String>>,
}

impl Node {
    /// Joins the cluster named by `config` (`--cluster-node`) with a new incarnation.
    pub async fn join(config: &Config, advertised: &str) -> Result<Arc<Node>, StoreError> {
        let Some(name) = config.cluster_node.as_deref() else {
            return Err(StoreError::Config("no --cluster-node".into()));
        };
        if config.storage.is_none() {
            return Err(StoreError::Config(
                "--cluster-node needs --storage mysql://... (SQLite is one node's own file)".into(),
            ));
        }
        let store = SqlStore::open(&config.storage_url(), true).await?;
        let me = store
            .join_cluster(name, advertised, config.cluster_lease_ms)
            .await?;
        tracing::info!(
            node = %me.name,
            incarnation = me.incarnation,
            %advertised,
            lease_ms = config.cluster_lease_ms,
            "joined the cluster"
        );
        Ok(Arc::new(Node {
            store,
            me,
            lease: Duration::from_millis(config.cluster_lease_ms),
            active_addr: Mutex::new(None),
        }))
    }

    pub fn id(&self) -> &NodeId {
        &self.me
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// Renews the lease: Ok(false) if this incarnation has been fenced.
    async fn renew(&self, last_ok: &mut Instant) -> Result<(), Exit> {
        match self.store.renew_lease(&self.me, self.lease_ms()).await {
            Ok(true) => {
                *last_ok = Instant::now();
                Ok(())
            }
            Ok(false) => Err(Exit::Fenced),
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the cluster lease");
                if last_ok.elapsed() >= self.lease {
                    Err(Exit::LeaseLost)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// As a standby: renews the lease and tries to take the active role every quarter lease,
    /// until this node is active. Logs the members and the active node when they change.
    pub async fn become_active(&self) -> Result<(), Exit> {
        let mut last_ok = Instant::now();
        let mut seen: Option<NodeId> = None;
        loop {
            self.renew(&mut last_ok).await?;
            match self.store.claim_active(&self.me).await {
                Ok(true) => {
                    tracing::info!(node = %self.me.name, "this node is now the active node");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the active node"),
            }
            if let Ok(Some(active)) = self.store.active_node().await {
                if seen.as_ref() != Some(&active) {
                    self.log_members(&active).await;
                    seen = Some(active.clone());
                }
                let addr = self.store.members().await.ok().and_then(|ms| {
                    ms.into_iter()
                        .find(|m| m.name == active.name && m.incarnation == active.incarnation)
                        .map(|m| m.advertised)
                });
                *self.active_addr.lock().unwrap_or_else(|e| e.into_inner()) = addr;
            }
            tokio::time::sleep(self.lease / 4).await;
        }
    }

    async fn log_members(&self, active: &NodeId) {
        let members = self.store.members().await.unwrap_or_default();
        for m in &members {
            tracing::info!(
                node = %m.name,
                incarnation = m.incarnation,
                state = %m.state,
                lease_left_ms = m.lease_left_ms,
                advertised = %m.advertised,
                active = (m.name == active.name && m.incarnation == active.incarnation),
                "cluster member"
            );
        }
    }

    /// As the active node: renews the lease every quarter lease until `shutdown`, or until
    /// the node is fenced (by the table, or because its store writer was refused with
    /// `Fenced`) or cannot renew for a whole lease.
    ///
    /// After each renewal the members are read and handed to `members` (the management API
    /// shows them).
    pub async fn keep(
        &self,
        writer_fenced: impl Fn() -> bool,
        members: impl Fn(Vec<ClusterMember>),
        shutdown: CancellationToken,
    ) -> Option<Exit> {
        let mut last_ok = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(self.lease / 4) => {}
            }
            if writer_fenced() {
                return Some(Exit::Fenced);
            }
            if let Err(exit) = self.renew(&mut last_ok).await {
                return Some(exit);
            }
            if let Ok(ms) = self.store.members().await {
                members(
                    ms.into_iter()
                        .map(|m| ClusterMember {
                            active: m.name == self.me.name && m.incarnation == self.me.incarnation,
                            name: m.name,
                            incarnation: m.incarnation,
                            state: m.state,
                            lease_left_ms: m.lease_left_ms,
                            advertised: m.advertised,
                        })
                        .collect(),
                );
            }
        }
    }

    /// The active node's advertised address, as last read by `become_active`.
    pub fn active_address(&self) -> Option<String> {
        self.active_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How long the standby waits to reach the active node for a proxied connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// As a standby: accepts AMQP connections on `listeners` and proxies each one byte for byte to
/// the active node, at most `max` at once, until `stop` (then every proxied connection is
/// dropped; its client reconnects, to this node once it is active).
pub async fn proxy(
    listeners: &[TcpListener],
    node: Arc<Node>,
    max: usize,
    stop: CancellationToken,
) {
    if listeners.is_empty() {
        return;
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = {
            let accepts = listeners.iter().map(|l| Box::pin(l.accept()));
            tokio::select! {
                _ = stop.cancelled() => return,
                (r, _, _) = futures_util::future::select_all(accepts) => r,
            }
        };
        let (client, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "standby accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(target) = node.active_address() else {
            tracing::info!(%peer, "no active node known yet; connection closed");
            continue;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let upstream =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, %target, error = %e, "cannot reach the active node");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, %target, "the active node did not answer in time");
                        return;
                    }
                };
            let _ = upstream.set_nodelay(true);
            let _ = client.set_nodelay(true);
            let (mut client, mut upstream) = (client, upstream);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "proxied connection ended");
                    }
                }
            }
        });
    }
}
