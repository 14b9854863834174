//! `MemStore`: an in-memory store with the SQL backends' semantics, for tests and fault
//! injection; nothing survives the process. It owns the same tables as `SqlStore` (exchanges,
//! queues, bindings, users, permissions, topic permissions, messages and queue positions), kept
//! in `BTreeMap`s keyed like the SQL primary keys, behind one mutex. A plan is applied in the SQL
//! backend's order (metadata in op order, purges, inserts, removes, delivered marks) with the
//! lock held throughout, so nobody sees half of one. Cloning is cheap and shares the data: a test
//! keeps a clone across a simulated broker crash and "restarts" by calling `recover()` on it.
//!
//! Deliberate mirrors of the SQL (see `sql.rs`): `REPLACE` for every put (a queue put also
//! replaces a queue of the same vhost and name under another id, and resets `delivered_seq` to
//! 0); "insert or ignore" for message rows and positions (the first row written for a message id
//! or a (queue, seq) position wins, so a retried commit is harmless); a message row goes when a
//! purge or remove takes its last position; positions need not name a queue that exists (recovery
//! drops them); a queue delete purges `seq > i64::MIN` as the SQL does; names compare byte for
//! byte (SQLite's BINARY collation). `behaves_as_sqlite_on_random_batches` checks all of it
//! against `SqlStore` on SQLite.
//!
//! Not mirrored: failures. Nothing here fails except after a panic poisoned the lock (then every
//! call is `Unavailable`), so no MySQL column-size errors, and a message id reused with another
//! chunked body keeps its first body whole (the SQL would mix the two bodies' chunks).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::plan::{Plan, PlannedInsert};
use crate::{
    BindingRecord, DestinationKind, ExchangeRecord, GlobalParameterRecord, MessageRow,
    MessageStore, MetaStore, Op, ParameterRecord, PermissionRecord, QueueRecord, QueueSummary,
    Recovered, Snapshot, StoreError, StoredEntry, TopicPermissionRecord, UserRecord, VhostRecord,
};

/// The in-memory store. `Clone` shares the data (it is an `Arc`).
#[derive(Clone, Default)]
pub struct MemStore {
    /// A std mutex: every method takes it, does its work without awaiting and drops it, so it is
    /// never held across an `.await`.
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.state.try_lock() {
            Ok(s) => write!(
                f,
                "MemStore({} queues, {} messages, {} positions)",
                s.queues.len(),
                s.messages.len(),
                s.positions.len()
            ),
            Err(_) => write!(f, "MemStore(busy or poisoned)"),
        }
    }
}

/// A binding's key, in `load_meta`'s order (`ORDER BY vhost, source, destination, routing_key`;
/// the SQL leaves ties unordered, here they go by kind then arguments). Distinct exactly when the
/// SQL backend's digest of the binding is.
type BindingKey = (String, String, String, String, DestinationKind, Bytes);

fn binding_key(b: &BindingRecord) -> BindingKey {
    (
        b.vhost.clone(),
        b.source.clone(),
        b.destination.clone(),
        b.routing_key.clone(),
        b.destination_kind,
        b.arguments.clone(),
    )
}

#[derive(Default)]
struct State {
    /// (vhost, name)
    exchanges: BTreeMap<(String, String), ExchangeRecord>,
    /// id (the SQL also has a unique (vhost, name), enforced by `put_queue`)
    queues: BTreeMap<i64, QueueRecord>,
    bindings: BTreeMap<BindingKey, BindingRecord>,
    users: BTreeMap<String, UserRecord>,
    /// (vhost, user)
    permissions: BTreeMap<(String, String), PermissionRecord>,
    /// (vhost, user, exchange)
    topic_permissions: BTreeMap<(String, String, String), TopicPermissionRecord>,
    vhosts: BTreeMap<String, VhostRecord>,
    /// (vhost, component, name)
    parameters: BTreeMap<(String, String, String), ParameterRecord>,
    global_parameters: BTreeMap<String, GlobalParameterRecord>,
    /// id -> the row (bodies are `Bytes`: reading one copies no body)
    messages: BTreeMap<i64, Arc<MessageRow>>,
    /// (queue id, seq) -> message id
    positions: BTreeMap<(i64, i64), i64>,
    /// Positions marked redelivered (the SQL's `queue_messages.redelivered`); only positions
    /// that exist.
    redelivered: BTreeSet<(i64, i64)>,
    /// message id -> how many positions name it (the SQL's `queue_messages_by_message` index);
    /// absent when none do.
    refs: BTreeMap<i64, usize>,
}

impl State {
    /// `apply_plan` of the SQL backend, step for step. Nothing here can fail.
    fn apply(&mut self, plan: &Plan) {
        for op in &plan.meta {
            self.meta_op(op);
        }
        for &(queue_id, after_seq) in &plan.purges {
            self.purge(queue_id, after_seq);
        }
        self.insert_messages(&plan.inserts);
        for (q, first, last) in plan.remove_runs() {
            let gone: Vec<((i64, i64), i64)> = self
                .positions
                .range((q, first)..=(q, last))
                .map(|(k, m)| (*k, *m))
                .collect();
            for (pos, message_id) in gone {
                self.positions.remove(&pos);
                self.redelivered.remove(&pos);
                self.release(message_id);
            }
        }
        for (first, last) in plan.removed_message_runs() {
            let unheld: Vec<i64> = self
                .messages
                .range(first..=last)
                .map(|(id, _)| *id)
                .filter(|id| !self.refs.contains_key(id))
                .collect();
            for id in unheld {
                self.messages.remove(&id);
            }
        }
        // UPDATE queue_messages SET redelivered = 1 WHERE queue_id = ? AND seq = ?
        for pos in &plan.redelivered {
            if self.positions.contains_key(pos) {
                self.redelivered.insert(*pos);
            }
        }
        // UPDATE queues SET delivered_seq = ? WHERE id = ? AND delivered_seq < ?
        for (q, &seq) in &plan.delivered {
            if let Some(queue) = self.queues.get_mut(q) {
                if queue.delivered_seq < seq {
                    queue.delivered_seq = seq;
                }
            }
        }
    }

    fn meta_op(&mut self, op: &Op) {
        match op {
            Op::PutExchange(x) => {
                self.exchanges
                    .insert((x.vhost.clone(), x.name.clone()), x.clone());
            }
            Op::DeleteExchange { vhost, name } => {
                self.exchanges.remove(&(vhost.clone(), name.clone()));
                self.bindings.retain(|_, b| {
                    !(b.vhost == *vhost
                        && (b.source == *name
                            || (b.destination == *name
                                && b.destination_kind == DestinationKind::Exchange)))
                });
            }
            Op::PutQueue(q) => {
                // REPLACE deletes every row it conflicts with: the same id, and the same
                // (vhost, name) under another id. The new row's delivered_seq is 0.
                self.queues
                    .retain(|id, old| *id != q.id && !(old.vhost == q.vhost && old.name == q.name));
                self.queues.insert(
                    q.id,
                    QueueRecord {
                        delivered_seq: 0,
                        ..q.clone()
                    },
                );
            }
            Op::DeleteQueue { id, vhost, name } => {
                self.purge(*id, i64::MIN);
                self.queues.remove(id);
                self.bindings.retain(|_, b| {
                    !(b.vhost == *vhost
                        && b.destination == *name
                        && b.destination_kind == DestinationKind::Queue)
                });
            }
            Op::PutBinding(b) => {
                self.bindings.insert(binding_key(b), b.clone());
            }
            Op::DeleteBinding(b) => {
                self.bindings.remove(&binding_key(b));
            }
            Op::PutUser(u) => {
                self.users.insert(u.name.clone(), u.clone());
            }
            Op::PutPermission(p) => {
                self.permissions
                    .insert((p.vhost.clone(), p.user.clone()), p.clone());
            }
            Op::PutTopicPermission(p) => {
                self.topic_permissions.insert(
                    (p.vhost.clone(), p.user.clone(), p.exchange.clone()),
                    p.clone(),
                );
            }
            Op::DeleteUser { name } => {
                self.users.remove(name);
                self.permissions.retain(|(_, u), _| u != name);
                self.topic_permissions.retain(|(_, u, _), _| u != name);
            }
            Op::DeletePermission { vhost, user } => {
                self.permissions.remove(&(vhost.clone(), user.clone()));
            }
            Op::DeleteTopicPermission {
                vhost,
                user,
                exchange,
            } => {
                self.topic_permissions.retain(|(v, u, x), _| {
                    !(v == vhost && u == user && exchange.as_ref().is_none_or(|e| e == x))
                });
            }
            Op::PutVhost(v) => {
                self.vhosts.insert(v.name.clone(), v.clone());
            }
            Op::DeleteVhost { name } => {
                self.vhosts.remove(name);
                self.exchanges.retain(|(v, _), _| v != name);
                self.queues.retain(|_, q| q.vhost != *name);
                self.bindings.retain(|_, b| b.vhost != *name);
                self.permissions.retain(|(v, _), _| v != name);
                self.topic_permissions.retain(|(v, _, _), _| v != name);
                self.parameters.retain(|(v, _, _), _| v != name);
            }
            Op::PutParameter(p) => {
                self.parameters.insert(
                    (p.vhost.clone(), p.component.clone(), p.name.clone()),
                    p.clone(),
                );
            }
            Op::DeleteParameter {
                vhost,
                component,
                name,
            } => {
                self.parameters
                    .remove(&(vhost.clone(), component.clone(), name.clone()));
            }
            Op::PutGlobalParameter(p) => {
                self.global_parameters.insert(p.name.clone(), p.clone());
            }
            Op::DeleteGlobalParameter { name } => {
                self.global_parameters.remove(name);
            }
            // Message ops never reach the metadata list of a plan (ignored, as by the SQL).
            Op::Insert { .. }
            | Op::Remove { .. }
            | Op::Purge { .. }
            | Op::Delivered { .. }
            | Op::Redelivered { .. }
            | Op::Atomic(_) => {}
        }
    }

    /// Deletes a queue's positions after `after_seq` and the messages no other position holds
    /// (positions at `after_seq` or before, or in another queue).
    fn purge(&mut self, queue_id: i64, after_seq: i64) {
        let gone: Vec<((i64, i64), i64)> = self
            .positions
            .range((
                Bound::Excluded((queue_id, after_seq)),
                Bound::Included((queue_id, i64::MAX)),
            ))
            .map(|(k, m)| (*k, *m))
            .collect();
        for (pos, message_id) in &gone {
            self.positions.remove(pos);
            self.redelivered.remove(pos);
            self.release(*message_id);
        }
        for (_, message_id) in gone {
            if !self.refs.contains_key(&message_id) {
                self.messages.remove(&message_id);
            }
        }
    }

    /// "Insert or ignore" of message rows, then of positions: an existing row or position keeps
    /// what it had (a message routed to several queues in two batches; a retried commit).
    fn insert_messages(&mut self, inserts: &[PlannedInsert]) {
        for ins in inserts {
            self.messages
                .entry(ins.message.id)
                .or_insert_with(|| Arc::clone(&ins.message));
        }
        for ins in inserts {
            for &pos in &ins.entries {
                if let std::collections::btree_map::Entry::Vacant(e) = self.positions.entry(pos) {
                    e.insert(ins.message.id);
                    *self.refs.entry(ins.message.id).or_insert(0) += 1;
                }
            }
        }
    }

    /// One position naming `message_id` is gone.
    fn release(&mut self, message_id: i64) {
        if let Some(n) = self.refs.get_mut(&message_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.refs.remove(&message_id);
            }
        }
    }

    /// `recover`'s four deletes, in the SQL's order.
    fn recover(&mut self) {
        let State {
            queues,
            messages,
            positions,
            redelivered,
            ..
        } = self;
        // Positions of queues that are gone, and positions of transient messages.
        positions.retain(|(q, _), m| {
            queues.contains_key(q) && messages.get(m).is_none_or(|row| row.persistent)
        });
        redelivered.retain(|pos| positions.contains_key(pos));
        // Transient messages.
        messages.retain(|_, m| m.persistent);
        // Messages no position holds.
        let mut refs: BTreeMap<i64, usize> = BTreeMap::new();
        for m in positions.values() {
            *refs.entry(*m).or_insert(0) += 1;
        }
        messages.retain(|id, _| refs.contains_key(id));
        self.refs = refs;
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            vhosts: self.vhosts.values().cloned().collect(),
            exchanges: self.exchanges.values().cloned().collect(),
            queues: self.queues.values().cloned().collect(),
            bindings: self.bindings.values().cloned().collect(),
            parameters: self.parameters.values().cloned().collect(),
            global_parameters: self.global_parameters.values().cloned().collect(),
        }
    }

    /// A queue's positions from `from` on, joined with their messages, in seq order.
    fn entries(
        &self,
        queue_id: i64,
        from: Bound<i64>,
    ) -> impl Iterator<Item = (i64, &Arc<MessageRow>)> + '_ {
        let start = match from {
            Bound::Included(seq) => Bound::Included((queue_id, seq)),
            Bound::Excluded(seq) => Bound::Excluded((queue_id, seq)),
            Bound::Unbounded => Bound::Included((queue_id, i64::MIN)),
        };
        self.positions
            .range((start, Bound::Included((queue_id, i64::MAX))))
            .filter_map(|((_, seq), m)| self.messages.get(m).map(|row| (*seq, row)))
    }
}

/// `COALESCE(MAX(id), 0) + 1`.
fn next_id<'a>(
    mut ids: impl DoubleEndedIterator<Item = &'a i64>,
    what: &str,
) -> Result<i64, StoreError> {
    ids.next_back()
        .copied()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt(format!("no {what} id after i64::MAX")))
}

impl MemStore {
    /// The state, or `Unavailable` once a panic has poisoned the lock (it may have interrupted a
    /// plan half-applied, which must never be seen).
    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| {
            StoreError::Unavailable("in-memory store poisoned by a panic while locked".into())
        })
    }
}

impl MetaStore for MemStore {
    async fn load_meta(&self) -> Result<Snapshot, StoreError> {
        Ok(self.lock()?.snapshot())
    }

    async fn has_users(&self) -> Result<bool, StoreError> {
        Ok(!self.lock()?.users.is_empty())
    }

    async fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        Ok(self.lock()?.users.get(name).cloned())
    }

    async fn permission(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Option<PermissionRecord>, StoreError> {
        Ok(self
            .lock()?
            .permissions
            .get(&(vhost.to_string(), user.to_string()))
            .cloned())
    }

    async fn topic_permissions(
        &self,
        vhost: &str,
        user: &str,
    ) -> Result<Vec<TopicPermissionRecord>, StoreError> {
        let s = self.lock()?;
        // ORDER BY exchange: the map's order within one (vhost, user).
        Ok(s.topic_permissions
            .range((vhost.to_string(), user.to_string(), String::new())..)
            .take_while(|((v, u, _), _)| v == vhost && u == user)
            .map(|(_, p)| p.clone())
            .collect())
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        Ok(self.lock()?.users.values().cloned().collect())
    }

    async fn list_permissions(&self) -> Result<Vec<PermissionRecord>, StoreError> {
        Ok(self.lock()?.permissions.values().cloned().collect())
    }

    async fn list_topic_permissions(&self) -> Result<Vec<TopicPermissionRecord>, StoreError> {
        Ok(self.lock()?.topic_permissions.values().cloned().collect())
    }
}

impl MemStore {
    /// An empty store as the migrations leave it: the default vhost exists.
    pub fn new() -> MemStore {
        let store = MemStore::default();
        if let Ok(mut s) = store.state.lock() {
            s.vhosts.insert(
                "/".to_string(),
                VhostRecord {
                    name: "/".to_string(),
                    description: "Default virtual host".to_string(),
                    tags: String::new(),
                    default_queue_type: "classic".to_string(),
                },
            );
        }
        store
    }
}

impl MessageStore for MemStore {
    async fn apply(&self, plan: &Plan) -> Result<(), StoreError> {
        if plan.is_empty() {
            return Ok(());
        }
        // No step can fail, and the lock is held for the whole plan: all of it or none.
        self.lock()?.apply(plan);
        Ok(())
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let mut s = self.lock()?;
        s.recover();
        Ok(Recovered {
            snapshot: s.snapshot(),
            next_message_id: next_id(s.messages.keys(), "message")?,
            next_queue_id: next_id(s.queues.keys(), "queue")?,
        })
    }

    async fn queue_summary(&self, queue_id: i64) -> Result<QueueSummary, StoreError> {
        let s = self.lock()?;
        let mut range = s
            .positions
            .range((queue_id, i64::MIN)..=(queue_id, i64::MAX));
        let count = range.clone().count() as u64;
        let min_seq = range.next().map_or(0, |((_, seq), _)| *seq);
        let max_seq = range.next_back().map_or(min_seq, |((_, seq), _)| *seq);
        Ok(QueueSummary {
            count,
            min_seq,
            max_seq,
        })
    }

    async fn read_queue(
        &self,
        queue_id: i64,
        after_seq: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        let s = self.lock()?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (seq, row) in s.entries(queue_id, Bound::Excluded(after_seq)).take(limit) {
            // As the SQL: the entry that crosses `max_bytes` is kept, the next is not; the first
            // always comes back.
            if bytes >= max_bytes && !out.is_empty() {
                break;
            }
            bytes = bytes.saturating_add(row.body.len());
            out.push(StoredEntry {
                seq,
                message: MessageRow::clone(row),
                redelivered: s.redelivered.contains(&(queue_id, seq)),
            });
        }
        Ok(out)
    }

    async fn read_message(&self, id: i64) -> Result<Option<MessageRow>, StoreError> {
        Ok(self
            .lock()?
            .messages
            .get(&id)
            .map(|row| MessageRow::clone(row)))
    }

    async fn queue_bytes(&self, queue_id: i64) -> Result<u64, StoreError> {
        let s = self.lock()?;
        Ok(s.entries(queue_id, Bound::Unbounded)
            .map(|(_, row)| row.body.len() as u64)
            .sum())
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::suite::{binding, exchange, message, queue};
    use crate::SqlStore;

    async fn apply(s: &MemStore, ops: Vec<Op>) {
        s.apply(&Plan::from_ops(ops)).await.unwrap();
    }

    fn insert(id: i64, persistent: bool, body: &'static [u8], entries: &[(i64, i64)]) -> Op {
        Op::Insert {
            message: message(id, persistent, Bytes::from_static(body)),
            entries: entries.to_vec(),
        }
    }

    fn seqs(entries: &[StoredEntry]) -> Vec<i64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plan_is_seen_whole_or_not_at_all() {
        let s = MemStore::new();
        apply(&s, vec![Op::PutQueue(queue(1, "q"))]).await;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn({
            let (s, stop) = (s.clone(), stop.clone());
            async move {
                let mut looks = 0u64;
                // At least one look, however the scheduler orders the two tasks.
                while looks == 0 || !stop.load(Ordering::Relaxed) {
                    // The plan's first step (metadata) and last (the delivered mark) agree.
                    let m = s.load_meta().await.unwrap();
                    assert_eq!(m.exchanges.len() % 2, 0, "half a plan's exchanges");
                    assert_eq!(m.queues[0].delivered_seq, m.exchanges.len() as i64 / 2);
                    looks += 1;
                    tokio::task::yield_now().await;
                }
                looks
            }
        });
        for i in 1..=300i64 {
            apply(
                &s,
                vec![
                    Op::PutExchange(exchange(&format!("a{i:03}"))),
                    insert(i, true, b"m", &[(1, i)]),
                    Op::PutExchange(exchange(&format!("b{i:03}"))),
                    Op::Delivered {
                        queue_id: 1,
                        seq: i,
                    },
                ],
            )
            .await;
            tokio::task::yield_now().await;
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.await.unwrap() > 0);
        assert_eq!(s.queue_summary(1).await.unwrap().count, 300);
    }

    #[tokio::test]
    async fn a_panic_holding_the_lock_leaves_the_store_unavailable() {
        // A panic in the middle of applying a plan could leave half of it: never show it.
        let s = MemStore::new();
        let held = s.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.state.lock();
            panic!("injected while locked");
        })
        .join();
        let e = s
            .apply(&Plan::from_ops([Op::PutQueue(queue(1, "q"))]))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(s.load_meta().await.is_err());
    }

    #[tokio::test]
    async fn recover_on_a_clone_keeps_only_durable_held_messages() {
        let s = MemStore::new();
        apply(
            &s,
            vec![
                Op::PutQueue(queue(1, "q1")),
                Op::PutQueue(queue(4, "q4")),
                // held by queue 1 and by a queue that never existed
                insert(1, true, b"kept", &[(1, 1), (9, 1)]),
                // only in a queue that is gone
                insert(2, true, b"orphan", &[(9, 2)]),
                // transient
                insert(3, false, b"transient", &[(1, 2), (4, 1)]),
                // no position at all
                insert(8, true, b"unheld", &[]),
                insert(7, true, b"kept too", &[(4, 2)]),
                Op::Delivered {
                    queue_id: 4,
                    seq: 2,
                },
            ],
        )
        .await;
        assert!(s.read_message(8).await.unwrap().is_some());
        // The broker "crashes"; a new one starts on the same data.
        let restarted = s.clone();
        drop(s);
        let r = restarted.recover().await.unwrap();
        assert_eq!((r.next_message_id, r.next_queue_id), (8, 5));
        assert_eq!(r.snapshot.queues[1].delivered_seq, 2);
        for (id, kept) in [(1, true), (2, false), (3, false), (7, true), (8, false)] {
            assert_eq!(
                restarted.read_message(id).await.unwrap().is_some(),
                kept,
                "{id}"
            );
        }
        let q1 = restarted.read_queue(1, 0, 10, usize::MAX).await.unwrap();
        assert_eq!(seqs(&q1), vec![1]);
        assert_eq!(restarted.queue_summary(9).await.unwrap().count, 0);
        assert_eq!(restarted.queue_bytes(4).await.unwrap(), 8);
        // Nothing left to drop: a second recovery changes nothing.
        assert_eq!(restarted.recover().await.unwrap(), r);
    }

    #[tokio::test]
    async fn an_empty_store_recovers_to_ids_one() {
        let r = MemStore::new().recover().await.unwrap();
        assert_eq!((r.next_message_id, r.next_queue_id), (1, 1));
    }

    #[tokio::test]
    async fn put_queue_replaces_by_id_and_by_name_and_resets_the_mark() {
        let s = MemStore::new();
        apply(
            &s,
            vec![
                Op::PutQueue(queue(1, "a")),
                Op::PutQueue(queue(2, "b")),
                Op::Delivered {
                    queue_id: 1,
                    seq: 9,
                },
            ],
        )
        .await;
        // The same name under a new id: the old row goes (its positions stay, as in SQL).
        apply(&s, vec![insert(1, true, b"x", &[(2, 1)])]).await;
        apply(
            &s,
            vec![
                Op::PutQueue(QueueRecord {
                    delivered_seq: 5,
                    ..queue(3, "b")
                }),
                Op::PutQueue(queue(1, "a")),
            ],
        )
        .await;
        let m = s.load_meta().await.unwrap();
        assert_eq!(m.queues, vec![queue(1, "a"), queue(3, "b")]);
        assert_eq!(s.queue_summary(2).await.unwrap().count, 1);
        // A mark for a queue that does not exist changes nothing; marks never go down.
        apply(
            &s,
            vec![
                Op::Delivered {
                    queue_id: 2,
                    seq: 4,
                },
                Op::Delivered {
                    queue_id: 3,
                    seq: -1,
                },
            ],
        )
        .await;
        assert_eq!(s.load_meta().await.unwrap().queues[1].delivered_seq, 0);
    }

    #[tokio::test]
    async fn a_retried_plan_is_harmless_and_the_first_row_wins() {
        let s = MemStore::new();
        let plan = Plan::from_ops([
            Op::PutQueue(queue(1, "q")),
            insert(1, true, b"one", &[(1, 1), (1, 2)]),
            Op::Delivered {
                queue_id: 1,
                seq: 1,
            },
        ]);
        s.apply(&plan).await.unwrap();
        s.apply(&plan).await.unwrap();
        assert_eq!(s.queue_summary(1).await.unwrap().count, 2);
        // Another message at a taken position, and another row under a taken id, are ignored.
        apply(
            &s,
            vec![
                insert(2, true, b"two", &[(1, 2), (1, 3)]),
                insert(1, true, b"uno", &[(1, 4)]),
            ],
        )
        .await;
        let page = s.read_queue(1, 0, 10, usize::MAX).await.unwrap();
        let bodies: Vec<&[u8]> = page.iter().map(|e| &e.message.body[..]).collect();
        assert_eq!(bodies, vec![&b"one"[..], b"one", b"two", b"one"]);
        // Message 2 lost its only position; message 1 still has two.
        apply(
            &s,
            vec![
                Op::Remove {
                    queue_id: 1,
                    seq: 3,
                    message_id: 2,
                },
                Op::Remove {
                    queue_id: 1,
                    seq: 1,
                    message_id: 1,
                },
                Op::Remove {
                    queue_id: 1,
                    seq: 2,
                    message_id: 1,
                },
            ],
        )
        .await;
        assert!(s.read_message(2).await.unwrap().is_none());
        assert!(s.read_message(1).await.unwrap().is_some());
        apply(
            &s,
            vec![Op::Remove {
                queue_id: 1,
                seq: 4,
                message_id: 1,
            }],
        )
        .await;
        assert!(s.read_message(1).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn read_queue_keeps_the_entry_that_crosses_the_byte_cap() {
        let s = MemStore::new();
        apply(
            &s,
            vec![
                insert(1, true, b"abc", &[(1, 1)]),
                insert(2, true, b"def", &[(1, 2)]),
                insert(3, true, b"ghi", &[(1, 3)]),
            ],
        )
        .await;
        for (max_bytes, want) in [(0, vec![1]), (1, vec![1]), (3, vec![1]), (4, vec![1, 2])] {
            let page = s.read_queue(1, 0, 10, max_bytes).await.unwrap();
            assert_eq!(seqs(&page), want, "max_bytes {max_bytes}");
        }
        assert_eq!(
            seqs(&s.read_queue(1, 0, 10, 7).await.unwrap()),
            vec![1, 2, 3]
        );
        assert!(s.read_queue(1, 0, 0, usize::MAX).await.unwrap().is_empty());
        assert_eq!(
            seqs(&s.read_queue(1, 1, 1, usize::MAX).await.unwrap()),
            vec![2]
        );
        assert!(s
            .read_queue(1, i64::MAX, 10, usize::MAX)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn deletes_take_the_bindings_the_sql_takes() {
        let s = MemStore::new();
        let to_exchange = |src: &str, dest: &str| BindingRecord {
            destination_kind: DestinationKind::Exchange,
            ..binding(src, dest, "k")
        };
        let elsewhere = BindingRecord {
            vhost: "v".into(),
            ..binding("x", "q", "k")
        };
        apply(
            &s,
            vec![
                Op::PutBinding(binding("x", "q", "k")),
                Op::PutBinding(to_exchange("y", "x")),
                Op::PutBinding(binding("y", "x", "k")), // a queue named x
                Op::PutBinding(binding("z", "q", "k")),
                Op::PutBinding(elsewhere.clone()),
            ],
        )
        .await;
        apply(
            &s,
            vec![Op::DeleteExchange {
                vhost: "/".into(),
                name: "x".into(),
            }],
        )
        .await;
        let m = s.load_meta().await.unwrap();
        assert_eq!(
            m.bindings,
            vec![
                binding("y", "x", "k"),
                binding("z", "q", "k"),
                elsewhere.clone()
            ]
        );
        apply(
            &s,
            vec![Op::DeleteQueue {
                id: 7,
                vhost: "/".into(),
                name: "x".into(),
            }],
        )
        .await;
        let m = s.load_meta().await.unwrap();
        assert_eq!(m.bindings, vec![binding("z", "q", "k"), elsewhere]);
    }

    /// A small deterministic generator (xorshift64*), so the comparison needs no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
            xs[self.below(xs.len() as u64) as usize].clone()
        }

        fn coin(&mut self) -> bool {
            self.next() & 1 == 1
        }
    }

    const VHOSTS: [&str; 2] = ["/", "v"];
    const USERS: [&str; 2] = ["guest", "Guest"];
    const SEQS: [i64; 9] = [i64::MIN, -1, 1, 2, 3, 4, 5, 6, i64::MAX];

    fn random_op(r: &mut Rng, depth: u32) -> Op {
        let vhost = r.pick(&VHOSTS).to_string();
        let user = r.pick(&USERS).to_string();
        let name = r.pick(&["x", "X", "q1", "q2"]).to_string();
        let queue_id = r.below(5) as i64 + 1;
        let seq = r.pick(&SEQS);
        let message_id = r.below(10) as i64 + 1;
        match r.below(if depth == 0 { 21 } else { 20 }) {
            0 => Op::PutExchange(ExchangeRecord {
                vhost,
                name,
                kind: r.pick(&["topic", "direct"]).to_string(),
                auto_delete: r.coin(),
                internal: r.coin(),
                arguments: Bytes::from(vec![r.below(2) as u8]),
            }),
            1 => Op::DeleteExchange { vhost, name },
            2 | 3 => Op::PutQueue(QueueRecord {
                id: r.below(4) as i64 + 1,
                vhost,
                name,
                auto_delete: r.coin(),
                arguments: Bytes::from(vec![r.below(3) as u8]),
                delivered_seq: r.below(3) as i64,
            }),
            4 => Op::DeleteQueue {
                id: r.below(4) as i64 + 1,
                vhost,
                name,
            },
            5 | 6 => {
                let b = BindingRecord {
                    vhost,
                    source: r.pick(&["x", "X"]).to_string(),
                    destination: name,
                    destination_kind: if r.coin() {
                        DestinationKind::Queue
                    } else {
                        DestinationKind::Exchange
                    },
                    routing_key: r.pick(&["a", "b"]).to_string(),
                    arguments: Bytes::from(vec![1; r.below(2) as usize]),
                };
                if r.below(3) == 0 {
                    Op::DeleteBinding(b)
                } else {
                    Op::PutBinding(b)
                }
            }
            7 => Op::PutUser(UserRecord {
                name: user,
                password_hash: vec![r.below(256) as u8, 0, 255],
                tags: r.pick(&["", "administrator"]).to_string(),
                limits: "{}".into(),
            }),
            8 => Op::PutPermission(PermissionRecord {
                vhost,
                user,
                configure: r.pick(&[".*", ""]).to_string(),
                write: r.pick(&[".*", "^a"]).to_string(),
                read: r.pick(&[".*", "^b"]).to_string(),
            }),
            9 => Op::PutTopicPermission(TopicPermissionRecord {
                vhost,
                user,
                exchange: r.pick(&["amq.topic", "logs", "Logs"]).to_string(),
                write: r.pick(&[".*", "^a"]).to_string(),
                read: r.pick(&[".*", "^b"]).to_string(),
            }),
            10..=13 => {
                let n = r.below(4) as usize;
                let entries = (0..n)
                    .map(|_| (r.below(5) as i64 + 1, r.pick(&SEQS)))
                    .collect();
                let body = vec![r.below(256) as u8; r.below(5) as usize];
                Op::Insert {
                    message: Arc::new(MessageRow {
                        id: message_id,
                        persistent: r.below(4) != 0,
                        exchange: "e".into(),
                        routing_key: format!("k{}", r.below(3)),
                        header: Bytes::from(vec![message_id as u8]),
                        body: Bytes::from(body),
                        published_ms: r.below(1000) as i64,
                    }),
                    entries,
                }
            }
            14..=16 => Op::Remove {
                queue_id,
                seq,
                message_id,
            },
            17 => Op::Purge {
                queue_id,
                after_seq: r.pick(&[i64::MIN, -1, 0, 2, 4, i64::MAX]),
            },
            18 if r.coin() => Op::Delivered {
                queue_id,
                seq: r.below(12) as i64 - 1,
            },
            18 => Op::Redelivered { queue_id, seq },
            19 => match r.below(9) {
                0 => Op::DeleteUser { name: user },
                1 => Op::DeletePermission { vhost, user },
                2 => Op::DeleteTopicPermission {
                    vhost,
                    user,
                    exchange: r.coin().then(|| "logs".to_string()),
                },
                3 | 4 => Op::PutVhost(VhostRecord {
                    name: vhost,
                    description: r.pick(&["", "d"]).to_string(),
                    tags: r.pick(&["", "a,b"]).to_string(),
                    default_queue_type: "classic".to_string(),
                }),
                5 => Op::DeleteVhost { name: vhost },
                6 => Op::PutParameter(ParameterRecord {
                    vhost,
                    component: r.pick(&["policy", "operator_policy"]).to_string(),
                    name,
                    value: r.pick(&["{}", "{\"a\":1}"]).to_string(),
                }),
                7 => Op::DeleteParameter {
                    vhost,
                    component: "policy".to_string(),
                    name,
                },
                _ => {
                    if r.coin() {
                        Op::PutGlobalParameter(GlobalParameterRecord {
                            name,
                            value: r.pick(&["1", "\"s\""]).to_string(),
                        })
                    } else {
                        Op::DeleteGlobalParameter { name }
                    }
                }
            },
            _ => Op::Atomic((0..r.below(4)).map(|_| random_op(r, depth + 1)).collect()),
        }
    }

    fn sorted_snapshot(mut snap: Snapshot) -> Snapshot {
        // The SQL leaves bindings that tie on (vhost, source, destination, routing_key)
        // unordered; compare those as sets.
        snap.bindings.sort_by_key(binding_key);
        snap
    }

    /// Everything a backend shows, as text.
    async fn observe<S: MetaStore + MessageStore>(s: &S) -> String {
        let mut out = String::new();
        let meta = s.load_meta().await.unwrap();
        let keys: Vec<_> = meta
            .bindings
            .iter()
            .map(|b| (&b.vhost, &b.source, &b.destination, &b.routing_key))
            .collect();
        assert!(
            keys.windows(2).all(|w| w[0] <= w[1]),
            "bindings out of order"
        );
        writeln!(out, "{:?}", sorted_snapshot(meta)).unwrap();
        writeln!(out, "users {:?}", s.has_users().await.unwrap()).unwrap();
        writeln!(out, "all users {:?}", s.list_users().await.unwrap()).unwrap();
        writeln!(out, "all perms {:?}", s.list_permissions().await.unwrap()).unwrap();
        writeln!(
            out,
            "all topic {:?}",
            s.list_topic_permissions().await.unwrap()
        )
        .unwrap();
        for user in USERS {
            writeln!(out, "{:?}", s.user(user).await.unwrap()).unwrap();
            for vhost in VHOSTS {
                writeln!(out, "{:?}", s.permission(vhost, user).await.unwrap()).unwrap();
                writeln!(out, "{:?}", s.topic_permissions(vhost, user).await.unwrap()).unwrap();
            }
        }
        for q in 1..=5 {
            writeln!(out, "q{q} {:?}", s.queue_summary(q).await.unwrap()).unwrap();
            writeln!(out, "q{q} bytes {}", s.queue_bytes(q).await.unwrap()).unwrap();
            for (after, limit, max_bytes) in [
                (i64::MIN, 100, usize::MAX),
                (0, 100, usize::MAX),
                (2, 2, usize::MAX),
                (i64::MIN, 100, 3),
                (-1, 100, 0),
                (0, 0, usize::MAX),
            ] {
                let page = s.read_queue(q, after, limit, max_bytes).await.unwrap();
                writeln!(out, "q{q} read {after} {limit} {max_bytes}: {page:?}").unwrap();
            }
        }
        for id in 1..=10 {
            writeln!(out, "m{id} {:?}", s.read_message(id).await.unwrap()).unwrap();
        }
        out
    }

    /// Random batches applied to this store and to `SqlStore` on SQLite show the same thing
    /// after every batch and every recovery.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn behaves_as_sqlite_on_random_batches() {
        let dir = std::env::temp_dir().join(format!(
            "warren-storage-memdiff-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for seed in [0x9e37_79b9_7f4a_7c15u64, 42, 7] {
            let path = dir.join(format!("{seed}"));
            std::fs::create_dir_all(&path).unwrap();
            let sql = SqlStore::open(&SqlStore::sqlite_url(&path), false)
                .await
                .unwrap();
            let mem = MemStore::new();
            let mut r = Rng(seed);
            for step in 0..150 {
                let ops: Vec<Op> = (0..r.below(6) + 1).map(|_| random_op(&mut r, 0)).collect();
                let plan = Plan::from_ops(ops.clone());
                sql.apply(&plan).await.unwrap();
                mem.apply(&plan).await.unwrap();
                if step % 10 == 9 {
                    // A retried commit.
                    sql.apply(&plan).await.unwrap();
                    mem.apply(&plan).await.unwrap();
                }
                let (want, got) = (observe(&sql).await, observe(&mem).await);
                assert!(
                    want == got,
                    "seed {seed} step {step}: {ops:#?}\nsql:\n{want}\nmemory:\n{got}"
                );
                if step % 25 == 24 {
                    let mut want = sql.recover().await.unwrap();
                    let mut got = mem.recover().await.unwrap();
                    want.snapshot = sorted_snapshot(want.snapshot);
                    got.snapshot = sorted_snapshot(got.snapshot);
                    assert_eq!(want, got, "seed {seed} recovery at step {step}");
                    assert_eq!(observe(&sql).await, observe(&mem).await);
                }
            }
            sql.close().await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
