//! `Broker`: what every connection shares: settings, virtual hosts, users, the store and the
//! shutdown signal. Built once at start; its maps are read-mostly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use warren_storage::StoreError;

use crate::config::Config;
use crate::persist::Persistence;
use crate::vhost::VHost;

pub struct Broker {
    pub config: Config,
    pub persist: Arc<Persistence>,
    vhosts: HashMap<String, Arc<VHost>>,
    users: HashMap<String, String>,
    next_conn_id: AtomicU64,
    /// Cancelled on SIGTERM / Ctrl-C: connections close with 320 CONNECTION_FORCED.
    pub shutdown: CancellationToken,
}

/// Why a login failed (logged; the client sees one generic text, as RabbitMQ does).
#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    UnknownUser,
    BadPassword,
    LoopbackOnly,
}

impl Broker {
    /// Opens the store, recovers the durable topology (messages are read lazily) and builds
    /// the broker.
    pub async fn open(config: Config) -> Result<Arc<Self>, StoreError> {
        let started = std::time::Instant::now();
        let (persist, recovered) = Persistence::open(&config).await?;
        let vhost = VHost::new("/", persist.clone());
        let (queues, messages) = vhost.restore(&recovered.snapshot).await?;
        tracing::info!(
            queues,
            messages,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store opened and recovered"
        );
        let mut vhosts = HashMap::new();
        vhosts.insert("/".to_string(), vhost);
        let mut users = HashMap::new();
        users.insert(config.default_user.clone(), config.default_pass.clone());
        Ok(Arc::new(Broker {
            config,
            persist,
            vhosts,
            users,
            next_conn_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
        }))
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.get(name).cloned()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a login. Passwords are compared in constant time.
    pub fn authenticate(&self, user: &str, pass: &str, peer: IpAddr) -> Result<(), LoginError> {
        let Some(expected) = self.users.get(user) else {
            return Err(LoginError::UnknownUser);
        };
        if !constant_time_eq(expected.as_bytes(), pass.as_bytes()) {
            return Err(LoginError::BadPassword);
        }
        if !peer.is_loopback() && self.config.loopback_users.iter().any(|u| u == user) {
            return Err(LoginError::LoopbackOnly);
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guest_only_from_loopback() {
        let b = Broker::open(Config::for_tests()).await.unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(b.authenticate("guest", "guest", lo), Ok(()));
        assert_eq!(
            b.authenticate("guest", "guest", remote),
            Err(LoginError::LoopbackOnly)
        );
        assert_eq!(
            b.authenticate("guest", "nope", lo),
            Err(LoginError::BadPassword)
        );
        assert_eq!(
            b.authenticate("bob", "guest", lo),
            Err(LoginError::UnknownUser)
        );
        let mut c = Config::for_tests();
        c.loopback_users.clear();
        let b = Broker::open(c).await.unwrap();
        assert_eq!(b.authenticate("guest", "guest", remote), Ok(()));
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abcd"));
    }
}
