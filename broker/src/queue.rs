//! `Queue`: one queue's messages and consumers. Each queue serialises its own state behind a
//! `std::sync::Mutex` (held only for short, non-awaiting sections); publishers, acks and writers
//! all call into it directly, so there is no global lock on the publish/deliver path and no queue
//! task to hop through. Ready messages are ordered by sequence number, so a requeued message goes
//! back to its original place. Dispatch is round-robin over consumers with credit.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use warren_protocol::{
    protocol::{basic, AMQPClass},
    FieldTable,
};

use crate::delivery::{ChannelHandle, Consumer, NoCredit};
use crate::error::{AmqpError, AmqpResult};
use crate::message::Message;
use crate::outbox::Outgoing;

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub msg: Arc<Message>,
    pub redelivered: bool,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Entry>,
    ready_bytes: usize,
    next_seq: u64,
    consumers: Vec<Arc<Consumer>>,
    rr: usize,
    had_consumer: bool,
    deleted: bool,
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

impl Queue {
    pub fn new(vhost: &str, spec: QueueSpec) -> Arc<Self> {
        Arc::new(Queue {
            spec,
            vhost: vhost.to_string(),
            state: Mutex::new(State::default()),
        })
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
        (g.ready.len() as u32, g.consumers.len() as u32)
    }

    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }

    /// Enqueues a message and delivers what consumers can take. False if the queue was deleted.
    pub fn publish(self: &Arc<Self>, msg: Arc<Message>) -> bool {
        let mut g = self.lock();
        if g.deleted {
            return false;
        }
        g.next_seq += 1;
        let seq = g.next_seq;
        g.ready_bytes += msg.body.len();
        g.ready.push_back(Entry {
            seq,
            msg,
            redelivered: false,
        });
        self.dispatch_locked(&mut g);
        true
    }

    /// Delivers to consumers with credit until the queue is empty or nobody can take more.
    pub fn dispatch(self: &Arc<Self>) {
        let mut g = self.lock();
        self.dispatch_locked(&mut g);
    }

    fn dispatch_locked(self: &Arc<Self>, g: &mut State) {
        let n = g.consumers.len();
        let mut refused = 0;
        while refused < n && !g.ready.is_empty() {
            let idx = g.rr % n;
            let consumer = g.consumers[idx].clone();
            match consumer.reserve() {
                Ok(()) => {
                    let Some(entry) = g.ready.pop_front() else {
                        break;
                    };
                    g.ready_bytes -= entry.msg.body.len();
                    if self.deliver(&consumer, &entry) {
                        g.rr = idx + 1;
                        refused = 0;
                    } else {
                        consumer.unreserve();
                        g.ready_bytes += entry.msg.body.len();
                        g.ready.push_front(entry);
                        g.rr = idx + 1;
                        refused += 1;
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
    }

    /// Sends one message to a consumer; false if its channel has closed.
    fn deliver(self: &Arc<Self>, consumer: &Arc<Consumer>, entry: &Entry) -> bool {
        let ch = &consumer.channel;
        let Some(tag) = ch.record(self, entry, Some(consumer), !consumer.no_ack) else {
            return false;
        };
        ch.outbox.push(Outgoing::Content(
            ch.id,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: consumer.tag.clone(),
                delivery_tag: tag,
                redelivered: entry.redelivered,
                exchange: entry.msg.exchange.clone(),
                routing_key: entry.msg.routing_key.clone(),
            })),
            entry.msg.clone(),
        ));
        true
    }

    /// basic.get: takes the head message for `channel`, or None when empty.
    pub fn get(self: &Arc<Self>, channel: &Arc<ChannelHandle>, no_ack: bool) -> Option<bool> {
        let mut g = self.lock();
        let entry = g.ready.pop_front()?;
        g.ready_bytes -= entry.msg.body.len();
        let remaining = g.ready.len() as u32;
        let Some(tag) = channel.record(self, &entry, None, !no_ack) else {
            g.ready_bytes += entry.msg.body.len();
            g.ready.push_front(entry);
            return Some(false);
        };
        channel.outbox.push(Outgoing::Content(
            channel.id,
            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: tag,
                redelivered: entry.redelivered,
                exchange: entry.msg.exchange.clone(),
                routing_key: entry.msg.routing_key.clone(),
                message_count: remaining,
            })),
            entry.msg.clone(),
        ));
        Some(true)
    }

    /// Puts messages back in their original places, marked redelivered, and re-dispatches.
    pub fn requeue(self: &Arc<Self>, entries: impl IntoIterator<Item = Entry>) {
        let mut g = self.lock();
        if g.deleted {
            return;
        }
        for mut e in entries {
            e.redelivered = true;
            g.ready_bytes += e.msg.body.len();
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

    /// Drops every ready message; returns how many.
    pub fn purge(&self) -> u32 {
        let mut g = self.lock();
        let n = g.ready.len() as u32;
        g.ready.clear();
        g.ready_bytes = 0;
        n
    }

    /// Marks the queue deleted: returns its ready count and its consumers (to be cancelled).
    pub fn mark_deleted(&self) -> (u32, Vec<Arc<Consumer>>) {
        let mut g = self.lock();
        g.deleted = true;
        let n = g.ready.len() as u32;
        g.ready.clear();
        g.ready_bytes = 0;
        let consumers = std::mem::take(&mut g.consumers);
        for c in &consumers {
            c.active.store(false, Ordering::Release);
        }
        (n, consumers)
    }

    /// Cancels a deleted queue's consumers on their channels.
    pub fn cancel_consumers(consumers: Vec<Arc<Consumer>>) {
        for c in consumers {
            c.channel.server_cancel(&c.tag);
        }
    }
}
