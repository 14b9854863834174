//! `Outbox`: a connection's outgoing frames, shared by its reader task and by the queues that
//! deliver to it, drained by its writer task. A `std::sync::Mutex` guards it: pushes and takes are
//! short and nobody holds it across `.await`. Control frames are always accepted; deliveries check
//! `has_room` first, and a queue that finds no room parks itself here and is woken (its dispatch
//! re-run) once the writer has written the backlog out: a slow consumer never grows memory without
//! bound. Frames a connection's own reader produces in bulk (basic.return, replies to a direct
//! reply-to requester) cannot be refused: instead, a reader that finds an outbox full stops
//! reading its socket until the outbox has room (`wait_room`), so TCP pushes back.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;
use warren_protocol::{protocol::basic, AMQPClass};

use warren_core::delivery::{Consumer, DeliverySink};
use warren_core::message::Message;
use warren_core::names::same;
use warren_core::queue::Queue;
use warren_storage::Tickets;

/// One outgoing item, encoded by the writer task.
#[derive(Debug)]
pub enum Outgoing {
    /// Boxed, like `Content`'s method: the enum stays the size of `Deliver`, the item an
    /// outbox holds by the thousand.
    Method(u16, Box<AMQPClass>),
    /// A content-bearing method (get-ok, return) followed by the message's content.
    Content(u16, Box<AMQPClass>, Arc<Message>),
    /// basic.deliver and the message's content: the writer encodes the method from a template
    /// it keeps, so nothing is allocated per delivery.
    Deliver(Deliver),
    Heartbeat,
    /// Write what precedes, then hold what follows until these store tickets are committed;
    /// if the store refused one, what follows would claim a write that did not happen, and
    /// the connection is closed instead (541).
    Gate(Box<Tickets>),
    /// Write what precedes, then close the socket and stop the writer.
    Shutdown,
}

impl Outgoing {
    fn weight(&self) -> usize {
        match self {
            Outgoing::Content(_, _, m) | Outgoing::Deliver(Deliver { msg: m, .. }) => {
                64 + m.header.len() + m.body.len()
            }
            _ => 64,
        }
    }
}

/// A delivery waiting in an outbox.
#[derive(Debug)]
pub struct Deliver {
    pub channel: u16,
    pub consumer: Arc<Consumer>,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub msg: Arc<Message>,
}

/// The basic.deliver a connection's writer encodes, kept from one delivery to the next: only
/// what differs from the last is replaced (usually just the tag), so encoding a delivery
/// allocates nothing. The consumer is recognised by its `Arc` (held, so its address cannot be
/// reused by another), the names by `names::same`: this runs once per delivery.
pub(crate) struct DeliverTemplate {
    pub method: AMQPClass,
    consumer: Option<Arc<Consumer>>,
}

impl DeliverTemplate {
    pub fn new() -> Self {
        DeliverTemplate {
            method: AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "".into(),
                delivery_tag: 0,
                redelivered: false,
                exchange: "".into(),
                routing_key: "".into(),
            })),
            consumer: None,
        }
    }

    pub fn fill(&mut self, d: &Deliver) {
        if let AMQPClass::Basic(basic::AMQPMethod::Deliver(m)) = &mut self.method {
            if !self
                .consumer
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &d.consumer))
            {
                m.consumer_tag = d.consumer.tag.clone();
                self.consumer = Some(d.consumer.clone());
            }
            m.delivery_tag = d.delivery_tag;
            m.redelivered = d.redelivered;
            if !same(m.exchange.as_str(), d.msg.exchange.as_str()) {
                m.exchange = d.msg.exchange.clone();
            }
            if !same(m.routing_key.as_str(), d.msg.routing_key.as_str()) {
                m.routing_key = d.msg.routing_key.clone();
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    items: Vec<Outgoing>,
    bytes: usize,
    parked: Vec<Weak<Queue>>,
    closed: bool,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    /// Woken when the writer takes the backlog (room again).
    room: Notify,
    limit: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Outbox {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            room: Notify::new(),
            limit,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the frame list half-updated in a way
        // that matters more than losing the connection, so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the writer. Frames pushed after `Shutdown` are dropped.
    pub fn push(&self, item: Outgoing) {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        if matches!(item, Outgoing::Shutdown) {
            g.closed = true;
        }
        g.bytes += item.weight();
        let was_empty = g.items.is_empty();
        g.items.push(item);
        drop(g);
        if was_empty {
            self.notify.notify_one();
        }
    }

    pub fn push_method(&self, channel: u16, method: AMQPClass) {
        self.push(Outgoing::Method(channel, Box::new(method)));
    }

    /// May a delivery be added now?
    pub fn has_room(&self) -> bool {
        let g = self.lock();
        !g.closed && g.bytes < self.limit
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Remembers a queue to re-dispatch once the writer catches up. If the writer drained the
    /// backlog between the caller's room check and now, it is woken so the queue is not stranded.
    pub fn park(&self, queue: &Arc<Queue>) {
        let mut g = self.lock();
        if !g.parked.iter().any(|w| w.as_ptr() == Arc::as_ptr(queue)) {
            g.parked.push(Arc::downgrade(queue));
        }
        let room = g.bytes < self.limit;
        drop(g);
        if room {
            self.notify.notify_one();
        }
    }

    /// Stops accepting frames (the writer is gone).
    pub fn close(&self) {
        let mut g = self.lock();
        g.closed = true;
        g.items.clear();
        g.parked.clear();
        drop(g);
        self.room.notify_waiters();
    }

    /// Takes everything pending into `out` (for the writer).
    pub fn take(&self, out: &mut Vec<Outgoing>) {
        let mut g = self.lock();
        std::mem::swap(&mut g.items, out);
        g.bytes = 0;
        drop(g);
        self.room.notify_waiters();
    }

    /// Resolves once the outbox has room for more (or is closed).
    pub async fn wait_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let g = self.lock();
                if g.closed || g.bytes < self.limit {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Queues parked for room, to wake after a write.
    pub fn take_parked(&self) -> Vec<Weak<Queue>> {
        std::mem::take(&mut self.lock().parked)
    }

    /// Resolves when something was pushed since the last take.
    pub async fn wait(&self) {
        self.notify.notified().await
    }
}

impl DeliverySink for Outbox {
    fn send_method(&self, channel: u16, method: AMQPClass) {
        self.push(Outgoing::Method(channel, Box::new(method)));
    }

    fn send_content(&self, channel: u16, method: AMQPClass, msg: Arc<Message>) {
        self.push(Outgoing::Content(channel, Box::new(method), msg));
    }

    fn send_deliver(
        &self,
        channel: u16,
        consumer: &Arc<Consumer>,
        delivery_tag: u64,
        redelivered: bool,
        msg: Arc<Message>,
    ) {
        self.push(Outgoing::Deliver(Deliver {
            channel,
            consumer: consumer.clone(),
            delivery_tag,
            redelivered,
            msg,
        }));
    }

    fn has_room(&self) -> bool {
        Outbox::has_room(self)
    }

    fn park(&self, queue: &Arc<Queue>) {
        Outbox::park(self, queue)
    }

    fn wait_room(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(Outbox::wait_room(self))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32};

    use warren_core::delivery::ChannelHandle;
    use warren_protocol::ShortString;

    use super::*;

    fn consumer(tag: &str, sink: Arc<Outbox>) -> Arc<Consumer> {
        Arc::new(Consumer {
            tag: ShortString::from(tag),
            channel: ChannelHandle::new(1, 1, sink, false, Default::default()),
            queue: Weak::new(),
            no_ack: true,
            exclusive: false,
            priority: 0,
            prefetch: 0,
            unacked: AtomicU32::new(0),
            active: AtomicBool::new(true),
        })
    }

    fn deliver(c: &Arc<Consumer>, tag: u64, exchange: &str, rk: &str) -> Deliver {
        let msg = Message::encoded(
            tag,
            exchange.into(),
            rk.into(),
            &Default::default(),
            bytes::Bytes::from_static(b"x"),
            None,
        )
        .unwrap();
        Deliver {
            channel: 1,
            consumer: c.clone(),
            delivery_tag: tag,
            redelivered: tag.is_multiple_of(2),
            msg: Arc::new(msg),
        }
    }

    #[test]
    fn the_deliver_template_follows_every_field_that_changes() {
        let sink = Outbox::new(1 << 20);
        let (a, b) = (consumer("ctag-a", sink.clone()), consumer("ctag-b", sink));
        let mut t = DeliverTemplate::new();
        let steps = [
            (&a, "", "q1"),
            (&a, "", "q1"),
            (&b, "", "q1"),
            (&a, "amq.direct", "q1"),
            (&a, "amq.direct", "q2"),
            (&b, "x", "q2"),
            (&b, "", ""),
        ];
        for (i, (c, x, rk)) in steps.into_iter().enumerate() {
            let d = deliver(c, i as u64 + 1, x, rk);
            t.fill(&d);
            let AMQPClass::Basic(basic::AMQPMethod::Deliver(m)) = &t.method else {
                panic!("not a deliver");
            };
            assert_eq!(m.consumer_tag.as_str(), c.tag.as_str(), "step {i}");
            assert_eq!(m.delivery_tag, i as u64 + 1);
            assert_eq!(m.redelivered, d.redelivered);
            assert_eq!((m.exchange.as_str(), m.routing_key.as_str()), (x, rk));
        }
    }
}
