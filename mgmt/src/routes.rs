//! The management API's routes and handlers (RabbitMQ's `rabbit_mgmt_dispatcher` is the
//! spec): each handler authenticates the caller, checks its tags and vhost access as RabbitMQ
//! does, and goes through the admin facade.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use warren_core::vhost::{ExchangeDeclare, QueueDeclare, VhostMeta};
use warren_storage::{PermissionRecord, TopicPermissionRecord};

use crate::http::{
    bool_field, created_or_updated, object, str_field, ApiError, ApiResult, AppState, Caller,
};
use crate::json::{answer, json_to_table, ListQuery};
use crate::views;

type St = State<Arc<AppState>>;
type Q = Query<HashMap<String, String>>;

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/", get(crate::console::index))
        .route("/console/{*path}", get(crate::console::asset))
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/extensions", get(|| async { Json(json!([])) }))
        .route(
            "/api/auth",
            get(|| async { Json(json!({"oauth_enabled": false})) }),
        )
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{node}", get(node))
        .route("/api/nodes/{node}/memory", get(node_memory))
        .route(
            "/api/nodes/{node}/memory/relative",
            get(node_memory_relative),
        )
        .route("/api/vhosts", get(vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(vhost).put(put_vhost).delete(delete_vhost),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route(
            "/api/vhosts/{vhost}/topic-permissions",
            get(vhost_topic_permissions),
        )
        .route("/api/vhosts/{vhost}/connections", get(vhost_connections))
        .route("/api/vhosts/{vhost}/channels", get(vhost_channels))
        .route("/api/vhost-limits", get(vhost_limits))
        .route("/api/vhost-limits/{vhost}", get(vhost_limits_of))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            axum::routing::put(put_vhost_limit).delete(delete_vhost_limit),
        )
        .route("/api/users", get(users))
        .route(
            "/api/users/without-permissions",
            get(users_without_permissions),
        )
        .route("/api/users/bulk-delete", post(users_bulk_delete))
        .route(
            "/api/users/{user}",
            get(user).put(put_user).delete(delete_user),
        )
        .route("/api/users/{user}/permissions", get(user_permissions))
        .route(
            "/api/users/{user}/topic-permissions",
            get(user_topic_permissions),
        )
        .route("/api/permissions", get(permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(permission)
                .put(put_permission)
                .delete(delete_permission),
        )
        .route("/api/topic-permissions", get(topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(topic_permission)
                .put(put_topic_permission)
                .delete(delete_topic_permission),
        )
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchange).put(put_exchange).delete(delete_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(exchange_bindings_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(exchange_bindings_destination),
        )
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
        .route(
            "/api/exchanges/{vhost}/{name}/tail",
            get(crate::browser::tail),
        )
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(queues))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue).put(put_queue).delete(delete_queue),
        )
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route(
            "/api/queues/{vhost}/{name}/contents",
            axum::routing::delete(purge),
        )
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
        .route(
            "/api/queues/{vhost}/{name}/messages",
            get(crate::browser::browse),
        )
        .route(
            "/api/queues/{vhost}/{name}/messages/{action}",
            post(crate::browser::act),
        )
        .route(
            "/api/queues/{vhost}/{name}/unacked",
            get(crate::browser::unacked),
        )
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}",
            get(bindings_between).post(add_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{dest}/{props}",
            get(binding).delete(delete_binding),
        )
        .route("/api/connections", get(connections))
        .route(
            "/api/connections/{name}",
            get(connection).delete(close_connection),
        )
        .route("/api/connections/{name}/channels", get(connection_channels))
        .route("/api/channels", get(channels))
        .route("/api/channels/{name}", get(channel))
        .route("/api/consumers", get(consumers))
        .route("/api/consumers/{vhost}", get(consumers))
        .route("/api/policies", get(policies))
        .route("/api/policies/{vhost}", get(policies_in))
        .route(
            "/api/policies/{vhost}/{name}",
            get(policy).put(put_policy).delete(delete_policy),
        )
        .route("/api/operator-policies", get(op_policies))
        .route("/api/operator-policies/{vhost}", get(op_policies_in))
        .route(
            "/api/operator-policies/{vhost}/{name}",
            get(op_policy).put(put_op_policy).delete(delete_op_policy),
        )
        .route(
            "/api/definitions",
            get(get_definitions).post(post_definitions),
        )
        .route(
            "/api/definitions/{vhost}",
            get(get_vhost_definitions).post(post_vhost_definitions),
        )
        .route("/api/parameters", get(parameters))
        .route("/api/parameters/{component}", get(parameters_of))
        .route("/api/parameters/{component}/{vhost}", get(parameters_in))
        .route(
            "/api/parameters/{component}/{vhost}/{name}",
            get(parameter).put(put_parameter).delete(delete_parameter),
        )
        .route(
            "/api/auth/attempts/{node}",
            get(auth_attempts).delete(reset_auth_attempts),
        )
        .route(
            "/api/auth/attempts/{node}/source",
            get(auth_attempts_by_source),
        )
        .route("/api/feature-flags", get(feature_flags))
        .route("/api/user-limits", get(user_limits))
        .route("/api/user-limits/{user}", get(user_limits_of))
        .route(
            "/api/user-limits/{user}/{name}",
            put(put_user_limit).delete(delete_user_limit),
        )
        .route("/api/global-parameters", get(global_parameters))
        .route(
            "/api/global-parameters/{name}",
            get(global_parameter)
                .put(put_global_parameter)
                .delete(delete_global_parameter),
        )
        .route("/api/health/checks/alarms", get(health_alarms))
        .route("/api/health/checks/local-alarms", get(health_local_alarms))
        .route("/api/health/checks/virtual-hosts", get(health_ok))
        .route("/api/health/checks/node-is-quorum-critical", get(health_ok))
        .route(
            "/api/health/checks/node-is-mirror-sync-critical",
            get(health_ok),
        )
        .route(
            "/api/health/checks/port-listener/{port}",
            get(port_listener),
        )
        .route(
            "/api/health/checks/protocol-listener/{proto}",
            get(protocol_listener),
        )
        .route("/api/aliveness-test/{vhost}", get(aliveness))
        .fallback(not_found)
        .with_state(state);
    // Outside the routes, where a 405 already carries its `allow` header.
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn(options))
}

/// OPTIONS as RabbitMQ answers it: 200, no login needed, `allow` listing the route's methods.
/// The route is asked with a method no route has (PATCH), and its 405's `allow` is the answer.
///
/// A request from script (`X-Requested-With`, as the console sends) gets its 401 without
/// `WWW-Authenticate`, so the browser shows the console's login form instead of its own
/// credentials prompt.
async fn options(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.method() != axum::http::Method::OPTIONS {
        let scripted = req.headers().contains_key("x-requested-with");
        let mut r = next.run(req).await;
        if scripted {
            r.headers_mut().remove(header::WWW_AUTHENTICATE);
        }
        return r;
    }
    let (mut parts, body) = req.into_parts();
    parts.method = axum::http::Method::PATCH;
    let r = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if r.status() != StatusCode::METHOD_NOT_ALLOWED {
        return r;
    }
    let allow = r
        .headers()
        .get(axum::http::header::ALLOW)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (
        StatusCode::OK,
        [(axum::http::header::ALLOW, format!("{allow},OPTIONS"))],
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

fn ok_json(v: Value) -> ApiResult<Response> {
    Ok(Json(v).into_response())
}

fn list<F: FnOnce() -> Value>(q: &Q, items: Vec<(String, F)>) -> ApiResult<Response> {
    let lq = ListQuery::parse(&q.0)?;
    ok_json(answer(&lq, items)?)
}

/// Items already rendered, listed by `key`.
fn rendered(items: Vec<Value>, key: &str) -> Vec<(String, impl FnOnce() -> Value)> {
    items
        .into_iter()
        .map(|v| {
            let k = v.get(key).and_then(Value::as_str).unwrap_or("").to_string();
            (k, move || v)
        })
        .collect()
}

// ----- overview, whoami, nodes -----

const EXCHANGE_TYPES: &[(&str, &str)] = &[
    (
        "direct",
        "AMQP direct exchange, as per the AMQP specification",
    ),
    (
        "fanout",
        "AMQP fanout exchange, as per the AMQP specification",
    ),
    (
        "headers",
        "AMQP headers exchange, as per the AMQP specification",
    ),
    (
        "topic",
        "AMQP topic exchange, as per the AMQP specification",
    ),
    ("x-delayed-message", "Delayed Message Exchange"),
];

fn exchange_types() -> Value {
    Value::Array(
        EXCHANGE_TYPES
            .iter()
            .map(|(n, d)| json!({"name": n, "description": d, "enabled": true}))
            .collect(),
    )
}

fn listeners(st: &AppState) -> Value {
    let node = views::node_name();
    Value::Array(
        st.listeners
            .iter()
            .map(|(proto, a)| {
                json!({
                    "node": node,
                    "protocol": proto,
                    "ip_address": a.ip().to_string(),
                    "port": a.port(),
                    "socket_opts": {},
                })
            })
            .collect(),
    )
}

async fn overview(State(st): St, caller: Caller) -> ApiResult<Response> {
    let b = &st.admin.broker;
    let g = &b.stats;
    let unacked_all = st.admin.unacked_by_queue();
    let (mut queues, mut consumers, mut exchanges) = (0usize, 0usize, 0usize);
    let (mut ready, mut unacked) = (0u64, 0u64);
    let (mut r_all, mut r_ready, mut r_unacked) = (0f64, 0f64, 0f64);
    for v in st.admin.vhosts().iter().filter(|v| caller.sees(&v.name)) {
        exchanges += v.exchanges().len();
        for q in v.queues() {
            queues += 1;
            let (r, c) = q.counts();
            ready += r as u64;
            consumers += c as usize;
            unacked += unacked_all
                .get(&(Arc::as_ptr(&q) as usize))
                .copied()
                .unwrap_or(0);
            r_all += q.depth.messages.rate();
            r_ready += q.depth.ready.rate();
            r_unacked += q.depth.unacked.rate();
        }
    }
    let conns: Vec<_> = b
        .connections
        .all()
        .into_iter()
        .filter(|c| caller.can.monitoring || c.session().user == caller.name)
        .collect();
    let channels: usize = conns.iter().map(|c| c.channel_count()).sum();
    let node = views::node_name();
    let mut message_stats = crate::json::message_stats(|f| {
        g.each(|k, c| {
            if !k.starts_with("connection_")
                && !k.starts_with("channel_")
                && !k.starts_with("queue_")
            {
                f(k, c)
            }
        })
    });
    if let Value::Object(m) = &mut message_stats {
        m.remove("get_empty");
        m.remove("get_empty_details");
        m.insert("get_empty".into(), json!(g.get_empty.get()));
        m.insert(
            "get_empty_details".into(),
            crate::json::details(g.get_empty.rate()),
        );
    }
    let churn = crate::json::message_stats(|f| {
        g.each(|k, c| {
            if k.starts_with("connection_") || k.starts_with("channel_") || k.starts_with("queue_")
            {
                f(k, c)
            }
        })
    });
    ok_json(json!({
        "management_version": crate::RABBITMQ_VERSION,
        "rabbitmq_version": crate::RABBITMQ_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "erlang_version": "none (Rust)",
        "erlang_full_version": "none (Rust)",
        "rates_mode": "basic",
        "disable_stats": false,
        "enable_queue_totals": false,
        "is_op_policy_updating_enabled": true,
        "sample_retention_policies": {"global": [600, 3600, 28800, 86400], "basic": [600, 3600], "detailed": [600]},
        "exchange_types": exchange_types(),
        "cluster_name": st.cluster_name(),
        "node": node,
        "message_stats": message_stats,
        "churn_rates": churn,
        "queue_totals": {
            "messages": ready + unacked,
            "messages_details": crate::json::details(r_all),
            "messages_ready": ready,
            "messages_ready_details": crate::json::details(r_ready),
            "messages_unacknowledged": unacked,
            "messages_unacknowledged_details": crate::json::details(r_unacked),
        },
        "object_totals": {
            "channels": channels,
            "connections": conns.len(),
            "consumers": consumers,
            "exchanges": exchanges,
            "queues": queues,
        },
        "statistics_db_event_queue": 0,
        "listeners": listeners(&st),
        "contexts": st.http_contexts(),
    }))
}

async fn whoami(caller: Caller) -> ApiResult<Response> {
    ok_json(json!({"name": caller.name, "tags": caller.tags}))
}

fn node_json(st: &AppState) -> Value {
    let b = &st.admin.broker;
    let sys = warren_core::system::read_for(&b.config.data_dir);
    let alarms = b.alarms.state();
    json!({
        "name": views::node_name(),
        "type": "disc",
        "running": true,
        "being_drained": false,
        // Cluster mode (Warren's own key): every member with its state and lease age, and
        // which one is active (this node, as only the active node serves the API).
        "cluster_members": b
            .cluster_members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|m| json!({
                "name": m.name,
                "incarnation": m.incarnation,
                "state": m.state,
                "lease_left_ms": m.lease_left_ms,
                "advertised": m.advertised,
                "active": m.active,
            }))
            .collect::<Vec<_>>(),
        // Warren's own keys, for the console: message bytes held in memory against the
        // cache budget, and the store's state.
        "warren_messages_memory": b.persist.gauge.get(),
        "warren_cache_budget": b.config.cache_memory,
        "warren_store": {
            "backend": if b.config.storage.as_deref().is_some_and(|s| s.starts_with("mysql")) { "mysql" } else { "sqlite" },
            "submitted": b.persist.writer.last_ticket(),
            "committed": b.persist.writer.committed(),
            "pending_bytes": b.persist.writer.held_bytes(),
            "over_limit": b.persist.writer.over_limit(),
            "fenced": b.persist.writer.fenced(),
        },
        "os_pid": std::process::id().to_string(),
        "uptime": b.started.elapsed().as_millis() as u64,
        "processors": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "run_queue": 0,
        "mem_used": sys.rss_bytes,
        "mem_limit": b.alarms.memory_limit(),
        "mem_alarm": alarms.memory,
        "disk_free": sys.disk_free,
        "disk_free_limit": b.alarms.disk_free_limit(),
        "disk_free_alarm": alarms.disk,
        "fd_used": sys.fds_used,
        "fd_total": sys.fds_total,
        "sockets_used": b.connections.len(),
        "sockets_total": sys.fds_total,
        "proc_used": b.connections.len(),
        "proc_total": 1_048_576,
        "partitions": [],
        "net_ticktime": 60,
        "rates_mode": "basic",
        "exchange_types": exchange_types(),
        "auth_mechanisms": [
            {"name": "PLAIN", "description": "SASL PLAIN authentication mechanism", "enabled": true},
            {"name": "AMQPLAIN", "description": "QPid AMQPLAIN mechanism", "enabled": true},
        ],
        "applications": [{"name": "warren", "description": "Warren", "version": env!("CARGO_PKG_VERSION")}],
        "contexts": st.http_contexts(),
        "listeners": listeners(st),
        "enabled_plugins": ["rabbitmq_management", "rabbitmq_prometheus"],
        "config_files": [],
        "log_files": ["<stderr>"],
        "db_dir": b.config.data_dir.display().to_string(),
    })
}

async fn nodes(State(st): St, caller: Caller) -> ApiResult<Response> {
    caller.require_monitor()?;
    ok_json(json!([node_json(&st)]))
}

async fn node(State(st): St, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require_monitor()?;
    this_node(&name)?;
    ok_json(node_json(&st))
}

// ----- memory breakdown -----

/// RabbitMQ's memory categories, in its order (3.10's, with 4.x's `metadata_store` and
/// `metadata_store_ets`, which rabbitmqadmin v2 requires). Warren reports its resident memory with the
/// bytes of messages held in memory as `binary` (where RabbitMQ keeps message bodies) and
/// the rest as `other_proc`; it measures no other category, so they are 0.
const MEMORY_KEYS: &[&str] = &[
    "connection_readers",
    "connection_writers",
    "connection_channels",
    "connection_other",
    "queue_procs",
    "queue_slave_procs",
    "quorum_queue_procs",
    "quorum_queue_dlx_procs",
    "stream_queue_procs",
    "stream_queue_replica_reader_procs",
    "stream_queue_coordinator_procs",
    "plugins",
    "metadata_store",
    "other_proc",
    "metrics",
    "mgmt_db",
    "mnesia",
    "quorum_ets",
    "metadata_store_ets",
    "other_ets",
    "binary",
    "msg_index",
    "code",
    "atom",
    "other_system",
    "allocated_unused",
    "reserved_unallocated",
];

fn memory_breakdown(st: &AppState) -> (u64, Vec<(&'static str, u64)>) {
    let rss = warren_core::system::rss();
    let messages = (st.admin.broker.persist.gauge.get() as u64).min(rss);
    let parts = MEMORY_KEYS
        .iter()
        .map(|&k| {
            let v = match k {
                "binary" => messages,
                "other_proc" => rss - messages,
                _ => 0,
            };
            (k, v)
        })
        .collect();
    (rss, parts)
}

async fn node_memory(State(st): St, caller: Caller, Path(n): Path<String>) -> ApiResult<Response> {
    caller.require_monitor()?;
    this_node(&n)?;
    let (rss, parts) = memory_breakdown(&st);
    let mut m: Map<String, Value> = parts
        .into_iter()
        .map(|(k, v)| (k.into(), json!(v)))
        .collect();
    m.insert("strategy".into(), json!("rss"));
    m.insert(
        "total".into(),
        json!({"erlang": rss, "rss": rss, "allocated": rss}),
    );
    ok_json(json!({ "memory": m }))
}

async fn node_memory_relative(
    State(st): St,
    caller: Caller,
    Path(n): Path<String>,
) -> ApiResult<Response> {
    caller.require_monitor()?;
    this_node(&n)?;
    let (rss, parts) = memory_breakdown(&st);
    let mut m = Map::new();
    m.insert("total".into(), json!(100));
    for (k, v) in parts {
        // Percent of the total, a category that has any memory at least 1 (as RabbitMQ).
        let pct = if v == 0 || rss == 0 {
            0
        } else {
            (v * 100 / rss).max(1)
        };
        m.insert(k.into(), json!(pct));
    }
    ok_json(json!({ "memory": m }))
}

// ----- feature flags -----

/// RabbitMQ 3.10's feature flags whose behaviour Warren has, always enabled (Warren has no
/// mixed-version clusters to migrate). Those it does not have (quorum and stream queues,
/// mirrored queue versions, maintenance mode) are not listed.
const FEATURE_FLAGS: &[(&str, &str, &str)] = &[
    (
        "drop_unroutable_metric",
        "Count unroutable publishes to be dropped in stats",
        "rabbitmq_management_agent",
    ),
    (
        "empty_basic_get_metric",
        "Count AMQP `basic.get` on empty queues in stats",
        "rabbitmq_management_agent",
    ),
    (
        "implicit_default_bindings",
        "Default bindings are now implicit, instead of being stored in the database",
        "rabbit",
    ),
    (
        "user_limits",
        "Configure connection and channel limits for a user",
        "rabbit",
    ),
    (
        "virtual_host_metadata",
        "Virtual host metadata (description, tags, etc)",
        "rabbit",
    ),
];

async fn feature_flags(caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    ok_json(Value::Array(
        FEATURE_FLAGS
            .iter()
            .map(|(name, desc, by)| {
                json!({"name": name, "desc": desc, "doc_url": "", "state": "enabled",
                       "stability": "stable", "provided_by": by})
            })
            .collect(),
    ))
}

// ----- authentication attempts -----

fn this_node(name: &str) -> ApiResult<()> {
    if name == views::node_name() {
        Ok(())
    } else {
        Err(ApiError::not_found())
    }
}

async fn auth_attempts(
    State(st): St,
    caller: Caller,
    Path(n): Path<String>,
) -> ApiResult<Response> {
    caller.require_monitor()?;
    this_node(&n)?;
    let items: Vec<Value> = st
        .admin
        .broker
        .auth_attempts
        .each()
        .into_iter()
        .filter_map(|(protocol, c)| {
            let (attempts, failed, succeeded) = c.get();
            (attempts > 0).then(|| {
                json!({
                    "protocol": protocol,
                    "auth_attempts": attempts,
                    "auth_attempts_failed": failed,
                    "auth_attempts_succeeded": succeeded,
                })
            })
        })
        .collect();
    ok_json(Value::Array(items))
}

/// Attempts by source address: RabbitMQ tracks them only with `track_auth_attempt_source`
/// (off by default), and Warren does not track them, so the list is empty as RabbitMQ's is.
async fn auth_attempts_by_source(caller: Caller, Path(n): Path<String>) -> ApiResult<Response> {
    caller.require_monitor()?;
    this_node(&n)?;
    ok_json(json!([]))
}

async fn reset_auth_attempts(
    State(st): St,
    caller: Caller,
    Path(n): Path<String>,
) -> ApiResult<Response> {
    caller.require_monitor()?;
    this_node(&n)?;
    for (_, c) in st.admin.broker.auth_attempts.each() {
        c.reset();
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- vhosts -----

async fn vhosts(State(st): St, caller: Caller, q: Q) -> ApiResult<Response> {
    let unacked = Arc::new(st.admin.unacked_by_queue());
    let items = st
        .admin
        .vhosts()
        .into_iter()
        .filter(|v| caller.sees(&v.name))
        .map(|v| {
            let unacked = unacked.clone();
            (v.name.clone(), move || views::vhost(&v, &unacked))
        })
        .collect();
    list(&q, items)
}

async fn vhost(State(st): St, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    let v = usable_vhost(&st, &caller, &name)?;
    ok_json(views::vhost(&v, &st.admin.unacked_by_queue()))
}

fn tags_of(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => warren_core::broker::split_tags(s),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

async fn put_vhost(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let m = object(&body)?;
    let existing = st.admin.find_vhost(&name).map(|v| v.meta());
    let base = existing.clone().unwrap_or_default();
    let meta = VhostMeta {
        description: str_field(&m, "description")
            .map(str::to_string)
            .unwrap_or(base.description),
        tags: if m.contains_key("tags") {
            tags_of(m.get("tags"))
        } else {
            base.tags
        },
        default_queue_type: str_field(&m, "default_queue_type")
            .map(str::to_string)
            .unwrap_or(base.default_queue_type),
    };
    if !matches!(meta.default_queue_type.as_str(), "classic" | "quorum") {
        return Err(ApiError::bad_request(format!(
            "Unsupported default queue type: {}",
            meta.default_queue_type
        )));
    }
    let created = st.admin.put_vhost(&name, meta).await?;
    Ok(created_or_updated(created))
}

async fn delete_vhost(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.delete_vhost(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn vhost_permissions(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.find_vhost(&v).ok_or_else(ApiError::not_found)?;
    let items = st.admin.permissions().await?;
    ok_json(Value::Array(
        items
            .iter()
            .filter(|p| p.vhost == v)
            .map(views::permission)
            .collect(),
    ))
}

async fn vhost_topic_permissions(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.find_vhost(&v).ok_or_else(ApiError::not_found)?;
    let items = st.admin.topic_permissions().await?;
    ok_json(Value::Array(
        items
            .iter()
            .filter(|p| p.vhost == v)
            .map(views::topic_permission)
            .collect(),
    ))
}

fn limits_json(v: &warren_core::vhost::VHost) -> Option<Value> {
    let text = v.parameter("vhost-limits", "limits")?;
    let value: Value = serde_json::from_str(&text).ok()?;
    if value.as_object().is_some_and(|m| m.is_empty()) {
        return None;
    }
    Some(json!({"vhost": v.name, "value": value}))
}

async fn vhost_limits(State(st): St, caller: Caller) -> ApiResult<Response> {
    let items: Vec<Value> = st
        .admin
        .vhosts()
        .iter()
        .filter(|v| caller.sees(&v.name))
        .filter_map(|v| limits_json(v))
        .collect();
    ok_json(Value::Array(items))
}

async fn vhost_limits_of(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    let vh = usable_vhost(&st, &caller, &v)?;
    ok_json(Value::Array(limits_json(&vh).into_iter().collect()))
}

const VHOST_LIMITS: &[&str] = &["max-connections", "max-queues"];

/// How RabbitMQ prints a JSON value in its validation messages (as an Erlang term: a string
/// is `<<"x">>`).
fn erlang_term(v: &Value) -> String {
    match v {
        Value::String(s) => format!("<<\"{s}\">>"),
        other => other.to_string(),
    }
}

/// What is wrong with limits (vhost or user) by RabbitMQ's rules and texts: an unknown name,
/// or a value that is not an integer. `what` names the kind ("limits", "user-limits").
fn limits_problem(names: &[&str], limits: &Map<String, Value>, what: &str) -> Option<String> {
    let unknown: Vec<String> = limits
        .iter()
        .filter(|(k, _)| !names.contains(&k.as_str()))
        .map(|(k, v)| format!("{{<<\"{k}\">>,{}}}", erlang_term(v)))
        .collect();
    if !unknown.is_empty() {
        return Some(format!(
            "Unrecognised terms [{}] in {what}",
            unknown.join(",")
        ));
    }
    limits
        .iter()
        .find(|(_, v)| v.as_i64().is_none())
        .map(|(k, v)| format!("{k} should be a number, actually was {}", erlang_term(v)))
}

/// RabbitMQ's management UI escapes some validation texts for HTML; its API returns them so.
fn html_escaped(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The `value` member of a limit's body; RabbitMQ's 400 when it is missing.
fn limit_value(body: &[u8]) -> ApiResult<Value> {
    object(body)?
        .remove("value")
        .ok_or_else(|| ApiError::bad_request("[{key_missing,value}]"))
}

async fn put_vhost_limit(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let vh = st.admin.find_vhost(&v).ok_or_else(ApiError::not_found)?;
    let value = limit_value(&body)?;
    let one = Map::from_iter([(name.clone(), value.clone())]);
    if let Some(problem) = limits_problem(VHOST_LIMITS, &one, "limits") {
        return Err(ApiError::bad_request(format!(
            "Validation failed\n\n{problem}\n"
        )));
    }
    let mut limits: Map<String, Value> = vh
        .parameter("vhost-limits", "limits")
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    limits.insert(name, value);
    st.admin
        .set_parameter(
            &v,
            "vhost-limits",
            "limits",
            Value::Object(limits).to_string(),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_vhost_limit(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let vh = st.admin.find_vhost(&v).ok_or_else(ApiError::not_found)?;
    let mut limits: Map<String, Value> = vh
        .parameter("vhost-limits", "limits")
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if limits.remove(&name).is_none() {
        return Err(ApiError::not_found());
    }
    if limits.is_empty() {
        st.admin
            .clear_parameter(&v, "vhost-limits", "limits")
            .await?;
    } else {
        st.admin
            .set_parameter(
                &v,
                "vhost-limits",
                "limits",
                Value::Object(limits).to_string(),
            )
            .await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- users and permissions -----

async fn users(State(st): St, caller: Caller, q: Q) -> ApiResult<Response> {
    caller.require_admin()?;
    let items = st.admin.users().await?;
    list(
        &q,
        rendered(items.iter().map(views::user).collect(), "name"),
    )
}

async fn users_without_permissions(State(st): St, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    let perms = st.admin.permissions().await?;
    let items = st.admin.users().await?;
    ok_json(Value::Array(
        items
            .iter()
            .filter(|u| !perms.iter().any(|p| p.user == u.name))
            .map(views::user)
            .collect(),
    ))
}

async fn user(State(st): St, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    caller.require_admin()?;
    let u = st
        .admin
        .user(&name)
        .await?
        .ok_or_else(ApiError::not_found)?;
    ok_json(views::user(&u))
}

/// The stored hash of a PUT user body: from `password`, from `password_hash` (base64, with
/// `hashing_algorithm` sha256 or sha512), or none (a user who cannot log in with a password).
fn password_hash_of(m: &Map<String, Value>) -> ApiResult<Option<Vec<u8>>> {
    use base64::Engine;
    if let Some(p) = m.get("password") {
        let Some(p) = p.as_str() else {
            return Err(ApiError::bad_request("password must be a string"));
        };
        return Ok(Some(warren_core::auth::hash_password(p)));
    }
    if let Some(h) = m.get("password_hash") {
        let Some(h) = h.as_str() else {
            return Err(ApiError::bad_request("password_hash must be a string"));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(h)
            .map_err(|_| ApiError::bad_request("password_hash is not base64"))?;
        let algo = str_field(m, "hashing_algorithm").unwrap_or("rabbit_password_hashing_sha256");
        let want = match algo {
            "rabbit_password_hashing_sha256" => 36,
            "rabbit_password_hashing_sha512" => 68,
            other => {
                return Err(ApiError::bad_request(format!(
                    "hashing algorithm {other} is not supported (sha256 and sha512 are)"
                )))
            }
        };
        if !bytes.is_empty() && bytes.len() != want {
            return Err(ApiError::bad_request(format!(
                "password_hash is {} bytes; {algo} hashes are {want}",
                bytes.len()
            )));
        }
        return Ok(Some(bytes));
    }
    Ok(None)
}

async fn put_user(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let m = object(&body)?;
    let existing = st.admin.user(&name).await?;
    let hash = match password_hash_of(&m)? {
        Some(h) => h,
        None => match &existing {
            Some(u) => u.password_hash.clone(),
            None => {
                if !m.contains_key("tags") {
                    return Err(ApiError::bad_request(
                        "Validation failed\n\nmandatory field password or password_hash missing\n",
                    ));
                }
                Vec::new()
            }
        },
    };
    let tags = if m.contains_key("tags") {
        tags_of(m.get("tags"))
    } else {
        existing
            .as_ref()
            .map(|u| warren_core::broker::split_tags(&u.tags))
            .unwrap_or_default()
    };
    let created = st.admin.put_user(&name, hash, &tags).await?;
    Ok(created_or_updated(created))
}

async fn delete_user(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn users_bulk_delete(State(st): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.require_admin()?;
    let m = object(&body)?;
    let Some(Value::Array(names)) = m.get("users") else {
        return Err(ApiError::bad_request("users must be a list of names"));
    };
    // As RabbitMQ: users are deleted in order; an unknown one stops the request with 400.
    for n in names.iter().filter_map(Value::as_str) {
        match st.admin.delete_user(n).await {
            Ok(()) => {}
            Err(warren_core::admin::AdminError::NotFound) => {
                return Err(ApiError::bad_request_term(json!(["no_such_user", n])));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn user_permissions(
    State(st): St,
    caller: Caller,
    Path(u): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.user(&u).await?.ok_or_else(ApiError::not_found)?;
    let items = st.admin.permissions().await?;
    ok_json(Value::Array(
        items
            .iter()
            .filter(|p| p.user == u)
            .map(views::permission)
            .collect(),
    ))
}

async fn user_topic_permissions(
    State(st): St,
    caller: Caller,
    Path(u): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.user(&u).await?.ok_or_else(ApiError::not_found)?;
    let items = st.admin.topic_permissions().await?;
    ok_json(Value::Array(
        items
            .iter()
            .filter(|p| p.user == u)
            .map(views::topic_permission)
            .collect(),
    ))
}

async fn permissions(State(st): St, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    let items = st.admin.permissions().await?;
    ok_json(Value::Array(items.iter().map(views::permission).collect()))
}

async fn permission(
    State(st): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let items = st.admin.permissions().await?;
    let p = items
        .iter()
        .find(|p| p.vhost == v && p.user == u)
        .ok_or_else(ApiError::not_found)?;
    ok_json(views::permission(p))
}

async fn put_permission(
    State(st): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let m = object(&body)?;
    let field = |k: &str| -> ApiResult<String> {
        match m.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            None => Err(ApiError::bad_request(format!(
                "Validation failed\n\nmandatory field {k} missing\n"
            ))),
            Some(_) => Err(ApiError::bad_request(format!("{k} must be a string"))),
        }
    };
    let p = PermissionRecord {
        vhost: v,
        user: u,
        configure: field("configure")?,
        write: field("write")?,
        read: field("read")?,
    };
    let created = st.admin.put_permission(p).await?;
    Ok(created_or_updated(created))
}

async fn delete_permission(
    State(st): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.delete_permission(&v, &u).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn topic_permissions(State(st): St, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    let items = st.admin.topic_permissions().await?;
    ok_json(Value::Array(
        items.iter().map(views::topic_permission).collect(),
    ))
}

async fn topic_permission(
    State(st): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let items: Vec<Value> = st
        .admin
        .topic_permissions()
        .await?
        .iter()
        .filter(|p| p.vhost == v && p.user == u)
        .map(views::topic_permission)
        .collect();
    if items.is_empty() {
        return Err(ApiError::not_found());
    }
    ok_json(Value::Array(items))
}

async fn put_topic_permission(
    State(st): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let m = object(&body)?;
    let field = |k: &str| -> ApiResult<String> {
        match m.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            None => Err(ApiError::bad_request(format!(
                "Validation failed\n\nmandatory field {k} missing\n"
            ))),
            Some(_) => Err(ApiError::bad_request(format!("{k} must be a string"))),
        }
    };
    let p = TopicPermissionRecord {
        vhost: v,
        user: u,
        exchange: field("exchange")?,
        write: field("write")?,
        read: field("read")?,
    };
    let created = st.admin.put_topic_permission(p).await?;
    Ok(created_or_updated(created))
}

async fn delete_topic_permission(
    State(st): St,
    caller: Caller,
    Path((v, u)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.delete_topic_permission(&v, &u, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- exchanges -----

/// The vhost a request names: 404 when it does not exist, 401 when the caller may not use it.
fn usable_vhost(
    st: &AppState,
    caller: &Caller,
    v: &str,
) -> ApiResult<Arc<warren_core::vhost::VHost>> {
    let vh = st.admin.find_vhost(v).ok_or_else(ApiError::not_found)?;
    caller.check_vhost(v)?;
    Ok(vh)
}

/// The vhosts a list covers: the one in the path (404 if missing) or all the caller sees.
fn scope(
    st: &AppState,
    caller: &Caller,
    vhost: Option<&str>,
) -> ApiResult<Vec<Arc<warren_core::vhost::VHost>>> {
    match vhost {
        Some(v) => Ok(vec![usable_vhost(st, caller, v)?]),
        None => Ok(st
            .admin
            .vhosts()
            .into_iter()
            .filter(|v| caller.sees(&v.name))
            .collect()),
    }
}

async fn exchanges(
    State(st): St,
    caller: Caller,
    vhost: Option<Path<String>>,
    q: Q,
) -> ApiResult<Response> {
    let lq = ListQuery::parse(&q.0)?;
    let items: Vec<(String, Arc<warren_core::exchange::Exchange>)> =
        scope(&st, &caller, vhost.as_deref().map(String::as_str))?
            .iter()
            .flat_map(|v| v.exchanges().into_iter().map(|x| (v.name.clone(), x)))
            .collect();
    let out = crate::json::answer_by(
        &lq,
        items,
        |(_, x)| x.name.as_str(),
        |(v, x)| views::exchange(&x, &v),
        |_, _| None,
    )?;
    ok_json(out)
}

/// "amq.default" names the default exchange in paths.
fn exchange_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

async fn exchange(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let x = st
        .admin
        .exchange(&v, exchange_name(&name))
        .ok_or_else(ApiError::not_found)?;
    ok_json(views::exchange(&x, &v))
}

async fn put_exchange(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let m = object(&body)?;
    // As RabbitMQ, the AMQP method's defaults apply: type direct, not durable.
    let kind = str_field(&m, "type").unwrap_or("direct");
    if name.len() > 255 {
        return Err(ApiError::bad_request("exchange name longer than 255 bytes"));
    }
    let d = ExchangeDeclare {
        name: exchange_name(&name).to_string(),
        kind: kind.to_string(),
        passive: false,
        durable: bool_field(&m, "durable", false)?,
        auto_delete: bool_field(&m, "auto_delete", false)?,
        internal: bool_field(&m, "internal", false)?,
        arguments: json_to_table(m.get("arguments").unwrap_or(&Value::Null))?,
    };
    let created = st.admin.declare_exchange(&v, d).await?;
    Ok(created_or_updated(created))
}

async fn delete_exchange(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    q: Q,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let if_unused = q.0.get("if-unused").is_some_and(|x| x == "true");
    st.admin
        .delete_exchange(&v, exchange_name(&name), if_unused)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn exchange_bindings_source(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.check_vhost(&v)?;
    let name = exchange_name(&name).to_string();
    st.admin
        .exchange(&v, &name)
        .ok_or_else(ApiError::not_found)?;
    let items = st.admin.bindings(&v);
    ok_json(Value::Array(
        items
            .iter()
            .filter(|b| b.source == name)
            .map(views::binding)
            .collect(),
    ))
}

async fn exchange_bindings_destination(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.check_vhost(&v)?;
    let name = exchange_name(&name).to_string();
    st.admin
        .exchange(&v, &name)
        .ok_or_else(ApiError::not_found)?;
    let items = st.admin.bindings(&v);
    ok_json(Value::Array(
        items
            .iter()
            .filter(|b| b.destination == name && b.destination_type == "exchange")
            .map(views::binding)
            .collect(),
    ))
}

async fn publish(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.check_vhost(&v)?;
    let m = object(&body)?;
    let routed = crate::messages::publish(&st.admin, &v, exchange_name(&name), &m).await?;
    ok_json(json!({ "routed": routed }))
}

// ----- queues -----

async fn queues(
    State(st): St,
    caller: Caller,
    vhost: Option<Path<String>>,
    q: Q,
) -> ApiResult<Response> {
    let lq = ListQuery::parse(&q.0)?;
    let unacked = st.admin.unacked_by_queue();
    let held = |qu: &Arc<warren_core::queue::Queue>| {
        unacked
            .get(&(Arc::as_ptr(qu) as usize))
            .copied()
            .unwrap_or(0)
    };
    let node = views::node_name();
    // In vhost order (the vhosts are sorted): ties in name keep it.
    let items: Vec<Arc<warren_core::queue::Queue>> =
        scope(&st, &caller, vhost.as_deref().map(String::as_str))?
            .iter()
            .flat_map(|v| v.queues())
            .collect();
    let out = crate::json::answer_by(
        &lq,
        items,
        |qu| qu.name(),
        |qu| views::queue(&qu, held(&qu), &node),
        |qu, key| {
            // The fields lists are most often sorted by, read without rendering the queue.
            let ready = || qu.counts().0 as u64;
            Some(match key {
                "messages" => json!(ready() + held(qu)),
                "messages_ready" => json!(ready()),
                "messages_unacknowledged" => json!(held(qu)),
                "consumers" => json!(qu.counts().1),
                "vhost" => json!(qu.vhost),
                "durable" => json!(qu.spec.durable),
                "auto_delete" => json!(qu.spec.auto_delete),
                _ => return None,
            })
        },
    )?;
    ok_json(out)
}

async fn queue(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let qu = st.admin.queue(&v, &name).ok_or_else(ApiError::not_found)?;
    let n = st
        .admin
        .unacked_by_queue()
        .get(&(Arc::as_ptr(&qu) as usize))
        .copied()
        .unwrap_or(0);
    ok_json(views::queue(&qu, n, &views::node_name()))
}

async fn put_queue(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let m = object(&body)?;
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::bad_request("queue names are 1 to 255 bytes"));
    }
    let mut arguments = json_to_table(m.get("arguments").unwrap_or(&Value::Null))?;
    if let Some(t) = str_field(&m, "type") {
        arguments.insert(
            "x-queue-type".into(),
            warren_protocol::AMQPValue::LongString(t.into()),
        );
    }
    let d = QueueDeclare {
        name: name.clone(),
        passive: false,
        durable: bool_field(&m, "durable", false)?,
        exclusive: false,
        auto_delete: bool_field(&m, "auto_delete", false)?,
        arguments,
    };
    let created = st.admin.declare_queue(&v, &caller.name, d).await?;
    Ok(created_or_updated(created))
}

async fn delete_queue(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    q: Q,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let flag = |k: &str| q.0.get(k).is_some_and(|x| x == "true");
    st.admin
        .delete_queue(&v, &name, flag("if-unused"), flag("if-empty"))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn queue_bindings(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.check_vhost(&v)?;
    st.admin.queue(&v, &name).ok_or_else(ApiError::not_found)?;
    let items = st.admin.bindings(&v);
    ok_json(Value::Array(
        items
            .iter()
            .filter(|b| b.destination == name && b.destination_type == "queue")
            .map(views::binding)
            .collect(),
    ))
}

async fn purge(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    st.admin.purge_queue(&v, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_messages(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let m = object(&body)?;
    let out = crate::messages::get(&st.admin, &v, &name, &m).await?;
    ok_json(out)
}

// ----- bindings -----

async fn bindings(
    State(st): St,
    caller: Caller,
    vhost: Option<Path<String>>,
) -> ApiResult<Response> {
    let mut out = Vec::new();
    for v in scope(&st, &caller, vhost.as_deref().map(String::as_str))? {
        out.extend(st.admin.bindings(&v.name).iter().map(views::binding));
    }
    ok_json(Value::Array(out))
}

fn dest_kind(kind: &str) -> ApiResult<bool> {
    match kind {
        "q" => Ok(false),
        "e" => Ok(true),
        _ => Err(ApiError::not_found()),
    }
}

fn matching(
    st: &AppState,
    v: &str,
    source: &str,
    to_exchange: bool,
    dest: &str,
) -> Vec<warren_core::admin::BindingView> {
    st.admin
        .bindings(v)
        .into_iter()
        .filter(|b| {
            b.source == source
                && b.destination == dest
                && (b.destination_type == "exchange") == to_exchange
        })
        .collect()
}

async fn bindings_between(
    State(st): St,
    caller: Caller,
    Path((v, source, kind, dest)): Path<(String, String, String, String)>,
) -> ApiResult<Response> {
    caller.check_vhost(&v)?;
    let to_exchange = dest_kind(&kind)?;
    let source = exchange_name(&source).to_string();
    st.admin
        .exchange(&v, &source)
        .ok_or_else(ApiError::not_found)?;
    let exists = if to_exchange {
        st.admin.exchange(&v, &dest).is_some()
    } else {
        st.admin.queue(&v, &dest).is_some()
    };
    if !exists {
        return Err(ApiError::not_found());
    }
    ok_json(Value::Array(
        matching(&st, &v, &source, to_exchange, &dest)
            .iter()
            .map(views::binding)
            .collect(),
    ))
}

async fn add_binding(
    State(st): St,
    caller: Caller,
    Path((v, source, kind, dest)): Path<(String, String, String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let to_exchange = dest_kind(&kind)?;
    let m = object(&body)?;
    let key = str_field(&m, "routing_key").unwrap_or("").to_string();
    let arguments = json_to_table(m.get("arguments").unwrap_or(&Value::Null))?;
    let source = exchange_name(&source).to_string();
    st.admin
        .bind(&v, &source, to_exchange, &dest, &key, &arguments)
        .await?;
    // RabbitMQ answers with the new binding's address relative to the request's own:
    // "<destination>/<properties key>".
    let props = views::properties_key(&key, &arguments);
    let location = format!(
        "{}/{}",
        percent_encoding::utf8_percent_encode(&dest, SEGMENT),
        props
    );
    let mut r = StatusCode::CREATED.into_response();
    if let Ok(h) = header::HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, h);
    }
    Ok(r)
}

const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn find_binding(
    st: &AppState,
    v: &str,
    source: &str,
    kind: &str,
    dest: &str,
    props: &str,
) -> ApiResult<warren_core::admin::BindingView> {
    let to_exchange = dest_kind(kind)?;
    matching(st, v, exchange_name(source), to_exchange, dest)
        .into_iter()
        .find(|b| {
            // The path segment arrives decoded; so is the key compared with it.
            let key = views::properties_key(&b.routing_key, &b.arguments);
            percent_encoding::percent_decode_str(&key).decode_utf8_lossy() == props
        })
        .ok_or_else(ApiError::not_found)
}

async fn binding(
    State(st): St,
    caller: Caller,
    Path((v, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<Response> {
    caller.check_vhost(&v)?;
    let b = find_binding(&st, &v, &source, &kind, &dest, &props)?;
    ok_json(views::binding(&b))
}

async fn delete_binding(
    State(st): St,
    caller: Caller,
    Path((v, source, kind, dest, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<Response> {
    caller.check_vhost(&v)?;
    let b = find_binding(&st, &v, &source, &kind, &dest, &props)?;
    st.admin
        .unbind(
            &v,
            &b.source,
            b.destination_type == "exchange",
            &b.destination,
            &b.routing_key,
            &b.arguments,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- connections, channels, consumers -----

fn visible_connections(
    st: &AppState,
    caller: &Caller,
) -> Vec<Arc<warren_core::connections::ConnInfo>> {
    st.admin
        .broker
        .connections
        .all()
        .into_iter()
        .filter(|c| caller.can.monitoring || c.session().user == caller.name)
        .collect()
}

async fn connections(State(st): St, caller: Caller, q: Q) -> ApiResult<Response> {
    let node = views::node_name();
    let alarm = st.admin.broker.alarms.state().any();
    let items = visible_connections(&st, &caller)
        .into_iter()
        .map(|c| views::connection(&c, &node, alarm))
        .collect();
    list(&q, rendered(items, "name"))
}

async fn vhost_connections(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    let node = views::node_name();
    let alarm = st.admin.broker.alarms.state().any();
    ok_json(Value::Array(
        visible_connections(&st, &caller)
            .into_iter()
            .filter(|c| c.session().vhost == v)
            .map(|c| views::connection(&c, &node, alarm))
            .collect(),
    ))
}

fn find_connection(
    st: &AppState,
    caller: &Caller,
    name: &str,
) -> ApiResult<Arc<warren_core::connections::ConnInfo>> {
    visible_connections(st, caller)
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(ApiError::not_found)
}

async fn connection(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let c = find_connection(&st, &caller, &name)?;
    let alarm = st.admin.broker.alarms.state().any();
    ok_json(views::connection(&c, &views::node_name(), alarm))
}

async fn close_connection(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    find_connection(&st, &caller, &name)?;
    let reason = headers
        .get("x-reason")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("Closed via management plugin");
    st.admin.close_connection(&name, reason)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn connection_channels(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let c = find_connection(&st, &caller, &name)?;
    let node = views::node_name();
    ok_json(Value::Array(
        c.channels()
            .iter()
            .map(|ch| views::channel(&c, ch, &node))
            .collect(),
    ))
}

fn all_channels(st: &AppState, caller: &Caller, vhost: Option<&str>) -> Vec<Value> {
    let node = views::node_name();
    let mut out = Vec::new();
    for c in visible_connections(st, caller) {
        if vhost.is_some_and(|v| c.session().vhost != v) {
            continue;
        }
        for ch in c.channels() {
            out.push(views::channel(&c, &ch, &node));
        }
    }
    out
}

async fn channels(State(st): St, caller: Caller, q: Q) -> ApiResult<Response> {
    list(&q, rendered(all_channels(&st, &caller, None), "name"))
}

async fn vhost_channels(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    ok_json(Value::Array(all_channels(&st, &caller, Some(&v))))
}

async fn channel(State(st): St, caller: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    all_channels(&st, &caller, None)
        .into_iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name.as_str()))
        .map(|c| Json(c).into_response())
        .ok_or_else(ApiError::not_found)
}

async fn consumers(
    State(st): St,
    caller: Caller,
    vhost: Option<Path<String>>,
) -> ApiResult<Response> {
    let conns: HashMap<u64, Arc<warren_core::connections::ConnInfo>> = st
        .admin
        .broker
        .connections
        .all()
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    let mut out = Vec::new();
    for v in scope(&st, &caller, vhost.as_deref().map(String::as_str))? {
        let mut qs = v.queues();
        qs.sort_by(|a, b| a.name().cmp(b.name()));
        for qu in qs {
            for cons in qu.consumers() {
                let Some(c) = conns.get(&cons.channel.conn_id) else {
                    continue;
                };
                if !caller.can.monitoring && c.session().user != caller.name {
                    continue;
                }
                out.push(views::consumer(c, &cons, &qu));
            }
        }
    }
    ok_json(Value::Array(out))
}

// ----- policies -----

fn policy_json(vhost: &str, p: &warren_core::policy::Policy) -> Value {
    let mut v = p.to_json();
    if let Value::Object(m) = &mut v {
        m.insert("vhost".into(), json!(vhost));
        m.insert("name".into(), json!(p.name));
    }
    v
}

fn list_policies(
    st: &AppState,
    caller: &Caller,
    vhost: Option<&str>,
    operator: bool,
) -> ApiResult<Value> {
    let mut out = Vec::new();
    for v in scope(st, caller, vhost)? {
        let mut ps = v.policies(operator);
        ps.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(ps.iter().map(|p| policy_json(&v.name, p)));
    }
    Ok(Value::Array(out))
}

fn get_policy(
    st: &AppState,
    caller: &Caller,
    v: &str,
    name: &str,
    operator: bool,
) -> ApiResult<Response> {
    let vh = usable_vhost(st, caller, v)?;
    vh.policies(operator)
        .iter()
        .find(|p| p.name == name)
        .map(|p| Json(policy_json(v, p)).into_response())
        .ok_or_else(ApiError::not_found)
}

async fn store_policy(
    st: &AppState,
    caller: &Caller,
    v: &str,
    name: &str,
    body: &[u8],
    operator: bool,
) -> ApiResult<Response> {
    if operator {
        caller.require_admin()?;
    } else {
        caller.require_policymaker()?;
    }
    usable_vhost(st, caller, v)?;
    let m = object(body)?;
    let component = if operator {
        warren_core::vhost::OPERATOR_POLICY
    } else {
        warren_core::vhost::POLICY
    };
    let created = st
        .admin
        .set_parameter(v, component, name, Value::Object(m).to_string())
        .await?;
    Ok(created_or_updated(created))
}

async fn remove_policy(
    st: &AppState,
    caller: &Caller,
    v: &str,
    name: &str,
    operator: bool,
) -> ApiResult<Response> {
    if operator {
        caller.require_admin()?;
    } else {
        caller.require_policymaker()?;
    }
    usable_vhost(st, caller, v)?;
    let component = if operator {
        warren_core::vhost::OPERATOR_POLICY
    } else {
        warren_core::vhost::POLICY
    };
    st.admin.clear_parameter(v, component, name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn policies(State(st): St, caller: Caller) -> ApiResult<Response> {
    ok_json(list_policies(&st, &caller, None, false)?)
}

async fn policies_in(State(st): St, caller: Caller, Path(v): Path<String>) -> ApiResult<Response> {
    ok_json(list_policies(&st, &caller, Some(&v), false)?)
}

async fn policy(
    State(st): St,
    caller: Caller,
    Path((v, n)): Path<(String, String)>,
) -> ApiResult<Response> {
    get_policy(&st, &caller, &v, &n, false)
}

async fn put_policy(
    State(st): St,
    caller: Caller,
    Path((v, n)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    store_policy(&st, &caller, &v, &n, &body, false).await
}

async fn delete_policy(
    State(st): St,
    caller: Caller,
    Path((v, n)): Path<(String, String)>,
) -> ApiResult<Response> {
    remove_policy(&st, &caller, &v, &n, false).await
}

async fn op_policies(State(st): St, caller: Caller) -> ApiResult<Response> {
    ok_json(list_policies(&st, &caller, None, true)?)
}

async fn op_policies_in(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
) -> ApiResult<Response> {
    ok_json(list_policies(&st, &caller, Some(&v), true)?)
}

async fn op_policy(
    State(st): St,
    caller: Caller,
    Path((v, n)): Path<(String, String)>,
) -> ApiResult<Response> {
    get_policy(&st, &caller, &v, &n, true)
}

async fn put_op_policy(
    State(st): St,
    caller: Caller,
    Path((v, n)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    store_policy(&st, &caller, &v, &n, &body, true).await
}

async fn delete_op_policy(
    State(st): St,
    caller: Caller,
    Path((v, n)): Path<(String, String)>,
) -> ApiResult<Response> {
    remove_policy(&st, &caller, &v, &n, true).await
}

// ----- definitions -----

fn download(v: Value, q: &Q) -> ApiResult<Response> {
    let mut r = Json(v).into_response();
    // ?download=name.json asks for an attachment, as the console's export button does.
    if let Some(name) = q.0.get("download").filter(|n| !n.is_empty()) {
        let safe: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .collect();
        if let Ok(h) = header::HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
            r.headers_mut().insert(header::CONTENT_DISPOSITION, h);
        }
    }
    Ok(r)
}

async fn get_definitions(State(st): St, caller: Caller, q: Q) -> ApiResult<Response> {
    caller.require_admin()?;
    download(crate::definitions::export(&st.admin, None).await?, &q)
}

async fn get_vhost_definitions(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
    q: Q,
) -> ApiResult<Response> {
    caller.require_admin()?;
    download(crate::definitions::export(&st.admin, Some(&v)).await?, &q)
}

async fn import_definitions(
    st: &AppState,
    caller: &Caller,
    vhost: Option<&str>,
    body: &[u8],
) -> ApiResult<Response> {
    caller.require_admin()?;
    if let Some(v) = vhost {
        st.admin.find_vhost(v).ok_or_else(ApiError::not_found)?;
    }
    let d: Value = serde_json::from_slice(body).map_err(|_| ApiError::bad_request("not_json"))?;
    crate::definitions::import(
        &st.admin,
        &d,
        vhost,
        crate::definitions::Existing::Update,
        &caller.name,
    )
    .await
    .map_err(|e| {
        tracing::warn!("definitions import refused: {e}");
        ApiError::bad_request(e)
    })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn post_definitions(State(st): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    import_definitions(&st, &caller, None, &body).await
}

async fn post_vhost_definitions(
    State(st): St,
    caller: Caller,
    Path(v): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    import_definitions(&st, &caller, Some(&v), &body).await
}

// ----- runtime parameters -----
//
// Warren's vhost-scoped parameter components are RabbitMQ's core ones: `policy` (set through
// /api/policies only, as RabbitMQ), `operator_policy` and `vhost-limits`. Components that come
// with plugins Warren does not have (federation, shovel) are refused on PUT as RabbitMQ
// refuses them when the plugin is off.

const LIMITS: &str = "vhost-limits";

fn parameter_json(vhost: &str, component: &str, name: &str, value: &str) -> Value {
    json!({
        "value": serde_json::from_str::<Value>(value).unwrap_or(Value::Null),
        "vhost": vhost,
        "component": component,
        "name": name,
    })
}

fn list_parameters(
    st: &AppState,
    caller: &Caller,
    component: Option<&str>,
    vhost: Option<&str>,
) -> ApiResult<Response> {
    parameters_allowed(caller)?;
    let mut out = Vec::new();
    for v in scope(st, caller, vhost)? {
        let mut ps = v.parameters();
        ps.sort();
        out.extend(
            ps.iter()
                // The full list leaves user policies out (they have /api/policies); asked
                // for by component, they are listed.
                .filter(|(c, _, _)| component.is_some() || c != warren_core::vhost::POLICY)
                .filter(|(c, _, _)| component.is_none_or(|want| c == want))
                .map(|(c, n, val)| parameter_json(&v.name, c, n, val)),
        );
    }
    ok_json(Value::Array(out))
}

async fn parameters(State(st): St, caller: Caller) -> ApiResult<Response> {
    list_parameters(&st, &caller, None, None)
}

async fn parameters_of(
    State(st): St,
    caller: Caller,
    Path(component): Path<String>,
) -> ApiResult<Response> {
    list_parameters(&st, &caller, Some(&component), None)
}

async fn parameters_in(
    State(st): St,
    caller: Caller,
    Path((component, v)): Path<(String, String)>,
) -> ApiResult<Response> {
    list_parameters(&st, &caller, Some(&component), Some(&v))
}

async fn parameter(
    State(st): St,
    caller: Caller,
    Path((component, v, name)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    parameters_allowed(&caller)?;
    let vh = usable_vhost(&st, &caller, &v)?;
    let value = vh
        .parameter(&component, &name)
        .ok_or_else(ApiError::not_found)?;
    ok_json(parameter_json(&v, &component, &name, &value))
}

/// Runtime parameters need the policymaker tag (RabbitMQ's text differs from /api/policies').
fn parameters_allowed(caller: &Caller) -> ApiResult<()> {
    if caller.can.policymaker {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "User not authorised to access object",
        ))
    }
}

async fn put_parameter(
    State(st): St,
    caller: Caller,
    Path((component, v, name)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    parameters_allowed(&caller)?;
    if st.admin.find_vhost(&v).is_none() {
        return Err(ApiError::vhost_not_found());
    }
    caller.check_vhost(&v)?;
    let value = limit_value(&body)?;
    let text = match component.as_str() {
        warren_core::vhost::POLICY => {
            return Err(ApiError::bad_request(
                "policies may not be set using this method",
            ))
        }
        warren_core::vhost::OPERATOR_POLICY => value.to_string(),
        LIMITS => {
            let Value::Object(limits) = &value else {
                return Err(ApiError::bad_request(
                    "Validation failed\n\nlimits must be a JSON object\n",
                ));
            };
            if name != "limits" {
                return Err(ApiError::bad_request(
                    "Validation failed\n\nvhost limits are one parameter named limits\n",
                ));
            }
            if let Some(problem) = limits_problem(VHOST_LIMITS, limits, "limits") {
                return Err(ApiError::bad_request(html_escaped(&format!(
                    "Validation failed\n\n{problem}\n"
                ))));
            }
            value.to_string()
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "Validation failed\n\ncomponent {other} not found\n"
            )))
        }
    };
    let created = st.admin.set_parameter(&v, &component, &name, text).await?;
    Ok(created_or_updated(created))
}

async fn delete_parameter(
    State(st): St,
    caller: Caller,
    Path((component, v, name)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    parameters_allowed(&caller)?;
    usable_vhost(&st, &caller, &v)?;
    st.admin.clear_parameter(&v, &component, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- user limits -----

fn user_limits_json(user: &str, limits: Map<String, Value>) -> Option<Value> {
    (!limits.is_empty()).then(|| json!({"user": user, "value": limits}))
}

async fn user_limits(State(st): St, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    let users = st.admin.users().await?;
    ok_json(Value::Array(
        users
            .iter()
            .filter_map(|u| {
                user_limits_json(&u.name, serde_json::from_str(&u.limits).unwrap_or_default())
            })
            .collect(),
    ))
}

async fn user_limits_of(
    State(st): St,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let limits = st.admin.user_limits(&user).await?;
    ok_json(Value::Array(
        user_limits_json(&user, limits).into_iter().collect(),
    ))
}

async fn put_user_limit(
    State(st): St,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let value = limit_value(&body)?;
    let one = Map::from_iter([(name.clone(), value.clone())]);
    if let Some(problem) = limits_problem(warren_core::auth::USER_LIMITS, &one, "user-limits") {
        return Err(ApiError::bad_request(problem));
    }
    let n = value.as_i64().unwrap_or(-1);
    match st.admin.set_user_limit(&user, &name, Some(n)).await {
        Err(warren_core::admin::AdminError::NotFound) => {
            Err(ApiError::bad_request_term(json!(["no_such_user", user])))
        }
        r => {
            r?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

async fn delete_user_limit(
    State(st): St,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    // Clearing a limit that is not set is not an error (RabbitMQ answers 204).
    if warren_core::auth::USER_LIMITS.contains(&name.as_str()) {
        st.admin.set_user_limit(&user, &name, None).await?;
    } else if st.admin.user(&user).await?.is_none() {
        return Err(ApiError::not_found());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- global parameters -----

fn global_json(name: &str, value: &str) -> Value {
    json!({
        "name": name,
        "value": serde_json::from_str::<Value>(value).unwrap_or(Value::Null),
    })
}

async fn global_parameters(State(st): St, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    ok_json(Value::Array(
        st.admin
            .global_parameters()
            .iter()
            .map(|(n, v)| global_json(n, v))
            .collect(),
    ))
}

async fn global_parameter(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin
        .global_parameters()
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, v)| Json(global_json(n, v)).into_response())
        .ok_or_else(ApiError::not_found)
}

async fn put_global_parameter(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let m = object(&body)?;
    let Some(value) = m.get("value") else {
        return Err(ApiError::bad_request(
            "Validation failed\n\nmandatory field value missing\n",
        ));
    };
    let created = st
        .admin
        .set_global_parameter(&name, value.to_string())
        .await?;
    Ok(created_or_updated(created))
}

async fn delete_global_parameter(
    State(st): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    st.admin.clear_global_parameter(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- health checks -----

async fn health_ok(_caller: Caller) -> ApiResult<Response> {
    ok_json(json!({"status": "ok"}))
}

/// 503 with RabbitMQ's body while the memory or disk alarm is in effect.
fn alarms_check(st: &AppState, scope: &str) -> ApiResult<Response> {
    let state = st.admin.broker.alarms.state();
    if !state.any() {
        return ok_json(json!({"status": "ok"}));
    }
    let node = views::node_name();
    let alarms: Vec<Value> = state
        .resources()
        .into_iter()
        .map(|r| json!({"node": node, "resource": r}))
        .collect();
    Ok((
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "failed",
            "reason": format!("There are alarms in effect {scope}"),
            "alarms": alarms,
        })),
    )
        .into_response())
}

async fn health_alarms(State(st): St, _caller: Caller) -> ApiResult<Response> {
    alarms_check(&st, "in the cluster")
}

async fn health_local_alarms(State(st): St, _caller: Caller) -> ApiResult<Response> {
    alarms_check(&st, "on the node")
}

/// RabbitMQ's 503 for a listener health check: what is missing and what listens.
fn no_listener(missing: Value, key: &str, present: Value) -> Response {
    let mut body = serde_json::Map::new();
    body.insert("status".into(), json!("failed"));
    body.insert("reason".into(), json!("No active listener"));
    body.insert("missing".into(), missing);
    body.insert(key.into(), present);
    (StatusCode::SERVICE_UNAVAILABLE, Json(Value::Object(body))).into_response()
}

fn health_failed(reason: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "failed", "reason": reason})),
    )
        .into_response()
}

async fn port_listener(
    State(st): St,
    _caller: Caller,
    Path(port): Path<String>,
) -> ApiResult<Response> {
    let Ok(p) = port.parse::<i64>() else {
        return Err(ApiError::bad_request("Invalid port"));
    };
    if st.listeners.iter().any(|(_, a)| i64::from(a.port()) == p) {
        ok_json(json!({"status": "ok", "port": p}))
    } else {
        let mut ports: Vec<u16> = Vec::new();
        for (_, a) in &st.listeners {
            if !ports.contains(&a.port()) {
                ports.push(a.port());
            }
        }
        Ok(no_listener(json!(p), "ports", json!(ports)))
    }
}

async fn protocol_listener(
    State(st): St,
    _caller: Caller,
    Path(proto): Path<String>,
) -> ApiResult<Response> {
    // RabbitMQ's aliases for its listener protocols.
    let want = match proto.to_ascii_lowercase().as_str() {
        "amqp" | "amqp091" | "amqp0.9.1" | "amqp0-9-1" => "amqp",
        "amqps" | "amqp/ssl" | "amqp091/ssl" | "amqp0-9-1/ssl" => "amqp/ssl",
        "http" | "http1" | "management" => "http",
        "https" | "management/ssl" => "https",
        "prometheus" | "http/prometheus" => "http/prometheus",
        _ => "",
    };
    if st.listeners.iter().any(|(p, _)| *p == want) {
        // RabbitMQ answers with the protocol's own name, whichever alias was asked for.
        ok_json(json!({"status": "ok", "protocol": want}))
    } else {
        let mut protocols: Vec<&str> = Vec::new();
        for (p, _) in &st.listeners {
            if !protocols.contains(p) {
                protocols.push(p);
            }
        }
        Ok(no_listener(json!(proto), "protocols", json!(protocols)))
    }
}

async fn aliveness(State(st): St, caller: Caller, Path(v): Path<String>) -> ApiResult<Response> {
    usable_vhost(&st, &caller, &v)?;
    match crate::messages::aliveness(&st.admin, &v).await {
        Ok(()) => ok_json(json!({"status": "ok"})),
        Err(e) => Ok(health_failed(e)),
    }
}
