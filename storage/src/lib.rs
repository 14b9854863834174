//! Warren's durable store: the records the broker persists, the `MetaStore` and `MessageStore`
//! traits, the SQL backend (`SqlStore`, SQLite by default or MySQL/MariaDB, through sqlx), the
//! write plan a batch of operations turns into (`plan`), the group-commit `Writer` task, and
//! `MemStore`, an in-memory store with the SQL semantics for tests, and `faults`, the
//! fault-injection seam (`Faulty` wraps any store).
//! The broker encodes AMQP tables and content headers itself, so this crate stays protocol-free.

pub mod cluster;
pub mod faults;
pub mod memory;
pub mod plan;
mod sql;
pub mod writer;

#[cfg(any(test, feature = "suite"))]
pub mod suite;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

pub use faults::{Faults, Faulty};
pub use memory::MemStore;
pub use plan::Plan;
pub use sql::{Backend, SqlStore};
pub use writer::{Capture, Tickets, Writer, WriterSettings};

/// A durable exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeRecord {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    /// The declare arguments, as an encoded AMQP field table.
    pub arguments: Bytes,
}

/// A durable queue. `id` is the broker's number for it, which message rows refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRecord {
    pub id: i64,
    pub vhost: String,
    pub name: String,
    pub auto_delete: bool,
    pub arguments: Bytes,
    /// Loaded only: the highest sequence number known to have been delivered.
    pub delivered_seq: i64,
}

/// What a binding's destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationKind {
    Queue,
    Exchange,
}

/// A binding between two durable entities.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindingRecord {
    pub vhost: String,
    pub source: String,
    pub destination: String,
    pub destination_kind: DestinationKind,
    pub routing_key: String,
    pub arguments: Bytes,
}

/// A user: RabbitMQ's internal user record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    /// `rabbit_password_hashing_sha256`: a 4-byte salt then sha256(salt ++ password).
    pub password_hash: Vec<u8>,
    /// Comma-separated tags (administrator, monitoring, ...).
    pub tags: String,
    /// RabbitMQ's user limits as a JSON object (`{"max-connections": 10}`); "{}" is none.
    pub limits: String,
}

/// A user's permissions in one vhost: configure, write and read regular expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionRecord {
    pub vhost: String,
    pub user: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// A user's topic permissions on one topic exchange of a vhost: write and read patterns on
/// routing keys (RabbitMQ's topic permissions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermissionRecord {
    pub vhost: String,
    pub user: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

/// A virtual host and its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostRecord {
    pub name: String,
    pub description: String,
    /// Comma-separated tags.
    pub tags: String,
    pub default_queue_type: String,
}

/// A runtime parameter of a vhost: a policy (component `policy`), an operator policy
/// (`operator_policy`), the vhost's limits (`vhost-limits`, name `limits`) or another
/// component's value. `value` is JSON text, as RabbitMQ's API carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterRecord {
    pub vhost: String,
    pub component: String,
    pub name: String,
    pub value: String,
}

/// A global (cluster-wide) parameter; `value` is JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalParameterRecord {
    pub name: String,
    pub value: String,
}

/// Everything durable, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub vhosts: Vec<VhostRecord>,
    pub exchanges: Vec<ExchangeRecord>,
    pub queues: Vec<QueueRecord>,
    pub bindings: Vec<BindingRecord>,
    pub parameters: Vec<ParameterRecord>,
    pub global_parameters: Vec<GlobalParameterRecord>,
}

/// A message as stored: once, however many queues hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub id: i64,
    pub persistent: bool,
    pub exchange: String,
    pub routing_key: String,
    /// The encoded content header payload.
    pub header: Bytes,
    pub body: Bytes,
    /// When it was published, in ms since the Unix epoch (TTLs count from it).
    pub published_ms: i64,
}

/// One queue's position holding a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub seq: i64,
    pub message: MessageRow,
    /// Marked by `Op::Redelivered`.
    pub redelivered: bool,
}

/// A queue's stored backlog, without reading it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSummary {
    pub count: u64,
    pub min_seq: i64,
    pub max_seq: i64,
}

/// What start-up recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    pub snapshot: Snapshot,
    /// The next free message id and queue id.
    pub next_message_id: i64,
    pub next_queue_id: i64,
}

/// One change to the store. The `Writer` batches these into a `Plan` and commits it at once.
#[derive(Debug, Clone)]
pub enum Op {
    PutExchange(ExchangeRecord),
    DeleteExchange {
        vhost: String,
        name: String,
    },
    PutQueue(QueueRecord),
    /// Deletes the queue, its messages and the bindings that name it.
    DeleteQueue {
        id: i64,
        vhost: String,
        name: String,
    },
    PutBinding(BindingRecord),
    DeleteBinding(BindingRecord),
    PutUser(UserRecord),
    /// Deletes a user with its permissions and topic permissions.
    DeleteUser {
        name: String,
    },
    PutPermission(PermissionRecord),
    DeletePermission {
        vhost: String,
        user: String,
    },
    PutTopicPermission(TopicPermissionRecord),
    /// Deletes a user's topic permissions in a vhost: on one exchange, or on all of them.
    DeleteTopicPermission {
        vhost: String,
        user: String,
        exchange: Option<String>,
    },
    PutVhost(VhostRecord),
    /// Deletes a vhost's record and every exchange, binding, permission and parameter in it,
    /// and its queue records (the broker deletes each queue, with its messages, before).
    DeleteVhost {
        name: String,
    },
    PutParameter(ParameterRecord),
    DeleteParameter {
        vhost: String,
        component: String,
        name: String,
    },
    PutGlobalParameter(GlobalParameterRecord),
    DeleteGlobalParameter {
        name: String,
    },
    /// A message and the (queue id, seq) positions that hold it.
    Insert {
        message: Arc<MessageRow>,
        entries: Vec<(i64, i64)>,
    },
    /// A position is gone (acked, dropped); the message goes with its last position.
    Remove {
        queue_id: i64,
        seq: i64,
        message_id: i64,
    },
    /// Every position of a queue after `after_seq` is gone.
    Purge {
        queue_id: i64,
        after_seq: i64,
    },
    /// A queue delivered up to `seq`.
    Delivered {
        queue_id: i64,
        seq: i64,
    },
    /// One stored position is marked redelivered: a message moved by the browser keeps its
    /// flag in its new queue, past that queue's delivered mark. A position already gone is
    /// left alone.
    Redelivered {
        queue_id: i64,
        seq: i64,
    },
    /// Ops that must commit together (a dead-lettered message's insert into its new queues and
    /// its removal from the old one): the writer never splits them across transactions.
    Atomic(Vec<Op>),
}

impl StoreError {
    /// Whether retrying the same write may succeed (an outage, a deadlock, a busy database).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl Op {
    /// Bytes this op holds in memory until committed: for an insert, the row's buffers and
    /// names, the row itself in its `Arc`, the op, its positions, and the allocator's headers
    /// of the names and the position list. Budgets count it (`held_bytes`).
    pub fn weight(&self) -> usize {
        match self {
            Op::Insert { message, entries } => {
                message.body.len()
                    + message.header.len()
                    + message.exchange.len()
                    + message.routing_key.len()
                    + std::mem::size_of::<MessageRow>()
                    + 16
                    + std::mem::size_of::<Op>()
                    + entries.capacity() * std::mem::size_of::<(i64, i64)>()
                    + 3 * 16
            }
            Op::Atomic(ops) => ops.iter().map(Op::weight).sum(),
            _ => std::mem::size_of::<Op>().max(64),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Transient: the store cannot be reached or is busy (retried).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Permanent: the store refuses this data (too long, a constraint): retrying cannot help.
    #[error("store rejected the write: {0}")]
    Rejected(String),
    #[error("store corrupt: {0}")]
    Corrupt(String),
    #[error("bad storage setting: {0}")]
    Config(String),
    /// Cluster mode: this node's incarnation is no longer the live one (another node took
    /// over, or a newer process of the same name started). Nothing was written, and nothing
    /// this store holds may be confirmed.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// Durable metadata: loaded at start; written through `Op`s.
pub trait MetaStore: Send + Sync + 'static {
    /// Loads every durable exchange, queue and binding.
    fn load_meta(&self) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;

    /// Whether any user exists (an empty store gets the default user).
    fn has_users(&self) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// One user, looked up by name (the broker caches the answer).
    fn user(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<UserRecord>, StoreError>> + Send;

    /// A user's permissions in a vhost, if any.
    fn permission(
        &self,
        vhost: &str,
        user: &str,
    ) -> impl Future<Output = Result<Option<PermissionRecord>, StoreError>> + Send;

    /// A user's topic permissions in a vhost, one per exchange.
    fn topic_permissions(
        &self,
        vhost: &str,
        user: &str,
    ) -> impl Future<Output = Result<Vec<TopicPermissionRecord>, StoreError>> + Send;

    /// Every user, by name.
    fn list_users(&self) -> impl Future<Output = Result<Vec<UserRecord>, StoreError>> + Send;

    /// Every permission, by (vhost, user).
    fn list_permissions(
        &self,
    ) -> impl Future<Output = Result<Vec<PermissionRecord>, StoreError>> + Send;

    /// Every topic permission, by (vhost, user, exchange).
    fn list_topic_permissions(
        &self,
    ) -> impl Future<Output = Result<Vec<TopicPermissionRecord>, StoreError>> + Send;
}

/// Messages and the batches that change them.
pub trait MessageStore: Send + Sync + 'static {
    /// Commits a plan in one transaction: all of it or none.
    fn apply(&self, plan: &Plan) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Start-up: drops what must not survive a restart (transient messages, rows of queues that
    /// are gone) and returns the durable metadata with the next free ids.
    fn recover(&self) -> impl Future<Output = Result<Recovered, StoreError>> + Send;

    /// How many messages a queue holds in the store, and their sequence range.
    fn queue_summary(
        &self,
        queue_id: i64,
    ) -> impl Future<Output = Result<QueueSummary, StoreError>> + Send;

    /// Up to `limit` entries of a queue after `after_seq`, in order, stopping early once
    /// `max_bytes` of bodies have been read.
    fn read_queue(
        &self,
        queue_id: i64,
        after_seq: i64,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<StoredEntry>, StoreError>> + Send;

    /// One message by id.
    fn read_message(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Option<MessageRow>, StoreError>> + Send;

    /// Body bytes of a queue's stored messages (for `x-max-length-bytes` after a restart).
    fn queue_bytes(&self, queue_id: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

#[cfg(test)]
mod backend_tests {
    use std::sync::Arc;

    use crate::{suite, MemStore, SqlStore};

    fn scratch_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "warren-storage-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn suite_on_sqlite() {
        let dir = scratch_dir("sqlite");
        let store = SqlStore::open(&SqlStore::sqlite_url(&dir), true)
            .await
            .unwrap();
        suite::run(Arc::new(store)).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_go_with_their_messages_on_sqlite() {
        let dir = scratch_dir("chunks");
        let store = SqlStore::open(&SqlStore::sqlite_url(&dir), false)
            .await
            .unwrap();
        suite::chunks_go_with_their_messages(&store).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_go_with_their_messages_on_mysql() {
        let url = suite::mysql_scratch_url().await;
        let store = SqlStore::open(&url, false).await.unwrap();
        suite::chunks_go_with_their_messages(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn suite_on_memory() {
        suite::run(Arc::new(MemStore::new())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn suite_on_mysql() {
        let url = suite::mysql_scratch_url().await;
        let store = SqlStore::open(&url, true).await.unwrap();
        suite::run(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn a_bad_url_is_a_config_error() {
        let e = SqlStore::open("postgres://x", true).await.unwrap_err();
        assert!(e.to_string().contains("sqlite:// or mysql://"), "{e}");
    }
}
