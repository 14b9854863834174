//! Warren's broker library: an AMQP 0-9-1 server that behaves like RabbitMQ. `server::start`
//! runs one in-process (tests use it on 127.0.0.1:0); the `warren` binary wraps it.
//! See ARCHITECTURE.md for how a message travels.

pub mod args;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod config;
pub mod connection;
pub mod deadletter;
pub mod delay;
pub mod delivery;
pub mod error;
pub mod exchange;
pub mod headers;
pub mod message;
pub mod outbox;
pub mod persist;
pub mod queue;
pub mod replyto;
pub mod server;
pub mod topic;
pub mod vhost;

pub use config::Config;
pub use server::{serve, start, Running};
