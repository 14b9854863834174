//! Declare-argument checks with RabbitMQ's reply texts: the `x-` arguments a queue accepts and
//! their types, and the equivalence check on redeclare.

use warren_protocol::{AMQPValue, FieldTable};

use crate::error::{AmqpError, AmqpResult};

/// RabbitMQ's name for a field-table value's type, as its reply texts print it.
pub fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// The value as RabbitMQ prints it in an inequivalence message.
pub fn render(v: &AMQPValue) -> String {
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        other => match as_int(other) {
            Some(n) => n.to_string(),
            None => format!("{other:?}"),
        },
    }
}

/// An integer of any of the integer kinds RabbitMQ accepts in arguments.
pub fn as_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => *x as i64,
        AMQPValue::ShortShortUInt(x) => *x as i64,
        AMQPValue::ShortInt(x) => *x as i64,
        AMQPValue::ShortUInt(x) => *x as i64,
        AMQPValue::LongInt(x) => *x as i64,
        AMQPValue::LongUInt(x) => *x as i64,
        AMQPValue::LongLongInt(x) => *x,
        _ => return None,
    })
}

pub fn as_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

enum Rule {
    /// An integer >= 0, at most the given bound (if any).
    NonNegInt(Option<i64>),
    /// An integer > 0, at most the bound.
    PosInt(i64),
    Priority,
    Str,
    /// A string that must fit an AMQP short string (it becomes an exchange name or a key).
    ShortStr,
    StrOneOf(&'static [&'static str], &'static str),
    Bool,
}

/// RabbitMQ's largest TTL / expiry (ten years in milliseconds).
const MAX_EXPIRY_MS: i64 = 315_360_000_000;

/// The queue arguments RabbitMQ validates at declare and compares on redeclare, in its order.
const QUEUE_ARGS: &[(&str, Rule)] = &[
    ("x-expires", Rule::PosInt(MAX_EXPIRY_MS)),
    ("x-message-ttl", Rule::NonNegInt(Some(MAX_EXPIRY_MS))),
    ("x-dead-letter-exchange", Rule::ShortStr),
    ("x-dead-letter-routing-key", Rule::ShortStr),
    ("x-max-length", Rule::NonNegInt(None)),
    ("x-max-length-bytes", Rule::NonNegInt(None)),
    ("x-max-priority", Rule::Priority),
    (
        "x-overflow",
        Rule::StrOneOf(
            &["drop-head", "reject-publish", "reject-publish-dlx"],
            "overflow",
        ),
    ),
    ("x-queue-mode", Rule::StrOneOf(&["default", "lazy"], "mode")),
    ("x-queue-version", Rule::NonNegInt(None)),
    ("x-single-active-consumer", Rule::Bool),
    (
        "x-queue-type",
        Rule::StrOneOf(&["classic", "quorum", "stream"], "type"),
    ),
    ("x-queue-master-locator", Rule::Str),
    ("x-delivery-limit", Rule::NonNegInt(None)),
    ("x-consumer-timeout", Rule::NonNegInt(None)),
];

/// Checks a new queue's arguments (406 with RabbitMQ's text on the first bad one). Keys Warren
/// does not know (`x-foo`) are kept and never checked, as RabbitMQ does.
pub fn validate_queue_args(queue: &str, vhost: &str, args: &FieldTable) -> AmqpResult<()> {
    let rs = format!("queue '{queue}' in vhost '{vhost}'");
    if let Some(v) = args.inner().get("x-dead-letter-exchange") {
        if !matches!(v, AMQPValue::LongString(_)) {
            return Err(AmqpError::precondition(format!(
                "invalid type '{}' for arg 'x-dead-letter-exchange' in {rs}",
                type_name(v)
            )));
        }
    }
    for (key, rule) in QUEUE_ARGS {
        let Some(v) = args.inner().get(*key) else {
            continue;
        };
        let problem = match rule {
            Rule::NonNegInt(_) | Rule::PosInt(_) | Rule::Priority if as_int(v).is_none() => {
                Some(format!("\"expected integer, got {}\"", type_name(v)))
            }
            Rule::NonNegInt(max) => {
                let n = as_int(v).unwrap_or(0);
                if n < 0 {
                    Some(format!("{{value_negative,{n}}}"))
                } else if max.is_some_and(|m| n > m) {
                    Some(format!("{{value_too_large,{n}}}"))
                } else {
                    None
                }
            }
            Rule::PosInt(max) => match as_int(v).unwrap_or(0) {
                n if n < 0 => Some(format!("{{value_negative,{n}}}")),
                0 => Some("{value_zero,0}".to_string()),
                n if n > *max => Some(format!("{{value_too_large,{n}}}")),
                _ => None,
            },
            Rule::Priority => match as_int(v).unwrap_or(0) {
                n if n < 0 => Some(format!("{{value_negative,{n}}}")),
                n if n > 255 => Some(format!("{{max_value_exceeded,{n}}}")),
                _ => None,
            },
            Rule::Str => match v {
                AMQPValue::LongString(_) => None,
                _ => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
            },
            Rule::ShortStr => match v {
                AMQPValue::LongString(s) if s.as_bytes().len() > 255 => {
                    Some(format!("{{value_too_long,{}}}", s.as_bytes().len()))
                }
                AMQPValue::LongString(_) => None,
                _ => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
            },
            Rule::StrOneOf(allowed, what) => match v {
                AMQPValue::LongString(_) => {
                    let s = as_str(v).unwrap_or_default();
                    if allowed.contains(&s.as_str()) {
                        None
                    } else if *what == "overflow" {
                        Some("invalid_overflow".to_string())
                    } else {
                        Some(format!("\"unsupported queue {what} '{s}'\""))
                    }
                }
                _ => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
            },
            Rule::Bool => match v {
                AMQPValue::Boolean(_) => None,
                _ => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
            },
        };
        if let Some(p) = problem {
            return Err(AmqpError::precondition(format!(
                "invalid arg '{key}' for {rs}: {p}"
            )));
        }
    }
    if args.inner().contains_key("x-dead-letter-routing-key")
        && !args.inner().contains_key("x-dead-letter-exchange")
    {
        return Err(AmqpError::precondition(format!(
            "invalid arg 'x-dead-letter-routing-key' for {rs}: routing_key_but_no_dlx_defined"
        )));
    }
    if args.inner().get("x-queue-type").and_then(as_str).as_deref() == Some("stream") {
        return Err(AmqpError::precondition(format!(
            "invalid arg 'x-queue-type' for {rs}: \"unsupported queue type 'stream'\" (streams are not supported by Warren yet)"
        )));
    }
    Ok(())
}

/// On redeclare, the equivalence keys must match (406 naming the first that differs).
pub fn check_queue_args_equivalent(
    queue: &str,
    vhost: &str,
    current: &FieldTable,
    received: &FieldTable,
) -> AmqpResult<()> {
    let keys: Vec<&str> = QUEUE_ARGS.iter().map(|(k, _)| *k).collect();
    check_equivalent(
        &format!("queue '{queue}' in vhost '{vhost}'"),
        &keys,
        current,
        received,
    )
}

/// Numeric types compare by value across widths, as RabbitMQ's type classes do.
fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => x == y,
        _ => type_name(a) == type_name(b) && render(a) == render(b),
    }
}

/// Compares `keys` of two argument tables; `rs` names the resource (`queue 'q' in vhost '/'`).
pub fn check_equivalent(
    rs: &str,
    keys: &[&str],
    current: &FieldTable,
    received: &FieldTable,
) -> AmqpResult<()> {
    for key in keys {
        let mut cur = current.inner().get(*key).cloned();
        let mut new = received.inner().get(*key).cloned();
        if *key == "x-queue-type" {
            // An absent type is the default, classic.
            let classic = || Some(AMQPValue::LongString("classic".into()));
            cur = cur.or_else(classic);
            new = new.or_else(classic);
        }
        let (received_txt, current_txt) = match (&new, &cur) {
            (None, None) => continue,
            (Some(a), Some(b)) if same_value(a, b) => continue,
            (Some(a), Some(b)) => (format!("'{}'", render(a)), format!("'{}'", render(b))),
            (a, b) => {
                let show = |v: &Option<AMQPValue>| match v {
                    None => "none".to_string(),
                    Some(v) => format!("the value '{}' of type '{}'", render(v), type_name(v)),
                };
                (show(a), show(b))
            }
        };
        return Err(AmqpError::precondition(format!(
            "inequivalent arg '{key}' for {rs}: received {received_txt} but current is {current_txt}"
        )));
    }
    Ok(())
}

/// What a queue does when it is full (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// A queue's `x-` arguments, decoded once at declare (they were validated there, so anything
/// unreadable here is treated as absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArgs {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    /// 0: not a priority queue.
    pub max_priority: u8,
    pub single_active_consumer: bool,
    pub delivery_limit: Option<u64>,
    pub consumer_timeout: Option<u64>,
    pub quorum: bool,
}

impl QueueArgs {
    pub fn parse(args: &FieldTable) -> QueueArgs {
        let t = args.inner();
        let int = |k: &str| {
            t.get(k)
                .and_then(as_int)
                .and_then(|n| u64::try_from(n).ok())
        };
        let string = |k: &str| t.get(k).and_then(as_str);
        QueueArgs {
            message_ttl: int("x-message-ttl"),
            expires: int("x-expires"),
            max_length: int("x-max-length"),
            max_length_bytes: int("x-max-length-bytes"),
            overflow: match string("x-overflow").as_deref() {
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => Overflow::DropHead,
            },
            dead_letter_exchange: string("x-dead-letter-exchange"),
            dead_letter_routing_key: string("x-dead-letter-routing-key"),
            max_priority: int("x-max-priority").unwrap_or(0).min(255) as u8,
            single_active_consumer: matches!(
                t.get("x-single-active-consumer"),
                Some(AMQPValue::Boolean(true))
            ),
            delivery_limit: int("x-delivery-limit"),
            consumer_timeout: int("x-consumer-timeout"),
            quorum: string("x-queue-type").as_deref() == Some("quorum"),
        }
    }

    /// A length limit is set.
    pub fn bounded(&self) -> bool {
        self.max_length.is_some() || self.max_length_bytes.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_protocol::LongString;

    fn t(kv: &[(&str, AMQPValue)]) -> FieldTable {
        let mut f = FieldTable::default();
        for (k, v) in kv {
            f.insert((*k).into(), v.clone());
        }
        f
    }

    #[test]
    fn validation_texts() {
        let e = validate_queue_args(
            "q",
            "/",
            &t(&[(
                "x-message-ttl",
                AMQPValue::LongString(LongString::from("1")),
            )]),
        )
        .unwrap_err();
        assert_eq!(e.text, "invalid arg 'x-message-ttl' for queue 'q' in vhost '/': \"expected integer, got longstr\"");
        let e =
            validate_queue_args("q", "/", &t(&[("x-expires", AMQPValue::LongInt(0))])).unwrap_err();
        assert!(e.text.ends_with("{value_zero,0}"));
        let e = validate_queue_args("q", "/", &t(&[("x-max-priority", AMQPValue::LongInt(300))]))
            .unwrap_err();
        assert!(e.text.ends_with("{max_value_exceeded,300}"));
        let e = validate_queue_args(
            "q",
            "/",
            &t(&[(
                "x-overflow",
                AMQPValue::LongString(LongString::from("nope")),
            )]),
        )
        .unwrap_err();
        assert!(e.text.ends_with(": invalid_overflow"));
        let e = validate_queue_args(
            "q",
            "/",
            &t(&[("x-dead-letter-exchange", AMQPValue::LongLongInt(1))]),
        )
        .unwrap_err();
        assert_eq!(
            e.text,
            "invalid type 'long' for arg 'x-dead-letter-exchange' in queue 'q' in vhost '/'"
        );
        assert!(validate_queue_args(
            "q",
            "/",
            &t(&[
                ("x-message-ttl", AMQPValue::ShortShortUInt(5)),
                ("x-custom", AMQPValue::Void)
            ])
        )
        .is_ok());
    }

    #[test]
    fn equivalence() {
        let a = t(&[("x-message-ttl", AMQPValue::LongInt(100))]);
        let b = t(&[("x-message-ttl", AMQPValue::LongLongInt(100))]);
        assert!(check_queue_args_equivalent("q", "/", &a, &b).is_ok());
        let e = check_queue_args_equivalent("q", "/", &FieldTable::default(), &a).unwrap_err();
        assert_eq!(
            e.text,
            "inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received the value '100' of type 'signedint' but current is none"
        );
        let c = t(&[("x-message-ttl", AMQPValue::LongInt(200))]);
        let e = check_queue_args_equivalent("q", "/", &a, &c).unwrap_err();
        assert!(e.text.ends_with("received '200' but current is '100'"));
        let q = t(&[(
            "x-queue-type",
            AMQPValue::LongString(LongString::from("classic")),
        )]);
        assert!(check_queue_args_equivalent("q", "/", &FieldTable::default(), &q).is_ok());
        assert!(check_queue_args_equivalent("q", "/", &q, &FieldTable::default()).is_ok());
    }
}
