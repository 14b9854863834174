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

/// The HTTP listeners a config asks for, bound: the management API over HTTP and over TLS,
/// and the Prometheus endpoint.
pub struct HttpListeners {
    pub http: Vec<tokio::net::TcpListener>,
    pub https: Vec<tokio::net::TcpListener>,
    pub prometheus: Vec<tokio::net::TcpListener>,
    /// The TLS acceptor for `https` (None when there is no HTTPS listener).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl HttpListeners {
    /// Every bound listener with RabbitMQ's protocol name, for logs and the API's `listeners`.
    pub fn addrs(&self) -> std::io::Result<Vec<(&'static str, SocketAddr)>> {
        let mut out = Vec::new();
        for (proto, ls) in [
            ("http", &self.http),
            ("https", &self.https),
            ("http/prometheus", &self.prometheus),
        ] {
            for l in ls {
                out.push((proto, l.local_addr()?));
            }
        }
        Ok(out)
    }
}

/// Binds the HTTP listeners a config asks for. HTTPS uses the same certificate, key and CA
/// as AMQPS (`--tls-cert`, `--tls-key`, `--tls-ca`), offering HTTP/1.1 by ALPN.
pub fn bind_http(config: &Config) -> std::io::Result<HttpListeners> {
    let tls = if config.https_listen.0.is_empty() {
        None
    } else {
        let Some(tls) = warren_amqp::tls::server_config(config)? else {
            return Err(std::io::Error::other(
                "--https-listen needs --tls-cert and --tls-key",
            ));
        };
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls)))
    };
    Ok(HttpListeners {
        http: server::bind(&config.http_listen.0)?,
        https: server::bind(&config.https_listen.0)?,
        prometheus: server::bind(&config.prometheus_listen.0)?,
        tls,
    })
}

/// Serves the management API (HTTP and HTTPS) and the Prometheus endpoint on the given
/// listeners until the broker shuts down. `amqp` lists the AMQP listeners with their protocol
/// names ("amqp", "amqp/ssl"), for the API's `listeners` and health checks.
pub fn serve_http(
    broker: &std::sync::Arc<broker::Broker>,
    amqp: &[(&'static str, SocketAddr)],
    listeners: HttpListeners,
) -> std::io::Result<()> {
    let mut all = amqp.to_vec();
    all.extend(listeners.addrs()?);
    let state = warren_mgmt::state(admin::Admin::new(broker.clone()), all);
    let shutdown = &broker.shutdown;
    for l in listeners.http {
        tokio::spawn(warren_mgmt::serve_api(l, state.clone(), shutdown.clone()));
    }
    if let Some(tls) = listeners.tls {
        for l in listeners.https {
            tokio::spawn(warren_mgmt::serve_api_tls(
                l,
                tls.clone(),
                state.clone(),
                shutdown.clone(),
            ));
        }
    }
    for l in listeners.prometheus {
        tokio::spawn(warren_mgmt::serve_metrics(
            l,
            state.clone(),
            shutdown.clone(),
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
    let http = bind_http(&config)?;
    let mut running = warren_amqp::start(config).await?;
    if let Err(e) = load_definitions(&running.broker).await {
        running.stop().await;
        return Err(e);
    }
    running.http = http.http.first().map(|l| l.local_addr()).transpose()?;
    running.https = http.https.first().map(|l| l.local_addr()).transpose()?;
    running.prometheus = http
        .prometheus
        .first()
        .map(|l| l.local_addr())
        .transpose()?;
    let mut amqp: Vec<_> = running.addrs.iter().map(|a| ("amqp", *a)).collect();
    amqp.extend(running.amqps.map(|a| ("amqp/ssl", a)));
    serve_http(&running.broker, &amqp, http)?;
    Ok(running)
}
