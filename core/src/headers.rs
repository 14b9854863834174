//! Headers-exchange matching: `x-match` of `all` (the default), `any`, `all-with-x` or
//! `any-with-x`, compared against the message's headers table.

use warren_protocol::{AMQPValue, FieldTable};

use crate::error::{AmqpError, AmqpResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

/// Reads and validates a binding's `x-match`.
pub fn x_match(args: &FieldTable) -> AmqpResult<XMatch> {
    match args.inner().get("x-match") {
        None => Ok(XMatch::All),
        Some(v) => {
            let s = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                _ => String::new(),
            };
            match s.as_str() {
                "all" => Ok(XMatch::All),
                "any" => Ok(XMatch::Any),
                "all-with-x" => Ok(XMatch::AllWithX),
                "any-with-x" => Ok(XMatch::AnyWithX),
                _ => Err(AmqpError::precondition(format!(
                    "Invalid x-match field value {v:?}; expected all, any, all-with-x, or any-with-x"
                ))),
            }
        }
    }
}

/// Does a message with `headers` match a binding with `args`?
pub fn matches(mode: XMatch, args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
    let all = matches!(mode, XMatch::All | XMatch::AllWithX);
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty);

    for (k, want) in args.inner() {
        if k.as_str() == "x-match" || (!with_x && k.as_str().starts_with("x-")) {
            continue;
        }

        let hit = match headers.inner().get(k.as_str()) {
            None => false,
            // A void binding value matches on presence alone.
            Some(_) if matches!(want, AMQPValue::Void) => true,
            Some(have) => values_equal(have, want),
        };
        if all && !hit {
            return false;
        }
        if !all && hit {
            return true;
        }
    }
    // all: every key matched (vacuously true); any: none matched.
    all
}

/// Equality that treats string kinds alike and integers by value, as RabbitMQ compares table
/// values loosely across their wire encodings.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    fn as_str(v: &AMQPValue) -> Option<&[u8]> {
        match v {
            AMQPValue::LongString(s) => Some(s.as_bytes()),
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
            _ => None,
        }
    }
    fn as_int(v: &AMQPValue) -> Option<i128> {
        Some(match v {
            AMQPValue::ShortShortInt(x) => *x as i128,
            AMQPValue::ShortShortUInt(x) => *x as i128,
            AMQPValue::ShortInt(x) => *x as i128,
            AMQPValue::ShortUInt(x) => *x as i128,
            AMQPValue::LongInt(x) => *x as i128,
            AMQPValue::LongUInt(x) => *x as i128,
            AMQPValue::LongLongInt(x) => *x as i128,
            AMQPValue::Timestamp(x) => *x as i128,
            _ => return None,
        })
    }
    if let (Some(x), Some(y)) = (as_str(a), as_str(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (as_int(a), as_int(b)) {
        return x == y;
    }
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_protocol::LongString;

    fn table(kv: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in kv {
            t.insert((*k).into(), v.clone());
        }
        t
    }
    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn all_and_any() {
        let args = table(&[("format", s("pdf")), ("type", s("report"))]);
        let both = table(&[
            ("format", s("pdf")),
            ("type", s("report")),
            ("extra", s("1")),
        ]);
        let one = table(&[("format", AMQPValue::ShortString("pdf".into()))]);
        assert!(matches(XMatch::All, &args, Some(&both)));
        assert!(!matches(XMatch::All, &args, Some(&one)));
        assert!(matches(XMatch::Any, &args, Some(&one)));
        assert!(!matches(XMatch::Any, &args, None));
        assert!(!matches(
            XMatch::Any,
            &args,
            Some(&table(&[("format", s("zip"))]))
        ));
    }

    #[test]
    fn x_keys_only_with_x_modes() {
        let args = table(&[("x-match", s("all-with-x")), ("x-tag", s("a"))]);
        assert!(!matches(XMatch::AllWithX, &args, Some(&table(&[]))));
        assert!(matches(
            XMatch::AllWithX,
            &args,
            Some(&table(&[("x-tag", s("a"))]))
        ));
        let args = table(&[("x-match", s("all")), ("x-tag", s("a"))]);
        assert!(matches(XMatch::All, &args, Some(&table(&[]))));
        assert_eq!(x_match(&args).unwrap(), XMatch::All);
        assert!(x_match(&table(&[("x-match", s("some"))])).is_err());
    }

    #[test]
    fn integers_compare_by_value_and_void_is_presence() {
        let args = table(&[("n", AMQPValue::LongInt(5)), ("p", AMQPValue::Void)]);
        let h = table(&[("n", AMQPValue::LongLongInt(5)), ("p", s("anything"))]);
        assert!(matches(XMatch::All, &args, Some(&h)));
    }
}
