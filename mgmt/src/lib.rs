//! Warren's operations surface: RabbitMQ's management HTTP API (`routes`, in RabbitMQ's JSON
//! shapes, `views` and `json`) and the Prometheus endpoint (`metrics`), both reading and
//! changing the broker only through `warren_core::admin::Admin`. Served with axum; requests
//! are bounded (body size, page size) and every failure answers with RabbitMQ's error body.

pub mod definitions;
pub mod http;
pub mod json;
pub mod messages;
pub mod metrics;
pub mod routes;
pub mod system;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::Request;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use warren_core::admin::Admin;

pub use http::AppState;

/// The RabbitMQ version whose management API and metrics Warren follows.
pub const RABBITMQ_VERSION: &str = "3.10.8";

/// Request bodies above this are refused with 413 (definitions files are the largest).
pub const MAX_BODY: usize = 64 << 20;

/// "/api/queues/" is "/api/queues", as RabbitMQ's router treats it (Flower calls the former).
fn strip_trailing_slash(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
        let pq = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_string(),
        };
        if let Ok(uri) = pq.parse() {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// Serves the management API on `listener` until `shutdown`.
pub async fn serve_api(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    let app = routes::router(state).layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    let app = app.map_request(strip_trailing_slash);
    let service =
        axum::ServiceExt::<Request>::into_make_service_with_connect_info::<SocketAddr>(app);
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "management listener failed");
    }
}

/// Serves the Prometheus endpoints on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let app = metrics::router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "prometheus listener failed");
    }
}

/// The admin facade and listener list every endpoint reads.
pub fn state(admin: Admin, listeners: Vec<(&'static str, SocketAddr)>) -> Arc<AppState> {
    Arc::new(AppState { admin, listeners })
}
