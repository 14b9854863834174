//! The `warren` binary: parse settings, set up logging, open and recover the store, serve until
//! SIGTERM or Ctrl-C, then close every connection with 320 CONNECTION_FORCED, commit what the
//! store writer holds and exit 0.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use warren_broker::{broker::Broker, Config};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listeners = warren_broker::server::bind(&config.amqp_listen)
        .map_err(|e| anyhow::anyhow!("cannot listen: {e}"))?;
    for l in &listeners {
        tracing::info!(addr = %l.local_addr()?, "Warren {} listening for AMQP 0-9-1", env!("CARGO_PKG_VERSION"));
    }
    let (tls_listeners, acceptor) = warren_broker::server::bind_tls(&config)
        .map_err(|e| anyhow::anyhow!("cannot listen for AMQPS: {e}"))?;
    for l in &tls_listeners {
        tracing::info!(addr = %l.local_addr()?, "listening for AMQP 0-9-1 over TLS");
    }
    let http = warren_broker::bind_http(&config)
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP: {e}"))?;
    for (proto, addr) in http.addrs()? {
        match proto {
            "http/prometheus" => tracing::info!(%addr, "Prometheus metrics listening"),
            "https" => tracing::info!(%addr, "management API listening over TLS"),
            _ => tracing::info!(%addr, "management API listening"),
        }
    }
    let mut amqp = Vec::new();
    for l in &listeners {
        amqp.push(("amqp", l.local_addr()?));
    }
    for l in &tls_listeners {
        amqp.push(("amqp/ssl", l.local_addr()?));
    }
    let broker = Broker::open(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store: {e}"))?;
    broker.start_sampler();
    warren_broker::load_definitions(&broker)
        .await
        .map_err(|e| anyhow::anyhow!("cannot load definitions: {e}"))?;
    warren_broker::serve_http(&broker, &amqp, http)?;
    let server = tokio::spawn(warren_broker::server::serve_all(
        listeners,
        tls_listeners,
        acceptor,
        broker.clone(),
    ));
    shutdown_signal().await;
    tracing::info!("shutting down: closing connections with 320 CONNECTION_FORCED");
    broker.shutdown.cancel();
    let _ = server.await;
    broker.persist.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
