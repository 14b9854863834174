//! Warren's broker library: an AMQP 0-9-1 server that behaves like RabbitMQ, assembled from
//! `warren_core` (no sockets) and `warren_amqp` (connections). `start` runs one in-process
//! (tests use it on 127.0.0.1:0); the `warren` binary wraps it. See ARCHITECTURE.md.

pub use warren_amqp::{channel, connection, outbox, server};
pub use warren_amqp::{serve, start, Running};
pub use warren_core::{
    args, auth, broker, config, deadletter, delay, delivery, error, exchange, headers, message,
    persist, queue, replyto, topic, vhost, Config,
};
