//! The JSON of each object the API lists, in RabbitMQ 3.x's shapes: queues, exchanges,
//! bindings, connections, channels, consumers, vhosts, users and permissions. Everything is
//! read through the admin facade's views; nothing here changes state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use std::collections::HashMap;

use warren_core::admin::BindingView;
use warren_core::connections::{ConnInfo, Hold};
use warren_core::delivery::{ChannelHandle, Consumer, MODE_CONFIRM, MODE_TX};
use warren_core::exchange::Exchange;
use warren_core::message::now_ms;
use warren_core::queue::Queue;
use warren_core::vhost::VHost;
use warren_storage::{PermissionRecord, TopicPermissionRecord, UserRecord};

use crate::json::{details, message_stats, rabbit_time, table_to_json};

/// This node's name, as RabbitMQ's `rabbit@host` (the host name is read once).
pub fn node_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        format!("warren@{host}")
    })
    .clone()
}

/// How the management API names a vhost in a binding's `properties_key` and paths.
pub fn properties_key(routing_key: &str, arguments: &warren_protocol::FieldTable) -> String {
    if arguments.inner().is_empty() {
        if routing_key.is_empty() {
            "~".to_string()
        } else {
            percent_encoding::utf8_percent_encode(routing_key, KEY_SET).to_string()
        }
    } else {
        // RabbitMQ appends a hash of the arguments; any stable digest of them serves, as
        // clients only hand the key back.
        use sha2::Digest;
        let text = table_to_json(arguments).to_string();
        let digest = sha2::Sha256::digest(text.as_bytes());
        let tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}~{tag}",
            percent_encoding::utf8_percent_encode(routing_key, KEY_SET)
        )
    }
}

/// Characters RabbitMQ escapes in a properties key: everything but unreserved ones.
const KEY_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn queue(q: &Arc<Queue>, unacked: u64, node: &str) -> Value {
    let s = q.view();
    let messages = s.ready + unacked;
    let args = q.args();
    let idle_since = s.idle_since.map(|t| {
        let ago = Instant::now().saturating_duration_since(t).as_millis() as u64;
        rabbit_time(now_ms().saturating_sub(ago))
    });
    let exclusive = q.spec.exclusive_owner.is_some();
    // Warren delivers whenever a consumer has credit: utilisation is 1 with consumers, 0
    // without (RabbitMQ 3.13+ shows 0 rather than null there).
    let consumer_utilisation = if s.consumers > 0 {
        json!(1.0)
    } else {
        json!(0.0)
    };
    let qtype = if args.quorum { "quorum" } else { "classic" };
    // Entries in memory cost about their struct; bodies are shared with the body cache.
    let memory = s.in_memory * 96 + s.bytes.min(s.bytes * s.in_memory / s.ready.max(1));
    let depth = &q.depth;
    let pol = q.policy();
    json!({
        "name": q.name(),
        "vhost": q.vhost,
        "durable": q.spec.durable,
        "auto_delete": q.spec.auto_delete,
        "exclusive": exclusive,
        "arguments": table_to_json(&q.spec.arguments),
        "node": node,
        "type": qtype,
        "state": "running",
        "policy": pol.policy,
        "operator_policy": pol.operator_policy,
        "effective_policy_definition": pol.definition,
        "exclusive_consumer_tag": Value::Null,
        "single_active_consumer_tag": Value::Null,
        "consumers": s.consumers,
        "consumer_capacity": if s.consumers > 0 { json!(1.0) } else { json!(0) },
        "consumer_utilisation": consumer_utilisation,
        "idle_since": idle_since,
        "memory": memory,
        "messages": messages,
        "messages_details": details(depth.messages.rate()),
        "messages_ready": s.ready,
        "messages_ready_details": details(depth.ready.rate()),
        "messages_unacknowledged": unacked,
        "messages_unacknowledged_details": details(depth.unacked.rate()),
        "messages_ram": s.in_memory + unacked,
        "messages_ready_ram": s.in_memory,
        "messages_unacknowledged_ram": unacked,
        "messages_paged_out": s.paged,
        "message_bytes": s.bytes,
        "message_bytes_ready": s.bytes,
        "head_message_timestamp": Value::Null,
        "message_stats": message_stats(|f| q.stats.each(|k, c| f(k, c))),
    })
}

pub fn exchange(x: &Exchange, vhost: &str) -> Value {
    let name = if x.name.is_empty() {
        ""
    } else {
        x.name.as_str()
    };
    json!({
        "name": name,
        "vhost": vhost,
        "type": x.type_name(),
        "durable": x.durable,
        "auto_delete": x.auto_delete,
        "internal": x.internal,
        "arguments": table_to_json(&x.arguments),
        "user_who_performed_action": "rmq-internal",
        "policy": x.policy.load_full().map(|p| p.to_string()),
        "message_stats": message_stats(|f| x.stats.each(|k, c| f(k, c))),
    })
}

pub fn binding(b: &BindingView) -> Value {
    json!({
        "source": b.source,
        "vhost": b.vhost,
        "destination": b.destination,
        "destination_type": b.destination_type,
        "routing_key": b.routing_key,
        "arguments": table_to_json(&b.arguments),
        "properties_key": properties_key(&b.routing_key, &b.arguments),
    })
}

fn conn_details(c: &ConnInfo) -> Value {
    json!({
        "name": c.name,
        "peer_host": c.peer_host(),
        "peer_port": c.peer.port(),
    })
}

/// A connection's JSON. `alarm`: a resource alarm is in effect, so a connection that is not
/// (yet) blocked shows RabbitMQ's "blocking" (it will be blocked when it publishes).
pub fn connection(c: &ConnInfo, node: &str, alarm: bool) -> Value {
    let s = c.session();
    let st = &c.stats;
    json!({
        "name": c.name,
        "node": node,
        "type": "network",
        "state": match (s.open, c.hold()) {
            (false, _) => "starting",
            (true, Hold::None) if alarm => "blocking",
            (true, Hold::None) => "running",
            (true, Hold::Flow) => "flow",
            (true, Hold::Blocked) => "blocked",
        },
        "protocol": "AMQP 0-9-1",
        "user": s.user,
        "user_who_performed_action": s.user,
        "vhost": s.vhost,
        "auth_mechanism": s.auth_mechanism,
        "client_properties": table_to_json(&s.client_properties),
        "connected_at": c.connected_at,
        "host": c.host(),
        "port": c.local.port(),
        "peer_host": c.peer_host(),
        "peer_port": c.peer.port(),
        "ssl": c.tls,
        "ssl_protocol": Value::Null,
        "ssl_key_exchange": Value::Null,
        "ssl_cipher": Value::Null,
        "ssl_hash": Value::Null,
        "peer_cert_subject": Value::Null,
        "peer_cert_issuer": Value::Null,
        "peer_cert_validity": Value::Null,
        "frame_max": c.frame_max.load(Ordering::Relaxed),
        "channel_max": c.channel_max.load(Ordering::Relaxed),
        "timeout": c.heartbeat.load(Ordering::Relaxed),
        "channels": c.channel_count(),
        "recv_oct": st.recv_oct.get(),
        "recv_oct_details": details(st.recv_oct.rate()),
        "recv_cnt": st.recv_cnt.get(),
        "send_oct": st.send_oct.get(),
        "send_oct_details": details(st.send_oct.rate()),
        "send_cnt": st.send_cnt.get(),
        "send_pend": 0,
    })
}

pub fn channel_name(c: &ConnInfo, ch: &ChannelHandle) -> String {
    format!("{} ({})", c.name, ch.id)
}

pub fn channel(c: &ConnInfo, ch: &ChannelHandle, node: &str) -> Value {
    let s = c.session();
    let (consumers, unacked) = ch.sizes();
    let mode = ch.mode.load(Ordering::Relaxed);
    json!({
        "name": channel_name(c, ch),
        "node": node,
        "number": ch.id,
        "user": s.user,
        "user_who_performed_action": s.user,
        "vhost": s.vhost,
        "connection_details": conn_details(c),
        "state": "running",
        "confirm": mode == MODE_CONFIRM,
        "transactional": mode == MODE_TX,
        "consumer_count": consumers,
        "messages_unacknowledged": unacked,
        "messages_unconfirmed": 0,
        "messages_uncommitted": 0,
        "acks_uncommitted": 0,
        "prefetch_count": ch.prefetch.load(Ordering::Relaxed),
        "global_prefetch_count": ch.global_prefetch(),
        "message_stats": message_stats(|f| ch.stats.each(|k, c| f(k, c))),
    })
}

pub fn consumer(c: &ConnInfo, cons: &Consumer, q: &Queue) -> Value {
    json!({
        "consumer_tag": cons.tag.as_str(),
        "channel_details": {
            "name": channel_name(c, &cons.channel),
            "number": cons.channel.id,
            "connection_name": c.name,
            "peer_host": c.peer_host(),
            "peer_port": c.peer.port(),
            "user": c.session().user,
            "node": node_name(),
        },
        "queue": {"name": q.name(), "vhost": q.vhost},
        "ack_required": !cons.no_ack,
        "exclusive": cons.exclusive,
        "prefetch_count": cons.prefetch,
        "active": cons.active.load(Ordering::Relaxed),
        "activity_status": if cons.active.load(Ordering::Relaxed) { "up" } else { "waiting" },
        "arguments": {},
        // The queue's x-consumer-timeout in ms; 0 when it has none (Warren has no node-wide
        // default).
        "consumer_timeout": q.args().consumer_timeout.unwrap_or(0),
    })
}

pub fn vhost(v: &VHost, unacked_all: &HashMap<usize, u64>) -> Value {
    let meta = v.meta();
    let (mut ready, mut unacked) = (0u64, 0u64);
    let (mut r_all, mut r_ready, mut r_unacked) = (0f64, 0f64, 0f64);
    for q in v.queues() {
        ready += q.counts().0 as u64;
        unacked += unacked_all
            .get(&(Arc::as_ptr(&q) as usize))
            .copied()
            .unwrap_or(0);
        r_all += q.depth.messages.rate();
        r_ready += q.depth.ready.rate();
        r_unacked += q.depth.unacked.rate();
    }
    json!({
        "name": v.name,
        "description": meta.description,
        "tags": meta.tags,
        "metadata": {"description": meta.description, "tags": meta.tags},
        "default_queue_type": meta.default_queue_type,
        "tracing": false,
        "cluster_state": {node_name(): "running"},
        "messages": ready + unacked,
        "messages_details": details(r_all),
        "messages_ready": ready,
        "messages_ready_details": details(r_ready),
        "messages_unacknowledged": unacked,
        "messages_unacknowledged_details": details(r_unacked),
    })
}

pub fn user(u: &UserRecord) -> Value {
    use base64::Engine;
    let algo = if u.password_hash.len() == 68 {
        "rabbit_password_hashing_sha512"
    } else {
        "rabbit_password_hashing_sha256"
    };
    json!({
        "name": u.name,
        "password_hash": base64::engine::general_purpose::STANDARD.encode(&u.password_hash),
        "hashing_algorithm": algo,
        "tags": warren_core::broker::split_tags(&u.tags),
        "limits": serde_json::from_str::<Value>(&u.limits)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({})),
    })
}

pub fn permission(p: &PermissionRecord) -> Value {
    json!({
        "user": p.user,
        "vhost": p.vhost,
        "configure": p.configure,
        "write": p.write,
        "read": p.read,
    })
}

pub fn topic_permission(p: &TopicPermissionRecord) -> Value {
    json!({
        "user": p.user,
        "vhost": p.vhost,
        "exchange": p.exchange,
        "write": p.write,
        "read": p.read,
    })
}
