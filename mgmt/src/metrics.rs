//! Prometheus metrics with `rabbitmq_prometheus`'s names, types and labels, so that its Grafana
//! dashboards work unchanged: `/metrics` (aggregated over the node), `/metrics/per-object`
//! (per queue, with `vhost` and `queue` labels, and per connection and channel) and
//! `/metrics/detailed?family=...` (only the requested families, per object). Rendered straight
//! from the counters, in one pass over the objects, without a stats process.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::http::AppState;
use crate::views::node_name;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .route("/metrics/detailed", get(detailed))
        .route("/metrics/memory-breakdown", get(aggregated))
        .with_state(state)
}

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn text(body: String) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// Escapes a label value (backslash, quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: `# TYPE` and `# HELP`, then its samples.
struct Out {
    s: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.s, "# TYPE {name} {kind}");
        let _ = writeln!(self.s, "# HELP {name} {help}");
    }

    fn sample(&mut self, name: &str, labels: &str, v: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.s, "{name} {v}");
        } else {
            let _ = writeln!(self.s, "{name}{{{labels}}} {v}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.sample(name, "", v);
    }
}

/// Per-queue figures, read once.
struct QueueRow {
    vhost: String,
    name: String,
    ready: u64,
    unacked: u64,
    consumers: u64,
    bytes: u64,
    in_memory: u64,
    paged: u64,
    /// In `QUEUE_COUNTERS` order.
    stats: [u64; 8],
}

/// The per-queue counter families: `rabbitmq_queue_messages_<name>_total`.
const QUEUE_COUNTERS: [&str; 8] = [
    "published",
    "delivered",
    "delivered_consume_manual_ack",
    "delivered_consume_auto_ack",
    "delivered_get_manual_ack",
    "delivered_get_auto_ack",
    "get_empty",
    "redelivered",
];

fn queue_rows(st: &AppState) -> Vec<QueueRow> {
    let unacked = st.admin.unacked_by_queue();
    let mut rows = Vec::new();
    for v in st.admin.vhosts() {
        for q in v.queues() {
            let s = q.view();
            let qs = &q.stats;
            rows.push(QueueRow {
                vhost: v.name.clone(),
                name: q.name().to_string(),
                ready: s.ready,
                unacked: unacked
                    .get(&(Arc::as_ptr(&q) as usize))
                    .copied()
                    .unwrap_or(0),
                consumers: s.consumers as u64,
                bytes: s.bytes,
                in_memory: s.in_memory,
                paged: s.paged,
                stats: [
                    qs.publish.get(),
                    qs.deliver.get() + qs.deliver_no_ack.get(),
                    qs.deliver.get(),
                    qs.deliver_no_ack.get(),
                    qs.get.get(),
                    qs.get_no_ack.get(),
                    qs.get_empty.get(),
                    qs.redeliver.get(),
                ],
            });
        }
    }
    rows
}

fn identity(o: &mut Out, st: &AppState) {
    let node = esc(&node_name());
    let cluster = esc(&st.cluster_name());
    o.family(
        "rabbitmq_identity_info",
        "untyped",
        "RabbitMQ node & cluster identity info",
    );
    o.sample(
        "rabbitmq_identity_info",
        &format!(
            "rabbitmq_node=\"{node}\",rabbitmq_cluster=\"{cluster}\",rabbitmq_cluster_permanent_id=\"{cluster}\""
        ),
        1.0,
    );
    o.family(
        "rabbitmq_build_info",
        "untyped",
        "RabbitMQ & Erlang/OTP version info",
    );
    o.sample(
        "rabbitmq_build_info",
        &format!(
            "rabbitmq_version=\"{}\",prometheus_plugin_version=\"{}\",prometheus_client_version=\"4.8.1\",namespace=\"rabbitmq\",erlang_version=\"none\",product_name=\"Warren\",product_version=\"{}\"",
            crate::RABBITMQ_VERSION,
            crate::RABBITMQ_VERSION,
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn node_metrics(o: &mut Out, st: &AppState, per_object: bool) {
    let b = &st.admin.broker;
    let g = &b.stats;
    let sys = warren_core::system::read_for(&b.config.data_dir);
    let alarms = b.alarms.state();
    let conns = b.connections.all();
    let channels: usize = conns.iter().map(|c| c.channel_count()).sum();
    let (mut queues, mut consumers) = (0u64, 0u64);
    for v in st.admin.vhosts() {
        for q in v.queues() {
            queues += 1;
            consumers += q.counts().1 as u64;
        }
    }
    let counters: [(&str, &str, u64); 7] = [
        (
            "rabbitmq_connections_opened_total",
            "Total number of connections opened",
            g.connection_created.get(),
        ),
        (
            "rabbitmq_connections_closed_total",
            "Total number of connections closed or terminated",
            g.connection_closed.get(),
        ),
        (
            "rabbitmq_channels_opened_total",
            "Total number of channels opened",
            g.channel_created.get(),
        ),
        (
            "rabbitmq_channels_closed_total",
            "Total number of channels closed",
            g.channel_closed.get(),
        ),
        (
            "rabbitmq_queues_declared_total",
            "Total number of queues declared",
            g.queue_declared.get(),
        ),
        (
            "rabbitmq_queues_created_total",
            "Total number of queues created",
            g.queue_created.get(),
        ),
        (
            "rabbitmq_queues_deleted_total",
            "Total number of queues deleted",
            g.queue_deleted.get(),
        ),
    ];
    for (n, h, v) in counters {
        o.one(n, "counter", h, v as f64);
    }
    o.one(
        "rabbitmq_connections",
        "gauge",
        "Connections currently open",
        conns.len() as f64,
    );
    o.one(
        "rabbitmq_channels",
        "gauge",
        "Channels currently open",
        channels as f64,
    );
    o.one(
        "rabbitmq_consumers",
        "gauge",
        "Consumers currently connected",
        consumers as f64,
    );
    o.one(
        "rabbitmq_queues",
        "gauge",
        "Queues available",
        queues as f64,
    );
    let proto = "protocol=\"amqp091\"";
    let global: [(&str, &str, u64); 14] = [
        ("rabbitmq_global_messages_received_total", "Total number of messages received from publishers", g.publish.get()),
        ("rabbitmq_global_messages_received_confirm_total", "Total number of messages received from publishers expecting confirmations", g.confirm.get()),
        ("rabbitmq_global_messages_routed_total", "Total number of messages routed to queues or streams", g.publish.get().saturating_sub(g.drop_unroutable.get() + g.return_unroutable.get())),
        ("rabbitmq_global_messages_unroutable_dropped_total", "Total number of messages published as non-mandatory into an exchange and dropped as unroutable", g.drop_unroutable.get()),
        ("rabbitmq_global_messages_unroutable_returned_total", "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable", g.return_unroutable.get()),
        ("rabbitmq_global_messages_confirmed_total", "Total number of messages confirmed to publishers", g.confirm.get()),
        ("rabbitmq_global_messages_delivered_total", "Total number of messages delivered to consumers", g.deliver.get() + g.deliver_no_ack.get() + g.get.get() + g.get_no_ack.get()),
        ("rabbitmq_global_messages_delivered_consume_manual_ack_total", "Total number of messages delivered to consumers using basic.consume with manual acknowledgment", g.deliver.get()),
        ("rabbitmq_global_messages_delivered_consume_auto_ack_total", "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment", g.deliver_no_ack.get()),
        ("rabbitmq_global_messages_delivered_get_manual_ack_total", "Total number of messages delivered to consumers using basic.get with manual acknowledgment", g.get.get()),
        ("rabbitmq_global_messages_delivered_get_auto_ack_total", "Total number of messages delivered to consumers using basic.get with automatic acknowledgment", g.get_no_ack.get()),
        ("rabbitmq_global_messages_get_empty_total", "Total number of times basic.get operations fetched no message", g.get_empty.get()),
        ("rabbitmq_global_messages_redelivered_total", "Total number of messages redelivered to consumers", g.redeliver.get()),
        ("rabbitmq_global_messages_acknowledged_total", "Total number of messages acknowledged by consumers", g.ack.get()),
    ];
    for (n, h, v) in global {
        o.family(n, "counter", h);
        o.sample(n, proto, v as f64);
    }
    for (name, help, pick) in [
        (
            "rabbitmq_auth_attempts_total",
            "Total number of authorization attempts",
            0,
        ),
        (
            "rabbitmq_auth_attempts_succeeded_total",
            "Total number of successful authentication attempts",
            2,
        ),
        (
            "rabbitmq_auth_attempts_failed_total",
            "Total number of failed authentication attempts",
            1,
        ),
    ] {
        o.family(name, "counter", help);
        for (protocol, c) in b.auth_attempts.each() {
            let (attempts, failed, succeeded) = c.get();
            let v = [attempts, failed, succeeded][pick];
            o.sample(name, &format!("protocol=\"{protocol}\""), v as f64);
        }
    }
    o.family(
        "rabbitmq_global_publishers",
        "gauge",
        "Current number of publishers",
    );
    o.sample("rabbitmq_global_publishers", proto, conns.len() as f64);
    o.family(
        "rabbitmq_global_consumers",
        "gauge",
        "Current number of consumers",
    );
    o.sample("rabbitmq_global_consumers", proto, consumers as f64);
    o.one(
        "rabbitmq_process_resident_memory_bytes",
        "gauge",
        "Memory used in bytes",
        sys.rss_bytes as f64,
    );
    o.one(
        "rabbitmq_resident_memory_limit_bytes",
        "gauge",
        "Memory high watermark in bytes",
        b.alarms.memory_limit() as f64,
    );
    o.one(
        "rabbitmq_process_open_fds",
        "gauge",
        "Open file descriptors",
        sys.fds_used as f64,
    );
    o.one(
        "rabbitmq_process_max_fds",
        "gauge",
        "Open file descriptors limit",
        sys.fds_total as f64,
    );
    o.one(
        "rabbitmq_process_open_tcp_sockets",
        "gauge",
        "Open TCP sockets",
        conns.len() as f64,
    );
    o.one(
        "rabbitmq_process_max_tcp_sockets",
        "gauge",
        "Open TCP sockets limit",
        sys.fds_total as f64,
    );
    o.one(
        "rabbitmq_disk_space_available_bytes",
        "gauge",
        "Disk space available in bytes",
        sys.disk_free as f64,
    );
    o.one(
        "rabbitmq_disk_space_available_limit_bytes",
        "gauge",
        "Free disk space low watermark in bytes",
        b.alarms.disk_free_limit() as f64,
    );
    o.one(
        "rabbitmq_alarms_file_descriptor_limit",
        "gauge",
        "is 1 if file descriptor limit alarm is in effect",
        flag(sys.fds_total > 0 && sys.fds_used >= sys.fds_total),
    );
    o.one(
        "rabbitmq_alarms_free_disk_space_watermark",
        "gauge",
        "is 1 if free disk space watermark alarm is in effect",
        flag(alarms.disk),
    );
    o.one(
        "rabbitmq_alarms_memory_used_watermark",
        "gauge",
        "is 1 if VM memory watermark alarm is in effect",
        flag(alarms.memory),
    );
    o.one(
        "rabbitmq_erlang_uptime_seconds",
        "gauge",
        "Node uptime",
        b.started.elapsed().as_secs_f64(),
    );
    if per_object {
        // Per connection instead, in `connection_metrics`.
        return;
    }
    let (mut rx, mut tx) = (0u64, 0u64);
    for c in &conns {
        rx += c.stats.recv_oct.get();
        tx += c.stats.send_oct.get();
    }
    o.one(
        "rabbitmq_connection_incoming_bytes_total",
        "counter",
        "Total number of bytes received on a connection",
        rx as f64,
    );
    o.one(
        "rabbitmq_connection_outgoing_bytes_total",
        "counter",
        "Total number of bytes sent on a connection",
        tx as f64,
    );
}

/// Queue families: `labels` gives each row's label set ("" to sum rows into one sample).
fn queue_metrics(o: &mut Out, rows: &[QueueRow], per_object: bool) {
    // Each row's label set, formatted once for all its families.
    let labels: Vec<String> = if per_object {
        rows.iter().map(qlabels).collect()
    } else {
        Vec::new()
    };
    type Get = fn(&QueueRow) -> u64;
    let gauges: [(&str, &str, Get); 8] = [
        (
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            |r| r.ready,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            |r| r.unacked,
        ),
        (
            "rabbitmq_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            |r| r.ready + r.unacked,
        ),
        (
            "rabbitmq_queue_messages_bytes",
            "Size in bytes of ready and unacknowledged messages",
            |r| r.bytes,
        ),
        (
            "rabbitmq_queue_messages_ready_bytes",
            "Size in bytes of ready messages",
            |r| r.bytes,
        ),
        (
            "rabbitmq_queue_messages_ram",
            "Ready and unacknowledged messages stored in memory",
            |r| r.in_memory + r.unacked,
        ),
        (
            "rabbitmq_queue_messages_paged_out",
            "Messages paged out to disk",
            |r| r.paged,
        ),
        ("rabbitmq_queue_consumers", "Consumers on a queue", |r| {
            r.consumers
        }),
    ];
    for (name, help, f) in gauges {
        o.family(name, "gauge", help);
        if per_object {
            for (r, l) in rows.iter().zip(&labels) {
                o.sample(name, l, f(r) as f64);
            }
        } else {
            o.sample(name, "", rows.iter().map(f).sum::<u64>() as f64);
        }
    }
    for (i, key) in QUEUE_COUNTERS.iter().enumerate() {
        let name = format!("rabbitmq_queue_messages_{key}_total");
        o.family(
            &name,
            "counter",
            &format!("Total number of messages {key} on a queue"),
        );
        if per_object {
            for (r, l) in rows.iter().zip(&labels) {
                o.sample(&name, l, r.stats[i] as f64);
            }
        } else {
            o.sample(
                &name,
                "",
                rows.iter().map(|r| r.stats[i]).sum::<u64>() as f64,
            );
        }
    }
}

fn qlabels(r: &QueueRow) -> String {
    format!("vhost=\"{}\",queue=\"{}\"", esc(&r.vhost), esc(&r.name))
}

async fn aggregated(State(st): State<Arc<AppState>>) -> Response {
    let mut o = Out {
        s: String::with_capacity(16 << 10),
    };
    identity(&mut o, &st);
    node_metrics(&mut o, &st, false);
    queue_metrics(&mut o, &queue_rows(&st), false);
    text(o.s)
}

async fn per_object(State(st): State<Arc<AppState>>) -> Response {
    let rows = queue_rows(&st);
    let mut o = Out {
        s: String::with_capacity(4096 + rows.len() * 1200),
    };
    identity(&mut o, &st);
    node_metrics(&mut o, &st, true);
    queue_metrics(&mut o, &rows, true);
    connection_metrics(&mut o, &st);
    text(o.s)
}

/// A metric family read off each connection: (name, help, reader).
type ConnFamily = (
    &'static str,
    &'static str,
    fn(&warren_core::connections::ConnInfo) -> u64,
);

fn connection_metrics(o: &mut Out, st: &AppState) {
    let conns = st.admin.broker.connections.all();
    let fams: [ConnFamily; 4] = [
        (
            "rabbitmq_connection_incoming_bytes_total",
            "Total number of bytes received on a connection",
            |c| c.stats.recv_oct.get(),
        ),
        (
            "rabbitmq_connection_outgoing_bytes_total",
            "Total number of bytes sent on a connection",
            |c| c.stats.send_oct.get(),
        ),
        (
            "rabbitmq_connection_incoming_packets_total",
            "Total number of packets received on a connection",
            |c| c.stats.recv_cnt.get(),
        ),
        (
            "rabbitmq_connection_outgoing_packets_total",
            "Total number of packets sent on a connection",
            |c| c.stats.send_cnt.get(),
        ),
    ];
    for (name, help, f) in fams {
        o.family(name, "counter", help);
        for c in &conns {
            o.sample(
                name,
                &format!("connection=\"{}\"", esc(&c.name)),
                f(c) as f64,
            );
        }
    }
    o.family(
        "rabbitmq_channel_messages_unacked",
        "gauge",
        "Delivered but not yet acknowledged messages",
    );
    for c in &conns {
        for ch in c.channels() {
            let label = format!("channel=\"{}\"", esc(&crate::views::channel_name(c, &ch)));
            o.sample(
                "rabbitmq_channel_messages_unacked",
                &label,
                ch.sizes().1 as f64,
            );
        }
    }
}

async fn detailed(State(st): State<Arc<AppState>>, RawQuery(raw): RawQuery) -> Response {
    // family=a&family=b (repeated) and vhost=... filters, as rabbitmq_prometheus takes them.
    let mut families = Vec::new();
    let mut vhosts = Vec::new();
    for pair in raw.unwrap_or_default().split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .to_string();
        match k {
            "family" => families.push(v),
            "vhost" => vhosts.push(v),
            _ => {}
        }
    }
    let mut rows = queue_rows(&st);
    if !vhosts.is_empty() {
        rows.retain(|r| vhosts.contains(&r.vhost));
    }
    let mut o = Out { s: String::new() };
    let mut per_queue = Out { s: String::new() };
    queue_metrics(&mut per_queue, &rows, true);
    let want = |fam: &str| {
        families.iter().any(|f| match f.as_str() {
            "queue_coarse_metrics" => matches!(
                fam,
                "rabbitmq_detailed_queue_messages_ready"
                    | "rabbitmq_detailed_queue_messages_unacked"
                    | "rabbitmq_detailed_queue_messages"
            ),
            "queue_consumer_count" => fam == "rabbitmq_detailed_queue_consumers",
            "queue_metrics" => fam.starts_with("rabbitmq_detailed_queue_"),
            _ => false,
        })
    };
    // The detailed endpoint prefixes every family with rabbitmq_detailed_.
    let mut keep = false;
    for line in per_queue.s.lines() {
        let renamed = line.replacen("rabbitmq_", "rabbitmq_detailed_", 1);
        if let Some(rest) = renamed.strip_prefix("# TYPE ") {
            keep = want(rest.split_whitespace().next().unwrap_or(""));
        }
        if keep {
            o.s.push_str(&renamed);
            o.s.push('\n');
        }
    }
    let mut head = Out { s: String::new() };
    identity(&mut head, &st);
    text(head.s + &o.s)
}
