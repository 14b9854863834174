//! `Persistence`: the broker's side of the store. It owns the store (`SqlStore` behind the
//! fault-injection seam, which forwards unless a test sets faults), the group-commit
//! `Writer`, the `--sync` mode, the memory `Gauge` with its budget, the moka cache of stored
//! bodies, the id counters for messages and queues, and the follow-ups a graceful stop waits
//! for (dead letters reading their bodies back). Topology changes and message positions
//! reach the store only through `submit`; tickets say when they are committed.
//!
//! Memory: every live `Message` is counted in the gauge. A quarter of the budget is the moka
//! cache, which only ever holds messages already in the store (so an eviction loses nothing).
//! Once the gauge passes three quarters, queues page new messages out to the store instead of
//! holding them (see `Queue::publish`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use warren_storage::{
    BindingRecord, ExchangeRecord, Faulty, MessageStore, Op, QueueRecord, Recovered, SqlStore,
    StoreError, Writer, WriterSettings,
};

/// The broker's store: SQL behind the fault-injection seam.
pub type Store = Faulty<SqlStore>;

use crate::config::{Config, SyncMode};
use crate::message::{Gauge, Message};

/// Store reads dead-letter follow-ups make at once.
pub const FOLLOW_UP_READS: usize = 8;

pub struct Persistence {
    pub store: Arc<Store>,
    pub writer: Arc<Writer>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    pub sync: SyncMode,
    /// Stored bodies by message id, weighed by size.
    pub cache: moka::sync::Cache<u64, Arc<Message>>,
    pub gauge: Arc<Gauge>,
    /// Work that must reach the writer before it closes: dead letters whose bodies are read
    /// back from the store first. A graceful shutdown waits for them.
    pub follow_ups: TaskTracker,
    /// Store reads the follow-ups make at once (`FOLLOW_UP_READS`): many rejects during an
    /// outage queue here instead of all retrying together.
    pub follow_up_reads: tokio::sync::Semaphore,
    budget: usize,
    next_message_id: AtomicU64,
    next_queue_id: AtomicI64,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Persistence({:?}, {:?})", self.store, self.writer)
    }
}

impl Persistence {
    /// Opens the store named by the config, cleans it up after the last run and starts the
    /// writer. Returns what was recovered for the vhosts to rebuild from.
    pub async fn open(config: &Config) -> Result<(Arc<Persistence>, Recovered), StoreError> {
        if config.storage.is_none() {
            std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                StoreError::Config(format!(
                    "cannot create data directory {}: {e}",
                    config.data_dir.display()
                ))
            })?;
        }
        let url = config.storage_url();
        let sql = SqlStore::open(&url, config.sync == SyncMode::Confirm).await?;
        // Cluster mode: the active node's every transaction, recovery's included, proves its
        // lease first.
        if let Some(me) = &config.cluster_fence {
            sql.fence_with(me.clone())?;
        }
        let faults = config.faults.clone().unwrap_or_default();
        let store = Arc::new(Faulty::new(sql, faults));
        let recovered = store.recover().await?;
        let interval = match config.sync {
            SyncMode::Confirm => Duration::from_micros(config.commit_interval_us),
            SyncMode::Periodic(ms) => Duration::from_millis(ms),
        };
        let (writer, task) = Writer::start(
            store.clone(),
            WriterSettings {
                interval,
                large_interval: interval.max(WriterSettings::default().large_interval),
                max_ops: config.commit_max_ops.max(1),
                max_bytes: config.commit_max_bytes as usize,
                hold_limit: config.store_hold_bytes as usize,
            },
        );
        let budget = config.cache_memory as usize;
        let cache = moka::sync::Cache::builder()
            .max_capacity((budget / 4) as u64)
            .weigher(|_k: &u64, m: &Arc<Message>| m.weight().min(u32::MAX as usize) as u32)
            .build();
        tracing::info!(
            backend = ?store.inner().backend(),
            queues = recovered.snapshot.queues.len(),
            exchanges = recovered.snapshot.exchanges.len(),
            "store opened"
        );
        Ok((
            Arc::new(Persistence {
                store,
                writer,
                writer_task: Mutex::new(Some(task)),
                sync: config.sync,
                cache,
                gauge: Arc::new(Gauge::default()),
                follow_ups: TaskTracker::new(),
                follow_up_reads: tokio::sync::Semaphore::new(FOLLOW_UP_READS),
                budget,
                next_message_id: AtomicU64::new(recovered.next_message_id.max(1) as u64),
                next_queue_id: AtomicI64::new(recovered.next_queue_id.max(1)),
            }),
            recovered,
        ))
    }

    pub fn next_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_queue_id(&self) -> i64 {
        self.next_queue_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Past three quarters of the budget, counting the messages in memory and those on their
    /// way to the store (the writer's rows): new messages page out.
    pub fn over_budget(&self) -> bool {
        self.gauge.get() + self.writer.held_bytes() > self.budget / 4 * 3
    }

    /// The ticket a publisher confirm must wait for: the store's ticket under `confirm`, none
    /// under `periodic` (write-behind).
    pub fn confirm_ticket(&self, ticket: u64) -> u64 {
        match self.sync {
            SyncMode::Confirm => ticket,
            SyncMode::Periodic(_) => 0,
        }
    }

    pub fn submit(&self, op: Op) -> u64 {
        self.writer.submit(op)
    }

    /// Keeps a stored message's body in the cache (it may be evicted at any time).
    pub fn cache_body(&self, msg: &Arc<Message>) {
        self.cache.insert(msg.id, msg.clone());
    }

    pub fn put_exchange(&self, r: ExchangeRecord) -> u64 {
        self.submit(Op::PutExchange(r))
    }

    pub fn delete_exchange(&self, vhost: &str, name: &str) {
        self.submit(Op::DeleteExchange {
            vhost: vhost.to_string(),
            name: name.to_string(),
        });
    }

    pub fn put_queue(&self, r: QueueRecord) -> u64 {
        self.submit(Op::PutQueue(r))
    }

    pub fn delete_queue(&self, id: i64, vhost: &str, name: &str) {
        self.submit(Op::DeleteQueue {
            id,
            vhost: vhost.to_string(),
            name: name.to_string(),
        });
    }

    /// The record's store ticket.
    pub fn put_binding(&self, r: BindingRecord) -> u64 {
        self.submit(Op::PutBinding(r))
    }

    pub fn delete_binding(&self, r: BindingRecord) {
        self.submit(Op::DeleteBinding(r));
    }

    /// Finishes the follow-ups, commits what was submitted and closes the store (at shutdown).
    pub async fn close(&self) {
        self.follow_ups.close();
        if tokio::time::timeout(Duration::from_secs(10), self.follow_ups.wait())
            .await
            .is_err()
        {
            tracing::error!(
                left = self.follow_ups.len(),
                "dead letters still reading their bodies after 10 s; they stay in their queues"
            );
        }
        self.writer.close();
        let task = self
            .writer_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                tracing::error!("store writer did not finish within 10 s");
            }
        }
        self.store.inner().close().await;
    }
}
