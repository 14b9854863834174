//! The message browser's side of `Admin`: a queue's ready messages read in position order
//! without consuming them, a search within a bounded scan, the deliveries clients hold
//! unacknowledged, and moving, copying, returning to origin and deleting chosen messages. A
//! move is one atomic store commit per message (`Queue::transfer`).

use std::sync::Arc;

use warren_protocol::{AMQPValue, FieldTable};

use crate::admin::{Admin, AdminError, AdminResult};
use crate::message::Message;
use crate::queue::{Browsed, Queue, Transferred};
use crate::vhost::VHost;

/// Most messages one browse page returns.
pub const MAX_PAGE: usize = 1_000;
/// Most messages one search or filtered action scans.
pub const MAX_SCAN: u64 = 1_000_000;
/// Scanned per store read while searching.
const SCAN_CHUNK: usize = 500;

/// What a search looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Any of the others.
    Any,
    RoutingKey,
    MessageId,
    CorrelationId,
    /// A header's value (`name=value` matches one header; a bare value any header).
    Header,
    Body,
}

impl Field {
    pub fn parse(s: &str) -> Option<Field> {
        Some(match s {
            "any" | "" => Field::Any,
            "routing_key" => Field::RoutingKey,
            "message_id" => Field::MessageId,
            "correlation_id" => Field::CorrelationId,
            "header" => Field::Header,
            "body" => Field::Body,
            _ => return None,
        })
    }
}

/// A search: a substring of a field (case-sensitive).
#[derive(Debug, Clone)]
pub struct Filter {
    pub field: Field,
    pub needle: String,
}

impl Filter {
    pub fn matches(&self, m: &Message) -> bool {
        // The properties are decoded from the header at most once, and only if a field needs them.
        let props = std::cell::OnceCell::new();
        self.field_matches(self.field, m, &props)
    }

    fn field_matches(
        &self,
        field: Field,
        m: &Message,
        props: &std::cell::OnceCell<warren_protocol::AMQPProperties>,
    ) -> bool {
        let n = self.needle.as_str();
        let has = |s: Option<&str>| s.is_some_and(|s| s.contains(n));
        let p = || props.get_or_init(|| m.properties());
        match field {
            Field::RoutingKey => m.routing_key.as_str().contains(n),
            Field::MessageId => has(p().message_id().as_ref().map(|s| s.as_str())),
            Field::CorrelationId => has(p().correlation_id().as_ref().map(|s| s.as_str())),
            Field::Header => header_matches(p().headers().as_ref(), n),
            Field::Body => contains_bytes(&m.body, n.as_bytes()),
            Field::Any => [
                Field::RoutingKey,
                Field::MessageId,
                Field::CorrelationId,
                Field::Header,
                Field::Body,
            ]
            .into_iter()
            .any(|field| self.field_matches(field, m, props)),
        }
    }
}

fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// `name=value`: the named header's value contains `value`; otherwise any header's value
/// (nested tables and arrays included) contains the needle.
fn header_matches(headers: Option<&FieldTable>, needle: &str) -> bool {
    let Some(h) = headers else { return false };
    if let Some((name, value)) = needle.split_once('=') {
        if let Some(v) = h.inner().get(name) {
            return value_contains(v, value);
        }
    }
    h.inner().values().any(|v| value_contains(v, needle))
}

fn value_contains(v: &AMQPValue, needle: &str) -> bool {
    match v {
        AMQPValue::LongString(s) => contains_bytes(s.as_bytes(), needle.as_bytes()),
        AMQPValue::ShortString(s) => s.as_str().contains(needle),
        AMQPValue::FieldTable(t) => t.inner().values().any(|v| value_contains(v, needle)),
        AMQPValue::FieldArray(a) => a.as_slice().iter().any(|v| value_contains(v, needle)),
        AMQPValue::Boolean(b) => b.to_string() == needle,
        AMQPValue::ShortShortInt(n) => n.to_string() == needle,
        AMQPValue::ShortShortUInt(n) => n.to_string() == needle,
        AMQPValue::ShortInt(n) => n.to_string() == needle,
        AMQPValue::ShortUInt(n) => n.to_string() == needle,
        AMQPValue::LongInt(n) => n.to_string() == needle,
        AMQPValue::LongUInt(n) => n.to_string() == needle,
        AMQPValue::LongLongInt(n) => n.to_string() == needle,
        AMQPValue::Timestamp(n) => n.to_string() == needle,
        _ => false,
    }
}

/// One page of a browse or search.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Browsed>,
    /// Where the next page starts (None: the end of the queue was reached).
    pub next: Option<u64>,
    /// Messages looked at (a search may look at more than it returns).
    pub scanned: u64,
}

/// Which messages an action takes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These positions.
    Positions(Vec<u64>),
    /// Every message from position `from` on that matches (all without a filter), looking
    /// at no more than `scan` messages.
    Matching {
        filter: Option<Filter>,
        from: u64,
        scan: u64,
    },
}

/// Where moved messages go.
#[derive(Debug, Clone)]
pub enum Destination {
    Queue(String),
    /// Routed through an exchange, with this routing key (None: the message's own).
    Exchange {
        name: String,
        routing_key: Option<String>,
    },
    /// Back to the queue it was dead-lettered from, with its original exchange and routing
    /// key (its newest `x-death` entry).
    Origin,
}

/// What an action did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Moved, copied or deleted.
    pub done: u64,
    /// No longer in the queue when the action reached them.
    pub gone: u64,
    /// No destination took them (they stay): no queue bound, a full queue, or no dead-letter
    /// origin.
    pub unroutable: u64,
    pub scanned: u64,
    /// Where a filtered action stopped, if it did not reach the end of the queue.
    pub next: Option<u64>,
}

/// An unacknowledged delivery of a queue: who holds it and since when.
#[derive(Debug, Clone)]
pub struct HeldView {
    pub connection: String,
    pub channel: u16,
    pub user: String,
    pub delivery: crate::delivery::HeldDelivery,
}

impl Admin {
    fn browse_queue(&self, vhost: &str, queue: &str) -> AdminResult<(Arc<VHost>, Arc<Queue>)> {
        let v = self.broker.vhost(vhost).ok_or(AdminError::NotFound)?;
        let q = v.queue(queue).ok_or(AdminError::NotFound)?;
        Ok((v, q))
    }

    /// Up to `count` ready messages from position `from` on, in order; with a filter, those
    /// that match among at most `scan` messages looked at.
    pub async fn browse(
        &self,
        vhost: &str,
        queue: &str,
        from: u64,
        count: usize,
        filter: Option<&Filter>,
        scan: u64,
    ) -> AdminResult<Page> {
        let (_, q) = self.browse_queue(vhost, queue)?;
        let count = count.clamp(1, MAX_PAGE);
        let Some(filter) = filter else {
            let items = q.browse(from, count).await?;
            let next = if items.len() < count {
                None
            } else {
                items.last().map(|b| b.seq + 1)
            };
            let scanned = items.len() as u64;
            return Ok(Page {
                items,
                next,
                scanned,
            });
        };
        let scan = scan.clamp(1, MAX_SCAN);
        let mut items = Vec::new();
        let mut scanned = 0u64;
        let mut at = from;
        loop {
            let chunk = (scan - scanned).min(SCAN_CHUNK as u64) as usize;
            let got = q.browse(at, chunk).await?;
            let end = got.len() < chunk;
            for b in got {
                scanned += 1;
                at = b.seq + 1;
                if b.msg.as_ref().is_some_and(|m| filter.matches(m)) {
                    items.push(b);
                    if items.len() == count {
                        return Ok(Page {
                            items,
                            next: Some(at),
                            scanned,
                        });
                    }
                }
            }
            if end {
                return Ok(Page {
                    items,
                    next: None,
                    scanned,
                });
            }
            if scanned >= scan {
                return Ok(Page {
                    items,
                    next: Some(at),
                    scanned,
                });
            }
        }
    }

    /// The deliveries of `queue` that clients hold unacknowledged, oldest first.
    pub fn unacked(&self, vhost: &str, queue: &str) -> AdminResult<Vec<HeldView>> {
        let (_, q) = self.browse_queue(vhost, queue)?;
        let mut out = Vec::new();
        for c in self.broker.connections.in_vhost(vhost) {
            let user = c.session().user;
            for ch in c.channels() {
                for d in ch.unacked_from(&q) {
                    out.push(HeldView {
                        connection: c.name.clone(),
                        channel: ch.id,
                        user: user.clone(),
                        delivery: d,
                    });
                }
            }
        }
        out.sort_by_key(|h| (h.delivery.at, h.delivery.seq));
        Ok(out)
    }

    /// Moves (or copies) the selected ready messages of a queue to `dest`, each in one
    /// atomic store commit, keeping their order; waits until all of it is committed.
    pub async fn move_messages(
        &self,
        vhost: &str,
        queue: &str,
        selection: Selection,
        dest: Destination,
        copy: bool,
    ) -> AdminResult<Report> {
        let (v, q) = self.browse_queue(vhost, queue)?;
        // Checked once up front, so a typo is a 404, not a queue full of "unroutable".
        match &dest {
            Destination::Queue(name) => {
                let t = v.queue(name).ok_or(AdminError::NotFound)?;
                if Arc::ptr_eq(&t, &q) {
                    return Err(AdminError::BadRequest(
                        "the destination is the source queue".into(),
                    ));
                }
            }
            Destination::Exchange { name, .. } => {
                v.publish_exchange(name)?;
            }
            Destination::Origin => {}
        }
        let report = self
            .each_selected(&q, selection, |b| {
                let Some(msg) = b.msg.as_ref() else {
                    return Transferred::Gone;
                };
                let Some((targets, out)) = self.destination(&v, msg, &dest) else {
                    return Transferred::Unroutable;
                };
                q.transfer((b.seq, b.id), &Arc::new(out), &targets, copy)
            })
            .await?;
        self.everything_committed().await?;
        Ok(report)
    }

    /// Deletes the selected ready messages of a queue; waits until it is committed.
    pub async fn delete_messages(
        &self,
        vhost: &str,
        queue: &str,
        selection: Selection,
    ) -> AdminResult<Report> {
        let (_, q) = self.browse_queue(vhost, queue)?;
        let report = self
            .each_selected(&q, selection, |b| {
                let len = b.msg.as_ref().map_or(0, |m| m.body.len() as u64);
                if q.delete_at((b.seq, b.id), len) {
                    Transferred::Done
                } else {
                    Transferred::Gone
                }
            })
            .await?;
        self.everything_committed().await?;
        Ok(report)
    }

    /// The queues `msg` goes to at `dest`, and the message as it goes there (a fresh id; for
    /// a return to origin, its original exchange and routing key). None: nowhere.
    fn destination(
        &self,
        v: &Arc<VHost>,
        msg: &Message,
        dest: &Destination,
    ) -> Option<(Vec<Arc<Queue>>, Message)> {
        let id = self.broker.persist.next_message_id();
        let short = |s: &str| warren_protocol::short::checked(s.to_string());
        match dest {
            Destination::Queue(name) => {
                let t = v.queue(name)?;
                let m = msg.rerouted(id, msg.exchange.clone(), msg.routing_key.clone());
                Some((vec![t], m))
            }
            Destination::Exchange { name, routing_key } => {
                let x = v.publish_exchange(name).ok()?;
                let rk = match routing_key {
                    Some(k) => short(k)?,
                    None => msg.routing_key.clone(),
                };
                let m = msg.rerouted(id, short(name)?, rk);
                let mut targets = Vec::new();
                v.route(&x, &m, &mut targets);
                (!targets.is_empty()).then_some((targets, m))
            }
            Destination::Origin => {
                let (queue, exchange, key) = crate::deadletter::origin(msg)?;
                let t = v.queue(&queue)?;
                let m = msg.rerouted(id, short(&exchange)?, short(&key)?);
                Some((vec![t], m))
            }
        }
    }

    /// Runs `act` on each selected message, in position order, and counts what it did.
    async fn each_selected(
        &self,
        q: &Arc<Queue>,
        selection: Selection,
        mut act: impl FnMut(&Browsed) -> Transferred,
    ) -> AdminResult<Report> {
        let mut r = Report::default();
        let tally = |r: &mut Report, t: Transferred| match t {
            Transferred::Done => r.done += 1,
            Transferred::Gone => r.gone += 1,
            Transferred::Unroutable => r.unroutable += 1,
        };
        match selection {
            Selection::Positions(mut positions) => {
                positions.sort_unstable();
                positions.dedup();
                for pos in positions {
                    r.scanned += 1;
                    let got = q.browse(pos, 1).await?;
                    match got.first() {
                        Some(b) if b.seq == pos => {
                            let t = act(b);
                            tally(&mut r, t);
                        }
                        _ => r.gone += 1,
                    }
                }
            }
            Selection::Matching { filter, from, scan } => {
                let scan = scan.clamp(1, MAX_SCAN);
                // Only what was in the queue when the action started: a message routed back
                // into it is not taken again.
                let last = q.last_position();
                let mut at = from;
                'scan: loop {
                    let chunk = (scan - r.scanned).min(SCAN_CHUNK as u64) as usize;
                    let got = q.browse(at, chunk).await?;
                    let end = got.len() < chunk;
                    for b in got {
                        if b.seq > last {
                            r.next = None;
                            break 'scan;
                        }
                        r.scanned += 1;
                        at = b.seq + 1;
                        let hit = match &filter {
                            None => true,
                            Some(f) => b.msg.as_ref().is_some_and(|m| f.matches(m)),
                        };
                        if hit {
                            let t = act(&b);
                            tally(&mut r, t);
                        }
                    }
                    if end {
                        break;
                    }
                    if r.scanned >= scan {
                        r.next = Some(at);
                        break;
                    }
                }
            }
        }
        Ok(r)
    }
}
