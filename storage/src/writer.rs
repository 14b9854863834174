//! `Writer`: the group-commit task. Every change to the store is submitted here as an `Op` and
//! gets a ticket (a sequence number, in submission order). One task gathers ops for up to
//! `interval` (or `max_ops` / `max_bytes`), reduces them to a `Plan` and commits it in one
//! transaction; `committed()` then covers every ticket of the batch. A commit that fails for a
//! transient reason (an outage) is retried with back-off, forever: nothing submitted is dropped,
//! and ticket holders simply wait. One the store refuses for good (`StoreError::Rejected`) is
//! split: each op is committed on its own, and the tickets of the ops still refused are marked
//! failed (`failed`), so their confirms become nacks; `committed()` moves past them. An op
//! submitted after `close` gets `NEVER`, a ticket that is never committed. The bytes held by
//! uncommitted ops are counted so publishers can be slowed (`over_limit`, `room`). In cluster
//! mode a commit refused with `StoreError::Fenced` stops the writer for good: it takes no more
//! ops, its committed ticket never moves again (nothing it held is confirmed, nothing is nacked
//! as if lost), and `fenced()` tells the node to stop.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{MessageStore, Op, Plan, StoreError};

/// The ticket of an op the writer did not take (it was closed): never committed, so nothing
/// waiting on it is ever confirmed.
pub const NEVER: u64 = u64::MAX;
/// A body at least this large makes its batch gather for `large_interval`.
pub const LARGE_BODY: usize = 64 * 1024;

thread_local! {
    /// While a `Capture` is alive on this thread: the tickets submitted or found since it began.
    static CAPTURED: std::cell::RefCell<Option<Tickets>> = const { std::cell::RefCell::new(None) };
}

/// The store writes a reply stands for: it may go once the highest is committed, and only if
/// the store took the writes its own method made (`own`). Records the method found already
/// made by someone else (`found`) are waited for, not judged: that is their maker's reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tickets {
    own: Vec<u64>,
    found: Vec<u64>,
}

impl Tickets {
    /// A single write of the reply's own (0: none).
    pub fn one(ticket: u64) -> Tickets {
        Tickets {
            own: if ticket > 0 { vec![ticket] } else { Vec::new() },
            found: Vec::new(),
        }
    }

    /// The highest (0: none).
    pub fn last(&self) -> u64 {
        self.own
            .iter()
            .chain(&self.found)
            .copied()
            .max()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.own.is_empty() && self.found.is_empty()
    }

    /// The tickets of the writes this reply's own method made.
    pub fn own(&self) -> impl Iterator<Item = u64> + '_ {
        self.own.iter().copied()
    }

    fn extend(&mut self, other: Tickets) {
        self.own.extend(other.own);
        self.found.extend(other.found);
    }
}

/// Records the tickets of the ops submitted on this thread while it lives, so that a reply can
/// wait for exactly the changes its own method made (not for everyone else's), and learn
/// whether the store refused any of them. Captures nest: an inner one's tickets count for the
/// outer one too. Not `Send`: a capture held across an `.await` (where a task may move to
/// another thread) does not compile in a spawned task.
pub struct Capture {
    outer: Option<Tickets>,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl Capture {
    pub fn begin() -> Capture {
        Capture {
            outer: CAPTURED.with(|c| c.replace(Some(Tickets::default()))),
            _this_thread: std::marker::PhantomData,
        }
    }

    /// The tickets submitted or found on this thread since `begin`.
    pub fn tickets(&self) -> Tickets {
        Capture::current()
    }

    /// The innermost live capture's tickets on this thread (none outside a capture).
    pub fn current() -> Tickets {
        CAPTURED.with(|c| c.borrow().clone().unwrap_or_default())
    }

    /// Counts `ticket`, the record of a change found already made (by another connection,
    /// maybe still uncommitted), so that the reply waits for its commit too; nothing outside
    /// a capture.
    pub fn include(ticket: u64) {
        if ticket > 0 {
            CAPTURED.with(|c| {
                if let Some(t) = c.borrow_mut().as_mut() {
                    t.found.push(ticket);
                }
            });
        }
    }

    /// Runs `f` (synchronous changes) under a capture: its result, and the tickets of the
    /// store writes it made or found.
    pub fn run<R>(f: impl FnOnce() -> R) -> (R, Tickets) {
        let capture = Capture::begin();
        let r = f();
        (r, capture.tickets())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        CAPTURED.with(|c| {
            let mine = c.borrow_mut().take().unwrap_or_default();
            *c.borrow_mut() = self.outer.take().map(|mut o| {
                o.extend(mine);
                o
            });
        });
    }
}

fn captured(ticket: u64) {
    CAPTURED.with(|c| {
        if let Some(t) = c.borrow_mut().as_mut() {
            t.own.push(ticket);
        }
    });
}

/// Remembers the weight of an insert with one position, by message id.
fn note_single(op: &Op, single: &mut HashMap<i64, usize>) {
    if let Op::Insert { message, entries } = op {
        if entries.len() == 1 {
            single.insert(message.id, op.weight());
        }
    }
}

fn is_large_insert(op: &Op) -> bool {
    matches!(op, Op::Insert { message, .. } if message.body.len() >= LARGE_BODY)
}

/// Failed tickets remembered (the oldest are forgotten past this; their confirms were due long
/// before).
const FAILED_KEPT: usize = 65_536;

#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// How long a batch gathers ops after its first one.
    pub interval: Duration,
    /// How long a batch that inserts a large body (`LARGE_BODY` or more) gathers instead: long
    /// enough for a consumer's ack to arrive and cancel the insert, which is then never written
    /// (writing and deleting 1 MiB costs SQLite some 3.5 ms of CPU).
    pub large_interval: Duration,
    pub max_ops: usize,
    pub max_bytes: usize,
    /// Uncommitted bytes above which publishers are held back.
    pub hold_limit: usize,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            interval: Duration::from_millis(1),
            large_interval: Duration::from_millis(5),
            max_ops: 10_000,
            max_bytes: 16 << 20,
            hold_limit: 64 << 20,
        }
    }
}

struct Submit {
    next: u64,
    tx: Option<mpsc::UnboundedSender<(u64, Op)>>,
}

pub struct Writer {
    submit: Mutex<Submit>,
    committed: watch::Receiver<u64>,
    pending: AtomicUsize,
    room: Notify,
    healthy: AtomicBool,
    hold_limit: usize,
    /// Tickets of ops the store refused for good (their confirms are nacks).
    failed: Mutex<BTreeSet<u64>>,
    /// How many tickets ever failed: lets `failed` skip its lock in the common case.
    failures: AtomicU64,
    /// A commit was refused with `StoreError::Fenced`: the writer has stopped.
    fenced: AtomicBool,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Writer(committed {}, pending {} bytes)",
            *self.committed.borrow(),
            self.pending.load(Ordering::Relaxed)
        )
    }
}

impl Writer {
    /// Starts the writer task on `store`.
    pub fn start<S: MessageStore>(
        store: Arc<S>,
        settings: WriterSettings,
    ) -> (Arc<Writer>, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (committed_tx, committed) = watch::channel(0);
        let writer = Arc::new(Writer {
            submit: Mutex::new(Submit {
                next: 1,
                tx: Some(tx),
            }),
            committed,
            pending: AtomicUsize::new(0),
            room: Notify::new(),
            healthy: AtomicBool::new(true),
            hold_limit: settings.hold_limit,
            failed: Mutex::new(BTreeSet::new()),
            failures: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
        });
        let task = tokio::spawn(run(store, settings, rx, committed_tx, writer.clone()));
        (writer, task)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Submit> {
        // Submit's state is a counter and a sender: always consistent.
        self.submit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an op; returns its ticket, or `NEVER` once the writer has been closed or has
    /// stopped (the op is dropped, and whatever waits for it is never confirmed).
    pub fn submit(&self, op: Op) -> u64 {
        let weight = op.weight();
        let mut s = self.lock();
        let ticket = s.next;
        let Some(tx) = s.tx.as_ref() else {
            tracing::debug!("store writer closed; op dropped");
            captured(NEVER);
            return NEVER;
        };
        if tx.send((ticket, op)).is_err() {
            tracing::error!("store writer gone; op dropped and never confirmed");
            s.tx = None;
            captured(NEVER);
            return NEVER;
        }
        s.next += 1;
        self.pending.fetch_add(weight, Ordering::Relaxed);
        captured(ticket);
        ticket
    }

    /// The ticket of the last op submitted.
    pub fn last_ticket(&self) -> u64 {
        self.lock().next - 1
    }

    /// Every ticket up to this one is committed.
    pub fn committed(&self) -> u64 {
        *self.committed.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Waits until `ticket` is committed: true then, false if the writer stopped first (the
    /// ticket will never be committed).
    pub async fn wait(&self, ticket: u64) -> bool {
        if ticket == NEVER {
            return false;
        }
        let mut rx = self.committed.clone();
        let ok = rx.wait_for(|c| *c >= ticket).await.is_ok();
        ok
    }

    /// Waits until every ticket of `t` is committed: true if the store took the writes of
    /// `t`'s own, false if it refused one for good or the writer stopped first. Judged at the
    /// commit (the writer remembers its most recent refusals, not all of them).
    pub async fn stored(&self, t: &Tickets) -> bool {
        t.is_empty() || (self.wait(t.last()).await && !t.own().any(|x| self.failed(x)))
    }

    /// Whether the store refused for good any op from `first` to `last` (only meaningful once
    /// `last` is committed).
    pub fn failed_any(&self, first: u64, last: u64) -> bool {
        if last == NEVER {
            return true;
        }
        self.failures.load(Ordering::Acquire) > 0
            && self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .range(first..=last)
                .next()
                .is_some()
    }

    /// Whether the store refused `ticket`'s op for good (only meaningful once committed).
    pub fn failed(&self, ticket: u64) -> bool {
        self.failed_any(ticket, ticket)
    }

    fn mark_failed(&self, ticket: u64) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        f.insert(ticket);
        while f.len() > FAILED_KEPT {
            f.pop_first();
        }
        drop(f);
        self.failures.fetch_add(1, Ordering::Release);
    }

    /// Bytes submitted and not yet committed.
    pub fn held_bytes(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn over_limit(&self) -> bool {
        self.held_bytes() > self.hold_limit
    }

    /// Bytes that can still be submitted before publishers are held.
    pub fn room_left(&self) -> usize {
        self.hold_limit.saturating_sub(self.held_bytes())
    }

    /// Waits until the held bytes are under the limit.
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            if !self.over_limit() {
                return;
            }
            notified.await;
        }
    }

    /// The writer stopped because this node was fenced (cluster mode).
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Stops taking ops; the task commits what it has and ends.
    pub fn close(&self) {
        self.lock().tx = None;
    }
}

async fn run<S: MessageStore>(
    store: Arc<S>,
    settings: WriterSettings,
    mut rx: mpsc::UnboundedReceiver<(u64, Op)>,
    committed: watch::Sender<u64>,
    writer: Arc<Writer>,
) {
    let mut batch: Vec<(u64, Op)> = Vec::new();
    // Inserts of one position in the current batch, by message id (kept between batches so
    // its allocation is reused).
    let mut single: HashMap<i64, usize> = HashMap::new();
    while let Some((ticket, op)) = rx.recv().await {
        let mut last = ticket;
        let mut bytes = op.weight();
        let opened = Instant::now();
        let mut deadline = opened
            + if is_large_insert(&op) {
                settings.large_interval
            } else {
                settings.interval
            };
        // The batch is full by the bytes it will write: an insert of one position whose
        // remove joins the batch is written by neither, so it stops counting.
        let mut live = bytes;
        single.clear();
        note_single(&op, &mut single);
        batch.push((ticket, op));
        let full = |n: usize, b: usize| n >= settings.max_ops || b >= settings.max_bytes;
        while !full(batch.len(), live) {
            let next = match rx.try_recv() {
                Ok(x) => Some(x),
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    x = rx.recv() => x,
                    _ = tokio::time::sleep_until(deadline) => None,
                },
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some((t, op)) = next else { break };
            if is_large_insert(&op) {
                deadline = deadline.max(opened + settings.large_interval);
            }
            last = t;
            let w = op.weight();
            bytes += w;
            live += w;
            if let Op::Remove { message_id, .. } = &op {
                if let Some(inserted) = single.remove(message_id) {
                    live = live.saturating_sub(inserted + w);
                }
            }
            note_single(&op, &mut single);
            batch.push((t, op));
        }
        let ops = batch.len();
        let plan = Plan::from_ops(batch.iter().map(|(_, op)| op));
        let started = Instant::now();
        let first = commit(&*store, &plan, &writer).await;
        if let Err(StoreError::Fenced(why)) = &first {
            tracing::error!(
                reason = %why,
                ops,
                "store writer fenced: another node owns the store; nothing it held is confirmed"
            );
            writer.fenced.store(true, Ordering::Release);
            writer.close();
            return;
        }
        if let Err(e) = first {
            // Refused for good: find the ops to blame, one transaction each.
            tracing::error!(error = %e, ops, "store refused a batch; committing its ops one by one");
            for (t, op) in batch.drain(..) {
                let r = commit(&*store, &Plan::from_ops([op]), &writer).await;
                if matches!(r, Err(StoreError::Fenced(_))) {
                    tracing::error!("store writer fenced while splitting a refused batch");
                    writer.fenced.store(true, Ordering::Release);
                    writer.close();
                    return;
                }
                if let Err(e) = r {
                    tracing::error!(ticket = t, error = %e, "store refused an op; its publisher is nacked");
                    writer.mark_failed(t);
                }
            }
        }
        batch.clear();
        tracing::trace!(
            ops,
            bytes,
            inserts = plan.inserts.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "batch committed"
        );
        writer.pending.fetch_sub(bytes, Ordering::Relaxed);
        let _ = committed.send(last);
        writer.room.notify_waiters();
    }
    tracing::debug!("store writer finished");
}

/// Commits `plan`, retrying transient failures with back-off until the store takes it; a
/// permanent refusal is returned.
async fn commit<S: MessageStore>(
    store: &S,
    plan: &Plan,
    writer: &Writer,
) -> Result<(), StoreError> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.apply(plan).await {
            Ok(()) => {
                if !writer.healthy.swap(true, Ordering::Relaxed) {
                    tracing::warn!("store reachable again; held writes committed");
                }
                return Ok(());
            }
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                if writer.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "store commit failed; holding writes and retrying");
                } else {
                    tracing::debug!(error = %e, "store commit retry failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{message, queue};
    use crate::{Faults, Faulty, SqlStore};
    use bytes::Bytes;

    async fn writer(tag: &str) -> (Arc<Writer>, Arc<Faulty<SqlStore>>, Arc<Faults>) {
        writer_with(tag, WriterSettings::default()).await
    }

    async fn writer_with(
        tag: &str,
        settings: WriterSettings,
    ) -> (Arc<Writer>, Arc<Faulty<SqlStore>>, Arc<Faults>) {
        let dir = std::env::temp_dir().join(format!(
            "warren-writer-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sql = SqlStore::open(&SqlStore::sqlite_url(&dir), false)
            .await
            .unwrap();
        let faults = Faults::new();
        let store = Arc::new(Faulty::new(sql, faults.clone()));
        let (w, _task) = Writer::start(store.clone(), settings);
        let t = w.submit(Op::PutQueue(queue(1, "q")));
        assert!(w.wait(t).await);
        (w, store, faults)
    }

    fn insert(id: i64) -> Op {
        Op::Insert {
            message: message(id, true, Bytes::from_static(b"body")),
            entries: vec![(1, id)],
        }
    }

    /// A large body's batch waits `large_interval`: an ack that comes meanwhile cancels the
    /// insert, and the message is never written.
    #[tokio::test]
    async fn a_large_body_acked_while_its_batch_gathers_is_never_written() {
        let settings = WriterSettings {
            interval: Duration::from_millis(1),
            large_interval: Duration::from_millis(300),
            ..WriterSettings::default()
        };
        let (w, store, faults) = writer_with("large", settings).await;
        let before = faults.commits();
        w.submit(Op::Insert {
            message: message(1, true, Bytes::from(vec![7u8; LARGE_BODY])),
            entries: vec![(1, 1)],
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let t = w.submit(Op::Remove {
            queue_id: 1,
            seq: 1,
            message_id: 1,
        });
        assert!(w.wait(t).await);
        assert_eq!(
            faults.commits() - before,
            1,
            "the insert was committed before its ack arrived"
        );
        assert_eq!(store.read_message(1).await.unwrap(), None);
        // A small body still commits after `interval`.
        let t = w.submit(insert(2));
        let start = std::time::Instant::now();
        assert!(w.wait(t).await);
        assert!(start.elapsed() < Duration::from_millis(300));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_capture_sees_only_its_own_threads_tickets() {
        let (w, _store, _faults) = writer("capture").await;
        let capture = Capture::begin();
        assert_eq!(capture.tickets().last(), 0, "nothing submitted yet");
        // Another thread's submissions are not this capture's.
        let other = std::thread::spawn({
            let w = w.clone();
            move || {
                (0..100)
                    .map(|i| w.submit(Op::PutQueue(queue(10 + i, "other"))))
                    .max()
            }
        })
        .join()
        .unwrap()
        .unwrap();
        assert_eq!(
            capture.tickets().last(),
            0,
            "another thread's ticket was captured"
        );
        let mine = w.submit(Op::PutQueue(queue(2, "mine")));
        assert!(mine > other);
        // A nested capture records its own tickets and hands them to the outer one.
        {
            let inner = Capture::begin();
            assert_eq!(inner.tickets().last(), 0);
            let t = w.submit(Op::PutQueue(queue(3, "inner")));
            assert_eq!(inner.tickets(), Tickets::one(t));
        }
        assert_eq!(
            capture.tickets().own().collect::<Vec<_>>(),
            vec![mine, mine + 1]
        );
        drop(capture);
        // No capture: submitting records nothing anywhere.
        w.submit(Op::PutQueue(queue(4, "after")));
        assert!(Capture::current().is_empty());
        assert!(Capture::begin().tickets().is_empty());
        let ((), t) = Capture::run(|| {
            w.submit(Op::PutQueue(queue(5, "run")));
        });
        assert_eq!(t, Tickets::one(w.last_ticket()));
        assert!(Capture::current().is_empty(), "run's capture ended with it");
    }

    /// Issue 11: `submit` answered 0 ("nothing to wait for") once the writer was gone, which
    /// would confirm at once.
    #[tokio::test]
    async fn a_closed_writer_never_confirms() {
        let (w, _, _) = writer("closed").await;
        w.close();
        let t = w.submit(insert(1));
        assert_eq!(t, NEVER);
        assert!(t > w.committed());
        assert!(!w.wait(t).await);
        assert!(w.failed(t));
    }

    #[tokio::test]
    async fn an_outage_is_retried_until_the_store_is_back() {
        let (w, store, faults) = writer("outage").await;
        faults.set_outage(true);
        let t = w.submit(insert(1));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(w.committed() < t, "committed during the outage");
        assert!(faults.commits() >= 3, "retried");
        faults.set_outage(false);
        assert!(w.wait(t).await);
        assert!(!w.failed(t));
        assert_eq!(store.queue_summary(1).await.unwrap().count, 1);
    }

    /// A refused batch is split: the other publishers' ops commit, only the refused op fails.
    #[tokio::test]
    async fn a_permanent_refusal_fails_only_its_op() {
        let (w, store, faults) = writer("reject").await;
        faults.reject_routing_key(Some("key-2"));
        let tickets: Vec<u64> = (1..=3).map(|id| w.submit(insert(id))).collect();
        assert!(w.wait(tickets[2]).await);
        let failed: Vec<bool> = tickets.iter().map(|t| w.failed(*t)).collect();
        assert_eq!(failed, vec![false, true, false]);
        let ids: Vec<i64> = store
            .read_queue(1, 0, 10, 1 << 20)
            .await
            .unwrap()
            .iter()
            .map(|e| e.message.id)
            .collect();
        assert_eq!(ids, vec![1, 3]);
        // The writer keeps going.
        faults.reject_routing_key(None);
        let t = w.submit(insert(4));
        assert!(w.wait(t).await && !w.failed(t));
    }

    /// A commit that applied but whose answer was lost is retried: the retry must not double
    /// the message or fail on the rows already there.
    #[tokio::test]
    async fn a_lost_commit_answer_is_retried_idempotently() {
        let (w, store, faults) = writer("lost").await;
        faults.lose_answers(1);
        let t = w.submit(insert(1));
        assert!(w.wait(t).await);
        assert!(!w.failed(t));
        assert_eq!(store.queue_summary(1).await.unwrap().count, 1);
        faults.lose_answers(1);
        let t = w.submit(Op::Remove {
            queue_id: 1,
            seq: 1,
            message_id: 1,
        });
        assert!(w.wait(t).await);
        assert_eq!(store.queue_summary(1).await.unwrap().count, 0);
        assert_eq!(store.read_message(1).await.unwrap(), None);
    }
}
