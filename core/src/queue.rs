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
//!
//! RabbitMQ's extensions live here too: TTL (each entry carries its deadline; only the head is
//! checked, and one timer per queue is armed for the head's deadline, so an idle queue costs
//! nothing), length limits, dead-lettering (collected under the lock in `State::dead` and
//! routed after it is released, so no queue lock is ever held while another is taken, except
//! `publish_atomic`, which takes its targets' locks in address order), priorities (the head is
//! ordered by priority, then seq), single active consumer, consumer priorities, the delivery
//! limit and the consumer timeout.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use warren_protocol::{
    protocol::{basic, AMQPClass},
    FieldTable,
};
use warren_storage::{MessageRow, MessageStore, Op, QueueSummary, StoreError};

use crate::args::{Overflow, QueueArgs};
use crate::confirm::{ConfirmHold, Pending};
use crate::deadletter::Reason;
use crate::delivery::{ChannelHandle, Consumer, DeliverySink, NoCredit};
use crate::error::{AmqpError, AmqpResult};
use crate::message::{now_ms, Message};
use crate::persist::Persistence;

/// An entry's `expires` when it never expires.
pub const NEVER: u64 = u64::MAX;

/// Most entries a queue's head holds before new messages page out. Normally the memory budget
/// (which counts each held message's entry) pages long before this; it only caps the index.
const MAX_HELD: usize = 1 << 22;
/// The loader reads this many entries (or `WINDOW_BYTES`) per trip, ahead of need when the
/// head has fewer than this left and memory is under budget.
const WINDOW: usize = 1024;
const WINDOW_BYTES: usize = 4 << 20;
/// The message browser reads at most this many body bytes from the store per page.
const BROWSE_BYTES: usize = 16 << 20;
/// How long the browser waits for drop-head drops the paged part still owes.
const OWED_DROPS_WAIT: Duration = Duration::from_secs(5);
/// The loader always refills a head shorter than this; up to `WINDOW` only under the budget.
const LOW_WATER: usize = 256;
/// Messages waiting in memory, while the consumers' outboxes are full, past which a queue
/// slows its publishers (see `Queue::publish`).
pub const FLOW_READY: usize = 4096;
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
    /// When it expires (ms since the epoch), or `NEVER`.
    pub expires: u64,
    /// Its priority, capped at the queue's `x-max-priority` (0 in other queues).
    pub prio: u8,
    /// How many times it came back unacknowledged (`x-delivery-count`).
    pub deliveries: u32,
    /// Its publisher's confirm may go once this is released (`confirm`).
    pub confirm: ConfirmHold,
}

impl Entry {
    /// Head order: higher priority first, then publish order.
    fn key(&self) -> (u8, u64) {
        (255 - self.prio, self.seq)
    }
}

/// What a queue needs from its vhost, without naming it: dead letters routed through the
/// dead-letter exchange (with the removal from this queue committed with them), and its own
/// removal (auto-delete after a consumer timeout). `VHost` implements it.
pub trait Router: Send + Sync {
    fn dead_letter(&self, src: &Arc<Queue>, entry: Entry, msg: Arc<Message>, reason: Reason);
    fn remove_queue(&self, q: &Arc<Queue>) -> AmqpResult<u32>;
}

/// A message leaving its queue for the dead-letter exchange (or for nowhere).
#[derive(Debug)]
pub struct Dead {
    pub entry: Entry,
    pub msg: Option<Arc<Message>>,
    pub reason: Reason,
}

#[derive(Default)]
struct Paged {
    /// Messages only in the store, all with seq > cursor.
    count: u64,
    cursor: u64,
    /// Seqs at or below this were assigned before start (committed, gaps allowed); above it the
    /// loader takes only consecutive seqs, starting right after it.
    sealed: u64,
    loading: bool,
    /// Bumped by purge and delete: a load started before is discarded.
    epoch: u64,
    /// Positions above `cursor` taken out of the store part by a move or delete from the
    /// message browser (already left out of `count`): the loader skips them, whether or not
    /// their removal has committed when it reads.
    holes: BTreeSet<u64>,
}

#[derive(Default)]
struct State {
    /// The arguments in effect, as `Queue::args` holds them: read here on the message path
    /// (under the lock already held) instead of through the `ArcSwap`.
    args: Arc<QueueArgs>,
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
    /// Body bytes of the ready and paged messages (`x-max-length-bytes`).
    bytes: u64,
    /// Drop-head drops owed by the paged part (its head is not in memory yet): the loader
    /// drops that many from what it reads.
    owed_drops: u64,
    /// Messages to dead-letter once the lock is released (see `Queue::unlock`).
    dead: Vec<Dead>,
    /// The deadline the expiry timer is armed for (0: none).
    timer_at: u64,
    /// The deadline the consumer-timeout check is armed for (0: none).
    timeout_at: u64,
    /// Last basic.get, consume or declare (`x-expires`).
    last_used: Option<Instant>,
    /// Where the last dispatch stopped: a consumer with credit whose connection's outbox was
    /// full (the queue is parked there). With a long ready part, publishers are slowed on it.
    blocked_on: Option<Arc<dyn DeliverySink>>,
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
    /// The `x-` arguments in effect, decoded: the declared ones merged with the queue's policy
    /// and operator policy (swapped whole when a policy changes).
    args: ArcSwap<QueueArgs>,
    /// The policies that apply, for the management API.
    policy: Mutex<PolicyView>,
    /// An `x-expires` watcher task is running.
    pub expiry_watched: std::sync::atomic::AtomicBool,
    pub vhost: String,
    /// The store's number for this queue.
    pub id: i64,
    persist: Arc<Persistence>,
    /// Its vhost, for dead letters and its own removal (unset in unit tests: dead letters are
    /// dropped).
    router: OnceLock<Weak<dyn Router>>,
    state: Mutex<State>,
    /// Message counters (publish, deliver, get, ack, redeliver) for the management API.
    pub stats: crate::stats::QueueStats,
    /// Depth rates, sampled with the counters.
    pub depth: crate::stats::QueueDepth,
    /// The store ticket of its record (0: none): a declare that finds it waits for that commit.
    pub stored: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queue({:?} in {:?})", self.spec.name, self.vhost)
    }
}

/// The policies that apply to a queue, as the management API shows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyView {
    pub policy: Option<String>,
    pub operator_policy: Option<String>,
    pub definition: serde_json::Map<String, serde_json::Value>,
}

/// A queue's state as the management API shows it (`Queue::view`).
#[derive(Debug, Clone)]
pub struct QueueState {
    /// Ready messages, in memory and paged.
    pub ready: u64,
    /// Of those, only in the store.
    pub paged: u64,
    pub consumers: usize,
    pub active_consumers: usize,
    /// Body bytes of the ready messages.
    pub bytes: u64,
    /// Ready messages whose entry is in memory (their bodies may be in the cache or the
    /// store).
    pub in_memory: u64,
    /// Unused since (no consumer), for `idle_since`.
    pub idle_since: Option<Instant>,
    pub deleted: bool,
}

/// A ready message as the message browser reads it.
#[derive(Debug, Clone)]
pub struct Browsed {
    /// Its position in the queue (its seq): the browser's cursor.
    pub seq: u64,
    pub id: u64,
    /// None only inside `Queue::browse`, until its body is read back.
    pub msg: Option<Arc<Message>>,
    pub redelivered: bool,
    /// Times it came back unacknowledged.
    pub deliveries: u32,
    /// Read from the store part (not in memory).
    pub paged: bool,
}

/// What `Queue::transfer` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transferred {
    Done,
    /// No longer ready in the source (consumed, delivered, expired, deleted).
    Gone,
    /// No target took it (none left, or all full): it stays where it was.
    Unroutable,
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
    /// Refused: the queue is full and overflows with `reject-publish(-dlx)`.
    Rejected,
}

/// Where `enqueue` sends its store op: to the writer now, or into a group committed together.
enum Sink<'a> {
    Now,
    Collect(&'a mut Vec<Op>),
}

/// A store read the caller awaits before asking again (basic.get on a paged queue: the
/// connection's reader awaits it, so no runtime thread blocks).
pub type LoadFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What basic.get found.
pub enum Got {
    /// get-ok went to the channel.
    Delivered,
    Empty,
    /// The head is only in the store: await this, then ask again.
    Load(LoadFuture),
}

impl Queue {
    pub fn new(vhost: &str, spec: QueueSpec, id: i64, persist: Arc<Persistence>) -> Arc<Self> {
        let parsed = Arc::new(QueueArgs::parse(&spec.arguments));
        let args = ArcSwap::new(parsed.clone());
        Arc::new(Queue {
            spec,
            args,
            policy: Mutex::new(PolicyView::default()),
            expiry_watched: Default::default(),
            vhost: vhost.to_string(),
            id,
            persist,
            router: OnceLock::new(),
            state: Mutex::new(State {
                args: parsed,
                last_used: Some(Instant::now()),
                ..State::default()
            }),
            stats: Default::default(),
            depth: Default::default(),
            stored: Default::default(),
        })
    }

    /// Dead letters of this queue are routed through `vhost`.
    pub fn set_router(&self, vhost: Weak<dyn Router>) {
        let _ = self.router.set(vhost);
    }

    /// A durable queue rebuilt at start: its stored messages are paged, read lazily.
    pub fn recovered(
        vhost: &str,
        spec: QueueSpec,
        id: i64,
        persist: Arc<Persistence>,
        summary: QueueSummary,
        delivered_before: i64,
        bytes: u64,
    ) -> Arc<Self> {
        let q = Queue::new(vhost, spec, id, persist);
        {
            let mut g = q.lock();
            let max = summary.max_seq.max(0) as u64;
            // New publishes take seqs after the delivered watermark, which may be above every
            // stored seq (it is written ahead, and acked rows are gone): everything up to there
            // was committed before the start, gaps and all.
            let next_seq = max.max(delivered_before.max(0) as u64);
            g.paged = Paged {
                count: summary.count,
                cursor: (summary.min_seq.max(1) - 1) as u64,
                sealed: next_seq,
                loading: false,
                epoch: 0,
                holes: BTreeSet::new(),
            };
            g.next_seq = next_seq;
            g.delivered_before = delivered_before.max(0) as u64;
            g.delivered_reported = g.delivered_before;
            g.stored_any = summary.count > 0;
            g.bytes = bytes;
        }
        q
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The arguments in effect (declared, merged with policies).
    pub fn args(&self) -> arc_swap::Guard<Arc<QueueArgs>> {
        self.args.load()
    }

    /// The policies that apply now.
    pub fn policy(&self) -> PolicyView {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A policy was set, changed or removed: the queue takes the merged arguments. Limits are
    /// enforced at once (drop-head trims the backlog); a new TTL applies to messages published
    /// from now on, and the expiry timer is re-armed.
    pub fn apply_policy(self: &Arc<Self>, e: crate::policy::Effective) {
        let view = PolicyView {
            policy: e.policy,
            operator_policy: e.operator_policy,
            definition: e.definition,
        };
        {
            let mut cur = self.policy.lock().unwrap_or_else(|e| e.into_inner());
            if *cur == view {
                return;
            }
            *cur = view;
        }
        let args = Arc::new(QueueArgs::parse(&e.arguments));
        let mut g = self.lock();
        self.args.store(args.clone());
        g.args = args;
        if g.deleted {
            return;
        }
        self.enforce_limits(&mut g);
        g.timer_at = 0;
        self.arm_expiry(&mut g);
        self.dispatch_locked(&mut g);
        self.unlock(g);
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
        (
            g.ready_count().min(u32::MAX as u64) as u32,
            g.consumers.len() as u32,
        )
    }

    /// What the management API shows of this queue's state, read under one lock.
    pub fn view(&self) -> QueueState {
        let g = self.lock();
        QueueState {
            in_memory: g.ready.len() as u64,
            ready: g.ready_count(),
            paged: g.paged.count,
            consumers: g.consumers.len(),
            active_consumers: g
                .consumers
                .iter()
                .filter(|c| c.active.load(std::sync::atomic::Ordering::Relaxed))
                .count(),
            bytes: g.bytes,
            idle_since: if g.consumers.is_empty() {
                g.last_used
            } else {
                None
            },
            deleted: g.deleted,
        }
    }

    /// The queue's consumers, in their delivery order.
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.lock().consumers.clone()
    }

    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }

    /// Did this queue ever write a position to the store?
    pub fn stored_any(&self) -> bool {
        self.lock().stored_any
    }

    /// A basic.get, basic.consume or declare used the queue (`x-expires` counts from here).
    pub fn touch(&self) {
        self.lock().last_used = Some(Instant::now());
    }

    /// For `x-expires`: (deleted, unused since): None while it has consumers.
    pub fn idle_since(&self) -> (bool, Option<Instant>) {
        let g = self.lock();
        let idle = if g.consumers.is_empty() {
            g.last_used
        } else {
            None
        };
        (g.deleted, idle)
    }

    /// Releases the lock, then routes what it collected for dead-lettering.
    fn unlock(self: &Arc<Self>, mut g: MutexGuard<'_, State>) {
        let dead = std::mem::take(&mut g.dead);
        drop(g);
        if !dead.is_empty() {
            self.dead_letter(dead);
        }
    }

    /// Enqueues a message and delivers what consumers can take. `row` is the message's store
    /// row, made once for all the queues it is routed to.
    ///
    /// Also returns the outbox this queue waits on when it cannot keep up: its consumers have
    /// credit but their connection's outbox is full, and at least `FLOW_READY` messages wait in
    /// memory. The publisher's connection stops reading until that outbox has room (credit
    /// flow, as RabbitMQ's): the queue then stays short and delivery latency bounded.
    pub fn publish(
        self: &Arc<Self>,
        msg: &Arc<Message>,
        row: &mut Option<Arc<MessageRow>>,
        confirm: Option<&Arc<Pending>>,
    ) -> (Enqueued, Option<Arc<dyn DeliverySink>>) {
        let mut g = self.lock();
        let r = self.enqueue(&mut g, msg, row, Sink::Now, confirm);
        let mut congested = None;
        if !matches!(r, Enqueued::Deleted | Enqueued::Rejected) {
            self.stats.publish.inc();
            self.dispatch_fresh(&mut g, msg.id);
            if g.ready.len() >= FLOW_READY {
                congested = g.blocked_on.clone();
            }
        }
        self.unlock(g);
        (r, congested)
    }

    /// Publishes `msg` to every queue in `targets` with one store commit that also carries
    /// `also` (a dead-lettered message's removal from its old queue): the move is atomic.
    /// The targets' locks are taken together, in address order.
    pub fn publish_atomic(targets: &[Arc<Queue>], msg: &Arc<Message>, also: Option<Op>) {
        let mut sorted: Vec<&Arc<Queue>> = targets.iter().collect();
        sorted.sort_by_key(|q| Arc::as_ptr(q) as usize);
        sorted.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut guards: Vec<MutexGuard<'_, State>> = sorted.iter().map(|q| q.lock()).collect();
        let mut ops = Vec::new();
        let mut row = None;
        let mut took = Vec::with_capacity(sorted.len());
        for (q, g) in sorted.iter().zip(guards.iter_mut()) {
            let r = q.enqueue(g, msg, &mut row, Sink::Collect(&mut ops), None);
            took.push(!matches!(r, Enqueued::Deleted | Enqueued::Rejected));
        }
        ops.extend(also);
        Self::commit_together(&sorted, guards, ops, &took, msg.id);
    }

    /// The end of a publish to several locked queues (`publish_atomic`, `transfer`): submits
    /// `ops` as one commit, dispatches the new message in the queues that `took` it, then
    /// releases every lock before routing any dead letters (a queue's dead letters may be
    /// headed for another queue whose lock is still held).
    fn commit_together(
        queues: &[&Arc<Queue>],
        mut guards: Vec<MutexGuard<'_, State>>,
        mut ops: Vec<Op>,
        took: &[bool],
        msg_id: u64,
    ) {
        if let Some(first) = queues.first() {
            match ops.len() {
                0 => {}
                1 => {
                    if let Some(op) = ops.pop() {
                        first.persist.submit(op);
                    }
                }
                _ => {
                    first.persist.submit(Op::Atomic(ops));
                }
            }
        }
        for ((q, g), took) in queues.iter().zip(guards.iter_mut()).zip(took) {
            if *took {
                q.stats.publish.inc();
                q.dispatch_fresh(g, msg_id);
            }
        }
        let mut dead = Vec::new();
        for (q, mut g) in queues.iter().zip(guards) {
            let d = std::mem::take(&mut g.dead);
            drop(g);
            if !d.is_empty() {
                dead.push((q, d));
            }
        }
        for (q, d) in dead {
            q.dead_letter(d);
        }
    }

    fn full_for(&self, g: &State, len: u64) -> bool {
        let args = &g.args;
        args.max_length.is_some_and(|m| g.ready_count() + 1 > m)
            || args.max_length_bytes.is_some_and(|m| g.bytes + len > m)
    }

    /// The deadline a message gets in this queue: the lower of the queue's and its own TTL.
    fn deadline(args: &QueueArgs, msg: &Message) -> u64 {
        let own = msg.expiration().ok().flatten();
        match (args.message_ttl, own) {
            (None, None) => NEVER,
            (a, b) => {
                let ttl = a.unwrap_or(u64::MAX).min(b.unwrap_or(u64::MAX));
                msg.published_ms.saturating_add(ttl)
            }
        }
    }

    fn insert_ready(&self, g: &mut State, e: Entry) {
        if g.args.max_priority == 0 && g.ready.back().is_none_or(|b| b.seq < e.seq) {
            g.ready.push_back(e);
        } else {
            let k = e.key();
            let pos = g.ready.partition_point(|x| x.key() < k);
            g.ready.insert(pos, e);
        }
    }

    /// Adds a message to the queue (no dispatch).
    fn enqueue(
        &self,
        g: &mut State,
        msg: &Arc<Message>,
        row: &mut Option<Arc<MessageRow>>,
        sink: Sink<'_>,
        confirm: Option<&Arc<Pending>>,
    ) -> Enqueued {
        if g.deleted {
            return Enqueued::Deleted;
        }
        let len = msg.body.len() as u64;
        if g.args.overflow != Overflow::DropHead && self.full_for(g, len) {
            if g.args.overflow == Overflow::RejectPublishDlx {
                g.dead.push(Dead {
                    entry: Entry {
                        seq: 0,
                        id: msg.id,
                        msg: None,
                        redelivered: false,
                        stored: false,
                        expires: NEVER,
                        prio: 0,
                        deliveries: 0,
                        confirm: ConfirmHold::default(),
                    },
                    msg: Some(msg.clone()),
                    reason: Reason::MaxLen,
                });
            }
            return Enqueued::Rejected;
        }
        g.next_seq += 1;
        let seq = g.next_seq;
        let durable = self.spec.durable && msg.is_persistent();
        let page = g.paged.count > 0
            || g.ready.len() >= MAX_HELD
            || (!g.ready.is_empty() && self.persist.over_budget());
        let stored = page || durable;
        g.bytes += len;
        let mut ticket = 0;
        if stored {
            let row = row.get_or_insert_with(|| Arc::new(msg.to_row())).clone();
            let op = Op::Insert {
                message: row,
                entries: vec![(self.id, seq as i64)],
            };
            match sink {
                Sink::Now => ticket = self.persist.submit(op),
                Sink::Collect(ops) => ops.push(op),
            }
            g.stored_any = true;
            if page {
                if durable {
                    // Only the store holds this copy: its confirm waits for the commit.
                    if let Some(p) = confirm {
                        p.pin();
                    }
                }
                if g.paged.count == 0 {
                    g.paged.cursor = seq - 1;
                    g.paged.holes.clear();
                }
                g.paged.count += 1;
                return Enqueued::Stored { ticket, durable };
            }
        }
        let prio = msg.priority().min(g.args.max_priority);
        let expires = Self::deadline(&g.args, msg);
        self.insert_ready(
            g,
            Entry {
                seq,
                id: msg.id,
                msg: Some(msg.clone()),
                redelivered: false,
                stored,
                expires,
                prio,
                deliveries: 0,
                // A durable copy in memory: acked here, it no longer needs the store.
                confirm: match confirm {
                    Some(p) if durable => ConfirmHold::new(p),
                    _ => ConfirmHold::default(),
                },
            },
        );
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
        self.unlock(g);
    }

    /// The head entry's body, from the entry or the cache.
    fn body(&self, e: &Entry) -> Option<Arc<Message>> {
        e.msg.clone().or_else(|| self.persist.cache.get(&e.id))
    }

    fn dispatch_locked(self: &Arc<Self>, g: &mut State) {
        self.dispatch_fresh(g, 0);
    }

    /// Takes an entry out of the ready part for good (expired, dropped): it is dead-lettered
    /// if the queue has a dead-letter exchange, else its stored position goes.
    fn drop_entry(&self, g: &mut State, e: Entry, reason: Reason) {
        let msg = self.body(&e);
        g.bytes = g
            .bytes
            .saturating_sub(msg.as_ref().map_or(0, |m| m.body.len() as u64));
        if g.args.dead_letter_exchange.is_some() {
            g.dead.push(Dead {
                entry: e,
                msg,
                reason,
            });
        } else {
            self.forget(&e);
        }
    }

    /// Drops expired entries from the head (RabbitMQ expires only at the head). `fresh` is a
    /// message just published, which gets one delivery attempt first (TTL 0).
    fn expire_head(&self, g: &mut State, now: u64, fresh: u64) {
        while let Some(e) = g.ready.front() {
            if e.expires > now || (e.expires == now && e.id == fresh) {
                break;
            }
            if let Some(e) = g.ready.pop_front() {
                self.drop_entry(g, e, Reason::Expired);
            }
        }
    }

    /// `expire_head` at `now`, read from the clock (and kept) when it is still 0 and the head
    /// has a deadline.
    fn expire_head_lazily(&self, g: &mut State, now: &mut u64, fresh: u64) {
        if *now == 0 {
            if g.ready.front().is_none_or(|e| e.expires == NEVER) {
                return;
            }
            *now = now_ms();
        }
        self.expire_head(g, *now, fresh);
    }

    /// Drop-head: drops the oldest while the queue is over its limits.
    fn enforce_limits(&self, g: &mut State) {
        if g.args.overflow != Overflow::DropHead || !g.args.bounded() {
            return;
        }
        loop {
            let over_len = g.args.max_length.is_some_and(|m| g.ready_count() > m);
            let over_bytes = g.args.max_length_bytes.is_some_and(|m| g.bytes > m);
            if !over_len && !over_bytes {
                return;
            }
            match g.ready.pop_front() {
                Some(e) => self.drop_entry(g, e, Reason::MaxLen),
                None if over_len && g.paged.count > g.owed_drops => g.owed_drops += 1,
                // Bytes of paged messages are known when they are read: the loader's
                // dispatch enforces the rest.
                None => return,
            }
        }
    }

    /// Picks the consumer for the next message: the single active one, or round-robin among
    /// the highest-priority consumers with credit. The credit is reserved. When none can take
    /// it, `g.blocked_on` names an outbox that a consumer with credit waits on (if any).
    fn pick(self: &Arc<Self>, g: &mut State) -> Option<Arc<Consumer>> {
        g.blocked_on = None;
        let n = g.consumers.len();
        if n == 0 {
            return None;
        }
        if g.args.single_active_consumer {
            let c = g.consumers[0].clone();
            return match c.reserve() {
                Ok(()) => Some(c),
                Err(NoCredit::Outbox) => {
                    c.channel.sink.park(self);
                    g.blocked_on = Some(c.channel.sink.clone());
                    None
                }
                Err(_) => None,
            };
        }
        let mut start = 0;
        while start < n {
            let prio = g.consumers[start].priority;
            let end = start
                + g.consumers[start..]
                    .iter()
                    .take_while(|c| c.priority == prio)
                    .count();
            let len = end - start;
            for k in 0..len {
                let idx = start + (g.rr + k) % len;
                let c = &g.consumers[idx];
                match c.reserve() {
                    Ok(()) => {
                        let c = c.clone();
                        g.rr = (idx - start) + 1;
                        return Some(c);
                    }
                    Err(NoCredit::Outbox) => {
                        let sink = c.channel.sink.clone();
                        sink.park(self);
                        g.blocked_on.get_or_insert(sink);
                    }
                    Err(_) => {}
                }
            }
            start = end;
        }
        None
    }

    fn dispatch_fresh(self: &Arc<Self>, g: &mut State, fresh: u64) {
        // The clock is read once, and only if a message with a deadline reaches the head: most
        // have none, and this runs for every publish.
        let mut now = 0;
        loop {
            self.expire_head_lazily(g, &mut now, fresh);
            if g.ready.is_empty() || g.consumers.is_empty() {
                break;
            }
            let Some(msg) = g.ready.front().and_then(|e| self.body(e)) else {
                break; // the loader brings the body back
            };
            let Some(consumer) = self.pick(g) else {
                break;
            };
            let Some(entry) = g.ready.pop_front() else {
                consumer.unreserve();
                break;
            };
            if let Err(entry) = self.deliver(g, &consumer, entry, msg) {
                consumer.unreserve();
                g.ready.push_front(entry);
                break;
            }
        }
        self.enforce_limits(g);
        self.expire_head_lazily(g, &mut now, 0);
        self.arm_expiry(g);
        self.maybe_load(g);
    }

    /// Arms the expiry timer for the head's deadline (one timer per queue at a time).
    fn arm_expiry(self: &Arc<Self>, g: &mut State) {
        let Some(at) = g.ready.front().map(|e| e.expires) else {
            return;
        };
        if at == NEVER || (g.timer_at != 0 && g.timer_at <= at) || g.deleted {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        g.timer_at = at;
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let wait = at.saturating_sub(now_ms()) + 1;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let Some(q) = weak.upgrade() else { return };
            let mut g = q.lock();
            if g.timer_at != at {
                return; // an earlier timer took over
            }
            g.timer_at = 0;
            q.dispatch_locked(&mut g);
            q.unlock(g);
        });
    }

    /// Arms the consumer-timeout check (`x-consumer-timeout`) after a delivery that waits
    /// for an ack.
    fn arm_consumer_timeout(self: &Arc<Self>, g: &mut State) {
        let Some(timeout) = g.args.consumer_timeout else {
            return;
        };
        if g.timeout_at != 0 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let at = now_ms() + timeout;
        g.timeout_at = at;
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            tokio::time::sleep(Duration::from_millis(timeout + 1)).await;
            if let Some(q) = weak.upgrade() {
                q.check_consumer_timeouts(timeout);
            }
        });
    }

    /// Cancels consumers holding a delivery older than the timeout (basic.cancel to the
    /// client) and requeues what they held; re-arms for the rest.
    fn check_consumer_timeouts(self: &Arc<Self>, timeout: u64) {
        let consumers = {
            let mut g = self.lock();
            g.timeout_at = 0;
            g.consumers.clone()
        };
        let now = now_ms();
        let mut oldest_left: Option<u64> = None;
        for c in consumers {
            match c.channel.oldest_unacked(&c) {
                Some(at) if at + timeout <= now => {
                    tracing::warn!(
                        queue = self.name(),
                        consumer = %c.tag,
                        timeout_ms = timeout,
                        "consumer delivery acknowledgement timed out; cancelling the consumer"
                    );
                    let held = c.channel.time_out_consumer(&c);
                    let removed = self.remove_consumer(&c);
                    self.requeue(held);
                    if removed == Removed::AutoDelete {
                        if let Some(vh) = self.router.get().and_then(Weak::upgrade) {
                            if let Err(e) = vh.remove_queue(self) {
                                tracing::warn!(queue = self.name(), error = %e, "auto-delete failed");
                            }
                        }
                    }
                }
                Some(at) => oldest_left = Some(oldest_left.map_or(at, |o| o.min(at))),
                None => {}
            }
        }
        if oldest_left.is_some() {
            let mut g = self.lock();
            self.arm_consumer_timeout(&mut g);
        }
    }

    /// What a delivered entry keeps while it waits for its ack: its body, unless memory is over
    /// budget and the message is stored, in which case the body goes to the cache (which may drop
    /// it; a requeue re-reads it). Bodies of deliveries that stay unacked while memory is over
    /// budget are given up later (`page_out_unacked`). A no-ack delivery's stored position is
    /// removed only once the delivery is recorded (`settled_no_ack`): a channel closing in
    /// between gives the entry back with its position untouched.
    fn delivered(&self, g: &mut State, mut entry: Entry, msg: &Arc<Message>, ack: bool) -> Entry {
        g.bytes = g.bytes.saturating_sub(msg.body.len() as u64);
        if entry.stored {
            if self.spec.durable && entry.seq > g.delivered_reported {
                g.delivered_reported = entry.seq;
                self.persist.submit(Op::Delivered {
                    queue_id: self.id,
                    seq: g.delivered_reported as i64,
                });
            }
            if !ack {
                entry.msg = Some(msg.clone());
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
        mut entry: Entry,
        msg: Arc<Message>,
    ) -> Result<(), Entry> {
        let ch = &consumer.channel;
        let redelivered = entry.redelivered;
        let deliveries = entry.deliveries;
        let (seq, id, stored) = (entry.seq, entry.id, entry.stored);
        // A no-ack delivery is its consumption: the hold goes once it is recorded.
        let mut hold = if consumer.no_ack {
            entry.confirm.take()
        } else {
            ConfirmHold::default()
        };
        let to_record = self.delivered(g, entry, &msg, !consumer.no_ack);
        let tag = match ch.record(self, to_record, Some(consumer), !consumer.no_ack) {
            Ok(tag) => tag,
            Err(mut back) => {
                back.confirm = hold;
                return Err(self.undeliver(g, back, msg));
            }
        };
        hold.release();
        if consumer.no_ack && stored {
            self.settled_no_ack(seq, id);
        }
        if !consumer.no_ack {
            self.arm_consumer_timeout(g);
        }
        let msg = self.with_delivery_count(msg, deliveries);
        ch.sink.send_deliver(ch.id, consumer, tag, redelivered, msg);
        Ok(())
    }

    /// A delivery its channel refused (closed meanwhile): the entry as it goes back to the head,
    /// with its body; its stored position was never removed.
    fn undeliver(&self, g: &mut State, mut e: Entry, msg: Arc<Message>) -> Entry {
        g.bytes += msg.body.len() as u64;
        e.msg = Some(msg);
        e
    }

    /// A no-ack delivery was recorded: its stored position goes (the message is gone).
    fn settled_no_ack(&self, seq: u64, id: u64) {
        self.persist.submit(self.remove_position(seq, id, false));
    }

    /// Gives up the body of the unacked delivery `tag` on `ch`, from this queue: a message not
    /// stored yet is written first (as a paged one is), then only the cache holds the body and
    /// a requeue reads it back. The sweeper calls this over the budget for deliveries held
    /// a while (`Broker::page_out_unacked`), so unacked deliveries do not keep their bodies
    /// in memory whatever the consumer's prefetch. Returns the message's weight and whether
    /// it was written, if it gave a body up.
    pub fn page_out_unacked(&self, ch: &ChannelHandle, tag: u64) -> Option<(usize, bool)> {
        let mut g = self.lock();
        if g.deleted {
            return None;
        }
        // The queue's lock, then the channel's: the order dispatch takes them in.
        let done = ch.with_unacked(tag, |e| {
            let msg = e.msg.take()?;
            let wrote = !e.stored;
            if wrote {
                self.persist.submit(Op::Insert {
                    message: Arc::new(msg.to_row()),
                    entries: vec![(self.id, e.seq as i64)],
                });
                e.stored = true;
            }
            self.persist.cache_body(&msg);
            Some((msg.weight(), wrote))
        })?;
        if done.is_some_and(|(_, wrote)| wrote) {
            g.stored_any = true;
        }
        drop(g);
        done
    }

    /// Redeliveries from a queue with a delivery limit (or a quorum queue) carry
    /// `x-delivery-count`, as RabbitMQ's quorum queues do.
    fn with_delivery_count(&self, msg: Arc<Message>, deliveries: u32) -> Arc<Message> {
        if deliveries == 0 || (self.args().delivery_limit.is_none() && !self.args().quorum) {
            return msg;
        }
        let mut props = msg.properties();
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            "x-delivery-count".into(),
            warren_protocol::AMQPValue::LongLongInt(deliveries as i64),
        );
        props = props.with_headers(headers);
        Arc::new(msg.derive(
            msg.id,
            msg.exchange.clone(),
            msg.routing_key.clone(),
            &props,
        ))
    }

    /// A delivery rejected or nacked without requeue: dead-lettered (reason `rejected`) when
    /// the queue has a dead-letter exchange, else gone.
    pub fn discard(self: &Arc<Self>, e: Entry) {
        if self.args().dead_letter_exchange.is_none() {
            self.forget(&e);
            return;
        }
        let msg = self.body(&e);
        self.dead_letter(vec![Dead {
            entry: e,
            msg,
            reason: Reason::Rejected,
        }]);
    }

    /// Routes dead letters through the dead-letter exchange (the lock is not held). A body the
    /// cache evicted is read back from the store first.
    fn dead_letter(self: &Arc<Self>, dead: Vec<Dead>) {
        let vh = self.router.get().and_then(Weak::upgrade);
        for d in dead {
            let Some(vh) = vh.as_ref() else {
                // The vhost is going (a broker stopping with deliveries requeued into a full
                // drop-head queue): a stored position stays in the store, and the message is
                // dead-lettered again after the restart. (A deleted queue's rows go with it.)
                tracing::warn!(
                    queue = self.name(),
                    seq = d.entry.seq,
                    stored = d.entry.stored,
                    "dead letter with no vhost to route it; left in the store if stored"
                );
                continue;
            };
            match d.msg {
                Some(msg) => vh.dead_letter(self, d.entry, msg, d.reason),
                None => {
                    let Ok(rt) = tokio::runtime::Handle::try_current() else {
                        self.forget(&d.entry);
                        continue;
                    };
                    let (q, vh, p) = (self.clone(), vh.clone(), self.persist.clone());
                    rt.spawn(self.persist.follow_ups.track_future(async move {
                        if !p.writer.wait(p.writer.last_ticket()).await {
                            return; // the store writer stopped: shutting down
                        }
                        // The message is no longer in the queue's memory: a read the store
                        // cannot answer now is retried (50 ms doubling to 1 s) until it can,
                        // or until shutdown (it stays in the store and is dead-lettered
                        // again after the restart; the stop waits at most 10 s for these).
                        let Ok(_permit) = p.follow_up_reads.acquire().await else {
                            return;
                        };
                        let mut backoff = Duration::from_millis(50);
                        let row = loop {
                            match p.store.read_message(d.entry.id as i64).await {
                                Ok(row) => break row,
                                Err(StoreError::Unavailable(e)) if !p.follow_ups.is_closed() => {
                                    if backoff == Duration::from_millis(50) {
                                        tracing::warn!(queue = q.name(), error = %e, "store read for a dead letter failed; retrying");
                                    }
                                    tokio::time::sleep(backoff).await;
                                    backoff = (backoff * 2).min(Duration::from_secs(1));
                                }
                                Err(e) => {
                                    tracing::warn!(queue = q.name(), error = %e, "store read for a dead letter failed; left in the store");
                                    return;
                                }
                            }
                        };
                        match row {
                            Some(row) => match Message::from_row(row, Some(p.gauge.clone())) {
                                Some(m) => vh.dead_letter(&q, d.entry, Arc::new(m), d.reason),
                                None => q.forget(&d.entry),
                            },
                            None => {
                                tracing::warn!(queue = q.name(), seq = d.entry.seq, id = d.entry.id, "dead letter's body is not in the store; dropped");
                                q.forget(&d.entry)
                            }
                        }
                    }));
                }
            }
        }
    }

    /// The Remove op for a stored entry leaving this queue (None if it has no stored position).
    pub fn removal(&self, e: &Entry) -> Option<Op> {
        e.stored
            .then(|| self.remove_position(e.seq, e.id, e.msg.is_some()))
    }

    /// The Remove op for a stored position; a body not held in memory is dropped from the
    /// cache too.
    fn remove_position(&self, seq: u64, id: u64, body_held: bool) -> Op {
        if !body_held {
            self.persist.cache.invalidate(&id);
        }
        Op::Remove {
            queue_id: self.id,
            seq: seq as i64,
            message_id: id as i64,
        }
    }

    /// The entry is gone for good (acked, dropped): its stored position goes too.
    pub fn forget(&self, e: &Entry) {
        if let Some(op) = self.removal(e) {
            self.persist.submit(op);
        }
    }

    /// basic.get: takes the head message for `channel`, or says what to read first.
    pub fn get(self: &Arc<Self>, channel: &Arc<ChannelHandle>, no_ack: bool) -> Got {
        let r = self.get_inner(channel, no_ack);
        let mut g = self.lock();
        g.last_used = Some(Instant::now());
        self.dispatch_locked(&mut g);
        self.unlock(g);
        r
    }

    fn get_inner(self: &Arc<Self>, channel: &Arc<ChannelHandle>, no_ack: bool) -> Got {
        {
            let mut g = self.lock();
            if !g.ready.is_empty() {
                self.expire_head(&mut g, now_ms(), 0);
            }
            let head = g.ready.front().map(|e| self.body(e));
            match head {
                Some(Some(msg)) => {
                    let Some(mut entry) = g.ready.pop_front() else {
                        self.unlock(g);
                        return Got::Empty;
                    };
                    let redelivered = entry.redelivered;
                    let deliveries = entry.deliveries;
                    let (seq, id, stored) = (entry.seq, entry.id, entry.stored);
                    let mut hold = if no_ack {
                        entry.confirm.take()
                    } else {
                        ConfirmHold::default()
                    };
                    let to_record = self.delivered(&mut g, entry, &msg, !no_ack);
                    let remaining = g.ready_count().min(u32::MAX as u64) as u32;
                    let tag = match channel.record(self, to_record, None, !no_ack) {
                        Ok(tag) => tag,
                        Err(mut back) => {
                            back.confirm = hold;
                            let back = self.undeliver(&mut g, back, msg);
                            g.ready.push_front(back);
                            self.unlock(g);
                            return Got::Empty;
                        }
                    };
                    hold.release();
                    if no_ack && stored {
                        self.settled_no_ack(seq, id);
                    }
                    let msg = self.with_delivery_count(msg, deliveries);
                    channel.sink.send_content(
                        channel.id,
                        AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                            delivery_tag: tag,
                            redelivered,
                            exchange: msg.exchange.clone(),
                            routing_key: msg.routing_key.clone(),
                            message_count: remaining,
                        })),
                        msg,
                    );
                    self.unlock(g);
                    return Got::Delivered;
                }
                None if g.paged.count == 0 => {
                    self.unlock(g);
                    return Got::Empty;
                }
                _ => {}
            }
            // The head is in the store: the caller reads it, then asks again.
            let job = self.load_job(&mut g, true);
            self.unlock(g);
            let q = self.clone();
            Got::Load(Box::pin(async move {
                if q.clone().load(job).await.is_err() {
                    // The store failed: the retry finds the head still missing and says empty.
                    tracing::warn!(queue = q.name(), "basic.get could not read the store");
                }
            }))
        }
    }

    /// Puts messages back in their original places, marked redelivered, and re-dispatches.
    /// A message over the queue's delivery limit is dead-lettered (`delivery_limit`) instead.
    pub fn requeue(self: &Arc<Self>, entries: impl IntoIterator<Item = Entry>) {
        let mut g = self.lock();
        if g.deleted {
            drop(g);
            // Deleted meanwhile: their stored positions went with the queue.
            return;
        }
        for mut e in entries {
            e.redelivered = true;
            e.deliveries = e.deliveries.saturating_add(1);
            if self
                .args()
                .delivery_limit
                .is_some_and(|limit| e.deliveries as u64 > limit)
            {
                self.drop_entry(&mut g, e, Reason::DeliveryLimit);
                continue;
            }
            // A body given up to the cache is usually still there: the entry holds it again
            // and it is counted. If not, its bytes are counted when the loader reads it back.
            if let Some(m) = self.body(&e) {
                g.bytes += m.body.len() as u64;
                e.msg = Some(m);
            }
            self.insert_ready(&mut g, e);
        }
        self.dispatch_locked(&mut g);
        self.unlock(g);
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
        // Highest priority first; arrival order within a priority (and for the single
        // active consumer, the first is the active one).
        let pos = g
            .consumers
            .partition_point(|c| c.priority >= consumer.priority);
        g.consumers.insert(pos, consumer);
        g.had_consumer = true;
        g.last_used = Some(Instant::now());
        self.dispatch_locked(&mut g);
        self.unlock(g);
        Ok(())
    }

    /// Removes a consumer (by identity). A single-active-consumer queue hands over to the next.
    pub fn remove_consumer(self: &Arc<Self>, consumer: &Arc<Consumer>) -> Removed {
        consumer.active.store(false, Ordering::Release);
        let mut g = self.lock();
        let Some(pos) = g.consumers.iter().position(|c| Arc::ptr_eq(c, consumer)) else {
            return Removed::NotFound;
        };
        g.consumers.remove(pos);
        if g.rr > pos {
            g.rr -= 1;
        }
        if g.consumers.is_empty() {
            g.last_used = Some(Instant::now());
        }
        let r = if g.consumers.is_empty() && self.spec.auto_delete && g.had_consumer && !g.deleted {
            Removed::AutoDelete
        } else {
            Removed::Removed
        };
        if pos == 0 && g.args.single_active_consumer && !g.consumers.is_empty() {
            self.dispatch_locked(&mut g);
        }
        self.unlock(g);
        r
    }

    /// Drops every ready message; returns how many. Deliveries not yet acked stay.
    pub fn purge(&self) -> u32 {
        let mut g = self.lock();
        let n = g.ready_count();
        g.bytes = 0;
        g.owed_drops = 0;
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
        g.paged.holes.clear();
        g.paged.epoch += 1;
        n.min(u32::MAX as u64) as u32
    }

    /// The message browser's view: up to `limit` ready messages with a position (seq) of at
    /// least `from`, in position order, read without taking them. The in-memory head comes
    /// first, then the store part (positions above the head's). Nothing about a message
    /// changes: not its place, its redelivered flag nor its delivery count. Drop-head drops
    /// the paged part still owes are waited for first (for a while), and any still owed are
    /// not shown.
    pub async fn browse(
        self: &Arc<Self>,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Browsed>, StoreError> {
        self.owed_drops_done(OWED_DROPS_WAIT).await;
        let (mut out, paged) = {
            let g = self.lock();
            let take = |e: &Entry| Browsed {
                seq: e.seq,
                id: e.id,
                msg: self.body(e),
                redelivered: e.redelivered,
                deliveries: e.deliveries,
                paged: false,
            };
            let out: Vec<Browsed> = if g.args.max_priority == 0 {
                // Without priorities the head is in seq order.
                let start = g.ready.partition_point(|e| e.seq < from);
                g.ready.range(start..).take(limit).map(take).collect()
            } else {
                let mut v: Vec<&Entry> = g.ready.iter().filter(|e| e.seq >= from).collect();
                v.sort_by_key(|e| e.seq);
                v.into_iter().take(limit).map(take).collect()
            };
            let paged = (g.paged.count > 0 && out.len() < limit).then(|| {
                (
                    g.paged.cursor,
                    g.paged.holes.clone(),
                    g.delivered_before,
                    g.owed_drops,
                )
            });
            (out, paged)
        };
        let p = &self.persist;
        let ticket = p.writer.last_ticket();
        if out.iter().any(|b| b.msg.is_none()) || paged.is_some() {
            // What was submitted before this read is in the store when it runs.
            if !p.writer.wait(ticket).await {
                return Err(StoreError::Unavailable("the store writer stopped".into()));
            }
        }
        for b in out.iter_mut().filter(|b| b.msg.is_none()) {
            b.msg = p
                .store
                .read_message(b.id as i64)
                .await?
                .and_then(|row| Message::from_row(row, None))
                .map(Arc::new);
        }
        out.retain(|b| b.msg.is_some());
        if let Some((cursor, holes, delivered_before, owed)) = paged {
            // Drop-head's drops still owed by the paged part (the store slow or failing, so
            // the loader has not read them yet) take its first messages: those are found
            // first and not shown.
            let mut owed_seqs = BTreeSet::new();
            if owed > 0 {
                let first = p
                    .store
                    .read_queue(
                        self.id,
                        cursor as i64,
                        owed as usize + holes.len(),
                        BROWSE_BYTES,
                    )
                    .await?;
                owed_seqs.extend(
                    first
                        .iter()
                        .map(|r| r.seq as u64)
                        .filter(|s| !holes.contains(s))
                        .take(owed as usize),
                );
            }
            let after = cursor.max(from.saturating_sub(1));
            let want = limit - out.len() + owed_seqs.len();
            let rows = p
                .store
                .read_queue(self.id, after as i64, want + holes.len(), BROWSE_BYTES)
                .await?;
            for row in rows {
                let seq = row.seq as u64;
                let marked = row.redelivered;
                if out.len() >= limit {
                    break;
                }
                if seq <= cursor || holes.contains(&seq) || owed_seqs.contains(&seq) {
                    continue;
                }
                let id = row.message.id as u64;
                let Some(m) = Message::from_row(row.message, None) else {
                    tracing::error!(queue = self.name(), seq, "stored header unreadable");
                    continue;
                };
                out.push(Browsed {
                    seq,
                    id,
                    msg: Some(Arc::new(m)),
                    redelivered: marked || seq <= delivered_before,
                    deliveries: 0,
                    paged: true,
                });
            }
        }
        Ok(out)
    }

    /// Waits, up to `limit`, until the drop-head drops owed by the paged part are done (the
    /// loader applies them as it reads the paged head; after a store failure it retries a
    /// second later). Until then the browser cannot take a paged message (`find_ready`): which
    /// ones the drops take is known only once they are read.
    async fn owed_drops_done(self: &Arc<Self>, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut g = self.lock();
                if g.owed_drops == 0 || g.deleted {
                    return;
                }
                self.maybe_load(&mut g);
            }
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The newest position given out (0: none yet).
    pub fn last_position(&self) -> u64 {
        self.lock().next_seq
    }

    /// Where the ready message at position `seq` (message `id`) is: `Some(Some(i))` at index
    /// `i` of the head, `Some(None)` in the store part, None if it is no longer ready here
    /// (taken, delivered, expired, or the queue is gone).
    fn find_ready(g: &State, seq: u64, id: u64) -> Option<Option<usize>> {
        if g.deleted {
            return None;
        }
        if let Some(i) = g.ready.iter().position(|e| e.seq == seq) {
            return (g.ready[i].id == id).then_some(Some(i));
        }
        // A paged message is taken only when no drop-head drop is owed to the paged head
        // (which message that drop takes is decided when it is read).
        (g.paged.count > 0
            && g.owed_drops == 0
            && seq > g.paged.cursor
            && !g.paged.holes.contains(&seq))
        .then_some(None)
    }

    /// Takes the ready message found at `at` out of this queue: returns the head entry (None
    /// for a paged one) and its store removal.
    fn take_out(
        &self,
        g: &mut State,
        (seq, id): (u64, u64),
        at: Option<usize>,
        len: u64,
    ) -> (Option<Entry>, Option<Op>) {
        g.bytes = g.bytes.saturating_sub(len);
        match at {
            Some(i) => match g.ready.remove(i) {
                Some(e) => {
                    let op = self.removal(&e);
                    (Some(e), op)
                }
                None => (None, None),
            },
            None => {
                g.paged.holes.insert(seq);
                g.paged.count = g.paged.count.saturating_sub(1);
                (None, Some(self.remove_position(seq, id, false)))
            }
        }
    }

    /// Deletes the ready message at position `seq` (message `id`, of `len` body bytes) from
    /// the message browser. Returns whether it was still there.
    pub fn delete_at(&self, (seq, id): (u64, u64), len: u64) -> bool {
        let mut g = self.lock();
        let Some(at) = Self::find_ready(&g, seq, id) else {
            return false;
        };
        if let (_, Some(op)) = self.take_out(&mut g, (seq, id), at, len) {
            self.persist.submit(op);
        }
        true
    }

    /// Moves (or, with `copy`, copies) the ready message at position `seq` (message `id`)
    /// into `targets` as `msg`: the same message under a fresh id, with the exchange and
    /// routing key it should carry there. The targets' inserts and the removal from this
    /// queue go to the store as one `Op::Atomic`, so after a crash the message is in exactly
    /// one place. The moved message keeps its redelivered flag and delivery count where the
    /// target holds it in memory. This queue's and the targets' locks are taken together, in
    /// address order; nothing changes when no target takes the message.
    pub fn transfer(
        self: &Arc<Self>,
        (seq, id): (u64, u64),
        msg: &Arc<Message>,
        targets: &[Arc<Queue>],
        copy: bool,
    ) -> Transferred {
        let mut all: Vec<&Arc<Queue>> = targets.iter().chain(std::iter::once(self)).collect();
        all.sort_by_key(|q| Arc::as_ptr(q) as usize);
        all.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut guards: Vec<MutexGuard<'_, State>> = all.iter().map(|q| q.lock()).collect();
        let Some(src) = all.iter().position(|q| Arc::ptr_eq(q, self)) else {
            return Transferred::Gone;
        };
        let Some(at) = Self::find_ready(&guards[src], seq, id) else {
            return Transferred::Gone;
        };
        let (redelivered, deliveries) = match at {
            Some(i) => (
                guards[src].ready[i].redelivered,
                guards[src].ready[i].deliveries,
            ),
            None => (seq <= guards[src].delivered_before, 0),
        };
        let len = msg.body.len() as u64;
        // Out of the source first: a target that is the source itself then appends it.
        let (entry, removal) = if copy {
            (None, None)
        } else {
            self.take_out(&mut guards[src], (seq, id), at, len)
        };
        let mut ops = Vec::new();
        let mut row = None;
        let mut took = vec![false; all.len()];
        for (i, (q, g)) in all.iter().zip(guards.iter_mut()).enumerate() {
            if !targets.iter().any(|t| Arc::ptr_eq(t, q)) {
                continue;
            }
            let r = q.enqueue(g, msg, &mut row, Sink::Collect(&mut ops), None);
            took[i] = !matches!(r, Enqueued::Deleted | Enqueued::Rejected);
            if took[i] && (redelivered || deliveries > 0) {
                if let Some(e) = g.ready.iter_mut().rev().find(|e| e.id == msg.id) {
                    e.redelivered = redelivered;
                    e.deliveries = deliveries;
                }
            }
            // A stored position (paged, or persistent in a durable queue) keeps the flag in
            // the store too: the loader and a restart read it back.
            if redelivered && matches!(r, Enqueued::Stored { .. }) {
                ops.push(Op::Redelivered {
                    queue_id: q.id,
                    seq: g.next_seq as i64,
                });
            }
        }
        if !took.iter().any(|t| *t) {
            if !copy {
                // Back exactly as it was; its removal is not submitted.
                let g = &mut guards[src];
                g.bytes += len;
                match entry {
                    Some(e) => self.insert_ready(g, e),
                    None => {
                        g.paged.holes.remove(&seq);
                        g.paged.count += 1;
                    }
                }
            }
            return Transferred::Unroutable;
        }
        ops.extend(removal);
        Self::commit_together(&all, guards, ops, &took, msg.id);
        Transferred::Done
    }

    /// Marks the queue deleted: returns its ready count and its consumers (to be cancelled).
    /// The caller deletes its stored rows (`Op::DeleteQueue`).
    pub fn mark_deleted(&self) -> (u32, Vec<Arc<Consumer>>) {
        let mut g = self.lock();
        g.deleted = true;
        let n = g.ready_count();
        g.ready.clear();
        g.paged.count = 0;
        g.paged.holes.clear();
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
        // Read ahead while memory allows: the next window is asked for while a window's worth
        // is still in memory, so a drain does not pause for each read. Over the budget only a
        // short head is refilled, so what paged out stays out.
        let want_page = g.paged.count > 0
            && (g.ready.len() < LOW_WATER
                || (g.ready.len() < WINDOW && !self.persist.over_budget()));
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
            q.unlock(g);
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
    ///
    /// Evicted bodies are read after the writer has committed `job.ticket` (a body may belong
    /// to a message whose insert is still in the writer). A page is read at once: the writer
    /// commits in ticket order and a queue's inserts reach it in seq order, so what the read
    /// sees is a committed prefix of the paged part, and the rest comes on the next trip. Only
    /// a page that comes back empty waits for the writer's backlog and is read again: waiting
    /// on every trip made a drain pause for each commit of unrelated work (acks of other
    /// queues, other publishers' batches).
    async fn load(self: Arc<Self>, job: LoadJob) -> Result<(), ()> {
        let p = self.persist.clone();
        let mut waited = false;
        if !job.missing.is_empty() {
            if !p.writer.wait(job.ticket).await {
                return Err(());
            }
            waited = true;
        }
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
        let mut rows = Vec::new();
        if job.page {
            // A read; if it comes back empty, one wait for the writer and a second read.
            loop {
                rows = match p
                    .store
                    .read_queue(self.id, job.cursor as i64, WINDOW, WINDOW_BYTES)
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!(queue = self.name(), error = %e, "store read failed");
                        return Err(());
                    }
                };
                if !rows.is_empty() || waited {
                    break;
                }
                if !p.writer.wait(job.ticket).await {
                    return Err(());
                }
                waited = true;
            }
        }
        let mut g = self.lock();
        if g.deleted || g.paged.epoch != job.epoch {
            return Ok(());
        }
        for m in bodies {
            // Requeued without their bodies, so not counted in `bytes` yet.
            let mut filled = 0;
            for e in g
                .ready
                .iter_mut()
                .filter(|e| e.id == m.id && e.msg.is_none())
            {
                e.msg = Some(m.clone());
                filled += m.body.len() as u64;
            }
            g.bytes += filled;
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
            if g.paged.holes.remove(&seq) {
                // Moved or deleted from the browser; its removal had not committed yet.
                g.paged.cursor = seq;
                continue;
            }
            // Holes whose removal has committed leave gaps: step over them.
            loop {
                let next = g.paged.cursor.max(g.paged.sealed) + 1;
                if next < seq && g.paged.holes.remove(&next) {
                    g.paged.cursor = next;
                } else {
                    break;
                }
            }
            if seq > g.paged.sealed && seq != g.paged.cursor.max(g.paged.sealed) + 1 {
                break; // not committed yet: the next trip takes it
            }
            let marked = row.redelivered;
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
            let redelivered = marked || seq <= g.delivered_before;
            let args = self.args();
            let (expires, prio) = (
                Self::deadline(&args, &m),
                m.priority().min(args.max_priority),
            );
            let e = Entry {
                seq,
                id: m.id,
                msg: Some(Arc::new(m)),
                redelivered,
                stored: true,
                expires,
                prio,
                deliveries: 0,
                confirm: ConfirmHold::default(),
            };
            g.paged.cursor = seq;
            g.paged.count -= 1;
            if g.owed_drops > 0 {
                // Drop-head dropped it while it was paged.
                g.owed_drops -= 1;
                self.drop_entry(&mut g, e, Reason::MaxLen);
                continue;
            }
            self.insert_ready(&mut g, e);
        }
        if !g.paged.holes.is_empty() {
            let cursor = g.paged.cursor;
            g.paged.holes.retain(|&h| h > cursor);
        }
        drop(g);
        Ok(())
    }
}

impl State {
    fn loading_blocked(&self) -> bool {
        self.paged.loading || self.deleted
    }

    /// Messages ready for delivery: the head, the paged part, less drops owed by the paged part.
    fn ready_count(&self) -> u64 {
        (self.ready.len() as u64 + self.paged.count).saturating_sub(self.owed_drops)
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

/// The queue state machine without sockets: consumers reached through a recording
/// `DeliverySink`, the store through `Persistence` on a scratch SQLite.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::DeliverySink;
    use std::sync::atomic::{AtomicBool, AtomicU32};
    use warren_protocol::{AMQPProperties, FieldTable, ShortString};

    /// Records deliveries; `full` makes it refuse room (deliveries then wait, parked).
    #[derive(Default)]
    struct Recorder {
        delivered: Mutex<Vec<(u64, bool, Vec<u8>)>>,
        parked: Mutex<Vec<Weak<Queue>>>,
        full: AtomicBool,
    }

    impl DeliverySink for Recorder {
        fn send_method(&self, _: u16, _: AMQPClass) {}
        fn send_content(&self, _: u16, method: AMQPClass, msg: Arc<Message>) {
            if let AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) = method {
                self.delivered.lock().unwrap().push((
                    d.delivery_tag,
                    d.redelivered,
                    msg.body.to_vec(),
                ));
            }
        }
        fn has_room(&self) -> bool {
            !self.full.load(Ordering::Relaxed)
        }
        fn park(&self, queue: &Arc<Queue>) {
            self.parked.lock().unwrap().push(Arc::downgrade(queue));
        }
        fn wait_room(
            &self,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
            Box::pin(async {})
        }
    }

    impl Recorder {
        fn bodies(&self) -> Vec<(bool, Vec<u8>)> {
            self.delivered
                .lock()
                .unwrap()
                .iter()
                .map(|(_, r, b)| (*r, b.clone()))
                .collect()
        }
    }

    async fn setup(
        args: FieldTable,
    ) -> (
        Arc<Queue>,
        Arc<Recorder>,
        Arc<ChannelHandle>,
        Arc<Persistence>,
    ) {
        let config = crate::Config::for_tests();
        let (persist, _) = Persistence::open(&config).await.unwrap();
        let q = Queue::new(
            "/",
            QueueSpec {
                name: "unit".to_string(),
                durable: false,
                exclusive_owner: None,
                auto_delete: false,
                arguments: args,
            },
            1,
            persist.clone(),
        );
        let sink = Arc::new(Recorder::default());
        let ch = ChannelHandle::new(1, 1, sink.clone(), false, Default::default());
        (q, sink, ch, persist)
    }

    fn consumer(q: &Arc<Queue>, ch: &Arc<ChannelHandle>, prefetch: u32) -> Arc<Consumer> {
        let c = Arc::new(Consumer {
            tag: ShortString::from("c1"),
            channel: ch.clone(),
            queue: Arc::downgrade(q),
            no_ack: false,
            exclusive: false,
            priority: 0,
            prefetch,
            unacked: AtomicU32::new(0),
            active: AtomicBool::new(true),
        });
        q.add_consumer(c.clone()).unwrap();
        ch.add_consumer(c.clone()).unwrap();
        c
    }

    fn publish(q: &Arc<Queue>, p: &Persistence, body: &[u8]) {
        let msg = Arc::new(
            Message::encoded(
                p.next_message_id(),
                ShortString::from(""),
                ShortString::from("unit"),
                &AMQPProperties::default(),
                bytes::Bytes::copy_from_slice(body),
                None,
            )
            .unwrap(),
        );
        q.publish(&msg, &mut None, None);
    }

    /// Acks `tags` the way a channel does: credit back, position forgotten, dispatch again.
    fn settle(q: &Arc<Queue>, ch: &Arc<ChannelHandle>, tag: u64, requeue: bool) {
        let taken = ch.take_unacked(tag, false).unwrap();
        let mut back = Vec::new();
        for (_, u) in taken {
            ch.release(&u);
            if requeue {
                back.push(u.entry);
            } else {
                u.queue.forget(&u.entry);
            }
        }
        if requeue {
            q.requeue(back);
        }
        q.dispatch();
    }

    /// The sweeper is offered each unacked delivery once, oldest first, and only once its age
    /// is past; a delivery a tx.rollback puts back is offered again.
    #[tokio::test]
    async fn unacked_deliveries_are_offered_to_the_sweeper_once() {
        let (q, _sink, ch, p) = setup(FieldTable::default()).await;
        for b in [b"a", b"b", b"c"] {
            publish(&q, &p, b);
        }
        consumer(&q, &ch, 0);
        q.dispatch();
        assert!(ch.unswept(0, 64).is_empty(), "none is old enough");
        let tags = |v: Vec<(u64, Arc<Queue>)>| v.into_iter().map(|(t, _)| t).collect::<Vec<_>>();
        assert_eq!(tags(ch.unswept(u64::MAX, 2)), vec![1, 2]);
        assert_eq!(tags(ch.unswept(u64::MAX, 64)), vec![3]);
        assert!(ch.unswept(u64::MAX, 64).is_empty());
        // tx.select; basic.ack 2; tx.rollback: delivery 2 is back.
        let taken = ch.take_unacked(2, false).unwrap();
        ch.restore_unacked(taken);
        assert_eq!(tags(ch.unswept(u64::MAX, 64)), vec![2, 3]);
        // Giving up its body: only the cache holds it after that, and it is not offered again.
        assert!(q.page_out_unacked(&ch, 2).is_some());
        assert!(
            q.page_out_unacked(&ch, 2).is_none(),
            "nothing left to give up"
        );
        assert!(ch.unswept(u64::MAX, 64).is_empty());
    }

    #[tokio::test]
    async fn prefetch_bounds_deliveries_and_acks_release_credit() {
        let (q, sink, ch, p) = setup(FieldTable::default()).await;
        for b in [b"a", b"b", b"c"] {
            publish(&q, &p, b);
        }
        consumer(&q, &ch, 2);
        q.dispatch();
        assert_eq!(
            sink.bodies(),
            vec![(false, b"a".to_vec()), (false, b"b".to_vec())]
        );
        assert_eq!(q.counts(), (1, 1));
        settle(&q, &ch, 1, false);
        assert_eq!(sink.bodies().len(), 3);
        assert_eq!(sink.bodies()[2], (false, b"c".to_vec()));
    }

    #[tokio::test]
    async fn a_requeue_goes_back_to_its_place_redelivered() {
        let (q, sink, ch, p) = setup(FieldTable::default()).await;
        for b in [b"a", b"b"] {
            publish(&q, &p, b);
        }
        consumer(&q, &ch, 1);
        q.dispatch();
        // "a" is delivered; requeued, it is delivered again before "b", marked redelivered.
        settle(&q, &ch, 1, true);
        assert_eq!(
            sink.bodies(),
            vec![(false, b"a".to_vec()), (true, b"a".to_vec())]
        );
    }

    #[tokio::test]
    async fn a_full_sink_parks_the_queue_until_room() {
        let (q, sink, ch, p) = setup(FieldTable::default()).await;
        sink.full.store(true, Ordering::Relaxed);
        consumer(&q, &ch, 0);
        publish(&q, &p, b"a");
        assert!(sink.bodies().is_empty(), "delivered into a full sink");
        assert_eq!(sink.parked.lock().unwrap().len(), 1, "parked on the sink");
        sink.full.store(false, Ordering::Relaxed);
        for w in sink.parked.lock().unwrap().drain(..) {
            if let Some(q) = w.upgrade() {
                q.dispatch();
            }
        }
        assert_eq!(sink.bodies(), vec![(false, b"a".to_vec())]);
    }

    /// A dead letter a queue cannot route (no vhost: the broker is stopping) keeps its stored
    /// position: it was deleted, and a persistent message the store held was lost.
    #[tokio::test]
    async fn a_dead_letter_with_no_vhost_stays_in_the_store() {
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            warren_protocol::AMQPValue::LongInt(1),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            warren_protocol::AMQPValue::LongString("dlx".into()),
        );
        let config = crate::Config::for_tests();
        let (p, _) = Persistence::open(&config).await.unwrap();
        let q = Queue::new(
            "/",
            QueueSpec {
                name: "durable".to_string(),
                durable: true,
                exclusive_owner: None,
                auto_delete: false,
                arguments: args,
            },
            1,
            p.clone(),
        );
        for b in [b"a", b"b"] {
            let msg = Arc::new(
                Message::encoded(
                    p.next_message_id(),
                    ShortString::from(""),
                    ShortString::from("durable"),
                    &AMQPProperties::default().with_delivery_mode(2),
                    bytes::Bytes::copy_from_slice(b),
                    None,
                )
                .unwrap(),
            );
            q.publish(&msg, &mut None, None);
        }
        assert_eq!(q.counts(), (1, 0), "drop-head took the first");
        assert!(p.writer.wait(p.writer.last_ticket()).await);
        let rows = p.store.read_queue(1, 0, 10, 1 << 20).await.unwrap();
        assert_eq!(
            rows.len(),
            2,
            "the dropped message's position is still stored"
        );
    }

    #[tokio::test]
    async fn drop_head_keeps_the_newest() {
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            warren_protocol::AMQPValue::LongInt(2),
        );
        let (q, sink, ch, p) = setup(args).await;
        for b in [b"a", b"b", b"c"] {
            publish(&q, &p, b);
        }
        assert_eq!(q.counts(), (2, 0));
        consumer(&q, &ch, 0);
        q.dispatch();
        assert_eq!(
            sink.bodies(),
            vec![(false, b"b".to_vec()), (false, b"c".to_vec())]
        );
    }
}
