//! Warren's broker core: virtual hosts, exchanges and routing, queues (dispatch, paging, TTL
//! and limits), delivery bookkeeping, dead-lettering, delayed messages, users and permissions,
//! and the broker's side of the store. No sockets: queues reach consumers through
//! `delivery::DeliverySink` and their vhost through `queue::Router`. See ARCHITECTURE.md.

pub mod admin;
pub mod alarms;
pub mod args;
pub mod auth;
pub mod broker;
pub mod browse;
pub mod config;
pub mod confirm;
pub mod connections;
pub mod deadletter;
pub mod delay;
pub mod delivery;
pub mod error;
pub mod exchange;
pub mod headers;
pub mod message;
pub mod names;
pub mod persist;
pub mod policy;
pub mod queue;
pub mod replyto;
pub mod stats;
pub mod system;
pub mod tap;
pub mod topic;
pub mod vhost;

pub use config::Config;
