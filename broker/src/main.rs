//! The `warren` binary: parse settings, set up logging, open and recover the store, serve until
//! SIGTERM or Ctrl-C, then close every connection with 320 CONNECTION_FORCED, commit what the
//! store writer holds and exit 0. In cluster mode (`--cluster-node`) it first joins the cluster
//! and serves as a standby (proxying AMQP to the active node) until it takes the active role;
//! as the active node, if it is fenced or loses its lease it closes every connection with 320
//! and exits with `warren_cluster::EXIT_FENCED` (3).

use clap::Parser;
use tracing_subscriber::EnvFilter;
use warren_broker::{broker::Broker, Config};

/// mimalloc, not glibc's malloc: under S4 (64 queues, publishers and consumers flat out) glibc
/// kept about 240 MiB of freed memory in its per-thread arenas beside a 590 MiB heap peak, and
/// capping its arenas cost a third of the throughput.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(run(&mut config))? {
        Some(exit) => {
            tracing::error!(?exit, "exiting: this node may no longer serve");
            // The runtime's tasks are not waited for: nothing more may be committed.
            runtime.shutdown_background();
            std::process::exit(warren_cluster::EXIT_FENCED);
        }
        None => Ok(()),
    }
}

async fn run(config: &mut Config) -> anyhow::Result<Option<warren_cluster::Exit>> {
    let listeners = warren_broker::server::bind(&config.amqp_listen)
        .map_err(|e| anyhow::anyhow!("cannot listen: {e}"))?;
    for l in &listeners {
        tracing::info!(addr = %l.local_addr()?, "Warren {} listening for AMQP 0-9-1", env!("CARGO_PKG_VERSION"));
    }
    let (tls_listeners, acceptor) = warren_broker::server::bind_tls(config)
        .map_err(|e| anyhow::anyhow!("cannot listen for AMQPS: {e}"))?;
    for l in &tls_listeners {
        tracing::info!(addr = %l.local_addr()?, "listening for AMQP 0-9-1 over TLS");
    }
    let http = warren_broker::bind_http(config)
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
    // Cluster mode: a standby until this node takes the active role.
    let node = match config.cluster_node.clone() {
        None => None,
        Some(_) => {
            let advertised = match &config.cluster_advertise {
                Some(a) => a.clone(),
                None => amqp[0].1.to_string(),
            };
            let node = warren_cluster::Node::join(config, &advertised)
                .await
                .map_err(|e| anyhow::anyhow!("cannot join the cluster: {e}"))?;
            let stop_proxy = tokio_util::sync::CancellationToken::new();
            let became = tokio::select! {
                r = node.become_active() => r,
                _ = warren_cluster::proxy(
                    &listeners,
                    node.clone(),
                    config.max_connections,
                    stop_proxy.clone(),
                ) => return Err(anyhow::anyhow!("the standby's proxy stopped")),
                _ = shutdown_signal() => return Ok(None),
            };
            stop_proxy.cancel();
            if let Err(exit) = became {
                return Ok(Some(exit));
            }
            config.cluster_fence = Some(node.id().clone());
            Some(node)
        }
    };
    let broker = Broker::open(config.clone())
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
    let exit = match &node {
        None => {
            shutdown_signal().await;
            None
        }
        Some(node) => {
            let writer = broker.persist.writer.clone();
            let view = broker.clone();
            let members = move |ms| {
                *view
                    .cluster_members
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = ms;
            };
            tokio::select! {
                _ = shutdown_signal() => None,
                e = node.keep(move || writer.fenced(), members, broker.shutdown.clone()) => e,
            }
        }
    };
    tracing::info!("shutting down: closing connections with 320 CONNECTION_FORCED");
    broker.shutdown.cancel();
    let _ = server.await;
    if exit.is_none() {
        broker.persist.close().await;
    }
    tracing::info!("stopped");
    Ok(exit)
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
