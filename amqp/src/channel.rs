//! One channel's method handling, run on its connection's reader task: topology methods through
//! the vhost, publishes assembled and routed to queues, consumers, acks, confirms and
//! transactions. The shared half (`ChannelHandle`) is what queues see. A channel error closes
//! only this channel (`fail`); the connection decides on hard errors.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use warren_protocol::short;
use warren_protocol::{
    codec::{Frame, MethodHead},
    content::{Assembler, Content, Step},
    protocol::{access, basic, channel, confirm, exchange, queue, tx, AMQPClass},
    ShortString,
};

use crate::outbox::{Outbox, Outgoing};
use warren_core::auth::{Access, Perm, Resource};
use warren_core::confirm::Pending;
use warren_core::delivery::{ChannelHandle, Consumer, DeliverySink, Unacked};
use warren_core::error::{AmqpError, AmqpResult};
use warren_core::exchange::Exchange;
use warren_core::message::Message;
use warren_core::persist::Persistence;
use warren_core::queue::{Enqueued, Entry, Got, LoadFuture, Queue, Removed};
use warren_storage::Capture;

/// Store reads one basic.get may wait for before it is answered get-empty.
const MAX_GET_LOADS: u8 = 3;
use warren_core::vhost::{server_name, ExchangeDeclare, QueueDeclare, VHost};

/// What a channel needs from its connection.
pub struct ConnCtx {
    pub conn_id: u64,
    /// The connection as the management API lists it.
    pub info: Arc<warren_core::connections::ConnInfo>,
    /// The node's counters.
    pub stats: Arc<warren_core::stats::GlobalStats>,
    /// The user's permissions in this vhost, as of connection.open.
    pub access: Arc<warren_core::auth::Access>,
    pub vhost: Arc<VHost>,
    pub outbox: Arc<Outbox>,
    pub max_message_size: u64,
    pub cancel_notify: bool,
    pub limits: Limits,
    /// Woken when a published message's last hold is released (`warren_core::confirm`): its
    /// confirm may go before the store commits it.
    pub confirm_waker: Arc<tokio::sync::Notify>,
}

/// Per-channel limits (settings `--consumer-max-per-channel`, `--tx-max-messages`,
/// `--tx-max-bytes`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub consumers: usize,
    pub tx_messages: usize,
    pub tx_bytes: u64,
}

/// What the connection does with the channel after a frame.
pub enum After {
    Keep,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Requeue,
    Discard,
}

#[derive(Default)]
struct Tx {
    publishes: Vec<(Arc<Exchange>, Arc<Message>, bool)>,
    /// Body bytes of `publishes`.
    bytes: u64,
    settles: Vec<(u64, Unacked, Settle)>,
}

/// Publisher confirms: the next sequence number, outcomes waiting for the store, and the
/// outcomes ready to send.
#[derive(Default)]
struct Confirms {
    next: u64,
    /// (tag, store tickets, ack?, holds) in tag order: sent once the tickets are committed,
    /// or once every durable queue holding the message has had it acknowledged. Confirms go
    /// out in tag order, so a transient message's confirm may wait behind a persistent one's.
    waiting: VecDeque<(u64, Writes, bool, Option<Arc<Pending>>)>,
    /// (first tag, last tag, ack?) runs in order, coalesced into one basic.ack/nack each.
    pending: Vec<(u64, u64, bool)>,
}

/// The store writes a publish made, one per durable queue it reached: consecutive tickets,
/// perhaps with other connections' between them.
#[derive(Debug, Clone, Copy, Default)]
struct Writes {
    first: u64,
    last: u64,
}

impl Writes {
    fn add(&mut self, ticket: u64) {
        if ticket == 0 {
            return;
        }
        if self.first == 0 || ticket < self.first {
            self.first = ticket;
        }
        self.last = self.last.max(ticket);
    }

    /// Whether the store refused one of them (only meaningful once `last` is committed). A
    /// refusal of another's write between them counts too: a false nack is published again,
    /// a false ack would lose the message.
    fn refused(&self, writer: &warren_storage::Writer) -> bool {
        self.last > 0 && writer.failed_any(self.first, self.last)
    }
}

impl Confirms {
    /// A publish's outcome: ready now, or waiting for its writes' commit (or its holds).
    fn settle(
        &mut self,
        tag: u64,
        ack: bool,
        writes: Writes,
        holds: Option<Arc<Pending>>,
        writer: &warren_storage::Writer,
    ) {
        if !self.waiting.is_empty() || writes.last > writer.committed() {
            self.waiting.push_back((tag, writes, ack, holds));
            return;
        }
        self.ready(tag, ack && !writes.refused(writer));
    }

    fn ready(&mut self, tag: u64, ack: bool) {
        if let Some(last) = self.pending.last_mut() {
            if last.2 == ack && last.1 + 1 == tag {
                last.1 = tag;
                return;
            }
        }
        self.pending.push((tag, tag, ack));
    }

    /// Moves what the store has committed, or what was acknowledged everywhere it went, to
    /// the ready runs; a message whose write the store refused is nacked.
    fn release(&mut self, writer: &warren_storage::Writer) {
        let committed = writer.committed();
        while let Some((tag, writes, ack, holds)) = self.waiting.front() {
            let (tag, writes, ack) = (*tag, *writes, *ack);
            if writes.last <= committed {
                self.ready(tag, ack && !writes.refused(writer));
            } else if holds.as_ref().is_some_and(|h| h.done()) {
                self.ready(tag, ack);
            } else {
                break;
            }
            self.waiting.pop_front();
        }
    }
}

pub struct Channel {
    pub handle: Arc<ChannelHandle>,
    /// The connection's outbox (the handle reaches it as a `DeliverySink`).
    outbox: Arc<Outbox>,
    assembler: Assembler,
    closing: bool,
    prefetch: u32,
    confirms: Option<Confirms>,
    tx: Option<Tx>,
    last_queue: Option<String>,
    route_buf: Vec<Arc<Queue>>,
    persist: Arc<Persistence>,
    confirm_waker: Arc<tokio::sync::Notify>,
    /// Some publish on this channel was written to the store (persistent or paged), so the
    /// connection is held when the store falls behind.
    pub stored_publishes: bool,
    /// A direct reply-to requester's outbox this channel filled: the connection stops reading
    /// until it has room (`take_full_outbox`).
    full_outbox: Option<Arc<dyn DeliverySink>>,
    /// A queue this channel published to cannot keep up: its consumers' outbox, on which the
    /// connection waits (briefly) before reading more (`take_congested`).
    congested: Option<Arc<dyn DeliverySink>>,
    /// basic.get found the head only in the store: the connection awaits this read, then hands
    /// the same basic.get back (`take_pending_load`).
    pending_load: Option<LoadFuture>,
    /// Store reads the current basic.get has waited for.
    get_loads: u8,
    /// Direct reply-to: (consumer tag, token) of this channel's `amq.rabbitmq.reply-to`
    /// consumer.
    reply_consumer: Option<(ShortString, String)>,
}

/// The pseudo-queue of direct reply-to, and the prefix of the addresses it hands out.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";
const REPLY_PREFIX: &str = "amq.rabbitmq.reply-to.";

impl Channel {
    pub fn new(id: u16, ctx: &ConnCtx) -> Self {
        Channel {
            handle: ChannelHandle::new(
                id,
                ctx.conn_id,
                ctx.outbox.clone(),
                ctx.cancel_notify,
                ctx.stats.clone(),
            ),
            outbox: ctx.outbox.clone(),
            assembler: Assembler::new(ctx.max_message_size),
            closing: false,
            prefetch: 0,
            confirms: None,
            tx: None,
            last_queue: None,
            route_buf: Vec::new(),
            persist: ctx.vhost.persist.clone(),
            confirm_waker: ctx.confirm_waker.clone(),
            stored_publishes: false,
            full_outbox: None,
            congested: None,
            pending_load: None,
            get_loads: 0,
            reply_consumer: None,
        }
    }

    fn id(&self) -> u16 {
        self.handle.id
    }

    /// Queues a reply. A queue or exchange method runs under a `Capture` of the store writes it
    /// makes: its reply waits for those writes, and only those, to commit, and is replaced by
    /// a 541 close if the store refused one (outside a capture there is nothing to wait for).
    fn reply(&self, method: AMQPClass) {
        let tickets = Capture::current();
        if !tickets.is_empty() {
            // This method changed the store: its reply goes out once that is committed, and
            // only if the store took it.
            self.outbox.push(Outgoing::Gate(Box::new(tickets)));
        }
        self.outbox
            .push(Outgoing::Method(self.id(), Box::new(method)));
    }

    /// Closes the channel for a channel error: channel.close goes out, resources are released
    /// now, and frames are ignored until close-ok.
    pub fn fail(&mut self, ctx: &ConnCtx, e: AmqpError) {
        tracing::warn!(channel = self.id(), "channel error: {}", e);
        self.reply(e.close_method());
        self.shutdown(ctx);
        self.closing = true;
    }

    /// Releases everything: consumers cancelled (auto-delete queues go), unacked requeued.
    pub fn shutdown(&mut self, ctx: &ConnCtx) {
        self.assembler.reset();
        if let Some((_, token)) = self.reply_consumer.take() {
            ctx.vhost.replies.remove(&token);
        }
        let (consumers, unacked) = self.handle.close();
        for c in consumers {
            self.detach_consumer(ctx, &c);
        }
        let mut back: Vec<(u64, Unacked)> = unacked.into_iter().map(|u| (0, u)).collect();
        if let Some(tx) = self.tx.take() {
            back.extend(tx.settles.into_iter().map(|(t, u, _)| (t, u)));
        }
        requeue_all(back.into_iter().map(|(_, u)| u));
        self.flush_confirms();
    }

    fn detach_consumer(&self, ctx: &ConnCtx, c: &Arc<Consumer>) {
        if let Some(q) = c.queue.upgrade() {
            if q.remove_consumer(c) == Removed::AutoDelete {
                if let Err(e) = ctx.vhost.remove_queue(&q) {
                    tracing::warn!(queue = q.name(), error = %e, "auto-delete failed");
                }
            }
        }
    }

    /// Are confirms waiting for the store?
    pub fn confirms_waiting(&self) -> bool {
        self.confirms
            .as_ref()
            .is_some_and(|c| !c.waiting.is_empty())
    }

    /// Sends the confirms that are ready (their messages committed), one method per run.
    /// The store read a basic.get needs before it is handled again, if any.
    pub fn take_pending_load(&mut self) -> Option<LoadFuture> {
        self.pending_load.take()
    }

    /// The foreign outbox (a reply-to requester's) this channel found full, if any.
    pub fn take_full_outbox(&mut self) -> Option<Arc<dyn DeliverySink>> {
        self.full_outbox.take()
    }

    /// The outbox a congested queue this channel published to waits on, if any.
    pub fn take_congested(&mut self) -> Option<Arc<dyn DeliverySink>> {
        self.congested.take()
    }

    pub fn flush_confirms(&mut self) {
        let Some(c) = self.confirms.as_mut() else {
            return;
        };
        let writer = &self.persist.writer;
        c.release(writer);
        if c.pending.is_empty() {
            return;
        }
        let runs = std::mem::take(&mut c.pending);
        for (first, last, ack) in runs {
            let multiple = last > first;
            let method = if ack {
                basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: last,
                    multiple,
                })
            } else {
                basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: last,
                    multiple,
                    requeue: false,
                })
            };
            self.outbox.push(Outgoing::Method(
                self.handle.id,
                Box::new(AMQPClass::Basic(method)),
            ));
        }
    }

    pub fn handle(&mut self, ctx: &ConnCtx, frame: Frame) -> AmqpResult<After> {
        if self.closing {
            if let Frame::Method {
                class: AMQPClass::Channel(c),
                ..
            } = frame
            {
                match c {
                    channel::AMQPMethod::CloseOk(_) => return Ok(After::Remove),
                    channel::AMQPMethod::Close(_) => {
                        self.reply(AMQPClass::Channel(channel::AMQPMethod::CloseOk(
                            channel::CloseOk {},
                        )));
                        return Ok(After::Remove);
                    }
                    _ => {}
                }
            }
            return Ok(After::Keep);
        }
        match frame {
            Frame::Method { class, head, .. } => {
                let ids = head.ids();
                self.assembler
                    .check_method()
                    .map_err(|e| AmqpError::from(e).at(60, 40))?;
                self.method(ctx, class, head)
                    .map_err(|e| e.at(ids.0, ids.1))
            }
            Frame::Header {
                class_id,
                body_size,
                properties,
                raw,
                ..
            } => {
                match self.assembler.header(class_id, body_size, properties, raw) {
                    Ok(Step::Done(c)) => self.published(ctx, c).map_err(|e| e.at(60, 40))?,
                    Ok(Step::Pending) => {}
                    Err(e) => return Err(AmqpError::from(e).at(60, 40)),
                }
                Ok(After::Keep)
            }
            Frame::Body { payload, .. } => {
                match self.assembler.body(payload) {
                    Ok(Step::Done(c)) => self.published(ctx, c).map_err(|e| e.at(60, 40))?,
                    Ok(Step::Pending) => {}
                    Err(e) => return Err(AmqpError::from(e).at(60, 40)),
                }
                Ok(After::Keep)
            }
            Frame::BodyInPlace { body, len, .. } => {
                match self.assembler.body_in_place(body, len) {
                    Ok(Step::Done(c)) => self.published(ctx, c).map_err(|e| e.at(60, 40))?,
                    Ok(Step::Pending) => {}
                    Err(e) => return Err(AmqpError::from(e).at(60, 40)),
                }
                Ok(After::Keep)
            }
            Frame::Heartbeat { .. } => Ok(After::Keep),
        }
    }

    /// The buffer of the message being published, lent to the reader for a body frame of
    /// `len` bytes (`Assembler::take_body_buffer`); None on a closing channel.
    pub fn take_body_buffer(&mut self, len: usize) -> Option<bytes::BytesMut> {
        if self.closing {
            return None;
        }
        self.assembler.take_body_buffer(len)
    }

    /// Body bytes the message being published still expects.
    pub fn body_left(&self) -> u64 {
        self.assembler.body_left()
    }

    /// The queue a method names; "" means the channel's last declared queue.
    fn queue_name(&self, name: &ShortString) -> AmqpResult<String> {
        if name.as_str().is_empty() {
            self.last_queue
                .clone()
                .ok_or_else(|| AmqpError::not_found("no previously declared queue"))
        } else {
            Ok(name.as_str().to_string())
        }
    }

    fn method(&mut self, ctx: &ConnCtx, class: AMQPClass, head: MethodHead) -> AmqpResult<After> {
        let vh = &ctx.vhost;
        let cid = ctx.conn_id;
        match class {
            AMQPClass::Channel(c) => match c {
                channel::AMQPMethod::Close(_) => {
                    self.shutdown(ctx);
                    self.reply(AMQPClass::Channel(channel::AMQPMethod::CloseOk(
                        channel::CloseOk {},
                    )));
                    return Ok(After::Remove);
                }
                channel::AMQPMethod::CloseOk(_) => {}
                channel::AMQPMethod::Flow(f) => {
                    if !f.active {
                        return Err(AmqpError::not_implemented("active=false"));
                    }
                    self.reply(AMQPClass::Channel(channel::AMQPMethod::FlowOk(
                        channel::FlowOk { active: true },
                    )));
                }
                channel::AMQPMethod::FlowOk(_) => {}
                _ => return Err(AmqpError::channel_error("second 'channel.open' seen")),
            },
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.reply(AMQPClass::Access(access::AMQPMethod::RequestOk(
                    access::RequestOk {},
                )));
            }
            AMQPClass::Exchange(e) => {
                let _writes = Capture::begin();
                self.exchange_method(vh, &ctx.access, e)?
            }
            AMQPClass::Queue(q) => {
                let _writes = Capture::begin();
                self.queue_method(vh, &ctx.access, cid, q)?
            }
            AMQPClass::Basic(b) => self.basic_method(ctx, b, head)?,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if self.confirms.is_none() {
                    self.handle.mode.store(
                        warren_core::delivery::MODE_CONFIRM,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    self.confirms = Some(Confirms {
                        next: 1,
                        ..Confirms::default()
                    });
                }
                if !s.nowait {
                    self.reply(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(
                        confirm::SelectOk {},
                    )));
                }
            }
            AMQPClass::Tx(t) => self.tx_method(ctx, t)?,
            _ => return Err(AmqpError::command_invalid("unimplemented method")),
        }
        Ok(After::Keep)
    }

    fn exchange_method(
        &mut self,
        vh: &Arc<VHost>,
        access: &Access,
        e: exchange::AMQPMethod,
    ) -> AmqpResult<()> {
        use exchange::AMQPMethod as E;
        match e {
            E::Declare(d) => {
                let name = d.exchange.as_str();
                // RabbitMQ: the default exchange is refused first (by the vhost), a passive
                // declare is not checked, a new exchange with an alternate exchange needs read
                // on itself and write on the alternate.
                if !d.passive && !name.is_empty() {
                    access.check(Perm::Configure, Resource::Exchange, name)?;
                    if vh.exchange(name).is_none() {
                        if let Some(ae) = d
                            .arguments
                            .inner()
                            .get("alternate-exchange")
                            .and_then(warren_core::args::as_str)
                        {
                            access.check(Perm::Read, Resource::Exchange, name)?;
                            access.check(Perm::Write, Resource::Exchange, &ae)?;
                        }
                    }
                }
                vh.declare_exchange(&ExchangeDeclare {
                    name: d.exchange.to_string(),
                    kind: d.kind.to_string(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                })?;
                if !d.nowait {
                    self.reply(AMQPClass::Exchange(E::DeclareOk(exchange::DeclareOk {})));
                }
            }
            E::Delete(d) => {
                let name = d.exchange.as_str();
                // The default and amq.* exchanges are refused by the vhost, with its text.
                if !name.is_empty() && !name.starts_with("amq.") {
                    access.check(Perm::Configure, Resource::Exchange, name)?;
                }
                vh.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    self.reply(AMQPClass::Exchange(E::DeleteOk(exchange::DeleteOk {})));
                }
            }
            E::Bind(b) => {
                check_binding(
                    vh,
                    access,
                    Resource::Exchange,
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                )?;
                vh.bind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                if !b.nowait {
                    self.reply(AMQPClass::Exchange(E::BindOk(exchange::BindOk {})));
                }
            }
            E::Unbind(b) => {
                check_binding(
                    vh,
                    access,
                    Resource::Exchange,
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                )?;
                vh.unbind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                if !b.nowait {
                    self.reply(AMQPClass::Exchange(E::UnbindOk(exchange::UnbindOk {})));
                }
            }
            _ => return Err(AmqpError::command_invalid("unimplemented method")),
        }
        Ok(())
    }

    fn queue_method(
        &mut self,
        vh: &Arc<VHost>,
        access: &Access,
        cid: u64,
        q: queue::AMQPMethod,
    ) -> AmqpResult<()> {
        use queue::AMQPMethod as Q;
        match q {
            Q::Declare(d) => {
                let (queue, messages, consumers) = vh.declare_queue(
                    cid,
                    access,
                    &QueueDeclare {
                        name: d.queue.to_string(),
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: d.arguments,
                    },
                )?;
                self.last_queue = Some(queue.name().to_string());
                if !d.nowait {
                    self.reply(AMQPClass::Queue(Q::DeclareOk(queue::DeclareOk {
                        queue: short::truncated(queue.name()),
                        message_count: messages,
                        consumer_count: consumers,
                    })));
                }
            }
            Q::Bind(b) => {
                let name = self.queue_name(&b.queue)?;
                check_binding(
                    vh,
                    access,
                    Resource::Queue,
                    &name,
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                )?;
                vh.bind_queue(
                    cid,
                    &name,
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                if !b.nowait {
                    self.reply(AMQPClass::Queue(Q::BindOk(queue::BindOk {})));
                }
            }
            Q::Unbind(b) => {
                let name = self.queue_name(&b.queue)?;
                check_binding(
                    vh,
                    access,
                    Resource::Queue,
                    &name,
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                )?;
                vh.unbind_queue(
                    cid,
                    &name,
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                self.reply(AMQPClass::Queue(Q::UnbindOk(queue::UnbindOk {})));
            }
            Q::Purge(p) => {
                let name = self.queue_name(&p.queue)?;
                access.check(Perm::Read, Resource::Queue, &name)?;
                let n = vh.purge_queue(cid, &name)?;
                if !p.nowait {
                    self.reply(AMQPClass::Queue(Q::PurgeOk(queue::PurgeOk {
                        message_count: n,
                    })));
                }
            }
            Q::Delete(d) => {
                let name = self.queue_name(&d.queue)?;
                access.check(Perm::Configure, Resource::Queue, &name)?;
                let (n, consumers) = vh.delete_queue(cid, &name, d.if_unused, d.if_empty)?;
                // delete-ok goes out before the basic.cancel the deletion causes, as RabbitMQ.
                if !d.nowait {
                    self.reply(AMQPClass::Queue(Q::DeleteOk(queue::DeleteOk {
                        message_count: n,
                    })));
                }
                Queue::cancel_consumers(consumers);
            }
            _ => return Err(AmqpError::command_invalid("unimplemented method")),
        }
        Ok(())
    }

    fn basic_method(
        &mut self,
        ctx: &ConnCtx,
        b: basic::AMQPMethod,
        head: MethodHead,
    ) -> AmqpResult<()> {
        use basic::AMQPMethod as B;
        let vh = &ctx.vhost;
        match b {
            B::Qos(q) => {
                let size = head.qos_prefetch_size();
                if size != 0 {
                    return Err(AmqpError::not_implemented(format!(
                        "prefetch_size!=0 ({size})"
                    )));
                }
                if q.global {
                    self.handle.set_global_prefetch(q.prefetch_count as u32);
                } else {
                    self.prefetch = q.prefetch_count as u32;
                    self.handle
                        .prefetch
                        .store(self.prefetch, std::sync::atomic::Ordering::Relaxed);
                }
                self.reply(AMQPClass::Basic(B::QosOk(basic::QosOk {})));
            }
            B::Consume(c) if c.queue.as_str() == REPLY_TO => {
                if self.handle.has_consumer(c.consumer_tag.as_str())
                    || self
                        .reply_consumer
                        .as_ref()
                        .is_some_and(|(t, _)| *t == c.consumer_tag)
                {
                    return Err(AmqpError::not_allowed(format!(
                        "attempt to reuse consumer tag '{}'",
                        c.consumer_tag
                    )));
                }
                if !c.no_ack {
                    return Err(AmqpError::precondition("reply consumer cannot acknowledge"));
                }
                if self.reply_consumer.is_some() {
                    return Err(AmqpError::precondition("reply consumer already set"));
                }
                let tag = if c.consumer_tag.as_str().is_empty() {
                    short::truncated(server_name("amq.ctag-"))
                } else {
                    c.consumer_tag.clone()
                };
                let token = server_name("");
                vh.replies.add(&token, &self.handle, tag.clone());
                self.reply_consumer = Some((tag.clone(), token));
                if !c.nowait {
                    self.reply(AMQPClass::Basic(B::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag,
                    })));
                }
            }
            B::Consume(c) => {
                let name = self.queue_name(&c.queue)?;
                ctx.access.check(Perm::Read, Resource::Queue, &name)?;
                let q = vh.queue_for(ctx.conn_id, &name)?;
                let tag = if c.consumer_tag.as_str().is_empty() {
                    short::truncated(server_name("amq.ctag-"))
                } else {
                    c.consumer_tag.clone()
                };
                if self.handle.has_consumer(tag.as_str()) {
                    return Err(AmqpError::not_allowed(format!(
                        "attempt to reuse consumer tag '{tag}'"
                    )));
                }
                if self.handle.consumer_count() >= ctx.limits.consumers {
                    return Err(AmqpError::not_allowed(format!(
                        "reached maximum ({}) of consumers per channel",
                        ctx.limits.consumers
                    )));
                }
                let priority = match c.arguments.inner().get("x-priority") {
                    None => 0,
                    Some(v) => warren_core::args::as_int(v).ok_or_else(|| {
                        AmqpError::precondition(format!(
                            "invalid arg 'x-priority' for queue '{}' in vhost '{}': \"expected integer, got {}\"",
                            name,
                            vh.name,
                            warren_core::args::type_name(v)
                        ))
                    })?,
                };
                let consumer = Arc::new(Consumer {
                    tag: tag.clone(),
                    channel: self.handle.clone(),
                    queue: Arc::downgrade(&q),
                    no_ack: c.no_ack,
                    exclusive: c.exclusive,
                    priority,
                    prefetch: self.prefetch,
                    unacked: Default::default(),
                    active: Default::default(),
                });
                // Registered inactive so nothing is delivered before consume-ok.
                q.add_consumer(consumer.clone())?;
                self.handle.add_consumer(consumer.clone())?;
                if !c.nowait {
                    self.reply(AMQPClass::Basic(B::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag,
                    })));
                }
                consumer.active.store(true, Ordering::Release);
                q.dispatch();
            }
            B::Cancel(c)
                if self
                    .reply_consumer
                    .as_ref()
                    .is_some_and(|(t, _)| *t == c.consumer_tag) =>
            {
                if let Some((_, token)) = self.reply_consumer.take() {
                    vh.replies.remove(&token);
                }
                if !c.nowait {
                    self.reply(AMQPClass::Basic(B::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
            }
            B::Cancel(c) => {
                if let Some(consumer) = self.handle.remove_consumer(c.consumer_tag.as_str()) {
                    self.detach_consumer(ctx, &consumer);
                }
                if !c.nowait {
                    self.reply(AMQPClass::Basic(B::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
            }
            B::Publish(p) => {
                if p.immediate {
                    return Err(AmqpError::not_implemented("immediate=true"));
                }
                self.assembler.start(p)?;
            }
            B::Get(g) => {
                let name = self.queue_name(&g.queue)?;
                ctx.access.check(Perm::Read, Resource::Queue, &name)?;
                let q = vh.queue_for(ctx.conn_id, &name)?;
                match q.get(&self.handle, g.no_ack) {
                    Got::Delivered => self.get_loads = 0,
                    // A head that is still not readable after a few store reads is answered
                    // as empty rather than holding the channel.
                    Got::Load(_) | Got::Empty if self.get_loads >= MAX_GET_LOADS => {
                        self.get_loads = 0;
                        self.count_get_empty(&q);
                        self.reply(AMQPClass::Basic(B::GetEmpty(basic::GetEmpty {})));
                    }
                    Got::Empty => {
                        self.get_loads = 0;
                        self.count_get_empty(&q);
                        self.reply(AMQPClass::Basic(B::GetEmpty(basic::GetEmpty {})));
                    }
                    Got::Load(f) => {
                        self.get_loads += 1;
                        self.pending_load = Some(f);
                    }
                }
            }
            B::Ack(a) => self.settle(a.delivery_tag, a.multiple, Settle::Ack)?,
            B::Nack(n) => self.settle(
                n.delivery_tag,
                n.multiple,
                if n.requeue {
                    Settle::Requeue
                } else {
                    Settle::Discard
                },
            )?,
            B::Reject(r) => self.settle(
                r.delivery_tag,
                false,
                if r.requeue {
                    Settle::Requeue
                } else {
                    Settle::Discard
                },
            )?,
            B::RecoverAsync(r) => self.recover(r.requeue)?,
            B::Recover(r) => {
                self.recover(r.requeue)?;
                self.reply(AMQPClass::Basic(B::RecoverOk(basic::RecoverOk {})));
            }
            _ => return Err(AmqpError::command_invalid("unimplemented method")),
        }
        Ok(())
    }

    fn recover(&mut self, requeue: bool) -> AmqpResult<()> {
        if !requeue {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        let all = self.handle.take_all_unacked();
        for u in &all {
            self.handle.release(u);
        }
        requeue_all(all);
        Ok(())
    }

    /// ack / nack / reject: now, or at commit in a transaction.
    fn settle(&mut self, tag: u64, multiple: bool, how: Settle) -> AmqpResult<()> {
        let taken = self.handle.take_unacked(tag, multiple)?;
        if let Some(tx) = self.tx.as_mut() {
            tx.settles
                .extend(taken.into_iter().map(|(t, u)| (t, u, how)));
            return Ok(());
        }
        self.apply_settles(taken.into_iter().map(|(_, u)| (u, how)));
        Ok(())
    }

    fn apply_settles(&self, items: impl IntoIterator<Item = (Unacked, Settle)>) {
        let mut requeue = Vec::new();
        let mut touched: Vec<Arc<Queue>> = Vec::new();
        for (mut u, how) in items {
            self.handle.release(&u);
            if !touched.iter().any(|q| Arc::ptr_eq(q, &u.queue)) {
                touched.push(u.queue.clone());
            }
            match how {
                Settle::Requeue => requeue.push(u),
                Settle::Discard => u.queue.discard(u.entry),
                Settle::Ack => {
                    self.handle.stats.ack.inc();
                    self.handle.global.ack.inc();
                    u.queue.stats.ack.inc();
                    u.queue.forget(&u.entry);
                    u.entry.confirm.release();
                }
            }
        }
        requeue_all(requeue);
        // Credit came back: let the queues deliver again (requeue_all dispatched its own).
        for q in touched {
            q.dispatch();
        }
        self.handle.dispatch_all_consumers_if_global();
    }

    fn count_get_empty(&self, q: &Queue) {
        self.handle.stats.get_empty.inc();
        self.handle.global.get_empty.inc();
        q.stats.get_empty.inc();
    }

    /// A complete message arrived.
    // Kept in the assembler's box: unboxing would copy the whole content once more per message.
    #[allow(clippy::boxed_local)]
    fn published(&mut self, ctx: &ConnCtx, c: Box<Content>) -> AmqpResult<()> {
        ctx.access
            .check(Perm::Write, Resource::Exchange, c.publish.exchange.as_str())?;
        let exchange = ctx.vhost.publish_exchange(c.publish.exchange.as_str())?;
        if exchange.kind == warren_core::exchange::ExchangeKind::Topic {
            ctx.access
                .check_topic(Perm::Write, &exchange.name, c.publish.routing_key.as_str())?;
        }
        let mandatory = c.publish.mandatory;
        if let Some(e) = c.properties.expiration() {
            if let Some(why) = warren_core::message::expiration_problem(e.as_str()) {
                return Err(AmqpError::precondition(format!(
                    "invalid expiration '{}': {why}",
                    e.as_str()
                )));
            }
        }
        let mut msg = Arc::new(Message::new(
            self.persist.next_message_id(),
            c.publish.exchange,
            c.publish.routing_key,
            &c.properties,
            c.header,
            c.body,
            Some(self.persist.gauge.clone()),
        ));
        if c.properties.reply_to().as_ref().map(|r| r.as_str()) == Some(REPLY_TO) {
            // Direct reply-to: the reply address names this channel's reply consumer.
            let Some((_, token)) = self.reply_consumer.as_ref() else {
                return Err(AmqpError::precondition(
                    "fast reply consumer does not exist",
                ));
            };
            let props = c
                .properties
                .with_reply_to(short::truncated(format!("{REPLY_PREFIX}{token}")));
            msg = Arc::new(msg.derive(
                msg.id,
                msg.exchange.clone(),
                msg.routing_key.clone(),
                &props,
            ));
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.bytes += msg.body.len() as u64;
            if tx.publishes.len() >= ctx.limits.tx_messages || tx.bytes > ctx.limits.tx_bytes {
                return Err(AmqpError::precondition(format!(
                    "transaction too large: at most {} messages and {} body bytes are held \
                     until tx.commit",
                    ctx.limits.tx_messages, ctx.limits.tx_bytes
                )));
            }
            tx.publishes.push((exchange, msg, mandatory));
            return Ok(());
        }
        self.route(ctx, &exchange, msg, mandatory);
        Ok(())
    }

    /// Routes a message to its queues (its store writes are submitted on this thread, so a
    /// `Capture` around it sees them).
    fn route(
        &mut self,
        ctx: &ConnCtx,
        exchange: &Arc<Exchange>,
        msg: Arc<Message>,
        mandatory: bool,
    ) {
        let mut queues = std::mem::take(&mut self.route_buf);
        let mut delivered = false;
        let mut held_ticket = 0;
        let delay = exchange
            .delay
            .get()
            .and_then(|d| warren_core::delay::delay_of(&msg).map(|ms| (d, ms)));
        match msg.routing_key.as_str().strip_prefix(REPLY_PREFIX) {
            Some(token) if exchange.name.is_empty() => {
                if let Some(outbox) = ctx.vhost.replies.deliver(token, &msg) {
                    delivered = true;
                    if !outbox.has_room() {
                        self.full_outbox = Some(outbox);
                    }
                }
            }
            _ => match delay {
                // Held by the delayed exchange: routed when due (never returned).
                Some((d, ms)) => {
                    held_ticket = d.hold(&msg, ms);
                    delivered = true;
                    self.stored_publishes = true;
                }
                None => ctx.vhost.route(exchange, &msg, &mut queues),
            },
        }
        let mut rejected = false;
        let mut writes = Writes::default();
        writes.add(held_ticket);
        let mut row = None;
        // A persistent message's confirm may go once every durable queue has had it acked.
        let holds = (self.confirms.is_some() && msg.is_persistent())
            .then(|| Pending::new(self.confirm_waker.clone()));
        if held_ticket > 0 {
            if let Some(h) = &holds {
                h.pin(); // held by the delayed exchange in the store alone
            }
        }
        for q in queues.drain(..) {
            let (enqueued, congested) = q.publish(&msg, &mut row, holds.as_ref());
            if congested.is_some() {
                self.congested = congested;
            }
            match enqueued {
                Enqueued::Deleted => {}
                // A full queue with reject-publish: the publisher's confirm is a nack.
                Enqueued::Rejected => {
                    delivered = true;
                    rejected = true;
                }
                Enqueued::Held => delivered = true,
                Enqueued::Stored { ticket: t, durable } => {
                    delivered = true;
                    // paged or persistent: this connection now feeds the store writer
                    self.stored_publishes = true;
                    if durable {
                        writes.add(t);
                    }
                }
            }
        }
        self.route_buf = queues;
        if let Some(h) = &holds {
            h.release(); // routed
        }
        // Without --sync confirm, confirms do not wait for the store.
        let writes = if self.persist.confirm_ticket(writes.last) == 0 {
            Writes::default()
        } else {
            writes
        };
        let (stats, global) = (&self.handle.stats, &self.handle.global);
        stats.publish.inc();
        global.publish.inc();
        exchange.stats.publish_in.inc();
        if delivered {
            exchange.stats.publish_out.inc();
        } else if mandatory {
            stats.return_unroutable.inc();
            global.return_unroutable.inc();
        } else {
            stats.drop_unroutable.inc();
            global.drop_unroutable.inc();
        }
        if self.confirms.is_some() && !rejected {
            stats.confirm.inc();
            global.confirm.inc();
        }
        if !delivered && mandatory {
            self.outbox.push(Outgoing::Content(
                self.id(),
                Box::new(AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: warren_protocol::reply::NO_ROUTE,
                    reply_text: short::truncated("NO_ROUTE"),
                    exchange: msg.exchange.clone(),
                    routing_key: msg.routing_key.clone(),
                }))),
                msg,
            ));
            if !self.outbox.has_room() {
                // The publisher gets its returns before more of its publishes are read.
                self.full_outbox = Some(self.outbox.clone());
            }
        }
        if let Some(c) = self.confirms.as_mut() {
            let tag = c.next;
            c.next += 1;
            let writer = &self.persist.writer;
            c.settle(tag, !rejected, writes, holds, writer);
        }
    }

    fn tx_method(&mut self, ctx: &ConnCtx, t: tx::AMQPMethod) -> AmqpResult<()> {
        use tx::AMQPMethod as T;
        match t {
            T::Select(_) => {
                if self.confirms.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if self.tx.is_none() {
                    self.tx = Some(Tx::default());
                    self.handle.mode.store(
                        warren_core::delivery::MODE_TX,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                self.reply(AMQPClass::Tx(T::SelectOk(tx::SelectOk {})));
            }
            T::Commit(_) => {
                let Some(tx) = self.tx.as_mut() else {
                    return Err(AmqpError::precondition("channel is not transactional"));
                };
                let Tx {
                    publishes, settles, ..
                } = std::mem::take(tx);
                // Every store write routing makes (one per durable queue a message reaches) is
                // one commit-ok stands for.
                let ((), tickets) = Capture::run(|| {
                    for (x, msg, mandatory) in publishes {
                        self.route(ctx, &x, msg, mandatory);
                    }
                });
                self.apply_settles(settles.into_iter().map(|(_, u, how)| (u, how)));
                if !tickets.is_empty() {
                    // commit-ok once the transaction's persistent messages are stored, and
                    // only if every one of them was
                    self.outbox.push(Outgoing::Gate(Box::new(tickets)));
                }
                self.reply(AMQPClass::Tx(T::CommitOk(tx::CommitOk {})));
            }
            T::Rollback(_) => {
                let Some(tx) = self.tx.as_mut() else {
                    return Err(AmqpError::precondition("channel is not transactional"));
                };
                let Tx { settles, .. } = std::mem::take(tx);
                self.handle
                    .restore_unacked(settles.into_iter().map(|(t, u, _)| (t, u)).collect());
                self.reply(AMQPClass::Tx(T::RollbackOk(tx::RollbackOk {})));
            }
            _ => return Err(AmqpError::command_invalid("unimplemented method")),
        }
        Ok(())
    }
}

/// Requeues deliveries to their queues, in tag order per queue.
fn requeue_all(items: impl IntoIterator<Item = Unacked>) {
    let mut groups: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
    for u in items {
        match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, v)) => v.push(u.entry),
            None => groups.push((u.queue, vec![u.entry])),
        }
    }
    for (q, entries) in groups {
        q.requeue(entries);
    }
}

/// queue.bind/unbind and exchange.bind/unbind, as RabbitMQ checks them: write on the
/// destination, then read on the source, then (for a topic source) read on the binding key.
/// The default exchange is left to the vhost's own 403.
fn check_binding(
    vh: &VHost,
    access: &Access,
    destination_kind: Resource,
    destination: &str,
    source: &str,
    key: &str,
) -> AmqpResult<()> {
    if source.is_empty() || (destination_kind == Resource::Exchange && destination.is_empty()) {
        return Ok(());
    }
    access.check(Perm::Write, destination_kind, destination)?;
    access.check(Perm::Read, Resource::Exchange, source)?;
    if let Some(x) = vh.exchange(source) {
        if x.kind == warren_core::exchange::ExchangeKind::Topic {
            access.check_topic(Perm::Read, source, key)?;
        }
    }
    Ok(())
}
