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
    NonNegInt,
    PosInt,
    Priority,
    Str,
    StrOneOf(&'static [&'static str], &'static str),
    Bool,
}

/// The queue arguments RabbitMQ validates at declare, and the equivalence keys on redeclare.
const QUEUE_ARGS: &[(&str, Rule)] = &[
    ("x-message-ttl", Rule::NonNegInt),
    ("x-expires", Rule::PosInt),
    ("x-max-length", Rule::NonNegInt),
    ("x-max-length-bytes", Rule::NonNegInt),
    ("x-max-priority", Rule::Priority),
    ("x-dead-letter-exchange", Rule::Str),
    ("x-dead-letter-routing-key", Rule::Str),
    ("x-overflow", Rule::StrOneOf(&["drop-head", "reject-publish", "reject-publish-dlx"], "unknown_overflow_type")),
    ("x-queue-mode", Rule::StrOneOf(&["default", "lazy"], "unsupported_queue_mode")),
    ("x-queue-type", Rule::StrOneOf(&["classic", "quorum", "stream"], "unsupported_queue_type")),
    ("x-single-active-consumer", Rule::Bool),
    ("x-delivery-limit", Rule::NonNegInt),
    ("x-consumer-timeout", Rule::NonNegInt),
    ("x-queue-master-locator", Rule::Str),
    ("x-queue-leader-locator", Rule::Str),
];

/// Checks a queue.declare's arguments (406 with RabbitMQ's text on the first bad one).
pub fn validate_queue_args(queue: &str, vhost: &str, args: &FieldTable) -> AmqpResult<()> {
    for (key, rule) in QUEUE_ARGS {
        let Some(v) = args.inner().get(*key) else { continue };
        let problem = match rule {
            Rule::NonNegInt | Rule::PosInt | Rule::Priority => match as_int(v) {
                None => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
                Some(n) if n < 0 => Some(format!("{{value_negative,{n}}}")),
                Some(0) if matches!(rule, Rule::PosInt) => Some("{value_zero,0}".to_string()),
                Some(n) if matches!(rule, Rule::Priority) && n > 255 => Some(format!("{{value_too_large,{n},255}}")),
                Some(_) => None,
            },
            Rule::Str => match v {
                AMQPValue::LongString(_) | AMQPValue::ShortString(_) => None,
                _ => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
            },
            Rule::StrOneOf(allowed, err) => match as_str(v) {
                None => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
                Some(s) if !allowed.contains(&s.as_str()) => Some(format!("{{{err},<<\"{s}\">>}}")),
                Some(_) => None,
            },
            Rule::Bool => match v {
                AMQPValue::Boolean(_) => None,
                _ => Some(format!("{{unacceptable_type,{}}}", type_name(v))),
            },
        };
        if let Some(p) = problem {
            return Err(AmqpError::precondition(format!(
                "invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': {p}"
            )));
        }
    }
    if args.inner().contains_key("x-dead-letter-routing-key") && !args.inner().contains_key("x-dead-letter-exchange") {
        return Err(AmqpError::precondition(format!(
            "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': {{routing_key_but_no_dlx_defined}}"
        )));
    }
    if let Some(t) = args.inner().get("x-queue-type").and_then(as_str) {
        if t == "stream" {
            return Err(AmqpError::precondition(format!(
                "invalid arg 'x-queue-type' for queue '{queue}' in vhost '{vhost}': stream queues are not supported by Warren yet"
            )));
        }
    }
    Ok(())
}

/// On redeclare, the equivalence keys must match (406 naming the first that differs).
pub fn check_queue_args_equivalent(queue: &str, vhost: &str, current: &FieldTable, received: &FieldTable) -> AmqpResult<()> {
    for (key, _) in QUEUE_ARGS {
        if *key == "x-queue-type" || *key == "x-queue-mode" {
            // RabbitMQ treats an absent type as the default and does not compare modes.
            let cur = current.inner().get(*key).and_then(as_str);
            let new = received.inner().get(*key).and_then(as_str);
            let def = if *key == "x-queue-type" { Some("classic".to_string()) } else { cur.clone() };
            if new.is_some() && new.clone().or(def.clone()) != cur.clone().or(def) {
                return Err(inequivalent(key, queue, vhost, received.inner().get(*key), current.inner().get(*key)));
            }
            continue;
        }
        let cur = current.inner().get(*key);
        let new = received.inner().get(*key);
        let same = match (cur, new) {
            (None, None) => true,
            (Some(a), Some(b)) => match (as_int(a), as_int(b)) {
                (Some(x), Some(y)) => x == y,
                _ => render(a) == render(b) && type_name(a) == type_name(b),
            },
            _ => false,
        };
        if !same {
            return Err(inequivalent(key, queue, vhost, new, cur));
        }
    }
    Ok(())
}

fn inequivalent(key: &str, queue: &str, vhost: &str, received: Option<&AMQPValue>, current: Option<&AMQPValue>) -> AmqpError {
    let show = |v: Option<&AMQPValue>| match v {
        None => "none".to_string(),
        Some(v) => format!("the value '{}' of type '{}'", render(v), type_name(v)),
    };
    AmqpError::precondition(format!(
        "inequivalent arg '{key}' for queue '{queue}' in vhost '{vhost}': received {} but current is {}",
        show(received),
        show(current)
    ))
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
        let e = validate_queue_args("q", "/", &t(&[("x-message-ttl", AMQPValue::LongString(LongString::from("1")))])).unwrap_err();
        assert_eq!(e.text, "invalid arg 'x-message-ttl' for queue 'q' in vhost '/': {unacceptable_type,longstr}");
        let e = validate_queue_args("q", "/", &t(&[("x-expires", AMQPValue::LongInt(0))])).unwrap_err();
        assert!(e.text.ends_with("{value_zero,0}"));
        let e = validate_queue_args("q", "/", &t(&[("x-max-priority", AMQPValue::LongInt(300))])).unwrap_err();
        assert!(e.text.ends_with("{value_too_large,300,255}"));
        let e = validate_queue_args("q", "/", &t(&[("x-overflow", AMQPValue::LongString(LongString::from("nope")))])).unwrap_err();
        assert!(e.text.ends_with("{unknown_overflow_type,<<\"nope\">>}"));
        assert!(validate_queue_args("q", "/", &t(&[("x-message-ttl", AMQPValue::ShortShortUInt(5)), ("x-custom", AMQPValue::Void)])).is_ok());
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
        let q = t(&[("x-queue-type", AMQPValue::LongString(LongString::from("classic")))]);
        assert!(check_queue_args_equivalent("q", "/", &FieldTable::default(), &q).is_ok());
        assert!(check_queue_args_equivalent("q", "/", &q, &FieldTable::default()).is_ok());
    }
}
