//! The listeners and accept loops: one accept task per listener, one task per connection, a
//! semaphore capping connections across listeners, back-off on accept errors, and shutdown
//! through the broker's `CancellationToken` with a `TaskTracker` to wait for every connection
//! to close.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::connection;
use warren_core::broker::Broker;
use warren_core::config::Config;

/// Binds every address. An unspecified IPv6 address (`[::]`) is bound dual-stack, so it takes
/// IPv4 connections too; where IPv6 is off it falls back to `0.0.0.0` on the same port.
pub fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let l = match bind_one(*addr) {
            Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && ipv6_unavailable(&e) => {
                let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
                tracing::info!(%addr, error = %e, "IPv6 unavailable; listening on {v4}");
                bind_one(v4)?
            }
            r => r.map_err(|e| std::io::Error::new(e.kind(), format!("{addr}: {e}")))?,
        };
        out.push(l);
    }
    Ok(out)
}

fn ipv6_unavailable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::Unsupported
    ) || e.raw_os_error() == Some(97) // EAFNOSUPPORT
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Dual-stack whatever the system default (net.ipv6.bindv6only).
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Serves AMQP on `listeners` until `broker.shutdown` is cancelled, then waits for connections
/// to close (they send 320 CONNECTION_FORCED).
pub async fn serve(listeners: Vec<TcpListener>, broker: Arc<Broker>) {
    serve_all(listeners, Vec::new(), None, broker).await
}

/// Serves AMQP on `listeners` and AMQPS on `tls_listeners` (with `acceptor`) until shutdown.
pub async fn serve_all(
    listeners: Vec<TcpListener>,
    tls_listeners: Vec<TcpListener>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    broker: Arc<Broker>,
) {
    let tracker = TaskTracker::new();
    // Sockets beyond --max-connections are still accepted (up to a margin) so that each is
    // answered with RabbitMQ's 530 at connection.open rather than left in the backlog.
    let max = broker.config.max_connections;
    let limit = Arc::new(Semaphore::new(max.saturating_add(max / 10 + 64)));
    let mut accepting = tokio::task::JoinSet::new();
    for listener in listeners {
        accepting.spawn(accept_loop(
            listener,
            None,
            broker.clone(),
            limit.clone(),
            tracker.clone(),
        ));
    }
    if let Some(acceptor) = acceptor {
        for listener in tls_listeners {
            accepting.spawn(accept_loop(
                listener,
                Some(acceptor.clone()),
                broker.clone(),
                limit.clone(),
                tracker.clone(),
            ));
        }
    }
    while accepting.join_next().await.is_some() {}
    tracker.close();
    tracker.wait().await;
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    broker: Arc<Broker>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = broker.shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = broker.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                backoff = Duration::from_millis(5);
                let broker = broker.clone();
                let tls = tls.clone();
                tracker.spawn(async move {
                    match tls {
                        None => connection::run(socket, peer, broker).await,
                        Some(acceptor) => {
                            let _ = socket.set_nodelay(true);
                            let local = socket.local_addr().unwrap_or(peer);
                            let limit = Duration::from_secs(broker.config.handshake_timeout);
                            match tokio::time::timeout(limit, acceptor.accept(socket)).await {
                                Ok(Ok(stream)) => {
                                    connection::run_tls(stream, peer, local, broker).await
                                }
                                Ok(Err(e)) => {
                                    tracing::info!(%peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                            }
                        }
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Serves until shutdown, then commits what the store writer holds and closes the store.
async fn serve_and_close(
    listeners: Vec<TcpListener>,
    tls_listeners: Vec<TcpListener>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    broker: Arc<Broker>,
) {
    serve_all(listeners, tls_listeners, acceptor, broker.clone()).await;
    broker.persist.close().await;
}

/// The AMQPS listeners and their acceptor, as the settings ask (none without --amqps-listen).
pub fn bind_tls(
    config: &Config,
) -> std::io::Result<(Vec<TcpListener>, Option<tokio_rustls::TlsAcceptor>)> {
    if config.amqps_listen.0.is_empty() {
        return Ok((Vec::new(), None));
    }
    let Some(tls) = crate::tls::server_config(config)? else {
        return Err(std::io::Error::other(
            "--amqps-listen needs --tls-cert and --tls-key",
        ));
    };
    Ok((
        bind(&config.amqps_listen.0)?,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
    ))
}

/// A broker running in-process (for tests and embedding): its address and a handle to stop it.
pub struct Running {
    /// The first listener's address.
    pub addr: std::net::SocketAddr,
    /// Every listener's address.
    pub addrs: Vec<std::net::SocketAddr>,
    pub broker: Arc<Broker>,
    /// The first AMQPS listener's address, when there is one.
    pub amqps: Option<std::net::SocketAddr>,
    /// The management API's address, when it listens (set by the broker crate's `start`).
    pub http: Option<std::net::SocketAddr>,
    /// The management API's HTTPS address, when it listens.
    pub https: Option<std::net::SocketAddr>,
    /// The Prometheus endpoint's address, when it listens.
    pub prometheus: Option<std::net::SocketAddr>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// `amqp://guest:guest@ADDR/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Closes every connection (320) and waits for the server to stop.
    pub async fn stop(self) {
        self.broker.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Binds `config.amqp_listen` (port 0 for an ephemeral one) and serves in the background.
pub async fn start(config: Config) -> std::io::Result<Running> {
    let listeners = bind(&config.amqp_listen)?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let addr = *addrs
        .first()
        .ok_or_else(|| std::io::Error::other("no --amqp-listen address"))?;
    let (tls_listeners, acceptor) = bind_tls(&config)?;
    let amqps = tls_listeners.first().map(|l| l.local_addr()).transpose()?;
    let broker = Broker::open(config)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot open the store: {e}")))?;
    broker.start_sampler();
    let task = tokio::spawn(serve_and_close(
        listeners,
        tls_listeners,
        acceptor,
        broker.clone(),
    ));
    Ok(Running {
        addr,
        addrs,
        broker,
        amqps,
        http: None,
        https: None,
        prometheus: None,
        task,
    })
}
