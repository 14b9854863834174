//! Delayed messages (`x-delayed-message` exchanges): a message published with an `x-delay`
//! header is held for that many milliseconds, then routed by the exchange's `x-delayed-type`.
//!
//! Every held message is written to the store under a hidden queue of the exchange
//! (`amq.delayed.<exchange>`, never visible as a queue) at a position ordered by due time
//! (`due_ms << 20 | counter`), so the store is the index by due time and pending delays survive
//! a restart (persistent messages of a durable exchange). Memory holds only the earliest
//! `MEM_CAP` of them: every message due at or before `horizon` is in memory, later ones may be
//! only in the store and are read in due order when memory runs dry. One task per exchange
//! sleeps until the earliest due time; firing routes the message and removes its held position
//! in one store commit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use warren_protocol::AMQPValue;
use warren_storage::{MessageStore, Op, QueueRecord};

use crate::exchange::Exchange;
use crate::message::{now_ms, Message};
use crate::persist::Persistence;
use crate::queue::Queue;
use crate::vhost::VHost;

/// The exchange type, and the name prefix of the hidden store queues.
pub const KIND: &str = "x-delayed-message";
pub const HIDDEN_PREFIX: &str = "amq.delayed.";
/// Held messages kept in memory, at most (the rest wait in the store).
const MEM_CAP: usize = 4096;
/// Messages read from the store per trip.
const WINDOW: usize = 1024;
const WINDOW_BYTES: usize = 4 << 20;
const COUNTER_BITS: u32 = 20;
/// The latest due time a position key can hold: keys are stored as positive `i64`s.
const MAX_DUE_MS: u64 = (i64::MAX as u64) >> COUNTER_BITS;

/// The position key of a message held for `delay` ms from `now` (`n` orders arrivals within a
/// millisecond). A delay past `MAX_DUE_MS` (about 200 years from now) waits until then: the key
/// never wraps, so due order and the stored order agree for every `x-delay`.
fn position_key(now: u64, delay: u64, n: u64) -> u64 {
    let due = now.saturating_add(delay).min(MAX_DUE_MS);
    (due << COUNTER_BITS) | (n & ((1 << COUNTER_BITS) - 1))
}

/// The `x-delay` header: Some(ms) for a positive delay.
pub fn delay_of(msg: &Message) -> Option<u64> {
    let props = msg.properties();
    let v = props.headers().as_ref()?.inner().get("x-delay")?;
    let ms = match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse::<i64>().ok()?,
        other => crate::args::as_int(other)?,
    };
    (ms > 0).then_some(ms as u64)
}

#[derive(Default)]
struct State {
    /// Held messages by position key (due time, then arrival).
    mem: BTreeMap<u64, Arc<Message>>,
    /// Every held message with a key at or below this is in `mem`.
    horizon: u64,
    /// Messages past the horizon may be in the store.
    beyond: bool,
    loading: bool,
    deleted: bool,
}

pub struct Delayer {
    vhost: Weak<VHost>,
    exchange: Weak<Exchange>,
    exchange_name: String,
    durable: bool,
    /// The hidden store queue holding this exchange's messages.
    queue_id: AtomicI64,
    counter: AtomicU64,
    persist: Arc<Persistence>,
    /// Std mutex: short sections, never held across `.await`.
    state: Mutex<State>,
    wake: Notify,
}

impl std::fmt::Debug for Delayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Delayer({:?})", self.exchange_name)
    }
}

impl Delayer {
    /// A delayer for a new exchange (`recovered`: the hidden queue's id and stored count).
    pub fn start(
        vhost: &Arc<VHost>,
        exchange: &Arc<Exchange>,
        recovered: Option<(i64, u64)>,
    ) -> Arc<Delayer> {
        let persist = vhost.persist.clone();
        let (queue_id, stored) = match recovered {
            Some(r) => r,
            None => {
                let id = persist.next_queue_id();
                if exchange.durable {
                    persist.put_queue(QueueRecord {
                        id,
                        vhost: vhost.name.clone(),
                        name: format!("{HIDDEN_PREFIX}{}", exchange.name),
                        auto_delete: false,
                        arguments: Default::default(),
                        delivered_seq: 0,
                    });
                }
                (id, 0)
            }
        };
        let d = Arc::new(Delayer {
            vhost: Arc::downgrade(vhost),
            exchange: Arc::downgrade(exchange),
            exchange_name: exchange.name.clone(),
            durable: exchange.durable,
            queue_id: AtomicI64::new(queue_id),
            counter: AtomicU64::new(0),
            persist,
            state: Mutex::new(State {
                horizon: if stored > 0 { 0 } else { u64::MAX },
                beyond: stored > 0,
                ..State::default()
            }),
            wake: Notify::new(),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(d.clone().run());
        }
        d
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each change is a complete map/flag update: a poisoned lock still holds valid state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue_id(&self) -> i64 {
        self.queue_id.load(Ordering::Relaxed)
    }

    /// Holds `msg` for `delay` ms. Returns the store ticket a publisher confirm waits for (0
    /// when the message need not survive a restart).
    pub fn hold(&self, msg: &Arc<Message>, delay: u64) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let key = position_key(now_ms(), delay, n);
        let ticket = self.persist.submit(Op::Insert {
            message: Arc::new(msg.to_row()),
            entries: vec![(self.queue_id(), key as i64)],
        });
        let mut g = self.lock();
        if g.deleted {
            return 0;
        }
        let earliest = g.mem.first_key_value().is_none_or(|(k, _)| key < *k);
        if key <= g.horizon || g.loading {
            // Held for a while: its own copy, not a slice pinning the connection's read buffer.
            g.mem.insert(key, Arc::new(msg.compacted()));
            if g.mem.len() > MEM_CAP {
                // Keep the earliest three quarters; the rest wait in the store.
                while g.mem.len() > MEM_CAP / 4 * 3 {
                    if let Some((k, _)) = g.mem.pop_last() {
                        g.horizon = g.horizon.min(k - 1);
                    }
                }
                g.beyond = true;
            }
        } else {
            g.beyond = true;
        }
        drop(g);
        if earliest {
            self.wake.notify_one();
        }
        if self.durable && msg.is_persistent() {
            ticket
        } else {
            0
        }
    }

    /// The exchange was deleted: stop, and drop the held messages with the hidden queue.
    pub fn delete(&self, vhost: &str) {
        {
            let mut g = self.lock();
            g.deleted = true;
            g.mem.clear();
        }
        self.wake.notify_one();
        self.persist.delete_queue(
            self.queue_id(),
            vhost,
            &format!("{HIDDEN_PREFIX}{}", self.exchange_name),
        );
    }

    async fn run(self: Arc<Self>) {
        loop {
            enum Next {
                Stop,
                Load(u64),
                Fire,
                Sleep(u64),
                Wait,
            }
            let next = {
                let g = self.lock();
                let first = g.mem.first_key_value().map(|(k, _)| *k);
                match first {
                    _ if g.deleted => Next::Stop,
                    Some(k) if k <= g.horizon => {
                        let due = k >> COUNTER_BITS;
                        let now = now_ms();
                        if due <= now {
                            Next::Fire
                        } else {
                            Next::Sleep(due - now)
                        }
                    }
                    _ if g.beyond => Next::Load(g.horizon),
                    _ => Next::Wait,
                }
            };
            match next {
                Next::Stop => return,
                Next::Fire => self.fire(),
                Next::Load(after) => {
                    if self.load(after).await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                Next::Sleep(ms) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                Next::Wait => self.wake.notified().await,
            }
        }
    }

    /// Routes every message that is due.
    fn fire(&self) {
        let (Some(vh), Some(x)) = (self.vhost.upgrade(), self.exchange.upgrade()) else {
            self.lock().deleted = true;
            return;
        };
        let now = now_ms();
        let due: Vec<(u64, Arc<Message>)> = {
            let mut g = self.lock();
            let mut out = Vec::new();
            while let Some((&k, _)) = g.mem.first_key_value() {
                if k > g.horizon || (k >> COUNTER_BITS) > now {
                    break;
                }
                if let Some(e) = g.mem.pop_first() {
                    out.push(e);
                }
            }
            out
        };
        let mut targets = Vec::new();
        for (key, msg) in due {
            let removal = Op::Remove {
                queue_id: self.queue_id(),
                seq: key as i64,
                message_id: msg.id as i64,
            };
            targets.clear();
            vh.route(&x, &msg, &mut targets);
            if targets.is_empty() {
                self.persist.submit(removal);
            } else {
                Queue::publish_atomic(&targets, &msg, Some(removal));
            }
        }
    }

    /// Reads the next messages past `after` from the store, in due order.
    async fn load(&self, after: u64) -> Result<(), ()> {
        self.lock().loading = true;
        let p = &self.persist;
        if !p.writer.wait(p.writer.last_ticket()).await {
            return Err(());
        }
        let rows = match p
            .store
            .read_queue(
                self.queue_id(),
                after.min(i64::MAX as u64) as i64,
                WINDOW,
                WINDOW_BYTES,
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(exchange = %self.exchange_name, error = %e, "reading delayed messages failed");
                self.lock().loading = false;
                return Err(());
            }
        };
        let bytes: usize = rows.iter().map(|r| r.message.body.len()).sum();
        let complete = rows.len() < WINDOW && bytes < WINDOW_BYTES;
        let mut g = self.lock();
        g.loading = false;
        let mut last = after;
        for row in rows {
            let key = row.seq as u64;
            let id = row.message.id;
            last = last.max(key);
            if g.mem.contains_key(&key) {
                continue;
            }
            match Message::from_row(row.message, Some(p.gauge.clone())) {
                Some(m) => {
                    g.mem.insert(key, Arc::new(m));
                }
                None => {
                    tracing::error!(exchange = %self.exchange_name, key, "stored delayed message unreadable; dropped");
                    p.submit(Op::Remove {
                        queue_id: self.queue_id(),
                        seq: key as i64,
                        message_id: id,
                    });
                }
            }
        }
        if complete {
            g.horizon = u64::MAX;
            g.beyond = false;
        } else {
            g.horizon = last;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_keys_keep_due_order_and_fit_a_stored_i64() {
        let now = 1_790_000_000_000;
        let mut last = 0;
        // Before the bound, `due << 20` wrapped for delays past about 2^43 ms.
        for delay in [
            1,
            1000,
            1 << 32,
            1 << 43,
            1 << 44,
            i64::MAX as u64,
            u64::MAX,
        ] {
            let k = position_key(now, delay, 0);
            assert!(k <= i64::MAX as u64, "delay {delay}: key {k} does not fit");
            assert!(k >= last, "delay {delay} sorts before a shorter one");
            last = k;
        }
        assert!(position_key(now, 5, 7) < position_key(now, 5, 8));
        assert!(position_key(now, 5, (1 << 20) + 3) < position_key(now, 6, 0));
    }
}
