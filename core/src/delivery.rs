//! What a channel shares with the queues that deliver to it: `ChannelHandle` (delivery tags, the
//! unacked map, consumers, the channel-wide prefetch) and `Consumer` (per-consumer prefetch).
//! A `std::sync::Mutex` guards the channel's delivery state; it is taken after a queue's lock
//! during dispatch and never the other way round, and never across `.await`. Frames leave
//! through `DeliverySink`, the trait the connection's outbox implements.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use warren_protocol::{
    protocol::{basic, AMQPClass},
    ShortString,
};

use crate::error::{AmqpError, AmqpResult};
use crate::message::Message;
use crate::queue::{Entry, Queue};
use crate::stats::{ChannelStats, GlobalStats};

/// A delivery the client has not acknowledged yet.
#[derive(Debug)]
pub struct Unacked {
    pub queue: Arc<Queue>,
    pub entry: Entry,
    /// The consumer whose prefetch credit it holds (None for basic.get).
    pub consumer: Option<Arc<Consumer>>,
    /// When it was delivered (ms since the epoch): `x-consumer-timeout`, and the message
    /// browser's "unacked since".
    pub at: u64,
}

/// An unacknowledged delivery as the message browser lists it.
#[derive(Debug, Clone)]
pub struct HeldDelivery {
    pub delivery_tag: u64,
    /// The message's position in its queue.
    pub seq: u64,
    pub redelivered: bool,
    /// The consumer holding it (None: taken by basic.get).
    pub consumer_tag: Option<String>,
    /// Delivered at (ms since the epoch).
    pub at: u64,
    /// Its body size, when the body is held in memory.
    pub body_bytes: Option<u64>,
}

#[derive(Default)]
struct State {
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: HashMap<String, Arc<Consumer>>,
    closed: bool,
    /// Tags taken back by a consumer timeout: a late ack of one is ignored, not a 406.
    timed_out: std::collections::BTreeSet<u64>,
    /// Unacked deliveries up to this tag have been offered to the sweeper (`unswept`).
    swept: u64,
}

/// Where a channel's frames go. Queues and the reply-to registry reach a consumer's connection
/// only through this trait (the connection's outbox implements it), never through an I/O type.
pub trait DeliverySink: Send + Sync {
    /// Queues a method frame (control frames are always taken).
    fn send_method(&self, channel: u16, method: AMQPClass);
    /// Queues a content-bearing method and the message's content.
    fn send_content(&self, channel: u16, method: AMQPClass, msg: Arc<Message>);
    /// Queues a basic.deliver of `msg` to `consumer` and the message's content. By default the
    /// method is built here; an outbox may encode it later without building one per delivery.
    fn send_deliver(
        &self,
        channel: u16,
        consumer: &Arc<Consumer>,
        delivery_tag: u64,
        redelivered: bool,
        msg: Arc<Message>,
    ) {
        let method = AMQPClass::Basic(warren_protocol::protocol::basic::AMQPMethod::Deliver(
            warren_protocol::protocol::basic::Deliver {
                consumer_tag: consumer.tag.clone(),
                delivery_tag,
                redelivered,
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
            },
        ));
        self.send_content(channel, method, msg);
    }
    /// May a delivery be added now?
    fn has_room(&self) -> bool;
    /// Re-run `queue`'s dispatch once there is room again.
    fn park(&self, queue: &Arc<Queue>);
    /// Resolves once there is room (or the connection is gone).
    fn wait_room(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The shared half of a channel.
pub struct ChannelHandle {
    pub id: u16,
    pub conn_id: u64,
    /// The connection's outgoing frames.
    pub sink: Arc<dyn DeliverySink>,
    /// The client asked for server-sent basic.cancel (consumer_cancel_notify).
    pub cancel_notify: bool,
    state: Mutex<State>,
    global_limit: AtomicU32,
    global_unacked: AtomicU32,
    /// This channel's counters (the management API's `message_stats`).
    pub stats: ChannelStats,
    /// The node's totals, counted beside the channel's.
    pub global: Arc<GlobalStats>,
    /// basic.qos prefetch for new consumers (global=false).
    pub prefetch: AtomicU32,
    /// 0: plain, 1: confirm mode, 2: transactional.
    pub mode: AtomicU8,
}

/// A channel's mode, for `ChannelHandle::mode`.
pub const MODE_CONFIRM: u8 = 1;
pub const MODE_TX: u8 = 2;

impl std::fmt::Debug for ChannelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Channel({}/{})", self.conn_id, self.id)
    }
}

/// Why a consumer cannot take a message now.
#[derive(Debug, PartialEq, Eq)]
pub enum NoCredit {
    /// Prefetch used up: an ack will re-dispatch.
    Prefetch,
    /// The connection's outgoing buffer is full: park on the outbox.
    Outbox,
    /// The channel is closing.
    Closed,
}

impl ChannelHandle {
    pub fn new(
        id: u16,
        conn_id: u64,
        sink: Arc<dyn DeliverySink>,
        cancel_notify: bool,
        global: Arc<GlobalStats>,
    ) -> Arc<Self> {
        Arc::new(ChannelHandle {
            id,
            conn_id,
            sink,
            cancel_notify,
            state: Mutex::new(State::default()),
            global_limit: AtomicU32::new(0),
            global_unacked: AtomicU32::new(0),
            stats: ChannelStats::default(),
            global,
            prefetch: AtomicU32::new(0),
            mode: AtomicU8::new(0),
        })
    }

    /// The channel-wide prefetch (basic.qos global=true); 0 is unlimited.
    pub fn global_prefetch(&self) -> u32 {
        self.global_limit.load(Ordering::Relaxed)
    }

    /// (consumers, unacknowledged deliveries)
    pub fn sizes(&self) -> (usize, usize) {
        let g = self.lock();
        (g.consumers.len(), g.unacked.len())
    }

    /// This channel's consumers.
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.lock().consumers.values().cloned().collect()
    }

    /// Calls `f` with the queue of each unacknowledged delivery.
    pub fn each_unacked(&self, mut f: impl FnMut(&Arc<Queue>)) {
        for u in self.lock().unacked.values() {
            f(&u.queue);
        }
    }

    /// Unacked deliveries made before `before_ms` (ms since the epoch) that still hold their
    /// bodies, oldest first, at most `max`, each offered once: (tag, queue). Delivery tags
    /// grow with time, so the scan stops at the first younger delivery.
    pub fn unswept(&self, before_ms: u64, max: usize) -> Vec<(u64, Arc<Queue>)> {
        let mut g = self.lock();
        let mut out = Vec::new();
        let mut last = g.swept;
        for (tag, u) in g.unacked.range(g.swept.saturating_add(1)..) {
            if u.at >= before_ms || out.len() >= max {
                break;
            }
            last = *tag;
            if u.entry.msg.is_some() {
                out.push((*tag, u.queue.clone()));
            }
        }
        g.swept = last;
        out
    }

    /// Calls `f` on the entry of unacked delivery `tag`, if it is still unacked. Callers may
    /// hold the delivering queue's lock (queue, then channel).
    pub fn with_unacked<R>(&self, tag: u64, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.lock().unacked.get_mut(&tag).map(|u| f(&mut u.entry))
    }

    /// This channel's unacknowledged deliveries from `queue`, by delivery tag.
    pub fn unacked_from(&self, queue: &Arc<Queue>) -> Vec<HeldDelivery> {
        self.lock()
            .unacked
            .iter()
            .filter(|(_, u)| Arc::ptr_eq(&u.queue, queue))
            .map(|(tag, u)| HeldDelivery {
                delivery_tag: *tag,
                seq: u.entry.seq,
                redelivered: u.entry.redelivered,
                consumer_tag: u.consumer.as_ref().map(|c| c.tag.to_string()),
                at: u.at,
                body_bytes: u.entry.msg.as_ref().map(|m| m.body.len() as u64),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update to State is a single map operation; a poisoned lock holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_global_prefetch(&self, n: u32) {
        self.global_limit.store(n, Ordering::Relaxed);
    }

    /// The channel-wide prefetch is used up.
    fn global_full(&self) -> bool {
        let limit = self.global_limit.load(Ordering::Relaxed);
        limit > 0 && self.global_unacked.load(Ordering::Relaxed) >= limit
    }

    fn reserve_global(&self) -> bool {
        let limit = self.global_limit.load(Ordering::Relaxed);
        if limit == 0 {
            self.global_unacked.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.global_unacked
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn release_global(&self) {
        let _ = self
            .global_unacked
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Records a delivery and returns its tag; None if the channel has closed.
    pub fn record(
        &self,
        queue: &Arc<Queue>,
        entry: Entry,
        consumer: Option<&Arc<Consumer>>,
        ack: bool,
    ) -> Result<u64, Entry> {
        let mut g = self.lock();
        if g.closed {
            return Err(entry);
        }
        g.next_tag += 1;
        let tag = g.next_tag;
        let counters = [
            &self.stats.redeliver,
            &self.global.redeliver,
            &queue.stats.redeliver,
        ];
        if entry.redelivered {
            counters.iter().for_each(|c| c.inc());
        }
        let counters = match (consumer.is_some(), ack) {
            (true, true) => [
                &self.stats.deliver,
                &self.global.deliver,
                &queue.stats.deliver,
            ],
            (true, false) => [
                &self.stats.deliver_no_ack,
                &self.global.deliver_no_ack,
                &queue.stats.deliver_no_ack,
            ],
            (false, true) => [&self.stats.get, &self.global.get, &queue.stats.get],
            (false, false) => [
                &self.stats.get_no_ack,
                &self.global.get_no_ack,
                &queue.stats.get_no_ack,
            ],
        };
        counters.iter().for_each(|c| c.inc());
        if ack {
            let at = crate::message::now_ms();
            g.unacked.insert(
                tag,
                Unacked {
                    queue: queue.clone(),
                    entry,
                    consumer: consumer.cloned(),
                    at,
                },
            );
        }
        Ok(tag)
    }

    /// A delivery tag for a delivery that is not acknowledged (direct reply-to); None once
    /// the channel has closed.
    pub fn next_tag(&self) -> Option<u64> {
        let mut g = self.lock();
        if g.closed {
            return None;
        }
        g.next_tag += 1;
        Some(g.next_tag)
    }

    /// Takes the deliveries an ack, nack or reject names. `tag == 0` with `multiple` means all.
    pub fn take_unacked(&self, tag: u64, multiple: bool) -> AmqpResult<Vec<(u64, Unacked)>> {
        let mut g = self.lock();
        if multiple && tag == 0 {
            return Ok(std::mem::take(&mut g.unacked).into_iter().collect());
        }
        if !g.unacked.contains_key(&tag) {
            if g.timed_out.remove(&tag) {
                return Ok(Vec::new());
            }
            return Err(AmqpError::precondition(format!(
                "unknown delivery tag {tag}"
            )));
        }
        if multiple {
            let rest = g.unacked.split_off(&(tag + 1));
            let taken = std::mem::replace(&mut g.unacked, rest);
            Ok(taken.into_iter().collect())
        } else {
            Ok(g.unacked
                .remove(&tag)
                .map(|u| (tag, u))
                .into_iter()
                .collect())
        }
    }

    /// Puts deliveries back (tx.rollback of acks).
    pub fn restore_unacked(&self, items: Vec<(u64, Unacked)>) {
        let mut g = self.lock();
        for (tag, u) in items {
            // Back under the sweeper's watermark: offered to it again.
            if tag <= g.swept {
                g.swept = tag.saturating_sub(1);
            }
            g.unacked.insert(tag, u);
        }
    }

    /// Releases the prefetch credit a finished delivery held.
    pub fn release(&self, u: &Unacked) {
        if let Some(c) = &u.consumer {
            let _ = c
                .unacked
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
            self.release_global();
        }
    }

    /// With a channel-wide prefetch, an ack frees credit for every consumer on the channel:
    /// re-dispatch all their queues (the channel lock is released first).
    pub fn dispatch_all_consumers_if_global(&self) {
        if self.global_limit.load(Ordering::Relaxed) == 0 {
            return;
        }
        let queues: Vec<Arc<Queue>> = self
            .lock()
            .consumers
            .values()
            .filter_map(|c| c.queue.upgrade())
            .collect();
        for q in queues {
            q.dispatch();
        }
    }

    pub fn add_consumer(&self, c: Arc<Consumer>) -> AmqpResult<()> {
        let mut g = self.lock();
        if g.consumers.contains_key(c.tag.as_str()) {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{}'",
                c.tag
            )));
        }
        g.consumers.insert(c.tag.as_str().to_string(), c);
        Ok(())
    }

    pub fn has_consumer(&self, tag: &str) -> bool {
        self.lock().consumers.contains_key(tag)
    }

    pub fn remove_consumer(&self, tag: &str) -> Option<Arc<Consumer>> {
        self.lock().consumers.remove(tag)
    }

    pub fn consumer_count(&self) -> usize {
        self.lock().consumers.len()
    }

    /// The server cancels a consumer (its queue was deleted): forget it and tell the client if
    /// it asked to be told.
    pub fn server_cancel(&self, tag: &ShortString) {
        if self.lock().consumers.remove(tag.as_str()).is_some() && self.cancel_notify {
            self.sink.send_method(
                self.id,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: tag.clone(),
                    nowait: true,
                })),
            );
        }
    }

    /// When the oldest delivery `consumer` holds was made (ms), if it holds any.
    pub fn oldest_unacked(&self, consumer: &Arc<Consumer>) -> Option<u64> {
        let g = self.lock();
        g.unacked
            .values()
            .filter(|u| {
                u.consumer
                    .as_ref()
                    .is_some_and(|c| Arc::ptr_eq(c, consumer))
            })
            .map(|u| u.at)
            .next()
    }

    /// A consumer timed out: it is cancelled (basic.cancel to a client that asked for
    /// notifications) and the deliveries it holds are returned, to be requeued. Late acks of
    /// their tags are ignored.
    pub fn time_out_consumer(&self, consumer: &Arc<Consumer>) -> Vec<Entry> {
        let held = {
            let mut g = self.lock();
            let tags: Vec<u64> = g
                .unacked
                .iter()
                .filter(|(_, u)| {
                    u.consumer
                        .as_ref()
                        .is_some_and(|c| Arc::ptr_eq(c, consumer))
                })
                .map(|(t, _)| *t)
                .collect();
            let mut held = Vec::with_capacity(tags.len());
            for t in tags {
                if let Some(u) = g.unacked.remove(&t) {
                    g.timed_out.insert(t);
                    held.push(u);
                }
            }
            held
        };
        for u in &held {
            self.release(u);
        }
        self.server_cancel(&consumer.tag);
        held.into_iter().map(|u| u.entry).collect()
    }

    /// Closes the channel: no more deliveries; returns its consumers and unacked deliveries.
    pub fn close(&self) -> (Vec<Arc<Consumer>>, Vec<Unacked>) {
        let mut g = self.lock();
        g.closed = true;
        let consumers = g.consumers.drain().map(|(_, c)| c).collect();
        let unacked = std::mem::take(&mut g.unacked).into_values().collect();
        (consumers, unacked)
    }

    /// Takes every unacked delivery (basic.recover).
    pub fn take_all_unacked(&self) -> Vec<Unacked> {
        std::mem::take(&mut self.lock().unacked)
            .into_values()
            .collect()
    }
}

/// A basic.consume subscription.
pub struct Consumer {
    pub tag: ShortString,
    pub channel: Arc<ChannelHandle>,
    pub queue: Weak<Queue>,
    pub no_ack: bool,
    pub exclusive: bool,
    /// `x-priority`: consumers of a higher priority are served first while they have credit.
    pub priority: i64,
    /// Per-consumer prefetch (basic.qos global=false before the consume); 0 is unlimited.
    pub prefetch: u32,
    pub unacked: AtomicU32,
    pub active: AtomicBool,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Consumer({}, {:?})", self.tag, self.channel)
    }
}

impl Consumer {
    /// Takes one unit of credit for a delivery.
    pub fn reserve(&self) -> Result<(), NoCredit> {
        if !self.active.load(Ordering::Acquire) {
            return Err(NoCredit::Closed);
        }
        // Prefetch before the outbox: `Outbox` means this consumer could take the message
        // but its connection is behind (the queue then parks there and may slow publishers).
        if !self.no_ack
            && ((self.prefetch > 0 && self.unacked.load(Ordering::Acquire) >= self.prefetch)
                || self.channel.global_full())
        {
            return Err(NoCredit::Prefetch);
        }
        if !self.channel.sink.has_room() {
            return Err(NoCredit::Outbox);
        }
        if self.no_ack {
            return Ok(());
        }
        if !self.channel.reserve_global() {
            return Err(NoCredit::Prefetch);
        }
        self.unacked.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Gives back credit taken by `reserve` for a delivery that did not happen.
    pub fn unreserve(&self) {
        if !self.no_ack {
            let _ = self
                .unacked
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
            self.channel.release_global();
        }
    }
}
