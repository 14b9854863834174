//! The registry of open client connections: what the management API lists (`ConnInfo`, with
//! its channels' shared halves) and the handle it closes a connection through. A connection
//! registers itself once the socket is accepted and is removed when its `Registered` guard
//! drops (also when its task panics). Nothing here does I/O: a close request is a token the
//! connection's reader watches, and it sends connection.close itself.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio_util::sync::CancellationToken;
use warren_protocol::FieldTable;

use crate::delivery::ChannelHandle;
use crate::stats::ConnStats;

/// What the handshake settled (set once, at connection.open or earlier).
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub user: String,
    pub vhost: String,
    pub auth_mechanism: String,
    pub client_properties: FieldTable,
    /// The connection is open (connection.open-ok sent).
    pub open: bool,
}

/// Why a connection's socket is not being read, as the management API's `state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Hold {
    None = 0,
    /// Held until the store catches up (RabbitMQ's credit-flow state, "flow").
    Flow = 1,
    /// Blocked by a resource alarm ("blocked").
    Blocked = 2,
}

/// One client connection as the management API sees it.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    /// RabbitMQ's name: "peer_host:peer_port -> host:port".
    pub name: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Accepted at, in ms since the epoch.
    pub connected_at: u64,
    pub tls: bool,
    pub frame_max: AtomicU32,
    pub channel_max: AtomicU16,
    pub heartbeat: AtomicU16,
    pub stats: ConnStats,
    hold: AtomicU8,
    session: Mutex<Session>,
    channels: Mutex<BTreeMap<u16, Arc<ChannelHandle>>>,
    close: CancellationToken,
    close_reason: Mutex<Option<String>>,
}

fn host_port(a: &SocketAddr) -> String {
    let ip = a.ip().to_canonical();
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{}", a.port()),
        v4 => format!("{v4}:{}", a.port()),
    }
}

impl ConnInfo {
    fn session_lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channels_lock(&self) -> MutexGuard<'_, BTreeMap<u16, Arc<ChannelHandle>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_hold(&self, h: Hold) {
        self.hold.store(h as u8, Ordering::Relaxed);
    }

    pub fn hold(&self) -> Hold {
        match self.hold.load(Ordering::Relaxed) {
            1 => Hold::Flow,
            2 => Hold::Blocked,
            _ => Hold::None,
        }
    }

    pub fn session(&self) -> Session {
        self.session_lock().clone()
    }

    pub fn update_session(&self, f: impl FnOnce(&mut Session)) {
        f(&mut self.session_lock());
    }

    pub fn add_channel(&self, ch: Arc<ChannelHandle>) {
        self.channels_lock().insert(ch.id, ch);
    }

    pub fn remove_channel(&self, id: u16) {
        self.channels_lock().remove(&id);
    }

    pub fn channels(&self) -> Vec<Arc<ChannelHandle>> {
        self.channels_lock().values().cloned().collect()
    }

    pub fn channel_count(&self) -> usize {
        self.channels_lock().len()
    }

    /// Asks the connection to close with 320 CONNECTION_FORCED and `reason`.
    pub fn request_close(&self, reason: &str) {
        *self.close_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        self.close.cancel();
    }

    /// Resolves once a close was requested or the broker shuts down (then without a reason).
    pub fn close_requested(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    pub fn close_reason(&self) -> Option<String> {
        self.close_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// "peer_host", "peer_port" and so on are derived from these.
    pub fn peer_host(&self) -> String {
        self.peer.ip().to_canonical().to_string()
    }

    pub fn host(&self) -> String {
        self.local.ip().to_canonical().to_string()
    }
}

/// The open connections, by id.
#[derive(Default)]
pub struct Registry {
    conns: RwLock<HashMap<u64, Arc<ConnInfo>>>,
}

/// Keeps a connection in the registry until dropped.
pub struct Registered {
    registry: Arc<Registry>,
    pub info: Arc<ConnInfo>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .conns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.info.id);
    }
}

impl Registry {
    /// Registers a connection; its close token is a child of `shutdown`, so one wait covers
    /// both an operator's close and the broker's shutdown.
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        peer: SocketAddr,
        local: SocketAddr,
        tls: bool,
        shutdown: &CancellationToken,
    ) -> Registered {
        let info = Arc::new(ConnInfo {
            id,
            name: format!("{} -> {}", host_port(&peer), host_port(&local)),
            peer,
            local,
            connected_at: crate::message::now_ms(),
            tls,
            frame_max: AtomicU32::new(0),
            channel_max: AtomicU16::new(0),
            heartbeat: AtomicU16::new(0),
            stats: ConnStats::default(),
            hold: AtomicU8::new(Hold::None as u8),
            session: Mutex::new(Session::default()),
            channels: Mutex::new(BTreeMap::new()),
            close: shutdown.child_token(),
            close_reason: Mutex::new(None),
        });
        self.conns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, info.clone());
        Registered {
            registry: self.clone(),
            info,
        }
    }

    /// Every open connection, oldest first.
    pub fn all(&self) -> Vec<Arc<ConnInfo>> {
        let mut v: Vec<_> = self
            .conns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<ConnInfo>> {
        self.conns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|c| c.name == name)
            .cloned()
    }

    pub fn by_id(&self, id: u64) -> Option<Arc<ConnInfo>> {
        self.conns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Open connections in `vhost`.
    pub fn in_vhost(&self, vhost: &str) -> Vec<Arc<ConnInfo>> {
        self.all()
            .into_iter()
            .filter(|c| {
                let s = c.session_lock();
                s.open && s.vhost == vhost
            })
            .collect()
    }

    /// The open connections of `user` (for user limits).
    pub fn of_user(&self, user: &str) -> Vec<Arc<ConnInfo>> {
        self.all()
            .into_iter()
            .filter(|c| {
                let s = c.session_lock();
                s.open && s.user == user
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.conns.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples every connection's and channel's rates.
    pub fn sample(&self, secs: f64) {
        for c in self.all() {
            c.stats.sample(secs);
            for ch in c.channels() {
                ch.stats.sample(secs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_until_dropped_and_named_as_rabbitmq() {
        let r = Arc::new(Registry::default());
        let peer: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let local: SocketAddr = "[::1]:5672".parse().unwrap();
        let shutdown = CancellationToken::new();
        let g = r.register(7, peer, local, false, &shutdown);
        assert_eq!(g.info.name, "127.0.0.1:5000 -> [::1]:5672");
        assert_eq!(
            r.by_name("127.0.0.1:5000 -> [::1]:5672").map(|c| c.id),
            Some(7)
        );
        assert!(r.in_vhost("/").is_empty());
        g.info.update_session(|s| {
            s.vhost = "/".into();
            s.open = true;
        });
        assert_eq!(r.in_vhost("/").len(), 1);
        g.info.request_close("bye");
        assert_eq!(g.info.close_reason().as_deref(), Some("bye"));
        drop(g);
        assert!(r.is_empty());
    }
}
