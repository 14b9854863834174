//! `Broker`: what every connection shares: settings, virtual hosts, users (through the data
//! cache), the store and the shutdown signal. Built once at start; its maps are read-mostly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warren_storage::StoreError;

pub use crate::auth::LoginError;
use crate::auth::Users;
use crate::config::Config;
use crate::connections::Registry;
use crate::persist::Persistence;
use crate::stats::GlobalStats;
use crate::vhost::VHost;

/// How often the unacked sweeper runs.
pub const UNACKED_SWEEP: Duration = Duration::from_millis(100);
/// Most rows one sweep of unacked deliveries writes to the store.
pub const UNACKED_SWEEP_ROWS: usize = 4096;

pub struct Broker {
    pub config: Config,
    pub persist: Arc<Persistence>,
    /// By name; changed only through the admin facade (`crate::admin`).
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    /// Open client connections, for the management API.
    pub connections: Arc<Registry>,
    /// Node-wide counters.
    pub stats: Arc<GlobalStats>,
    /// Login attempts by protocol (AMQP and the management API).
    pub auth_attempts: crate::stats::AuthAttempts,
    /// The memory and disk alarms (publishers are blocked while one is in effect).
    pub alarms: Arc<crate::alarms::Alarms>,
    /// Global runtime parameters (name -> JSON text).
    pub(crate) globals: RwLock<std::collections::BTreeMap<String, String>>,
    /// When the broker started.
    pub started: std::time::Instant,
    /// Users and permissions: the data cache in front of the store.
    pub users: Users,
    next_conn_id: AtomicU64,
    /// Connections whose task is running (accepted, not yet closed).
    open_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Cancelled on SIGTERM / Ctrl-C: connections close with 320 CONNECTION_FORCED.
    pub shutdown: CancellationToken,
    /// Cluster mode: the members as this (active) node last read them, for the API.
    pub cluster_members: std::sync::Mutex<Vec<ClusterMember>>,
}

/// A cluster member as the management API shows it (cluster mode only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMember {
    pub name: String,
    pub incarnation: i64,
    /// "live" or "dead".
    pub state: String,
    /// Lease left on the database clock, in ms (negative: expired).
    pub lease_left_ms: i64,
    pub advertised: String,
    /// This member holds the active role.
    pub active: bool,
}

impl Broker {
    /// Opens the store, recovers the durable topology (messages are read lazily) and builds
    /// the broker.
    pub async fn open(config: Config) -> Result<Arc<Self>, StoreError> {
        let started = std::time::Instant::now();
        let (persist, recovered) = Persistence::open(&config).await?;
        let snap = &recovered.snapshot;
        let stats: Arc<GlobalStats> = Arc::default();
        let mut vhosts = HashMap::new();
        let (mut queues, mut messages) = (0, 0);
        for r in &snap.vhosts {
            let vhost = VHost::new(&r.name, persist.clone(), stats.clone());
            vhost.set_meta(crate::vhost::VhostMeta {
                description: r.description.clone(),
                tags: split_tags(&r.tags),
                default_queue_type: r.default_queue_type.clone(),
            });
            for p in snap.parameters.iter().filter(|p| p.vhost == r.name) {
                vhost.set_parameter(&p.component, &p.name, Some(p.value.clone()));
            }
            let (q, m) = vhost.restore(snap).await?;
            queues += q;
            messages += m;
            vhosts.insert(r.name.clone(), vhost);
        }
        let globals = snap
            .global_parameters
            .iter()
            .map(|g| (g.name.clone(), g.value.clone()))
            .collect();
        tracing::info!(
            vhosts = vhosts.len(),
            queues,
            messages,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store opened and recovered"
        );
        let users = Users::new(persist.store.clone());
        let seed = users
            .default_user_ops(&config.default_user, &config.default_pass)
            .await?;
        if !seed.is_empty() {
            let mut ticket = 0;
            for op in seed {
                ticket = persist.submit(op);
            }
            if !persist.writer.wait(ticket).await || persist.writer.failed(ticket) {
                return Err(StoreError::Unavailable(
                    "the default user could not be stored".to_string(),
                ));
            }
            tracing::info!(user = %config.default_user, "empty store: created the default user");
        }
        let alarms = Arc::new(crate::alarms::Alarms::new(&config));
        alarms.check(&config.data_dir);
        Ok(Arc::new(Broker {
            config,
            auth_attempts: Default::default(),
            alarms,
            persist,
            vhosts: RwLock::new(vhosts),
            connections: Arc::default(),
            stats,
            globals: RwLock::new(globals),
            started,
            users,
            next_conn_id: AtomicU64::new(1),
            open_connections: Arc::default(),
            shutdown: CancellationToken::new(),
            cluster_members: std::sync::Mutex::new(Vec::new()),
        }))
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every vhost, by name.
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        let mut v: Vec<_> = self
            .vhosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub(crate) fn insert_vhost(&self, v: Arc<VHost>) {
        self.vhosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(v.name.clone(), v);
    }

    pub(crate) fn remove_vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// Closes every sampling interval: the rates the management API shows.
    pub fn sample_rates(&self, secs: f64) {
        self.stats.sample(secs);
        let unacked = self.unacked_by_queue();
        for v in self.vhosts() {
            for x in v.exchanges() {
                x.stats.sample(secs);
            }
            for q in v.queues() {
                q.stats.sample(secs);
                let held = unacked.get(&(Arc::as_ptr(&q) as usize)).copied();
                q.depth.sample(q.counts().0 as u64, held.unwrap_or(0), secs);
            }
        }
        self.connections.sample(secs);
    }

    /// Unacknowledged deliveries per queue (keyed by the queue's address), counted over
    /// every open channel.
    pub fn unacked_by_queue(&self) -> HashMap<usize, u64> {
        let mut m = HashMap::new();
        for c in self.connections.all() {
            for ch in c.channels() {
                ch.each_unacked(|q| *m.entry(Arc::as_ptr(q) as usize).or_insert(0) += 1);
            }
        }
        m
    }

    /// Samples rates every `stats::RATE_INTERVAL`, checks the resource alarms every
    /// `alarms::CHECK_INTERVAL` and sweeps unacked deliveries over the budget
    /// (`start_unacked_sweeper`), until shutdown.
    pub fn start_sampler(self: &Arc<Self>) {
        self.alarms
            .start_monitor(self.config.data_dir.clone(), self.shutdown.clone());
        self.start_unacked_sweeper();
        let me = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::stats::RATE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let Some(b) = me.upgrade() else { return };
                let now = std::time::Instant::now();
                b.sample_rates(now.duration_since(last).as_secs_f64());
                last = now;
            }
        });
    }

    /// Over the memory budget, unacked deliveries held longer than `--unacked-page-after-ms` give their
    /// bodies up to the store and the cache (`Queue::page_out_unacked`), checked every
    /// `UNACKED_SWEEP` until shutdown. Deliveries acked within that time (the usual case)
    /// cost nothing; only those a consumer sits on are written.
    pub fn start_unacked_sweeper(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UNACKED_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for round in 0.. {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let Some(b) = me.upgrade() else { return };
                b.page_out_unacked(round);
            }
        });
    }

    /// One sweep (see `start_unacked_sweeper`); returns how many bodies it gave up. A sweep
    /// writes at most `UNACKED_SWEEP_ROWS` rows and gives up at most an eighth of the budget
    /// or the room left in the store's write queue under `--store-hold-bytes`, whichever is
    /// less, oldest deliveries first, starting from another connection each `round`. The extra
    /// work for the store stays bounded however many deliveries wait, so a broker that is
    /// behind (consumers slow to ack because the machine is busy) is not slowed further by
    /// writing deliveries that are about to be acked, and publishers are not held for the
    /// sweeper's writes. So this caps the rate at which unacked bodies leave memory (40,960
    /// rows a second, and what the store commits): a consumer that takes more than that and
    /// never acks still grows memory, up to the memory alarm.
    pub fn page_out_unacked(&self, round: usize) -> usize {
        if !self.persist.over_budget() {
            return 0;
        }
        let max_bytes =
            ((self.config.cache_memory / 8) as usize).min(self.persist.writer.room_left());
        if max_bytes == 0 {
            return 0;
        }
        let before = crate::message::now_ms().saturating_sub(self.config.unacked_page_after_ms);
        let (mut freed, mut rows, mut bytes) = (0, 0, 0);
        let conns = self.connections.all();
        'sweep: for k in 0..conns.len() {
            for ch in conns[(round + k) % conns.len()].channels() {
                loop {
                    if rows >= UNACKED_SWEEP_ROWS || bytes >= max_bytes {
                        break 'sweep;
                    }
                    let batch = ch.unswept(before, 64);
                    if batch.is_empty() {
                        break;
                    }
                    for (tag, q) in batch {
                        if let Some((weight, wrote)) = q.page_out_unacked(&ch, tag) {
                            freed += 1;
                            bytes += weight;
                            rows += wrote as usize;
                        }
                    }
                }
            }
        }
        if freed > 0 {
            tracing::debug!(
                freed,
                rows,
                bytes,
                "unacked deliveries gave their bodies up to the store"
            );
        }
        freed
    }

    /// Counts a connection as open until the returned guard drops.
    pub fn count_connection(&self) -> ConnectionCount {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionCount(self.open_connections.clone())
    }

    /// Connections open now (this one included, when asked from a connection).
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a login against the stored user (through the data cache).
    pub async fn authenticate(
        &self,
        user: &str,
        pass: &str,
        peer: IpAddr,
    ) -> Result<(), LoginError> {
        let record = self
            .users
            .user(user)
            .await
            .map_err(|e| LoginError::StoreUnavailable(e.to_string()))?
            .ok_or(LoginError::UnknownUser)?;
        if !crate::auth::password_matches(&record.password_hash, pass) {
            return Err(LoginError::BadPassword);
        }
        self.check_loopback(user, peer)
    }

    /// `--loopback-users` log in from this host only. A dual-stack listener sees IPv4 peers as
    /// ::ffff:a.b.c.d: the IPv4 address is compared.
    fn check_loopback(&self, user: &str, peer: IpAddr) -> Result<(), LoginError> {
        if !peer.to_canonical().is_loopback()
            && self.config.loopback_users.iter().any(|u| u == user)
        {
            return Err(LoginError::LoopbackOnly);
        }
        Ok(())
    }

    /// SASL EXTERNAL: the verified certificate names the user, who must exist (no password
    /// is checked), with the same loopback rule.
    pub async fn authenticate_external(&self, user: &str, peer: IpAddr) -> Result<(), LoginError> {
        self.users
            .user(user)
            .await
            .map_err(|e| LoginError::StoreUnavailable(e.to_string()))?
            .ok_or(LoginError::UnknownUser)?;
        self.check_loopback(user, peer)
    }

    /// connection.open: the user needs permissions in the vhost (any, as RabbitMQ checks);
    /// what they are is checked per method through the returned `Access`.
    pub async fn vhost_access(
        &self,
        user: &str,
        vhost: &str,
    ) -> Result<Arc<crate::auth::Access>, LoginError> {
        match self.users.permission(vhost, user).await {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(LoginError::NoVhostAccess),
            Err(e) => Err(LoginError::StoreUnavailable(e.to_string())),
        }
    }
}

/// Tags as stored (comma-separated) to a list.
pub fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// One open connection, counted until dropped (also when its task panics).
pub struct ConnectionCount(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guest_only_from_loopback() {
        let b = Broker::open(Config::for_tests()).await.unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(b.authenticate("guest", "guest", lo).await, Ok(()));
        assert_eq!(
            b.authenticate("guest", "guest", remote).await,
            Err(LoginError::LoopbackOnly)
        );
        assert_eq!(
            b.authenticate("guest", "nope", lo).await,
            Err(LoginError::BadPassword)
        );
        assert_eq!(
            b.authenticate("bob", "guest", lo).await,
            Err(LoginError::UnknownUser)
        );
        assert!(b.vhost_access("guest", "/").await.is_ok());
        assert_eq!(
            b.vhost_access("guest", "other").await.err(),
            Some(LoginError::NoVhostAccess)
        );
        // Hits and misses alike are cached: guest and bob, guest's "/" and "other".
        assert_eq!(b.users.cached(), (2, 2));
        let mut c = Config::for_tests();
        c.loopback_users.clear();
        let b = Broker::open(c).await.unwrap();
        assert_eq!(b.authenticate("guest", "guest", remote).await, Ok(()));
    }

    /// RabbitMQ creates the default user on the first boot only: a restart with another
    /// --default-pass keeps the stored password.
    #[tokio::test]
    async fn default_user_is_created_once() {
        let config = Config::for_tests();
        let dir = config.data_dir.clone();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let b = Broker::open(config).await.unwrap();
        assert_eq!(b.authenticate("guest", "guest", lo).await, Ok(()));
        b.persist.close().await;
        drop(b);
        let mut config = Config::for_tests();
        config.data_dir = dir.clone();
        config.default_pass = "changed".to_string();
        let b = Broker::open(config).await.unwrap();
        assert_eq!(b.authenticate("guest", "guest", lo).await, Ok(()));
        assert_eq!(
            b.authenticate("guest", "changed", lo).await,
            Err(LoginError::BadPassword)
        );
        b.persist.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
