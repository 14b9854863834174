//! `Writer`: the group-commit task. Every change to the store is submitted here as an `Op` and
//! gets a ticket (a sequence number, in submission order). One task gathers ops for up to
//! `interval` (or `max_ops` / `max_bytes`), reduces them to a `Plan` and commits it in one
//! transaction; `committed()` then covers every ticket of the batch. A failed commit is retried
//! with back-off, forever: nothing submitted is dropped, and ticket holders simply wait. The
//! bytes held by uncommitted ops are counted so publishers can be slowed (`over_limit`, `room`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{MessageStore, Op, Plan};

#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// How long a batch gathers ops after its first one.
    pub interval: Duration,
    pub max_ops: usize,
    pub max_bytes: usize,
    /// Uncommitted bytes above which publishers are held back.
    pub hold_limit: usize,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            interval: Duration::from_millis(1),
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
        });
        let task = tokio::spawn(run(store, settings, rx, committed_tx, writer.clone()));
        (writer, task)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Submit> {
        // Submit's state is a counter and a sender: always consistent.
        self.submit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an op; returns its ticket, or 0 once the writer has been closed (the op is
    /// dropped: the broker is shutting down).
    pub fn submit(&self, op: Op) -> u64 {
        let weight = op.weight();
        let mut s = self.lock();
        let ticket = s.next;
        let Some(tx) = s.tx.as_ref() else {
            return 0;
        };
        if tx.send((ticket, op)).is_err() {
            return 0;
        }
        s.next += 1;
        self.pending.fetch_add(weight, Ordering::Relaxed);
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

    /// Waits until `ticket` is committed.
    pub async fn wait(&self, ticket: u64) {
        let mut rx = self.committed.clone();
        let _ = rx.wait_for(|c| *c >= ticket).await;
    }

    /// Bytes submitted and not yet committed.
    pub fn held_bytes(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn over_limit(&self) -> bool {
        self.held_bytes() > self.hold_limit
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
    let mut batch: Vec<Op> = Vec::new();
    while let Some((ticket, op)) = rx.recv().await {
        let mut last = ticket;
        let mut bytes = op.weight();
        batch.push(op);
        let deadline = Instant::now() + settings.interval;
        let full = |n: usize, b: usize| n >= settings.max_ops || b >= settings.max_bytes;
        while !full(batch.len(), bytes) {
            let next = match rx.try_recv() {
                Ok(x) => Some(x),
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    x = rx.recv() => x,
                    _ = tokio::time::sleep_until(deadline) => None,
                },
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some((t, op)) = next else { break };
            last = t;
            bytes += op.weight();
            batch.push(op);
        }
        let ops = batch.len();
        let plan = Plan::from_ops(batch.drain(..));
        let started = Instant::now();
        commit(&*store, &plan, &writer).await;
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

/// Commits `plan`, retrying with back-off until the store takes it.
async fn commit<S: MessageStore>(store: &S, plan: &Plan, writer: &Writer) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.apply(plan).await {
            Ok(()) => {
                if !writer.healthy.swap(true, Ordering::Relaxed) {
                    tracing::warn!("store reachable again; held writes committed");
                }
                return;
            }
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
