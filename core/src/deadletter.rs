//! Dead-lettering as RabbitMQ does it: the message a queue dead-letters (its `x-death` history,
//! the `x-first-death-*` headers, `expiration` moved into the history), the routing keys it is
//! republished with, and the cycle rule that drops a message going round without a rejection.

use warren_protocol::{AMQPValue, FieldArray, FieldTable, LongString};

use crate::message::Message;

/// Why a message was dead-lettered (`reason` in `x-death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rejected,
    Expired,
    MaxLen,
    DeliveryLimit,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn text(v: Option<&AMQPValue>) -> Option<String> {
    match v? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The message `queue` dead-letters to `dlx` with routing key `routing_key`, under a new `id`.
pub fn dead_lettered(
    msg: &Message,
    id: u64,
    queue: &str,
    reason: Reason,
    dlx: &str,
    routing_key: &str,
    now_secs: u64,
) -> Option<Message> {
    let mut props = msg.properties();
    let mut headers: FieldTable = props.headers().clone().unwrap_or_default();
    let mut entry = FieldTable::default();
    entry.insert("count".into(), AMQPValue::LongLongInt(1));
    entry.insert("reason".into(), long_str(reason.as_str()));
    entry.insert("queue".into(), long_str(queue));
    entry.insert("time".into(), AMQPValue::Timestamp(now_secs));
    entry.insert("exchange".into(), long_str(msg.exchange.as_str()));
    let mut keys = FieldArray::default();
    keys.push(long_str(msg.routing_key.as_str()));
    entry.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
    if let Some(e) = props.expiration().clone() {
        entry.insert("original-expiration".into(), long_str(e.as_str()));
        props = crate::message::without_expiration(&props);
    }
    let old: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    // One entry per (queue, reason): an earlier one keeps its first details, counts one more
    // and moves to the front.
    let mut deaths = FieldArray::default();
    let mut rest = Vec::with_capacity(old.len());
    let mut found: Option<FieldTable> = None;
    for d in old {
        match &d {
            AMQPValue::FieldTable(t)
                if found.is_none()
                    && text(t.inner().get("queue")).as_deref() == Some(queue)
                    && text(t.inner().get("reason")).as_deref() == Some(reason.as_str()) =>
            {
                let mut t = t.clone();
                let n = match t.inner().get("count") {
                    Some(v) => crate::args::as_int(v).unwrap_or(0),
                    None => 0,
                };
                t.insert("count".into(), AMQPValue::LongLongInt(n + 1));
                found = Some(t);
            }
            _ => rest.push(d),
        }
    }
    deaths.push(AMQPValue::FieldTable(found.unwrap_or(entry)));
    for d in rest {
        deaths.push(d);
    }
    headers.insert("x-death".into(), AMQPValue::FieldArray(deaths));
    for (key, value) in [
        ("x-first-death-reason", reason.as_str()),
        ("x-first-death-queue", queue),
        ("x-first-death-exchange", msg.exchange.as_str()),
    ] {
        if !headers.inner().contains_key(key) {
            headers.insert(key.into(), long_str(value));
        }
    }
    props = props.with_headers(headers);
    let dlx = warren_protocol::short::checked(dlx)?;
    let routing_key = warren_protocol::short::checked(routing_key)?;
    Some(msg.derive(id, dlx, routing_key, &props))
}

/// A message's `x-death` history, newest first (None: never dead-lettered).
fn deaths(msg: &Message) -> Option<FieldArray> {
    match msg
        .properties()
        .headers()
        .as_ref()?
        .inner()
        .get("x-death")?
    {
        AMQPValue::FieldArray(a) => Some(a.clone()),
        _ => None,
    }
}

/// Where a dead-lettered message last died: the queue, and the exchange and first routing
/// key it was published with there (the newest `x-death` entry). None for a message that was
/// never dead-lettered.
pub fn origin(msg: &Message) -> Option<(String, String, String)> {
    let deaths = deaths(msg)?;
    let AMQPValue::FieldTable(t) = deaths.as_slice().first()? else {
        return None;
    };
    let t = t.inner();
    let queue = text(t.get("queue"))?;
    let exchange = text(t.get("exchange")).unwrap_or_default();
    let key = match t.get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(|k| text(Some(k))),
        _ => None,
    }
    .unwrap_or_else(|| queue.clone());
    Some((queue, exchange, key))
}

/// RabbitMQ's cycle rule: delivering `msg` (already carrying its newest death) to `queue` is a
/// cycle to drop when `queue` is in its `x-death` history and no death from the newest one back
/// to that queue's was a rejection.
pub fn is_cycle(msg: &Message, queue: &str) -> bool {
    let Some(deaths) = deaths(msg) else {
        return false;
    };
    for d in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = d else {
            return false;
        };
        if text(t.inner().get("reason")).as_deref() == Some(Reason::Rejected.as_str()) {
            return false;
        }
        if text(t.inner().get("queue")).as_deref() == Some(queue) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use warren_protocol::AMQPProperties;

    fn msg(props: AMQPProperties) -> Message {
        Message::encoded(
            1,
            "ex".into(),
            "rk".into(),
            &props,
            Bytes::from_static(b"body"),
            None,
        )
        .unwrap()
    }

    fn deaths(m: &Message) -> Vec<FieldTable> {
        match m
            .properties()
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-death")
        {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .map(|v| match v {
                    AMQPValue::FieldTable(t) => t.clone(),
                    _ => panic!("not a table"),
                })
                .collect(),
            _ => panic!("no x-death"),
        }
    }

    #[test]
    fn x_death_entries_count_per_queue_and_reason_newest_first() {
        let m0 = msg(AMQPProperties::default().with_expiration("500".into()));
        let m1 = dead_lettered(&m0, 2, "q1", Reason::Expired, "dlx", "rk", 100).unwrap();
        assert!(m1.properties().expiration().is_none());
        let d = deaths(&m1);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(
            d[0].inner().get("original-expiration"),
            Some(&long_str("500"))
        );
        assert_eq!(d[0].inner().get("time"), Some(&AMQPValue::Timestamp(100)));
        assert_eq!(m1.exchange.as_str(), "dlx");
        let m2 = dead_lettered(&m1, 3, "q2", Reason::Rejected, "dlx2", "rk", 200).unwrap();
        let m3 = dead_lettered(&m2, 4, "q1", Reason::Expired, "dlx", "rk", 300).unwrap();
        let d = deaths(&m3);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].inner().get("queue"), Some(&long_str("q1")));
        assert_eq!(d[0].inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(
            d[0].inner().get("time"),
            Some(&AMQPValue::Timestamp(100)),
            "an existing entry keeps its first time"
        );
        assert_eq!(d[1].inner().get("queue"), Some(&long_str("q2")));
        let h = m3.properties().headers().clone().unwrap();
        assert_eq!(h.inner().get("x-first-death-queue"), Some(&long_str("q1")));
        assert_eq!(
            h.inner().get("x-first-death-reason"),
            Some(&long_str("expired"))
        );
        assert_eq!(
            h.inner().get("x-first-death-exchange"),
            Some(&long_str("ex"))
        );
    }

    #[test]
    fn cycles_without_a_rejection_are_detected() {
        let m0 = msg(AMQPProperties::default());
        let m1 = dead_lettered(&m0, 2, "a", Reason::Expired, "", "a", 1).unwrap();
        assert!(is_cycle(&m1, "a"));
        assert!(!is_cycle(&m1, "b"));
        let r = dead_lettered(&m0, 2, "a", Reason::Rejected, "", "a", 1).unwrap();
        assert!(!is_cycle(&r, "a"));
        // a rejected in b, then expired in a: going back to b passes a rejection
        let m2 = dead_lettered(&r, 3, "b", Reason::Expired, "", "a", 1).unwrap();
        assert!(!is_cycle(&m2, "a"));
        assert!(is_cycle(&m2, "b"));
    }
}
