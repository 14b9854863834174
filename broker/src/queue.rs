//! `Queue`: one queue's messages and consumers. Each queue serialises its own state behind a
//! `std::sync::Mutex` (held only for short, non-awaiting sections); publishers, acks and writers
//! all call into it directly, so there is no global lock on the publish/deliver path and no queue
//! task to hop through. Dispatch is round-robin over consumers with credit.
//!
//! A queue's messages are in two parts, in sequence order:
//! - `ready`: the head, in memory (entries in seq order, so a requeued message goes back to its
//!   place). An entry holds its body, or only the message id when the body is stored and may be
//!   in the cache;
//! - `paged`: the rest, only in the store (a count and a cursor). Once anything is paged, every
//!   newer message is paged too, so order holds. A loader task reads the next window when the head
//!   runs low, and re-reads bodies the cache evicted.
//!
//! A position is written to the store (`Op::Insert`, under this queue's lock, so positions reach
//! the writer in seq order) when the message is persistent and the queue durable, or when it
//! is paged. Acks and drops of stored positions submit `Op::Remove`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use warren_protocol::{
    protocol::{basic, AMQPClass},
    FieldTable,
};
use warren_storage::{MessageRow, MessageStore, Op, QueueSummary};

use crate::delivery::{ChannelHandle, Consumer, NoCredit};
use crate::error::{AmqpError, AmqpResult};
use crate::message::Message;
use crate::outbox::Outgoing;
use crate::persist::Persistence;

/// Most entries a queue's head holds before new messages page out. Normally the memory budget
/// (which counts each held message's entry) pages long before this; it only caps the index.
const MAX_HELD: usize = 1 << 22;
/// The loader reads this many entries (or `WINDOW_BYTES`) per trip...
const WINDOW: usize = 1024;
const WINDOW_BYTES: usize = 4 << 20;
/// ...when the head has fewer than this left.
const LOW_WATER: usize = 256;
/// Head entries whose evicted bodies one trip re-reads.
const REFILL: usize = 64;

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub id: u64,
    /// The body, or None when it is stored (then it may be in the cache).
    pub msg: Option<Arc<Message>>,
    pub redelivered: bool,
    /// A position row exists (or is on its way) in the store.
    pub stored: bool,
}

#[derive(Default)]
struct Paged {
    /// Messages only in the store, all with seq > cursor.
    count: u64,
    cursor: u64,
    /// Seqs at or below this were committed before start (gaps allowed); above it the loader
    /// takes only consecutive seqs.
    sealed: u64,
    loading: bool,
    /// Bumped by purge and delete: a load started before is discarded.
    epoch: u64,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Entry>,
    paged: Paged,
    next_seq: u64,
    consumers: Vec<Arc<Consumer>>,
    rr: usize,
    had_consumer: bool,
    deleted: bool,
    /// Recovered: seqs at or below were delivered before the restart.
    delivered_before: u64,
    /// Highest delivered seq reported to the store.
    delivered_reported: u64,
    /// Some position of this queue was written to the store.
    stored_any: bool,
}

/// The properties a queue was declared with.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub exclusive_owner: Option<u64>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

pub struct Queue {
    pub spec: QueueSpec,
    pub vhost: String,
    /// The store's number for this queue.
    pub id: i64,
    persist: Arc<Persistence>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queue({:?} in {:?})", self.spec.name, self.vhost)
    }
}

/// What removing a consumer left behind.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    NotFound,
    Removed,
    /// The last consumer of an auto-delete queue went: delete the queue.
    AutoDelete,
}

/// What publishing to a queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The queue was deleted meanwhile.
    Deleted,
    /// Held in memory only.
    Held,
    /// Written to the store under `ticket`; `durable` when the message must survive a restart
    /// (a publisher confirm waits for the ticket).
    Stored { ticket: u64, durable: bool },
}

/// Runs a store read to completion from synchronous code (basic.get on a paged queue). Needs the
/// multi-threaded runtime; None elsewhere.
fn block_on<F: std::future::Future>(f: F) -> Option<F::Output> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return None;
    }
    Some(tokio::task::block_in_place(|| handle.block_on(f)))
}

impl Queue {
    pub fn new(vhost: &str, spec: QueueSpec, id: i64, persist: Arc<Persistence>) -> Arc<Self> {
        Arc::new(Queue {
            spec,
            vhost: vhost.to_string(),
            id,
            persist,
            state: Mutex::new(State::default()),
        })
    }

    /// A durable queue rebuilt at start: its stored messages are paged, read lazily.
    pub fn recovered(
        vhost: &str,
        spec: QueueSpec,
        id: i64,
        persist: Arc<Persistence>,
        summary: QueueSummary,
        delivered_before: i64,
    ) -> Arc<Self> {
        let q = Queue::new(vhost, spec, id, persist);
        {
            let mut g = q.lock();
            let max = summary.max_seq.max(0) as u64;
            g.paged = Paged {
                count: summary.count,
                cursor: (summary.min_seq.max(1) - 1) as u64,
                sealed: max,
                loading: false,
                epoch: 0,
            };
            g.next_seq = max.max(delivered_before.max(0) as u64);
            g.delivered_before = delivered_before.max(0) as u64;
            g.delivered_reported = g.delivered_before;
            g.stored_any = summary.count > 0;
        }
        q
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // State changes are single steps that leave the queue consistent even if a panic
        // interrupted the holder, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Is this exclusive queue owned by another connection?
    pub fn locked_against(&self, conn_id: u64) -> bool {
        matches!(self.spec.exclusive_owner, Some(owner) if owner != conn_id)
    }

    /// 405 unless `conn_id` may use this queue.
    pub fn check_access(&self, conn_id: u64) -> AmqpResult<()> {
        if self.locked_against(conn_id) {
            return Err(AmqpError::locked_queue(&self.spec.name, &self.vhost));
        }
        Ok(())
    }

    /// (ready messages, consumers)
    pub fn counts(&self) -> (u32, u32) {
        let g = self.lock();
        let n = g.ready.len() as u64 + g.paged.count;
        (n.min(u32::MAX as u64) as u32, g.consumers.len() as u32)
    }

    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }

    /// Did this queue ever write a position to the store?
    pub fn stored_any(&self) -> bool {
        self.lock().stored_any
    }

    /// Enqueues a message and delivers what consumers can take. `row` is the message's store
    /// row, made once for all the queues it is routed to.
    pub fn publish(
        self: &Arc<Self>,
        msg: &Arc<Message>,
        row: &mut Option<Arc<MessageRow>>,
    ) -> Enqueued {
        let mut g = self.lock();
        if g.deleted {
            return Enqueued::Deleted;
        }
        g.next_seq += 1;
        let seq = g.next_seq;
        let durable = self.spec.durable && msg.is_persistent();
        let page = g.paged.count > 0
            || g.ready.len() >= MAX_HELD
            || (!g.ready.is_empty() && self.persist.over_budget());
        let stored = page || durable;
        let mut ticket = 0;
        if stored {
            let row = row.get_or_insert_with(|| Arc::new(msg.to_row())).clone();
            ticket = self.persist.submit(Op::Insert {
                message: row,
                entries: vec![(self.id, seq as i64)],
            });
            g.stored_any = true;
            if page {
                if g.paged.count == 0 {
                    g.paged.cursor = seq - 1;
                }
                g.paged.count += 1;
                self.maybe_load(&mut g);
                return Enqueued::Stored { ticket, durable };
            }
        }
        g.ready.push_back(Entry {
            seq,
            id: msg.id,
            msg: Some(msg.clone()),
            redelivered: false,
            stored,
        });
        self.dispatch_locked(&mut g);
        if stored {
            Enqueued::Stored { ticket, durable }
        } else {
            Enqueued::Held
        }
    }

    /// Delivers to consumers with credit until the queue is empty or nobody can take more.
    pub fn dispatch(self: &Arc<Self>) {
        let mut g = self.lock();
        self.dispatch_locked(&mut g);
    }

    /// The head entry's body, from the entry or the cache.
    fn body(&self, e: &Entry) -> Option<Arc<Message>> {
        e.msg.clone().or_else(|| self.persist.cache.get(&e.id))
    }

    fn dispatch_locked(self: &Arc<Self>, g: &mut State) {
        let n = g.consumers.len();
        let mut refused = 0;
        while refused < n && !g.ready.is_empty() {
            let Some(msg) = g.ready.front().and_then(|e| self.body(e)) else {
                break; // the loader brings the body back
            };
            let idx = g.rr % n;
            let consumer = g.consumers[idx].clone();
            match consumer.reserve() {
                Ok(()) => {
                    let Some(entry) = g.ready.pop_front() else {
                        break;
                    };
                    match self.deliver(g, &consumer, entry, msg) {
                        Ok(()) => {
                            g.rr = idx + 1;
                            refused = 0;
                        }
                        Err(entry) => {
                            consumer.unreserve();
                            g.ready.push_front(entry);
                            g.rr = idx + 1;
                            refused += 1;
                        }
                    }
                }
                Err(NoCredit::Outbox) => {
                    consumer.channel.outbox.park(self);
                    g.rr = idx + 1;
                    refused += 1;
                }
                Err(NoCredit::Prefetch | NoCredit::Closed) => {
                    g.rr = idx + 1;
                    refused += 1;
                }
            }
        }
        if n > 0 {
            g.rr %= n;
        }
        self.maybe_load(g);
    }

    /// What a delivered entry keeps while it waits for its ack: its body, unless memory is over
    /// budget and the message is stored, in which case the body goes to the cache (which may drop
    /// it; a requeue re-reads it).
    fn delivered(&self, g: &mut State, mut entry: Entry, msg: &Arc<Message>, ack: bool) -> Entry {
        if entry.stored {
            if self.spec.durable && entry.seq > g.delivered_reported {
                g.delivered_reported = entry.seq;
                self.persist.submit(Op::Delivered {
                    queue_id: self.id,
                    seq: g.delivered_reported as i64,
                });
            }
            if !ack {
                self.forget(&entry);
            } else if self.persist.over_budget() {
                self.persist.cache_body(msg);
                entry.msg = None;
            } else {
                entry.msg = Some(msg.clone());
            }
        }
        entry
    }

    /// Sends one message to a consumer; gives the entry back if its channel has closed.
    fn deliver(
        self: &Arc<Self>,
        g: &mut State,
        consumer: &Arc<Consumer>,
        entry: Entry,
        msg: Arc<Message>,
    ) -> Result<(), Entry> {
        let ch = &consumer.channel;
        let redelivered = entry.redelivered;
        let to_record = self.delivered(g, entry, &msg, !consumer.no_ack);
        let tag = match ch.record(self, to_record, Some(consumer), !consumer.no_ack) {
            Ok(tag) => tag,
            Err(back) => return Err(self.undeliver(back, msg, consumer.no_ack)),
        };
        ch.outbox.push(Outgoing::Content(
            ch.id,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: consumer.tag.clone(),
                delivery_tag: tag,
                redelivered,
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
            })),
            msg,
        ));
        Ok(())
    }

    /// A delivery its channel refused (closed meanwhile): the entry as it goes back to the head,
    /// with its body, and its stored position written again if `delivered` forgot it (no-ack).
    fn undeliver(&self, mut e: Entry, msg: Arc<Message>, no_ack: bool) -> Entry {
        if no_ack && e.stored {
            self.persist.submit(Op::Insert {
                message: Arc::new(msg.to_row()),
                entries: vec![(self.id, e.seq as i64)],
            });
        }
        e.msg = Some(msg);
        e
    }

    /// The entry is gone for good (acked, dropped): its stored position goes too.
    pub fn forget(&self, e: &Entry) {
        if e.stored {
            if e.msg.is_none() {
                // Its body may be in the cache, where it would only take room.
                self.persist.cache.invalidate(&e.id);
            }
            self.persist.submit(Op::Remove {
                queue_id: self.id,
                seq: e.seq as i64,
                message_id: e.id as i64,
            });
        }
    }

    /// basic.get: takes the head message for `channel`; None when empty.
    pub fn get(self: &Arc<Self>, channel: &Arc<ChannelHandle>, no_ack: bool) -> Option<bool> {
        for _ in 0..3 {
            let mut g = self.lock();
            let head = g.ready.front().map(|e| self.body(e));
            match head {
                Some(Some(msg)) => {
                    let entry = g.ready.pop_front()?;
                    let remaining = (g.ready.len() as u64 + g.paged.count) as u32;
                    let redelivered = entry.redelivered;
                    let to_record = self.delivered(&mut g, entry, &msg, !no_ack);
                    let tag = match channel.record(self, to_record, None, !no_ack) {
                        Ok(tag) => tag,
                        Err(back) => {
                            let back = self.undeliver(back, msg, no_ack);
                            g.ready.push_front(back);
                            return Some(false);
                        }
                    };
                    channel.outbox.push(Outgoing::Content(
                        channel.id,
                        AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                            delivery_tag: tag,
                            redelivered,
                            exchange: msg.exchange.clone(),
                            routing_key: msg.routing_key.clone(),
                            message_count: remaining,
                        })),
                        msg,
                    ));
                    self.maybe_load(&mut g);
                    return Some(true);
                }
                None if g.paged.count == 0 => return None,
                _ => {}
            }
            // The head is in the store: read it now.
            let job = self.load_job(&mut g, true);
            drop(g);
            if block_on(self.clone().load(job)).is_none() {
                tracing::warn!(
                    queue = self.name(),
                    "basic.get on a paged queue needs the multi-threaded runtime"
                );
                return None;
            }
        }
        None
    }

    /// Puts messages back in their original places, marked redelivered, and re-dispatches.
    pub fn requeue(self: &Arc<Self>, entries: impl IntoIterator<Item = Entry>) {
        let mut g = self.lock();
        if g.deleted {
            return;
        }
        for mut e in entries {
            e.redelivered = true;
            let pos = g.ready.partition_point(|x| x.seq < e.seq);
            g.ready.insert(pos, e);
        }
        self.dispatch_locked(&mut g);
    }

    /// Adds a consumer, refusing one that conflicts with exclusivity, and delivers to it.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> AmqpResult<()> {
        let mut g = self.lock();
        if g.deleted {
            return Err(AmqpError::no_queue(&self.spec.name, &self.vhost));
        }
        if g.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !g.consumers.is_empty())
        {
            return Err(AmqpError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.spec.name, self.vhost
            )));
        }
        g.consumers.push(consumer);
        g.had_consumer = true;
        self.dispatch_locked(&mut g);
        Ok(())
    }

    /// Removes a consumer (by identity).
    pub fn remove_consumer(&self, consumer: &Arc<Consumer>) -> Removed {
        consumer.active.store(false, Ordering::Release);
        let mut g = self.lock();
        let Some(pos) = g.consumers.iter().position(|c| Arc::ptr_eq(c, consumer)) else {
            return Removed::NotFound;
        };
        g.consumers.remove(pos);
        if g.rr > pos {
            g.rr -= 1;
        }
        if g.consumers.is_empty() && self.spec.auto_delete && g.had_consumer && !g.deleted {
            Removed::AutoDelete
        } else {
            Removed::Removed
        }
    }

    /// Drops every ready message; returns how many. Deliveries not yet acked stay.
    pub fn purge(&self) -> u32 {
        let mut g = self.lock();
        let n = g.ready.len() as u64 + g.paged.count;
        let ready = std::mem::take(&mut g.ready);
        for e in &ready {
            self.forget(e);
        }
        if g.paged.count > 0 {
            self.persist.submit(Op::Purge {
                queue_id: self.id,
                after_seq: g.paged.cursor as i64,
            });
        }
        g.paged.count = 0;
        g.paged.epoch += 1;
        n.min(u32::MAX as u64) as u32
    }

    /// Marks the queue deleted: returns its ready count and its consumers (to be cancelled).
    /// The caller deletes its stored rows (`Op::DeleteQueue`).
    pub fn mark_deleted(&self) -> (u32, Vec<Arc<Consumer>>) {
        let mut g = self.lock();
        g.deleted = true;
        let n = g.ready.len() as u64 + g.paged.count;
        g.ready.clear();
        g.paged.count = 0;
        g.paged.epoch += 1;
        let consumers = std::mem::take(&mut g.consumers);
        for c in &consumers {
            c.active.store(false, Ordering::Release);
        }
        (n.min(u32::MAX as u64) as u32, consumers)
    }

    /// Cancels a deleted queue's consumers on their channels.
    pub fn cancel_consumers(consumers: Vec<Arc<Consumer>>) {
        for c in consumers {
            c.channel.server_cancel(&c.tag);
        }
    }

    /// Starts the loader when the head runs low on a paged queue or needs evicted bodies back.
    fn maybe_load(self: &Arc<Self>, g: &mut State) {
        if g.loading_blocked() {
            return;
        }
        let want_page = g.paged.count > 0 && g.ready.len() < LOW_WATER;
        // Only the head is checked (this runs on every dispatch); the trip itself re-reads
        // every evicted body among the first REFILL entries.
        let want_bodies = g
            .ready
            .front()
            .is_some_and(|e| e.msg.is_none() && !self.persist.cache.contains_key(&e.id));
        if !want_page && !want_bodies {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let job = self.load_job(g, want_page);
        g.paged.loading = true;
        let q = self.clone();
        rt.spawn(async move {
            if q.clone().load(job).await.is_err() {
                // The store failed: try again in a while, not in a hot loop.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mut g = q.lock();
            g.paged.loading = false;
            q.dispatch_locked(&mut g);
        });
    }

    fn load_job(&self, g: &mut State, want_page: bool) -> LoadJob {
        LoadJob {
            ticket: self.persist.writer.last_ticket(),
            epoch: g.paged.epoch,
            cursor: g.paged.cursor,
            page: want_page && g.paged.count > 0,
            missing: g
                .ready
                .iter()
                .take(REFILL)
                .filter(|e| e.msg.is_none() && !self.persist.cache.contains_key(&e.id))
                .map(|e| e.id)
                .collect(),
        }
    }

    /// Reads what `job` names from the store into the head. Err if the store failed.
    async fn load(self: Arc<Self>, job: LoadJob) -> Result<(), ()> {
        let p = self.persist.clone();
        p.writer.wait(job.ticket).await;
        let mut bodies = Vec::new();
        for id in &job.missing {
            match p.store.read_message(*id as i64).await {
                Ok(Some(row)) => match Message::from_row(row, Some(p.gauge.clone())) {
                    Some(m) => bodies.push(Arc::new(m)),
                    None => tracing::error!(queue = self.name(), id, "stored header unreadable"),
                },
                Ok(None) => tracing::error!(queue = self.name(), id, "stored message missing"),
                Err(e) => {
                    tracing::warn!(queue = self.name(), error = %e, "store read failed");
                    return Err(());
                }
            }
        }
        let rows = if job.page {
            match p
                .store
                .read_queue(self.id, job.cursor as i64, WINDOW, WINDOW_BYTES)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(queue = self.name(), error = %e, "store read failed");
                    return Err(());
                }
            }
        } else {
            Vec::new()
        };
        let mut g = self.lock();
        if g.deleted || g.paged.epoch != job.epoch {
            return Ok(());
        }
        for m in bodies {
            for e in g
                .ready
                .iter_mut()
                .filter(|e| e.id == m.id && e.msg.is_none())
            {
                e.msg = Some(m.clone());
            }
        }
        // A missing body that could not be read back is dropped rather than wedging the head.
        let unreadable: Vec<u64> = job
            .missing
            .iter()
            .copied()
            .filter(|id| g.ready.iter().any(|e| e.id == *id && e.msg.is_none()))
            .filter(|id| !p.cache.contains_key(id))
            .collect();
        if !unreadable.is_empty() {
            g.ready
                .retain(|e| !(e.msg.is_none() && unreadable.contains(&e.id)));
        }
        if job.page && rows.is_empty() && g.paged.count > 0 && g.paged.cursor == job.cursor {
            tracing::error!(
                queue = self.name(),
                count = g.paged.count,
                "the store holds none of this queue's paged messages; dropping the count"
            );
            g.paged.count = 0;
        }
        for row in rows {
            let seq = row.seq as u64;
            if seq <= g.paged.cursor || g.paged.count == 0 {
                continue;
            }
            if seq > g.paged.sealed && seq != g.paged.cursor + 1 {
                break; // not committed yet: the next trip takes it
            }
            let Some(m) = Message::from_row(row.message, Some(p.gauge.clone())) else {
                tracing::error!(
                    queue = self.name(),
                    seq,
                    "stored header unreadable; skipped"
                );
                g.paged.cursor = seq;
                g.paged.count -= 1;
                continue;
            };
            let redelivered = seq <= g.delivered_before;
            g.ready.push_back(Entry {
                seq,
                id: m.id,
                msg: Some(Arc::new(m)),
                redelivered,
                stored: true,
            });
            g.paged.cursor = seq;
            g.paged.count -= 1;
        }
        Ok(())
    }
}

impl State {
    fn loading_blocked(&self) -> bool {
        self.paged.loading || self.deleted
    }
}

/// One loader trip: wait for `ticket`, re-read `missing` bodies, and read a page after `cursor`.
struct LoadJob {
    ticket: u64,
    epoch: u64,
    cursor: u64,
    page: bool,
    missing: Vec<u64>,
}
