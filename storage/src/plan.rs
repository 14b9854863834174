//! `Plan`: a batch of `Op`s reduced to what must reach the database. A message inserted and
//! removed within one batch is never written; positions dropped by a purge in the same batch are
//! never written; delivered marks keep only each queue's highest. A backend applies a plan in
//! this order, in one transaction: metadata in op order, purges, inserts, removes, delivered marks,
//! redelivered marks.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::{MessageRow, Op};

/// An insert that survived the batch: the message and the positions still to write.
#[derive(Debug, Clone)]
pub struct PlannedInsert {
    pub message: Arc<MessageRow>,
    pub entries: Vec<(i64, i64)>,
}

#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// Exchange, queue and binding changes, in the order they were made.
    pub meta: Vec<Op>,
    /// (queue id, after seq): positions that go before this batch's inserts.
    pub purges: Vec<(i64, i64)>,
    pub inserts: Vec<PlannedInsert>,
    /// (queue id, seq, message id) positions removed.
    pub removes: Vec<(i64, i64, i64)>,
    /// queue id -> highest delivered seq.
    pub delivered: BTreeMap<i64, i64>,
    /// (queue id, seq) positions marked redelivered (after the inserts that write them).
    pub redelivered: Vec<(i64, i64)>,
}

/// The state `Plan::from_ops` keeps while it reads a batch.
#[derive(Default)]
struct Builder {
    plan: Plan,
    inserts: Vec<Option<PlannedInsert>>,
    /// (queue, seq) -> index in `inserts`, for positions written by this batch.
    pending: HashMap<(i64, i64), usize>,
    /// message id -> index in `inserts`
    by_id: HashMap<i64, usize>,
    /// (queue, seq) -> index in `plan.removes`, for positions removed by this batch: a later
    /// insert of the same position cancels the remove (removes are applied after inserts, so
    /// keeping both would delete the position the insert put back).
    removed: HashMap<(i64, i64), usize>,
    cancelled: Vec<usize>,
}

impl Builder {
    /// Adds one op; an `Atomic` group's ops in order (the whole group is in this batch by
    /// construction).
    fn add(&mut self, op: &Op) {
        match op {
            Op::Atomic(ops) => ops.iter().for_each(|op| self.add(op)),
            Op::Insert { message, entries } => {
                // A message routed to several queues arrives once per queue: one row.
                let at = match self.by_id.get(&message.id) {
                    Some(&i) if self.inserts[i].is_some() => i,
                    _ => {
                        self.by_id.insert(message.id, self.inserts.len());
                        self.inserts.push(Some(PlannedInsert {
                            message: message.clone(),
                            entries: Vec::new(),
                        }));
                        self.inserts.len() - 1
                    }
                };
                for &e in entries {
                    match self.removed.remove(&e) {
                        // The position was committed before this batch: a later remove must
                        // reach the store, so it is not absorbed by this insert.
                        Some(r) => self.cancelled.push(r),
                        None => {
                            self.pending.insert(e, at);
                        }
                    }
                    if let Some(ins) = self.inserts[at].as_mut() {
                        ins.entries.push(e);
                    }
                }
            }
            &Op::Remove {
                queue_id,
                seq,
                message_id,
            } => match self.pending.remove(&(queue_id, seq)) {
                Some(i) => drop_entry(&mut self.inserts[i], queue_id, seq),
                None => {
                    self.removed
                        .insert((queue_id, seq), self.plan.removes.len());
                    self.plan.removes.push((queue_id, seq, message_id));
                }
            },
            &Op::Purge {
                queue_id,
                after_seq,
            } => {
                drop_queue(&mut self.inserts, &mut self.pending, queue_id, after_seq);
                self.plan.purges.push((queue_id, after_seq));
            }
            Op::DeleteQueue { id, .. } => {
                drop_queue(&mut self.inserts, &mut self.pending, *id, i64::MIN);
                self.plan.meta.push(op.clone());
            }
            &Op::Delivered { queue_id, seq } => {
                let mark = self.plan.delivered.entry(queue_id).or_insert(seq);
                *mark = (*mark).max(seq);
            }
            // Applied last: a mark on a position that is gone by then changes nothing.
            &Op::Redelivered { queue_id, seq } => self.plan.redelivered.push((queue_id, seq)),
            meta => self.plan.meta.push(meta.clone()),
        }
    }

    fn finish(self) -> Plan {
        let Builder {
            mut plan,
            inserts,
            mut cancelled,
            ..
        } = self;
        plan.inserts = inserts.into_iter().flatten().collect();
        if !cancelled.is_empty() {
            cancelled.sort_unstable();
            let mut i = 0;
            plan.removes.retain(|_| {
                let keep = cancelled.binary_search(&i).is_err();
                i += 1;
                keep
            });
        }
        plan
    }
}

impl Plan {
    /// Reduces a batch of ops (owned or borrowed: the writer keeps its ops to retry them one
    /// by one if the store refuses the batch) to what must be written.
    pub fn from_ops<B: Borrow<Op>>(ops: impl IntoIterator<Item = B>) -> Plan {
        let mut b = Builder::default();
        for op in ops {
            b.add(op.borrow());
        }
        b.finish()
    }

    /// Whether the commit must be on disk before its tickets are released: it writes
    /// metadata, purges, or stores a persistent message. Acks (removes), delivered marks and
    /// paged transient messages may wait for the next synced commit.
    pub fn needs_sync(&self) -> bool {
        !self.meta.is_empty()
            || !self.purges.is_empty()
            || self.inserts.iter().any(|i| i.message.persistent)
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
            && self.purges.is_empty()
            && self.inserts.is_empty()
            && self.removes.is_empty()
            && self.delivered.is_empty()
            && self.redelivered.is_empty()
    }

    /// Removes grouped by queue as (queue id, first seq, last seq) runs of consecutive seqs,
    /// for range deletes.
    pub fn remove_runs(&self) -> Vec<(i64, i64, i64)> {
        let mut positions: Vec<(i64, i64)> = self.removes.iter().map(|r| (r.0, r.1)).collect();
        positions.sort_unstable();
        positions.dedup();
        let mut runs: Vec<(i64, i64, i64)> = Vec::new();
        for (q, s) in positions {
            match runs.last_mut() {
                Some(run) if run.0 == q && run.2 + 1 == s => run.2 = s,
                _ => runs.push((q, s, s)),
            }
        }
        runs
    }

    /// Message ids whose rows may have lost their last position, as (first, last) runs.
    pub fn removed_message_runs(&self) -> Vec<(i64, i64)> {
        let mut ids: Vec<i64> = self.removes.iter().map(|r| r.2).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut runs: Vec<(i64, i64)> = Vec::new();
        for id in ids {
            match runs.last_mut() {
                Some(run) if run.1 + 1 == id => run.1 = id,
                _ => runs.push((id, id)),
            }
        }
        runs
    }
}

fn drop_entry(slot: &mut Option<PlannedInsert>, queue_id: i64, seq: i64) {
    if let Some(ins) = slot {
        ins.entries.retain(|e| *e != (queue_id, seq));
        if ins.entries.is_empty() {
            *slot = None;
        }
    }
}

fn drop_queue(
    inserts: &mut [Option<PlannedInsert>],
    pending: &mut HashMap<(i64, i64), usize>,
    queue_id: i64,
    after_seq: i64,
) {
    let gone = |q: i64, s: i64| q == queue_id && s > after_seq;
    pending.retain(|(q, s), _| !gone(*q, *s));
    for slot in inserts.iter_mut() {
        if let Some(ins) = slot {
            ins.entries.retain(|e| !gone(e.0, e.1));
            if ins.entries.is_empty() {
                *slot = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn insert(id: i64, entries: &[(i64, i64)]) -> Op {
        Op::Insert {
            message: Arc::new(MessageRow {
                id,
                persistent: true,
                exchange: String::new(),
                routing_key: "k".into(),
                header: Bytes::new(),
                body: Bytes::from_static(b"x"),
                published_ms: 0,
            }),
            entries: entries.to_vec(),
        }
    }

    fn remove(q: i64, s: i64, m: i64) -> Op {
        Op::Remove {
            queue_id: q,
            seq: s,
            message_id: m,
        }
    }

    #[test]
    fn insert_then_remove_in_one_batch_writes_nothing() {
        let p = Plan::from_ops([insert(1, &[(1, 1)]), remove(1, 1, 1)]);
        assert!(p.inserts.is_empty() && p.removes.is_empty());
    }

    #[test]
    fn a_message_in_two_queues_keeps_the_position_not_removed() {
        let p = Plan::from_ops([insert(1, &[(1, 1), (2, 7)]), remove(1, 1, 1)]);
        assert_eq!(p.inserts.len(), 1);
        assert_eq!(p.inserts[0].entries, vec![(2, 7)]);
        assert!(p.removes.is_empty());
    }

    #[test]
    fn removes_of_earlier_batches_become_range_runs() {
        let p = Plan::from_ops([
            remove(1, 3, 10),
            remove(1, 1, 8),
            remove(1, 2, 9),
            remove(2, 5, 11),
            remove(1, 9, 20),
        ]);
        assert_eq!(p.remove_runs(), vec![(1, 1, 3), (1, 9, 9), (2, 5, 5)]);
        assert_eq!(p.removed_message_runs(), vec![(8, 11), (20, 20)]);
    }

    #[test]
    fn purge_drops_earlier_inserts_of_that_queue_only() {
        let p = Plan::from_ops([
            insert(1, &[(1, 1), (2, 1)]),
            Op::Purge {
                queue_id: 1,
                after_seq: 0,
            },
            insert(2, &[(1, 2)]),
        ]);
        assert_eq!(p.purges, vec![(1, 0)]);
        let kept: Vec<_> = p.inserts.iter().map(|i| i.entries.clone()).collect();
        assert_eq!(kept, vec![vec![(2, 1)], vec![(1, 2)]]);
    }

    #[test]
    fn one_message_in_several_queues_is_one_row() {
        let p = Plan::from_ops([insert(1, &[(1, 1)]), insert(1, &[(2, 4)]), remove(1, 1, 1)]);
        assert_eq!(p.inserts.len(), 1);
        assert_eq!(p.inserts[0].entries, vec![(2, 4)]);
    }

    #[test]
    fn purge_keeps_positions_at_or_before_its_seq() {
        let p = Plan::from_ops([
            insert(1, &[(1, 5)]),
            insert(2, &[(1, 6)]),
            Op::Purge {
                queue_id: 1,
                after_seq: 5,
            },
        ]);
        assert_eq!(p.inserts.len(), 1);
        assert_eq!(p.inserts[0].entries, vec![(1, 5)]);
    }

    #[test]
    fn atomic_groups_are_planned_like_their_ops() {
        // A dead-letter move: the new row into queue 2, the old position out of queue 1.
        let p = Plan::from_ops([
            insert(1, &[(1, 1)]),
            Op::Atomic(vec![insert(2, &[(2, 1)]), remove(1, 1, 1)]),
        ]);
        assert_eq!(p.inserts.len(), 1);
        assert_eq!(p.inserts[0].message.id, 2);
        assert!(
            p.removes.is_empty(),
            "the insert of 1 and its removal cancel out"
        );
        let p = Plan::from_ops([Op::Atomic(vec![insert(3, &[(2, 2)]), remove(1, 5, 1)])]);
        assert_eq!(p.inserts.len(), 1);
        assert_eq!(p.removes, vec![(1, 5, 1)]);
    }

    #[test]
    fn delivered_keeps_the_highest() {
        let p = Plan::from_ops([
            Op::Delivered {
                queue_id: 1,
                seq: 5,
            },
            Op::Delivered {
                queue_id: 1,
                seq: 3,
            },
        ]);
        assert_eq!(p.delivered.get(&1), Some(&5));
    }

    /// Issue 11: a no-ack delivery's Remove and its channel's re-Insert of the same position
    /// landed in one batch; the plan kept the Remove (applied after inserts), so the row was
    /// deleted while memory said "stored".
    #[test]
    fn a_remove_then_insert_of_one_position_keeps_it() {
        let p = Plan::from_ops([
            Op::Remove {
                queue_id: 1,
                seq: 5,
                message_id: 7,
            },
            insert(7, &[(1, 5)]),
        ]);
        assert!(p.removes.is_empty(), "{:?}", p.removes);
        assert_eq!(p.inserts.len(), 1);
        assert_eq!(p.inserts[0].entries, vec![(1, 5)]);
        // Removed again after that: the store ends without it.
        let p = Plan::from_ops([
            Op::Remove {
                queue_id: 1,
                seq: 5,
                message_id: 7,
            },
            insert(7, &[(1, 5)]),
            Op::Remove {
                queue_id: 1,
                seq: 5,
                message_id: 7,
            },
        ]);
        assert_eq!(p.removes, vec![(1, 5, 7)]);
        // Other removes are untouched.
        let p = Plan::from_ops([
            Op::Remove {
                queue_id: 1,
                seq: 4,
                message_id: 6,
            },
            Op::Remove {
                queue_id: 1,
                seq: 5,
                message_id: 7,
            },
            insert(7, &[(1, 5)]),
            Op::Remove {
                queue_id: 2,
                seq: 5,
                message_id: 7,
            },
        ]);
        assert_eq!(p.removes, vec![(1, 4, 6), (2, 5, 7)]);
    }
}
