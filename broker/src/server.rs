//! The accept loop: one task per connection, a semaphore capping connections, back-off on accept
//! errors, and shutdown through the broker's `CancellationToken` with a `TaskTracker` to wait for
//! every connection to close.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::connection;

/// Serves AMQP on `listener` until `broker.shutdown` is cancelled, then waits for connections to
/// close (they send 320 CONNECTION_FORCED).
pub async fn serve(listener: TcpListener, broker: Arc<Broker>) {
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(broker.config.max_connections));
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
                tracker.spawn(async move {
                    connection::run(socket, peer, broker).await;
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
    tracker.close();
    tracker.wait().await;
}

/// Serves until shutdown, then commits what the store writer holds and closes the store.
async fn serve_and_close(listener: TcpListener, broker: Arc<Broker>) {
    serve(listener, broker.clone()).await;
    broker.persist.close().await;
}

/// A broker running in-process (for tests and embedding): its address and a handle to stop it.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub broker: Arc<Broker>,
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
    let listener = TcpListener::bind(config.amqp_listen).await?;
    let addr = listener.local_addr()?;
    let broker = Broker::open(config)
        .await
        .map_err(|e| std::io::Error::other(format!("cannot open the store: {e}")))?;
    let task = tokio::spawn(serve_and_close(listener, broker.clone()));
    Ok(Running { addr, broker, task })
}
