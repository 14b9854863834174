//! Messages through the HTTP API: "publish message" (exchange `publish`), "get messages"
//! (queue `get`) and the aliveness test, with RabbitMQ's JSON for message properties and
//! payload encodings.

use base64::Engine;
use serde_json::{json, Map, Value};
use warren_core::admin::{Admin, GetMode};
use warren_protocol::short::checked;
use warren_protocol::AMQPProperties;

use crate::http::{str_field, ApiError, ApiResult};
use crate::json::{json_to_table, table_to_json};

fn short(key: &str, v: &Value) -> ApiResult<warren_protocol::ShortString> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(ApiError::bad_request(format!(
                "property {key} must be a string"
            )))
        }
    };
    checked(s).ok_or_else(|| ApiError::bad_request(format!("property {key} longer than 255 bytes")))
}

fn octet(key: &str, v: &Value) -> ApiResult<u8> {
    v.as_u64()
        .and_then(|n| u8::try_from(n).ok())
        .ok_or_else(|| ApiError::bad_request(format!("property {key} must be an integer 0-255")))
}

/// Message properties from RabbitMQ's JSON (`properties` of a publish request).
pub fn properties_from_json(v: Option<&Value>) -> ApiResult<AMQPProperties> {
    let mut p = AMQPProperties::default();
    let Some(v) = v else { return Ok(p) };
    let Some(m) = v.as_object() else {
        return Err(ApiError::bad_request("properties must be an object"));
    };
    for (k, x) in m {
        if x.is_null() {
            continue;
        }
        p =
            match k.as_str() {
                "content_type" => p.with_content_type(short(k, x)?),
                "content_encoding" => p.with_content_encoding(short(k, x)?),
                "headers" => p.with_headers(json_to_table(x)?),
                "delivery_mode" => p.with_delivery_mode(octet(k, x)?),
                "priority" => p.with_priority(octet(k, x)?),
                "correlation_id" => p.with_correlation_id(short(k, x)?),
                "reply_to" => p.with_reply_to(short(k, x)?),
                "expiration" => p.with_expiration(short(k, x)?),
                "message_id" => p.with_message_id(short(k, x)?),
                "timestamp" => p.with_timestamp(x.as_u64().ok_or_else(|| {
                    ApiError::bad_request("property timestamp must be an integer")
                })?),
                "type" => p.with_type(short(k, x)?),
                "user_id" => p.with_user_id(short(k, x)?),
                "app_id" => p.with_app_id(short(k, x)?),
                "cluster_id" => p.with_cluster_id(short(k, x)?),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown message property {other}"
                    )))
                }
            };
    }
    Ok(p)
}

/// Message properties as RabbitMQ's JSON shows them (only those set).
pub fn properties_to_json(p: &AMQPProperties) -> Value {
    let mut m = Map::new();
    let mut s = |k: &str, v: &Option<warren_protocol::ShortString>| {
        if let Some(v) = v {
            m.insert(k.to_string(), json!(v.as_str()));
        }
    };
    s("content_type", p.content_type());
    s("content_encoding", p.content_encoding());
    s("correlation_id", p.correlation_id());
    s("reply_to", p.reply_to());
    s("expiration", p.expiration());
    s("message_id", p.message_id());
    s("type", p.kind());
    s("user_id", p.user_id());
    s("app_id", p.app_id());
    s("cluster_id", p.cluster_id());
    if let Some(h) = p.headers() {
        m.insert("headers".into(), table_to_json(h));
    }
    if let Some(d) = p.delivery_mode() {
        m.insert("delivery_mode".into(), json!(d));
    }
    if let Some(x) = p.priority() {
        m.insert("priority".into(), json!(x));
    }
    if let Some(t) = p.timestamp() {
        m.insert("timestamp".into(), json!(t));
    }
    Value::Object(m)
}

pub async fn publish(
    admin: &Admin,
    vhost: &str,
    exchange: &str,
    m: &Map<String, Value>,
) -> ApiResult<bool> {
    let Some(key) = str_field(m, "routing_key") else {
        return Err(ApiError::bad_request(
            "Validation failed\n\nmandatory field routing_key missing\n",
        ));
    };
    let Some(payload) = str_field(m, "payload") else {
        return Err(ApiError::bad_request(
            "Validation failed\n\nmandatory field payload missing\n",
        ));
    };
    let body = match str_field(m, "payload_encoding").unwrap_or("string") {
        "string" => bytes::Bytes::copy_from_slice(payload.as_bytes()),
        "base64" => bytes::Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(payload)
                .map_err(|_| ApiError::bad_request("payload is not valid base64"))?,
        ),
        other => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding must be string or base64, not {other}"
            )))
        }
    };
    let props = properties_from_json(m.get("properties"))?;
    Ok(admin.publish(vhost, exchange, key, props, body).await?)
}

/// A body as RabbitMQ's `/get` shows it: `string` when it is UTF-8 (unless base64 is asked
/// for), else `base64`. Returns the payload and its `payload_encoding`.
pub fn payload(shown: &[u8], base64: bool) -> (String, &'static str) {
    match std::str::from_utf8(shown) {
        Ok(s) if !base64 => (s.to_string(), "string"),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(shown),
            "base64",
        ),
    }
}

pub async fn get(
    admin: &Admin,
    vhost: &str,
    queue: &str,
    m: &Map<String, Value>,
) -> ApiResult<Value> {
    let count = match m.get("count") {
        None => 1,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| ApiError::bad_request("count must be an integer"))?,
    } as usize;
    let mode = match str_field(m, "ackmode") {
        Some("ack_requeue_true") => GetMode::AckRequeueTrue,
        Some("ack_requeue_false") => GetMode::AckRequeueFalse,
        Some("reject_requeue_true") => GetMode::RejectRequeueTrue,
        Some("reject_requeue_false") => GetMode::RejectRequeueFalse,
        Some(other) => return Err(ApiError::bad_request(format!("Invalid ackmode: {other}"))),
        None => {
            return Err(ApiError::bad_request(
                "Validation failed\n\nmandatory field ackmode missing\n",
            ))
        }
    };
    let encoding = match str_field(m, "encoding") {
        Some("auto") | None => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Unsupported encoding: {other}"
            )))
        }
    };
    let truncate = match m.get("truncate") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| ApiError::bad_request("truncate must be an integer"))?
                as usize,
        ),
    };
    let got = admin.get(vhost, queue, count.min(10_000), mode).await?;
    let items = got
        .iter()
        .map(|g| {
            let body = &g.message.body;
            let shown = &body[..truncate.unwrap_or(body.len()).min(body.len())];
            let (payload, enc) = payload(shown, encoding);
            json!({
                "payload_bytes": body.len(),
                "redelivered": g.redelivered,
                "exchange": g.message.exchange.as_str(),
                "routing_key": g.message.routing_key.as_str(),
                "message_count": g.message_count,
                "properties": properties_to_json(&g.message.properties()),
                "payload": payload,
                "payload_encoding": enc,
            })
        })
        .collect();
    Ok(Value::Array(items))
}

/// RabbitMQ's aliveness test: declares `aliveness-test` in the vhost, publishes a message to
/// it and reads it back.
pub async fn aliveness(admin: &Admin, vhost: &str) -> Result<(), String> {
    let d = warren_core::vhost::QueueDeclare {
        name: "aliveness-test".to_string(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        arguments: Default::default(),
    };
    admin
        .declare_queue(vhost, "aliveness-test", d)
        .await
        .map_err(|e| e.to_string())?;
    let routed = admin
        .publish(
            vhost,
            "",
            "aliveness-test",
            AMQPProperties::default(),
            bytes::Bytes::from_static(b"test_message"),
        )
        .await
        .map_err(|e| e.to_string())?;
    if !routed {
        return Err("the test message was not routed".into());
    }
    let got = admin
        .get(vhost, "aliveness-test", 1, GetMode::AckRequeueFalse)
        .await
        .map_err(|e| e.to_string())?;
    match got.first() {
        Some(g) if &g.message.body[..] == b"test_message" => Ok(()),
        _ => Err("the test message did not come back".into()),
    }
}
