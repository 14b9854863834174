//! Warren's operations surface: RabbitMQ's management HTTP API (`routes`, in RabbitMQ's JSON
//! shapes, `views` and `json`) and the Prometheus endpoint (`metrics`), both reading and
//! changing the broker only through `warren_core::admin::Admin`. Served with axum; requests
//! are bounded (body size, page size) and every failure answers with RabbitMQ's error body.

pub mod browser;
pub mod console;
pub mod definitions;
pub mod http;
pub mod json;
pub mod messages;
pub mod metrics;
pub mod routes;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// The management API's service: the routes, the body limit and the trailing-slash rule.
fn api_service(
    state: Arc<AppState>,
) -> tower::util::MapRequest<axum::Router, fn(Request) -> Request> {
    let app = routes::router(state).layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    app.map_request(strip_trailing_slash as fn(Request) -> Request)
}

/// Serves the management API on `listener` until `shutdown`.
pub async fn serve_api(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    let service = axum::ServiceExt::<Request>::into_make_service_with_connect_info::<SocketAddr>(
        api_service(state),
    );
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "management listener failed");
    }
}

/// A client that has not finished its TLS handshake within this is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many HTTPS connections are served at once; further ones wait in the
/// listener's backlog.
const MAX_TLS_CONNECTIONS: usize = 1024;

/// Serves the management API over TLS (RabbitMQ's `management.ssl` listener) on `listener`
/// until `shutdown`. Each connection's handshake runs in its own task, so a slow or hostile
/// client delays no one else.
pub async fn serve_api_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let app = api_service(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, app, shutdown) = (acceptor.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "HTTPS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "HTTPS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = shutdown.cancelled() => None,
            };
            let r = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTPS connection ended with an error");
            }
        });
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
