//! `Message`: a published message as queues hold it. Immutable and shared (`Arc`) by every queue
//! it was routed to; the content header is the publisher's encoded one, reused for each delivery.
//! Every live message is counted in its broker's `Gauge` until dropped: that count is what the
//! memory budget (and so paging) is decided on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use warren_protocol::{AMQPProperties, ShortString};
use warren_storage::MessageRow;

/// Bytes of message data alive in memory.
#[derive(Debug, Default)]
pub struct Gauge(AtomicUsize);

impl Gauge {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-message memory besides its buffers: the struct and its `Arc` counts, a queue entry, and
/// about 64 bytes of method and frame headers sharing the read buffer with the body.
const OVERHEAD: usize = std::mem::size_of::<Message>() + 16 + 32 + 64;

#[derive(Debug)]
pub struct Message {
    /// Unique per broker (and across restarts): the store's key.
    pub id: u64,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: AMQPProperties,
    /// The encoded content header payload (class, weight, body size, properties).
    pub header: Bytes,
    pub body: Bytes,
    gauge: Option<Arc<Gauge>>,
}

impl Message {
    pub fn new(
        id: u64,
        exchange: ShortString,
        routing_key: ShortString,
        properties: AMQPProperties,
        header: Bytes,
        body: Bytes,
        gauge: Option<Arc<Gauge>>,
    ) -> Message {
        let m = Message {
            id,
            exchange,
            routing_key,
            properties,
            header,
            body,
            gauge,
        };
        if let Some(g) = &m.gauge {
            g.0.fetch_add(m.weight(), Ordering::Relaxed);
        }
        m
    }

    /// A message read back from the store; None if its header does not parse.
    pub fn from_row(row: MessageRow, gauge: Option<Arc<Gauge>>) -> Option<Message> {
        let properties = warren_protocol::codec::header_properties(&row.header)?;
        Some(Message::new(
            row.id as u64,
            ShortString::from(row.exchange),
            ShortString::from(row.routing_key),
            properties,
            row.header,
            row.body,
            gauge,
        ))
    }

    pub fn to_row(&self) -> MessageRow {
        MessageRow {
            id: self.id as i64,
            persistent: self.is_persistent(),
            exchange: self.exchange.to_string(),
            routing_key: self.routing_key.to_string(),
            header: self.header.clone(),
            body: self.body.clone(),
        }
    }

    /// delivery-mode 2.
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }

    /// Bytes this message holds in memory, for budgets: its buffers, the struct itself (with
    /// its `Arc`), the queue entry that points at it, and the frame bytes around the body and
    /// header that stay in the shared read buffer they were sliced from.
    pub fn weight(&self) -> usize {
        self.body.len()
            + self.header.len()
            + self.exchange.as_str().len()
            + self.routing_key.as_str().len()
            + OVERHEAD
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.0.fetch_sub(self.weight(), Ordering::Relaxed);
        }
    }
}
