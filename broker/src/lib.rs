//! Warren's broker library: an AMQP 0-9-1 server that behaves like RabbitMQ, assembled from
//! `warren_core` (no sockets), `warren_amqp` (connections) and `warren_mgmt` (the management
//! API and Prometheus metrics). `start` runs one in-process (tests use it on 127.0.0.1:0); the
//! `warren` binary wraps it. See ARCHITECTURE.md.

pub use warren_amqp::{channel, connection, outbox, server};
pub use warren_amqp::{serve, Running};
pub use warren_core::{
    admin, args, auth, broker, config, connections, deadletter, delay, delivery, error, exchange,
    headers, message, persist, queue, replyto, stats, topic, vhost, Config,
};
pub use warren_mgmt as mgmt;

use std::net::SocketAddr;

/// Binds the HTTP listeners a config asks for: (management, prometheus).
pub fn bind_http(
    config: &Config,
) -> std::io::Result<(Vec<tokio::net::TcpListener>, Vec<tokio::net::TcpListener>)> {
    Ok((
        server::bind(&config.http_listen.0)?,
        server::bind(&config.prometheus_listen.0)?,
    ))
}

/// Serves the management API and the Prometheus endpoint on the given listeners until the
/// broker shuts down. `amqp` lists the AMQP listeners, for the API's `listeners`.
pub fn serve_http(
    broker: &std::sync::Arc<broker::Broker>,
    amqp: &[SocketAddr],
    http: Vec<tokio::net::TcpListener>,
    prometheus: Vec<tokio::net::TcpListener>,
) -> std::io::Result<()> {
    let mut listeners: Vec<(&'static str, SocketAddr)> =
        amqp.iter().map(|a| ("amqp", *a)).collect();
    for l in &http {
        listeners.push(("http", l.local_addr()?));
    }
    for l in &prometheus {
        listeners.push(("prometheus", l.local_addr()?));
    }
    let state = warren_mgmt::state(admin::Admin::new(broker.clone()), listeners);
    for l in http {
        tokio::spawn(warren_mgmt::serve_api(
            l,
            state.clone(),
            broker.shutdown.clone(),
        ));
    }
    for l in prometheus {
        tokio::spawn(warren_mgmt::serve_metrics(
            l,
            state.clone(),
            broker.shutdown.clone(),
        ));
    }
    Ok(())
}

/// Imports `--load-definitions` (creating only what is missing). An unreadable or invalid
/// file is an error: the broker does not start half-configured.
pub async fn load_definitions(broker: &std::sync::Arc<broker::Broker>) -> std::io::Result<()> {
    let Some(path) = broker.config.load_definitions.clone() else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
    })?;
    let d: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| std::io::Error::other(format!("{} is not JSON: {e}", path.display())))?;
    let admin = admin::Admin::new(broker.clone());
    warren_mgmt::definitions::import(
        &admin,
        &d,
        None,
        warren_mgmt::definitions::Existing::Keep,
        &broker.config.default_user,
    )
    .await
    .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
    tracing::info!(file = %path.display(), "definitions loaded");
    Ok(())
}

/// Starts a broker in-process: AMQP on `config.amqp_listen`, and the management API and
/// Prometheus endpoint where the config asks for them (port 0 for ephemeral ports).
pub async fn start(config: Config) -> std::io::Result<Running> {
    let (http, prometheus) = bind_http(&config)?;
    let mut running = warren_amqp::start(config).await?;
    if let Err(e) = load_definitions(&running.broker).await {
        running.stop().await;
        return Err(e);
    }
    running.http = http.first().map(|l| l.local_addr()).transpose()?;
    running.prometheus = prometheus.first().map(|l| l.local_addr()).transpose()?;
    serve_http(&running.broker, &running.addrs, http, prometheus)?;
    Ok(running)
}
