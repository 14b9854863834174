//! `Message`: a published message as queues hold it. Immutable and shared (`Arc`) by every queue
//! it was routed to; the content header is the publisher's encoded one, reused for each delivery.
//! Every live message is counted in its broker's `Gauge` until dropped: that count is what the
//! memory budget (and so paging) is decided on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use warren_protocol::{short, AMQPProperties, ShortString};
use warren_storage::MessageRow;

/// Bytes of message data alive in memory.
#[derive(Debug, Default)]
pub struct Gauge(AtomicUsize);

impl Gauge {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-message memory besides its buffers: the struct and its `Arc` counts, the allocator's
/// headers of its header and body (small ones are copied out of the read buffer), and the
/// record that holds it: a queue entry (48 bytes), or an unacknowledged delivery (72 bytes and
/// its key in a B-tree leaf that is about half full after in-order inserts: about 160).
const OVERHEAD: usize = std::mem::size_of::<Message>() + 16 + 32 + 160;

/// The `expiration` property as a queue reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    None,
    Ms(u64),
    /// Present but not what RabbitMQ accepts (refused at publish; possible in old rows).
    Bad,
}

/// The properties are kept only in their encoded form (`header`, what deliveries send): the
/// few that queues read for every message are extracted once, and the rest are decoded on
/// demand (`properties`) by the rarer paths that need them (headers exchanges, dead-lettering,
/// the management API). A decoded `AMQPProperties` is several hundred bytes per message.
#[derive(Debug)]
pub struct Message {
    /// Unique per broker (and across restarts): the store's key.
    pub id: u64,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    /// The encoded content header payload (class, weight, body size, properties).
    pub header: Bytes,
    pub body: Bytes,
    /// When it was published (ms since the Unix epoch): TTLs count from it.
    pub published_ms: u64,
    gauge: Option<Arc<Gauge>>,
    expiry: Expiry,
    priority: u8,
    persistent: bool,
}

/// Now, in ms since the Unix epoch (the clock TTLs, delays and x-death times use).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `p` without its `expiration` (amq-protocol's properties can be set but not cleared).
pub fn without_expiration(p: &AMQPProperties) -> AMQPProperties {
    let mut out = AMQPProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// Why RabbitMQ refuses an `expiration` property (Erlang's `string:to_integer` reading), in its
/// words: `no_integer`, `{value_negative,-1}`, `{leftover_string,"x"}`; None if it is valid.
pub fn expiration_problem(s: &str) -> Option<String> {
    let digits_from = usize::from(s.starts_with(['+', '-']));
    let digits = s[digits_from..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if digits == 0 {
        return Some("no_integer".into());
    }
    let end = digits_from + digits;
    if end < s.len() {
        return Some(format!("{{leftover_string,\"{}\"}}", &s[end..]));
    }
    match s.parse::<i64>() {
        Ok(n) if n < 0 => Some(format!("{{value_negative,{n}}}")),
        Ok(_) => None,
        Err(_) => Some("no_integer".into()),
    }
}

/// An `expiration` RabbitMQ accepts, in ms; None for one it refuses.
fn parse_expiration(s: &str) -> Option<u64> {
    match s.trim_start_matches('+').parse::<u64>() {
        Ok(n) if expiration_problem(s).is_none() => Some(n),
        _ => None,
    }
}

/// A per-message `expiration` property RabbitMQ refuses (406 at publish).
#[derive(Debug, PartialEq, Eq)]
pub struct BadExpiration(pub String);

impl Message {
    /// A message whose `header` is the encoding of `properties` (a publisher's content header).
    pub fn new(
        id: u64,
        exchange: ShortString,
        routing_key: ShortString,
        properties: &AMQPProperties,
        header: Bytes,
        body: Bytes,
        gauge: Option<Arc<Gauge>>,
    ) -> Message {
        let expiry = match properties.expiration() {
            None => Expiry::None,
            Some(e) => match parse_expiration(e.as_str()) {
                Some(ms) => Expiry::Ms(ms),
                None => Expiry::Bad,
            },
        };
        let m = Message {
            id,
            exchange,
            routing_key,
            header,
            body,
            published_ms: now_ms(),
            gauge,
            expiry,
            priority: properties.priority().unwrap_or(0),
            persistent: properties.delivery_mode() == &Some(2),
        };
        if let Some(g) = &m.gauge {
            g.0.fetch_add(m.weight(), Ordering::Relaxed);
        }
        m
    }

    /// A message whose content header is encoded here from `properties`; an error if they do
    /// not encode.
    pub fn encoded(
        id: u64,
        exchange: ShortString,
        routing_key: ShortString,
        properties: &AMQPProperties,
        body: Bytes,
        gauge: Option<Arc<Gauge>>,
    ) -> Result<Message, String> {
        let header = warren_protocol::encode::content_header_payload(
            warren_protocol::CLASS_BASIC,
            body.len() as u64,
            properties,
        )
        .map_err(|e| e.to_string())?;
        Ok(Message::new(
            id,
            exchange,
            routing_key,
            properties,
            header,
            body,
            gauge,
        ))
    }

    /// The message's properties, decoded from its content header.
    pub fn properties(&self) -> AMQPProperties {
        warren_protocol::codec::header_properties(&self.header).unwrap_or_else(|| {
            // Every header was parsed (or encoded) before its message was built.
            tracing::error!(id = self.id, "a message's content header does not parse");
            AMQPProperties::default()
        })
    }

    /// A message read back from the store; None if its header does not parse.
    pub fn from_row(row: MessageRow, gauge: Option<Arc<Gauge>>) -> Option<Message> {
        let properties = warren_protocol::codec::header_properties(&row.header)?;
        let mut m = Message::new(
            row.id as u64,
            short::checked(row.exchange)?,
            short::checked(row.routing_key)?,
            &properties,
            row.header,
            row.body,
            gauge,
        );
        // Rows written before the column existed read 0: they count from now.
        if row.published_ms > 0 {
            m.published_ms = row.published_ms as u64;
        }
        Some(m)
    }

    /// A copy under a new id with other properties, exchange and routing key (dead-lettering,
    /// reply-to rewriting, redelivery headers). The header is re-encoded; the body is shared.
    pub fn derive(
        &self,
        id: u64,
        exchange: ShortString,
        routing_key: ShortString,
        properties: &AMQPProperties,
    ) -> Message {
        let header = match warren_protocol::encode::content_header_payload(
            warren_protocol::CLASS_BASIC,
            self.body.len() as u64,
            properties,
        ) {
            Ok(h) => h,
            Err(e) => {
                // Properties that decoded from a peer's frame always encode again. If not, the
                // copy keeps the original header and what was read from it, consistently.
                tracing::error!(error = %e, "re-encoding a content header failed; keeping the original");
                return self.rerouted(id, exchange, routing_key);
            }
        };
        Message::new(
            id,
            exchange,
            routing_key,
            properties,
            header,
            self.body.clone(),
            self.gauge.clone(),
        )
    }

    /// A copy under a new id, exchange and routing key with the same properties (shovelled or
    /// moved messages): header and body are shared.
    pub fn rerouted(&self, id: u64, exchange: ShortString, routing_key: ShortString) -> Message {
        self.copy_with(
            id,
            (exchange, routing_key),
            (self.header.clone(), self.body.clone()),
            now_ms(),
        )
    }

    /// This message's content under `id`, `address` (exchange, routing key) and `buffers`
    /// (header, body), counted in the gauge.
    fn copy_with(
        &self,
        id: u64,
        address: (ShortString, ShortString),
        buffers: (Bytes, Bytes),
        published_ms: u64,
    ) -> Message {
        let m = Message {
            id,
            exchange: address.0,
            routing_key: address.1,
            header: buffers.0,
            body: buffers.1,
            published_ms,
            gauge: self.gauge.clone(),
            expiry: self.expiry,
            priority: self.priority,
            persistent: self.persistent,
        };
        if let Some(g) = &m.gauge {
            g.0.fetch_add(m.weight(), Ordering::Relaxed);
        }
        m
    }

    /// A copy whose header and body own their memory. A published message's buffers are slices
    /// of its connection's read buffer and keep the whole buffer alive; a message held for long
    /// (delayed) is compacted so it pins only its own bytes.
    pub fn compacted(&self) -> Message {
        self.copy_with(
            self.id,
            (self.exchange.clone(), self.routing_key.clone()),
            (
                Bytes::copy_from_slice(&self.header),
                Bytes::copy_from_slice(&self.body),
            ),
            self.published_ms,
        )
    }

    /// The per-message TTL from the `expiration` property, as RabbitMQ reads it: a string of
    /// decimal digits (ms).
    pub fn expiration(&self) -> Result<Option<u64>, BadExpiration> {
        match self.expiry {
            Expiry::None => Ok(None),
            Expiry::Ms(ms) => Ok(Some(ms)),
            Expiry::Bad => Err(BadExpiration(
                self.properties()
                    .expiration()
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            )),
        }
    }

    /// The `priority` property (absent: 0).
    pub fn priority(&self) -> u8 {
        self.priority
    }

    pub fn to_row(&self) -> MessageRow {
        MessageRow {
            id: self.id as i64,
            persistent: self.is_persistent(),
            exchange: self.exchange.to_string(),
            routing_key: self.routing_key.to_string(),
            header: self.header.clone(),
            body: self.body.clone(),
            published_ms: self.published_ms as i64,
        }
    }

    /// delivery-mode 2.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Bytes this message holds in memory, for budgets: its buffers, the struct itself (with
    /// its `Arc`), and the entry or delivery record that points at it.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_kept_encoded_and_decoded_on_demand() {
        // The decoded form alone is several hundred bytes: it is not part of the struct.
        assert!(
            std::mem::size_of::<Message>() < std::mem::size_of::<AMQPProperties>(),
            "Message is {} bytes",
            std::mem::size_of::<Message>()
        );
        let mut headers = warren_protocol::FieldTable::default();
        headers.insert("k".into(), warren_protocol::AMQPValue::LongLongInt(7));
        let props = AMQPProperties::default()
            .with_delivery_mode(2)
            .with_priority(5)
            .with_expiration("1500".into())
            .with_correlation_id("c-1".into())
            .with_headers(headers);
        let m = Message::encoded(1, "x".into(), "k".into(), &props, Bytes::new(), None).unwrap();
        assert!(m.is_persistent());
        assert_eq!(m.priority(), 5);
        assert_eq!(m.expiration(), Ok(Some(1500)));
        assert_eq!(m.properties(), props);
        let plain = Message::encoded(
            2,
            "x".into(),
            "k".into(),
            &AMQPProperties::default(),
            Bytes::new(),
            None,
        )
        .unwrap();
        assert!(!plain.is_persistent());
        assert_eq!(plain.priority(), 0);
        assert_eq!(plain.expiration(), Ok(None));
        // One RabbitMQ refuses (possible only in rows stored before the check) reads as bad.
        let bad = AMQPProperties::default().with_expiration("10x".into());
        let m = Message::encoded(3, "x".into(), "k".into(), &bad, Bytes::new(), None).unwrap();
        assert_eq!(m.expiration(), Err(BadExpiration("10x".into())));
    }

    #[test]
    fn expiration_is_read_as_rabbitmq_reads_it() {
        assert_eq!(expiration_problem("1000"), None);
        assert_eq!(expiration_problem("0"), None);
        assert_eq!(expiration_problem("abc").as_deref(), Some("no_integer"));
        assert_eq!(expiration_problem("").as_deref(), Some("no_integer"));
        assert_eq!(
            expiration_problem("-1").as_deref(),
            Some("{value_negative,-1}")
        );
        assert_eq!(
            expiration_problem("10x").as_deref(),
            Some("{leftover_string,\"x\"}")
        );
    }
}
