//! `Message`: a published message as queues hold it. Immutable and shared (`Arc`) by every queue
//! it was routed to; the content header is the publisher's encoded one, reused for each delivery.

use bytes::Bytes;
use warren_protocol::{AMQPProperties, ShortString};

#[derive(Debug)]
pub struct Message {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: AMQPProperties,
    /// The encoded content header payload (class, weight, body size, properties).
    pub header: Bytes,
    pub body: Bytes,
}

impl Message {
    /// delivery-mode 2.
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }

    /// Bytes this message holds in memory, for budgets.
    pub fn weight(&self) -> usize {
        self.body.len()
            + self.header.len()
            + self.exchange.as_str().len()
            + self.routing_key.as_str().len()
            + 64
    }
}
