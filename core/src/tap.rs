//! Live tail: watchers of an exchange see samples of the messages published to it and where
//! they were routed, without a queue of their own. Bounded everywhere: a few watchers per
//! exchange, at most `PER_SECOND` samples per watcher per second, a small channel that drops
//! what a slow watcher cannot take, and only the first `BODY_PREFIX` bytes of each body. The
//! publish path pays one relaxed atomic load while nobody watches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use warren_protocol::AMQPProperties;

use crate::message::{now_ms, Message};
use crate::queue::Queue;

/// Watchers one exchange may have at once.
pub const MAX_WATCHERS: usize = 8;
/// Samples per watcher per second; the rest are counted as dropped.
pub const PER_SECOND: u32 = 20;
/// Body bytes a sample carries.
pub const BODY_PREFIX: usize = 1024;
/// Samples waiting for a watcher.
const BACKLOG: usize = 64;

/// One message as a watcher sees it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: u64,
    pub exchange: String,
    pub routing_key: String,
    pub properties: AMQPProperties,
    pub body: Bytes,
    pub body_len: usize,
    /// The queues it was routed to (empty: unroutable).
    pub queues: Vec<String>,
    /// Messages this watcher did not get since its previous sample (sampling, or it was slow).
    pub dropped: u64,
}

struct Watcher {
    tx: mpsc::Sender<Sample>,
    window_ms: u64,
    in_window: u32,
    dropped: u64,
}

/// An exchange's watchers.
#[derive(Default)]
pub struct Taps {
    active: AtomicUsize,
    watchers: Mutex<Vec<Watcher>>,
}

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Taps({})", self.active.load(Ordering::Relaxed))
    }
}

impl Taps {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Watcher>> {
        self.watchers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching; None when the exchange already has `MAX_WATCHERS`. Dropping the
    /// receiver stops it.
    pub fn watch(&self) -> Option<mpsc::Receiver<Sample>> {
        let mut w = self.lock();
        w.retain(|x| !x.tx.is_closed());
        if w.len() >= MAX_WATCHERS {
            return None;
        }
        let (tx, rx) = mpsc::channel(BACKLOG);
        w.push(Watcher {
            tx,
            window_ms: 0,
            in_window: 0,
            dropped: 0,
        });
        self.active.store(w.len(), Ordering::Relaxed);
        Some(rx)
    }

    /// Called after routing a message published to this exchange.
    #[inline]
    pub fn offer(&self, msg: &Message, routed: &[Arc<Queue>]) {
        if self.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.offer_slow(msg, routed);
    }

    #[cold]
    fn offer_slow(&self, msg: &Message, routed: &[Arc<Queue>]) {
        let now = now_ms();
        let mut w = self.lock();
        w.retain(|x| !x.tx.is_closed());
        self.active.store(w.len(), Ordering::Relaxed);
        let mut sample: Option<Sample> = None;
        for x in w.iter_mut() {
            if now.saturating_sub(x.window_ms) >= 1000 {
                x.window_ms = now;
                x.in_window = 0;
            }
            if x.in_window >= PER_SECOND {
                x.dropped += 1;
                continue;
            }
            let mut s = sample
                .get_or_insert_with(|| Sample {
                    at_ms: now,
                    exchange: msg.exchange.to_string(),
                    routing_key: msg.routing_key.to_string(),
                    properties: msg.properties(),
                    body: msg.body.slice(..msg.body.len().min(BODY_PREFIX)),
                    body_len: msg.body.len(),
                    queues: routed.iter().map(|q| q.name().to_string()).collect(),
                    dropped: 0,
                })
                .clone();
            s.dropped = x.dropped;
            match x.tx.try_send(s) {
                Ok(()) => {
                    x.in_window += 1;
                    x.dropped = 0;
                }
                Err(_) => x.dropped += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(rk: &str, body: &[u8]) -> Message {
        Message::encoded(
            1,
            "x".into(),
            rk.into(),
            &Default::default(),
            Bytes::copy_from_slice(body),
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn watchers_get_bounded_samples_and_go_away_when_dropped() {
        let t = Taps::default();
        t.offer(&msg("nobody", b"x"), &[]);
        let mut rx = t.watch().unwrap();
        let big = vec![b'a'; 5000];
        for i in 0..100 {
            t.offer(&msg(&format!("k{i}"), &big), &[]);
        }
        let mut got = Vec::new();
        while let Ok(s) = rx.try_recv() {
            got.push(s);
        }
        assert_eq!(
            got.len(),
            PER_SECOND as usize,
            "sampled to the per-second cap"
        );
        assert_eq!(got[0].routing_key, "k0");
        assert_eq!(got[0].body.len(), BODY_PREFIX);
        assert_eq!(got[0].body_len, 5000);
        assert_eq!(got[0].dropped, 0);
        // The cap: MAX_WATCHERS at once; a dropped receiver frees its place.
        let more: Vec<_> = (1..MAX_WATCHERS).map(|_| t.watch().unwrap()).collect();
        assert!(t.watch().is_none());
        drop(more);
        drop(rx);
        assert!(t.watch().is_some());
    }
}
