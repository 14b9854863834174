//! Warren's AMQP 0-9-1 side: the listeners and accept loops (`server`), one reader and one
//! writer task per connection (`connection`), channels (`channel`), the outbox the writer drains
//! (`outbox`, the core's `DeliverySink`), and the one place errors become `channel.close` or
//! `connection.close`. It drives `warren_core` and owns every socket.

pub mod channel;
pub mod connection;
pub mod outbox;
pub mod server;
pub mod tls;

pub use server::{serve, start, Running};
