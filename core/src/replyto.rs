//! Direct reply-to: the addresses (`amq.rabbitmq.reply-to.<token>`) handed to RPC clients that
//! consume from the `amq.rabbitmq.reply-to` pseudo-queue, and the channels they lead to. A
//! reply published to an address goes straight to that channel's outbox (no queue, no ack).

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};

use warren_protocol::{
    protocol::{basic, AMQPClass},
    ShortString,
};

use crate::delivery::{ChannelHandle, DeliverySink};
use crate::message::Message;

/// Token -> (channel, consumer tag). A `std::sync::RwLock`: read per reply, written when a
/// reply consumer starts or ends; never held across `.await`.
#[derive(Default)]
pub struct Replies {
    map: RwLock<HashMap<String, (Weak<ChannelHandle>, ShortString)>>,
}

impl Replies {
    pub fn add(&self, token: &str, channel: &Arc<ChannelHandle>, tag: ShortString) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), (Arc::downgrade(channel), tag));
    }

    pub fn remove(&self, token: &str) {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    /// Delivers a reply to the channel `token` names and returns that channel's outbox (the
    /// replier's reader waits for room in it when it is full); None when there is no such
    /// channel (any more): the reply is then unroutable.
    pub fn deliver(&self, token: &str, msg: &Arc<Message>) -> Option<Arc<dyn DeliverySink>> {
        let found = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned();
        let (ch, tag) = found?;
        let ch = ch.upgrade()?;
        let delivery_tag = ch.next_tag()?;
        ch.sink.send_content(
            ch.id,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: tag,
                delivery_tag,
                redelivered: false,
                exchange: msg.exchange.clone(),
                routing_key: msg.routing_key.clone(),
            })),
            msg.clone(),
        );
        Some(ch.sink.clone())
    }
}
