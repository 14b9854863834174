//! Policies and operator policies (RabbitMQ's): a pattern on names, what they apply to, a
//! priority and a definition. Per queue or exchange, the matching policy of the highest
//! priority applies, and so does the matching operator policy of the highest priority. Their
//! definitions merge with the object's own `x-` arguments by RabbitMQ's rules: for numeric
//! limits the lowest value wins; for everything else (dead-lettering, overflow, queue mode,
//! alternate exchange) the object's argument wins, then the policy, then the operator policy.
//! The result is an argument table the queue parses as if declared with it.

use serde_json::{Map, Value};
use warren_protocol::{AMQPValue, FieldTable, LongString};

/// What a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    Queues,
    Exchanges,
    All,
}

impl ApplyTo {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::All => "all",
        }
    }
}

/// A parsed policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub pattern: String,
    re: regex::Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: Map<String, Value>,
}

/// Definition keys and how each merges: (key, the queue argument it stands for, numeric).
const QUEUE_KEYS: &[(&str, &str, bool)] = &[
    ("message-ttl", "x-message-ttl", true),
    ("expires", "x-expires", true),
    ("max-length", "x-max-length", true),
    ("max-length-bytes", "x-max-length-bytes", true),
    ("delivery-limit", "x-delivery-limit", true),
    ("consumer-timeout", "x-consumer-timeout", true),
    ("overflow", "x-overflow", false),
    ("dead-letter-exchange", "x-dead-letter-exchange", false),
    (
        "dead-letter-routing-key",
        "x-dead-letter-routing-key",
        false,
    ),
    ("queue-mode", "x-queue-mode", false),
];

const EXCHANGE_KEYS: &[&str] = &["alternate-exchange"];

/// Keys an operator policy may set (RabbitMQ allows only limits there).
const OPERATOR_KEYS: &[&str] = &[
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "delivery-limit",
    "consumer-timeout",
];

fn check_value(key: &str, v: &Value) -> Result<(), String> {
    let numeric = QUEUE_KEYS.iter().any(|(k, _, n)| *k == key && *n);
    if numeric {
        let min = if key == "expires" { 1 } else { 0 };
        return match v.as_i64() {
            Some(n) if n >= min => Ok(()),
            _ => Err(format!(
                "{key} must be an integer of at least {min}, not {v}"
            )),
        };
    }
    match (key, v.as_str()) {
        ("overflow", Some("drop-head" | "reject-publish" | "reject-publish-dlx")) => Ok(()),
        ("overflow", _) => Err(format!(
            "overflow must be drop-head, reject-publish or reject-publish-dlx, not {v}"
        )),
        ("queue-mode", Some("default" | "lazy")) => Ok(()),
        ("queue-mode", _) => Err(format!("queue-mode must be default or lazy, not {v}")),
        (_, Some(s)) if s.len() <= 255 => Ok(()),
        _ => Err(format!(
            "{key} must be a string of at most 255 bytes, not {v}"
        )),
    }
}

impl Policy {
    /// Parses a policy's JSON value (`pattern`, `definition`, `priority`, `apply-to`) with
    /// RabbitMQ's checks; the error text is what the API answers with 400.
    pub fn parse(name: &str, value: &Value, operator: bool) -> Result<Policy, String> {
        let Some(m) = value.as_object() else {
            return Err("a policy is a JSON object".into());
        };
        let Some(pattern) = m.get("pattern").and_then(Value::as_str) else {
            return Err("Validation failed\n\npattern is mandatory\n".into());
        };
        let re = regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                format!("Validation failed\n\n{pattern} is not a valid regular expression: {e}\n")
            })?;
        let apply_to = match m.get("apply-to").and_then(Value::as_str).unwrap_or("all") {
            "queues" | "classic_queues" | "quorum_queues" => ApplyTo::Queues,
            "exchanges" => ApplyTo::Exchanges,
            "all" => ApplyTo::All,
            other => {
                return Err(format!(
                    "Validation failed\n\n\"{other}\" is not a valid apply-to value (queues, exchanges or all)\n"
                ))
            }
        };
        let priority = match m.get("priority") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| {
                    format!("Validation failed\n\npriority must be an integer, not {v}\n")
                })?,
        };
        let Some(definition) = m.get("definition").and_then(Value::as_object) else {
            return Err("Validation failed\n\ndefinition must be an object\n".into());
        };
        if definition.is_empty() {
            return Err("Validation failed\n\ndefinition must not be empty\n".into());
        }
        let mut unknown = Vec::new();
        for (k, v) in definition {
            let known = if operator {
                OPERATOR_KEYS.contains(&k.as_str())
            } else {
                QUEUE_KEYS.iter().any(|(q, _, _)| q == k) || EXCHANGE_KEYS.contains(&k.as_str())
            };
            if !known {
                unknown.push(format!("{{<<\"{k}\">>,{v}}}"));
                continue;
            }
            check_value(k, v).map_err(|e| format!("Validation failed\n\n{e}\n"))?;
        }
        if !unknown.is_empty() {
            return Err(format!(
                "Validation failed\n\n[{}] are not recognised policy settings\n",
                unknown.join(",")
            ));
        }
        Ok(Policy {
            name: name.to_string(),
            pattern: pattern.to_string(),
            re,
            apply_to,
            priority,
            definition: definition.clone(),
        })
    }

    /// The policy as the API shows it (without `vhost` and `name`).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "pattern": self.pattern,
            "apply-to": self.apply_to.as_str(),
            "definition": self.definition,
            "priority": self.priority,
        })
    }

    fn applies(&self, name: &str, queue: bool) -> bool {
        let kind = match self.apply_to {
            ApplyTo::All => true,
            ApplyTo::Queues => queue,
            ApplyTo::Exchanges => !queue,
        };
        kind && self.re.is_match(name)
    }
}

/// The policy that applies to a queue (`queue`) or exchange named `name`: the matching one of
/// the highest priority, ties going to the first by name.
pub fn select<'a>(policies: &'a [Policy], name: &str, queue: bool) -> Option<&'a Policy> {
    if name.starts_with("amq.") || name.is_empty() {
        return None;
    }
    policies
        .iter()
        .filter(|p| p.applies(name, queue))
        .max_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then_with(|| b.name.cmp(&a.name))
        })
}

/// What applies to one object: the policy and operator policy names and the arguments it ends
/// up with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effective {
    pub policy: Option<String>,
    pub operator_policy: Option<String>,
    /// The merged definition of both (as the API's `effective_policy_definition`).
    pub definition: Map<String, Value>,
    /// The object's arguments with the definition merged in.
    pub arguments: FieldTable,
}

fn json_arg(v: &Value) -> Option<AMQPValue> {
    match v {
        Value::Number(n) => n.as_i64().map(AMQPValue::LongLongInt),
        Value::String(s) => Some(AMQPValue::LongString(LongString::from(s.as_str()))),
        _ => None,
    }
}

fn arg_int(v: &AMQPValue) -> Option<i64> {
    crate::args::as_int(v)
}

/// Merges a queue's declared arguments with its policy and operator policy.
pub fn for_queue(
    declared: &FieldTable,
    policy: Option<&Policy>,
    operator: Option<&Policy>,
) -> Effective {
    let mut args = declared.clone();
    let mut definition = Map::new();
    for (key, arg, numeric) in QUEUE_KEYS {
        let p = policy.and_then(|p| p.definition.get(*key));
        let o = operator.and_then(|p| p.definition.get(*key));
        let mine = declared.inner().get(*arg);
        let chosen: Option<Value> = if *numeric {
            [p.and_then(Value::as_i64), o.and_then(Value::as_i64)]
                .into_iter()
                .flatten()
                .min()
                .map(Value::from)
        } else {
            p.or(o).cloned()
        };
        let Some(chosen) = chosen else { continue };
        definition.insert(key.to_string(), chosen.clone());
        let put = match (mine, *numeric) {
            (None, _) => true,
            // The lower limit wins between the argument and the policies.
            (Some(m), true) => match (arg_int(m), chosen.as_i64()) {
                (Some(a), Some(b)) => b < a,
                _ => false,
            },
            // For everything else the queue's own argument wins.
            (Some(_), false) => false,
        };
        if put {
            if let Some(v) = json_arg(&chosen) {
                args.insert((*arg).into(), v);
            }
        }
    }
    Effective {
        policy: policy.map(|p| p.name.clone()),
        operator_policy: operator.map(|p| p.name.clone()),
        definition,
        arguments: args,
    }
}

/// An exchange's alternate exchange: its own argument, else its policy's.
pub fn alternate_for_exchange(declared: &FieldTable, policy: Option<&Policy>) -> Option<String> {
    declared
        .inner()
        .get("alternate-exchange")
        .and_then(crate::args::as_str)
        .or_else(|| {
            policy
                .and_then(|p| p.definition.get("alternate-exchange"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(name: &str, v: Value) -> Policy {
        Policy::parse(name, &v, false).unwrap()
    }

    #[test]
    fn validation_refuses_unknown_keys_bad_values_and_patterns() {
        let e = Policy::parse(
            "x",
            &json!({"pattern": ".*", "definition": {"ha-mode": "all"}}),
            false,
        )
        .unwrap_err();
        assert!(e.contains("are not recognised policy settings"), "{e}");
        assert!(Policy::parse(
            "x",
            &json!({"pattern": "(", "definition": {"max-length": 1}}),
            false
        )
        .is_err());
        assert!(Policy::parse(
            "x",
            &json!({"pattern": ".*", "definition": {"max-length": -1}}),
            false
        )
        .is_err());
        assert!(Policy::parse(
            "x",
            &json!({"pattern": ".*", "definition": {"overflow": "nope"}}),
            false
        )
        .is_err());
        assert!(Policy::parse("x", &json!({"pattern": ".*", "definition": {}}), false).is_err());
        assert!(Policy::parse(
            "x",
            &json!({"pattern": ".*", "definition": {"dead-letter-exchange": "d"}}),
            true
        )
        .is_err());
        assert!(Policy::parse("x", &json!({"pattern": ".*", "definition": {"max-length": 5}, "apply-to": "queues", "priority": 3}), true).is_ok());
    }

    #[test]
    fn highest_priority_wins_and_apply_to_is_respected() {
        let ps = vec![
            p(
                "low",
                json!({"pattern": "^q", "definition": {"max-length": 1}, "priority": 1}),
            ),
            p(
                "high",
                json!({"pattern": "^q", "definition": {"max-length": 2}, "priority": 5, "apply-to": "queues"}),
            ),
            p(
                "xs",
                json!({"pattern": ".*", "definition": {"alternate-exchange": "ae"}, "priority": 9, "apply-to": "exchanges"}),
            ),
        ];
        assert_eq!(
            select(&ps, "q1", true).map(|p| p.name.as_str()),
            Some("high")
        );
        assert_eq!(
            select(&ps, "q1", false).map(|p| p.name.as_str()),
            Some("xs")
        );
        assert_eq!(select(&ps, "other", true).map(|p| p.name.as_str()), None);
        assert!(select(&ps, "amq.direct", false).is_none());
    }

    #[test]
    fn merge_lowest_limit_wins_and_arguments_win_for_dead_lettering() {
        let mut declared = FieldTable::default();
        declared.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
        declared.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("mine".into()),
        );
        let pol = p(
            "p",
            json!({"pattern": ".*", "definition": {
            "max-length": 20, "message-ttl": 5000, "dead-letter-exchange": "theirs", "overflow": "reject-publish"}}),
        );
        let op = Policy::parse(
            "o",
            &json!({"pattern": ".*", "definition": {"message-ttl": 1000, "max-length": 5}}),
            true,
        )
        .unwrap();
        let e = for_queue(&declared, Some(&pol), Some(&op));
        let a = e.arguments.inner();
        assert_eq!(a.get("x-max-length"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(a.get("x-message-ttl"), Some(&AMQPValue::LongLongInt(1000)));
        assert_eq!(
            a.get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("mine".into()))
        );
        assert_eq!(
            a.get("x-overflow"),
            Some(&AMQPValue::LongString("reject-publish".into()))
        );
        assert_eq!(e.definition.get("max-length"), Some(&json!(5)));
        assert_eq!(e.policy.as_deref(), Some("p"));
        assert_eq!(e.operator_policy.as_deref(), Some("o"));
        let e = for_queue(
            &declared,
            Some(&p(
                "big",
                json!({"pattern": ".*", "definition": {"max-length": 100}}),
            )),
            None,
        );
        assert_eq!(
            e.arguments.inner().get("x-max-length"),
            Some(&AMQPValue::LongLongInt(10))
        );
    }
}
