//! The message browser's endpoints (Warren's own, beside RabbitMQ's API): browse and search a
//! queue's ready messages without consuming them, list who holds which unacknowledged
//! delivery, and move, copy, return to origin or delete chosen messages.
//!
//! - `GET /api/queues/{vhost}/{name}/messages?from=POS&count=N[&q=TEXT&field=F&scan=N]`
//!   answers `{"items": [...], "next": POS|null, "scanned": N}`;
//! - `GET /api/queues/{vhost}/{name}/unacked`;
//! - `POST /api/queues/{vhost}/{name}/messages/{move,copy,return,delete}` with a selection
//!   (`positions`, or `filter`/`from`/`scan`, or `all`) and, for move and copy, a destination
//!   (`queue`, or `exchange` with an optional `routing_key`);
//! - `GET /api/exchanges/{vhost}/{name}/tail`: server-sent events, one per sampled message
//!   published to the exchange (`core::tap`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use warren_core::browse::{Destination, Field, Filter, Report, Selection, MAX_PAGE, MAX_SCAN};
use warren_core::queue::Browsed;

use crate::http::{object, str_field, ApiError, ApiResult, AppState, Caller};
use crate::messages::{payload, properties_to_json};

type St = State<Arc<AppState>>;
type Q = Query<HashMap<String, String>>;

/// Body bytes shown per message unless `truncate` says otherwise.
const DEFAULT_TRUNCATE: usize = 64 << 10;
/// Messages a search scans unless `scan` says otherwise.
const DEFAULT_SCAN: u64 = 100_000;
/// Most positions one action names.
const MAX_POSITIONS: usize = 10_000;

fn number(q: &HashMap<String, String>, key: &str) -> ApiResult<Option<u64>> {
    match q.get(key).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("{key} must be a non-negative integer"))),
    }
}

fn json_number(m: &Map<String, Value>, key: &str) -> ApiResult<Option<u64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{key} must be a non-negative integer"))),
    }
}

fn filter(q: Option<&str>, field: Option<&str>) -> ApiResult<Option<Filter>> {
    let Some(needle) = q.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if needle.len() > 4096 {
        return Err(ApiError::bad_request(
            "the search text is longer than 4096 bytes",
        ));
    }
    let field = Field::parse(field.unwrap_or("any")).ok_or_else(|| {
        ApiError::bad_request(
            "field must be any, routing_key, message_id, correlation_id, header or body",
        )
    })?;
    Ok(Some(Filter {
        field,
        needle: needle.to_string(),
    }))
}

/// A queue as the caller may use it: 404 for a missing vhost or queue, 401 without access.
fn check(st: &AppState, caller: &Caller, vhost: &str) -> ApiResult<()> {
    st.admin.find_vhost(vhost).ok_or_else(ApiError::not_found)?;
    caller.check_vhost(vhost)
}

/// Changing messages needs more than monitoring: a user tagged only `monitoring` sees
/// everything and changes nothing.
fn check_change(st: &AppState, caller: &Caller, vhost: &str) -> ApiResult<()> {
    check(st, caller, vhost)?;
    if caller.can.monitoring
        && !caller.can.administrator
        && !caller.can.policymaker
        && !caller.tags.iter().any(|t| t == "management")
    {
        return Err(ApiError::unauthorized("Not management user"));
    }
    Ok(())
}

/// One message as the browser shows it: its position and the fields of RabbitMQ's `/get`.
fn item(b: &Browsed, truncate: usize, base64: bool) -> Value {
    let Some(m) = b.msg.as_ref() else {
        return Value::Null;
    };
    let body = &m.body;
    let shown = &body[..truncate.min(body.len())];
    let (payload, enc) = payload(shown, base64);
    json!({
        "position": b.seq,
        "payload": payload,
        "payload_encoding": enc,
        "payload_bytes": body.len(),
        "payload_truncated": shown.len() < body.len(),
        "properties": properties_to_json(&m.properties()),
        "redelivered": b.redelivered,
        "delivery_count": b.deliveries,
        "exchange": m.exchange.as_str(),
        "routing_key": m.routing_key.as_str(),
        "paged": b.paged,
    })
}

pub async fn browse(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
    Query(q): Q,
) -> ApiResult<Response> {
    check(&st, &caller, &v)?;
    let from = number(&q, "from")?.unwrap_or(0);
    let count = number(&q, "count")?.unwrap_or(100);
    if count == 0 || count > MAX_PAGE as u64 {
        return Err(ApiError::bad_request(format!(
            "count must be between 1 and {MAX_PAGE}"
        )));
    }
    let scan = number(&q, "scan")?.unwrap_or(DEFAULT_SCAN);
    if scan == 0 || scan > MAX_SCAN {
        return Err(ApiError::bad_request(format!(
            "scan must be between 1 and {MAX_SCAN}"
        )));
    }
    let truncate = number(&q, "truncate")?.map_or(DEFAULT_TRUNCATE, |n| n as usize);
    let base64 = match q.get("encoding").map(String::as_str) {
        None | Some("auto") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Unsupported encoding: {other}"
            )))
        }
    };
    let f = filter(
        q.get("q").map(String::as_str),
        q.get("field").map(String::as_str),
    )?;
    let page = st
        .admin
        .browse(&v, &name, from, count as usize, f.as_ref(), scan)
        .await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|b| item(b, truncate, base64))
        .filter(|v| !v.is_null())
        .collect();
    Ok(Json(json!({
        "items": items,
        "next": page.next,
        "scanned": page.scanned,
    }))
    .into_response())
}

pub async fn unacked(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    check(&st, &caller, &v)?;
    let held = st.admin.unacked(&v, &name)?;
    let out: Vec<Value> = held
        .iter()
        .map(|h| {
            json!({
                "connection": h.connection,
                "channel": h.channel,
                "channel_details": {
                    "connection_name": h.connection,
                    "number": h.channel,
                    "name": format!("{} ({})", h.connection, h.channel),
                    "user": h.user,
                },
                "consumer_tag": h.delivery.consumer_tag,
                "delivery_tag": h.delivery.delivery_tag,
                "position": h.delivery.seq,
                "redelivered": h.delivery.redelivered,
                "payload_bytes": h.delivery.body_bytes,
                "delivered_at": h.delivery.at,
            })
        })
        .collect();
    Ok(Json(Value::Array(out)).into_response())
}

fn selection(m: &Map<String, Value>) -> ApiResult<Selection> {
    if let Some(p) = m.get("positions") {
        let Some(list) = p.as_array() else {
            return Err(ApiError::bad_request(
                "positions must be a list of integers",
            ));
        };
        if list.len() > MAX_POSITIONS {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_POSITIONS} positions at once"
            )));
        }
        let positions = list
            .iter()
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| ApiError::bad_request("positions must be a list of integers"))
            })
            .collect::<ApiResult<Vec<u64>>>()?;
        return Ok(Selection::Positions(positions));
    }
    let f = filter(str_field(m, "q"), str_field(m, "field"))?;
    let all = m.get("all").and_then(Value::as_bool).unwrap_or(false);
    if f.is_none() && !all {
        return Err(ApiError::bad_request(
            "say which messages: positions, a filter (q), or all: true",
        ));
    }
    let scan = json_number(m, "scan")?.unwrap_or(MAX_SCAN);
    if scan == 0 || scan > MAX_SCAN {
        return Err(ApiError::bad_request(format!(
            "scan must be between 1 and {MAX_SCAN}"
        )));
    }
    Ok(Selection::Matching {
        filter: f,
        from: json_number(m, "from")?.unwrap_or(0),
        scan,
    })
}

fn destination(m: &Map<String, Value>) -> ApiResult<Destination> {
    match (str_field(m, "queue"), str_field(m, "exchange")) {
        (Some(q), None) => Ok(Destination::Queue(q.to_string())),
        (None, Some(x)) => Ok(Destination::Exchange {
            name: x.to_string(),
            routing_key: str_field(m, "routing_key").map(str::to_string),
        }),
        _ => Err(ApiError::bad_request(
            "give the destination as queue, or as exchange (with routing_key)",
        )),
    }
}

fn report(r: &Report) -> Response {
    Json(json!({
        "done": r.done,
        "gone": r.gone,
        "unroutable": r.unroutable,
        "scanned": r.scanned,
        "next": r.next,
    }))
    .into_response()
}

/// `move`, `copy`, `return` (to the dead-lettering queue) or `delete`.
pub async fn act(
    State(st): St,
    caller: Caller,
    Path((v, name, action)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    check_change(&st, &caller, &v)?;
    let m = object(&body)?;
    let sel = selection(&m)?;
    let r = match action.as_str() {
        "move" | "copy" => {
            let dest = destination(&m)?;
            st.admin
                .move_messages(&v, &name, sel, dest, action == "copy")
                .await?
        }
        "return" => {
            st.admin
                .move_messages(&v, &name, sel, Destination::Origin, false)
                .await?
        }
        "delete" => st.admin.delete_messages(&v, &name, sel).await?,
        _ => return Err(ApiError::not_found()),
    };
    tracing::info!(
        user = %caller.name,
        vhost = %v,
        queue = %name,
        action = %action,
        done = r.done,
        gone = r.gone,
        unroutable = r.unroutable,
        "message browser action"
    );
    Ok(report(&r))
}

/// Live tail of an exchange, as server-sent events: `data: {json}` per sampled message, with
/// a keep-alive comment every 15 s. Ends when the client goes away or the broker stops.
pub async fn tail(
    State(st): St,
    caller: Caller,
    Path((v, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    check(&st, &caller, &v)?;
    let name = if name == "amq.default" {
        String::new()
    } else {
        name
    };
    let x = st
        .admin
        .exchange(&v, &name)
        .ok_or_else(ApiError::not_found)?;
    let Some(rx) = x.taps.watch() else {
        return Err(ApiError::bad_request(format!(
            "exchange already has {} watchers",
            warren_core::tap::MAX_WATCHERS
        )));
    };
    let shutdown = st.admin.broker.shutdown.clone();
    let stream = futures_util::stream::unfold((rx, shutdown), |(mut rx, shutdown)| async move {
        let s = tokio::select! {
            s = rx.recv() => s?,
            _ = shutdown.cancelled() => return None,
        };
        let (payload, enc) = payload(&s.body, false);
        let data = json!({
            "at": s.at_ms,
            "exchange": s.exchange,
            "routing_key": s.routing_key,
            "properties": properties_to_json(&s.properties),
            "payload": payload,
            "payload_encoding": enc,
            "payload_bytes": s.body_len,
            "payload_truncated": s.body.len() < s.body_len,
            "queues": s.queues,
            "dropped": s.dropped,
        });
        let ev = axum::response::sse::Event::default().data(data.to_string());
        Some((Ok::<_, std::convert::Infallible>(ev), (rx, shutdown)))
    });
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(
            axum::response::sse::KeepAlive::new().interval(std::time::Duration::from_secs(15)),
        )
        .into_response())
}
