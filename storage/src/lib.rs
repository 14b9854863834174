//! Warren's storage seam: the records the broker persists and the `MetaStore` trait it writes
//! durable exchanges, queues and bindings through. `MemoryStore` is the in-memory implementation
//! (nothing survives a restart); the SQL backends arrive with the storage issue behind the same
//! trait. The broker encodes argument tables itself, so this crate stays protocol-free.

mod memory;

pub use memory::MemoryStore;

use bytes::Bytes;

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

/// A durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRecord {
    pub vhost: String,
    pub name: String,
    pub auto_delete: bool,
    pub arguments: Bytes,
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

/// Everything durable, as loaded at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub exchanges: Vec<ExchangeRecord>,
    pub queues: Vec<QueueRecord>,
    pub bindings: Vec<BindingRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

/// Durable metadata. Calls are write-through: when one returns Ok the change is as durable as the
/// backend makes it. Deleting an entity deletes the bindings that name it.
pub trait MetaStore: Send + Sync + 'static {
    fn put_exchange(&self, record: &ExchangeRecord) -> Result<(), StoreError>;
    fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), StoreError>;
    fn put_queue(&self, record: &QueueRecord) -> Result<(), StoreError>;
    fn delete_queue(&self, vhost: &str, name: &str) -> Result<(), StoreError>;
    fn put_binding(&self, record: &BindingRecord) -> Result<(), StoreError>;
    fn delete_binding(&self, record: &BindingRecord) -> Result<(), StoreError>;
    fn load(&self) -> Result<Snapshot, StoreError>;
}

#[cfg(test)]
pub(crate) mod suite {
    //! The shared behaviour every `MetaStore` must show.
    use super::*;

    pub fn exchange(name: &str) -> ExchangeRecord {
        ExchangeRecord {
            vhost: "/".into(),
            name: name.into(),
            kind: "topic".into(),
            auto_delete: false,
            internal: false,
            arguments: Bytes::new(),
        }
    }

    pub fn queue(name: &str) -> QueueRecord {
        QueueRecord {
            vhost: "/".into(),
            name: name.into(),
            auto_delete: false,
            arguments: Bytes::new(),
        }
    }

    pub fn binding(source: &str, dest: &str, key: &str) -> BindingRecord {
        BindingRecord {
            vhost: "/".into(),
            source: source.into(),
            destination: dest.into(),
            destination_kind: DestinationKind::Queue,
            routing_key: key.into(),
            arguments: Bytes::new(),
        }
    }

    pub fn run(store: &dyn MetaStore) {
        assert_eq!(store.load().unwrap(), Snapshot::default());
        store.put_exchange(&exchange("x")).unwrap();
        store.put_exchange(&exchange("x")).unwrap();
        store.put_queue(&queue("q1")).unwrap();
        store.put_queue(&queue("q2")).unwrap();
        store.put_binding(&binding("x", "q1", "a.#")).unwrap();
        store.put_binding(&binding("x", "q1", "a.#")).unwrap();
        store.put_binding(&binding("x", "q2", "b")).unwrap();
        let s = store.load().unwrap();
        assert_eq!(s.exchanges, vec![exchange("x")]);
        assert_eq!(s.queues.len(), 2);
        assert_eq!(s.bindings.len(), 2);

        store.delete_binding(&binding("x", "q2", "b")).unwrap();
        assert_eq!(
            store.load().unwrap().bindings,
            vec![binding("x", "q1", "a.#")]
        );
        store.put_binding(&binding("x", "q2", "b")).unwrap();
        store.delete_queue("/", "q1").unwrap();
        let s = store.load().unwrap();
        assert_eq!(s.queues, vec![queue("q2")]);
        assert_eq!(s.bindings, vec![binding("x", "q2", "b")]);
        store.delete_exchange("/", "x").unwrap();
        let s = store.load().unwrap();
        assert!(s.exchanges.is_empty() && s.bindings.is_empty());
        // deleting what is not there is not an error
        store.delete_queue("/", "nope").unwrap();
        store.delete_exchange("/", "nope").unwrap();
    }
}
