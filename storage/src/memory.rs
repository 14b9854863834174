//! `MemoryStore`: the in-memory `MetaStore`. A `std::sync::Mutex` guards it: every call is a short
//! map update and no caller holds it across an `.await`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use crate::{BindingRecord, ExchangeRecord, MetaStore, QueueRecord, Snapshot, StoreError};

#[derive(Default)]
struct Inner {
    exchanges: BTreeMap<(String, String), ExchangeRecord>,
    queues: BTreeMap<(String, String), QueueRecord>,
    bindings: BTreeSet<BindingRecord>,
}

/// Durable metadata kept in memory: durable for the process's life only.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Corrupt("memory store lock poisoned".into()))
    }
}

impl MetaStore for MemoryStore {
    fn put_exchange(&self, r: &ExchangeRecord) -> Result<(), StoreError> {
        self.lock()?
            .exchanges
            .insert((r.vhost.clone(), r.name.clone()), r.clone());
        Ok(())
    }

    fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        g.exchanges.remove(&(vhost.to_string(), name.to_string()));
        g.bindings.retain(|b| {
            !(b.vhost == vhost
                && (b.source == name
                    || (b.destination_kind == crate::DestinationKind::Exchange
                        && b.destination == name)))
        });
        Ok(())
    }

    fn put_queue(&self, r: &QueueRecord) -> Result<(), StoreError> {
        self.lock()?
            .queues
            .insert((r.vhost.clone(), r.name.clone()), r.clone());
        Ok(())
    }

    fn delete_queue(&self, vhost: &str, name: &str) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        g.queues.remove(&(vhost.to_string(), name.to_string()));
        g.bindings.retain(|b| {
            !(b.vhost == vhost
                && b.destination_kind == crate::DestinationKind::Queue
                && b.destination == name)
        });
        Ok(())
    }

    fn put_binding(&self, r: &BindingRecord) -> Result<(), StoreError> {
        self.lock()?.bindings.insert(r.clone());
        Ok(())
    }

    fn delete_binding(&self, r: &BindingRecord) -> Result<(), StoreError> {
        self.lock()?.bindings.remove(r);
        Ok(())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let g = self.lock()?;
        Ok(Snapshot {
            exchanges: g.exchanges.values().cloned().collect(),
            queues: g.queues.values().cloned().collect(),
            bindings: g.bindings.iter().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_store_passes_the_suite() {
        crate::suite::run(&super::MemoryStore::new());
    }
}
