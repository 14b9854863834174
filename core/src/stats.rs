//! Statistics: counters kept where the work happens, as plain atomics (no stats process, no
//! events), and their rates. A `Counter` is incremented on the message path with one relaxed
//! add; `Broker::sample_rates` (every `RATE_INTERVAL`) turns each counter's growth since the
//! last sample into a per-second rate stored beside it, so reading a rate costs nothing and
//! the management API shows what happened over the last few seconds, as RabbitMQ's does.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// How often rates are sampled (RabbitMQ's default `collect_statistics_interval` is 5 s).
pub const RATE_INTERVAL: Duration = Duration::from_secs(5);

/// A monotonic counter with the rate of its last sampling interval.
#[derive(Debug, Default)]
pub struct Counter {
    n: AtomicU64,
    /// The count at the last sample.
    prev: AtomicU64,
    /// Per second over the last interval, as f32 bits.
    rate: AtomicU32,
}

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.n.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }

    /// Per second, over the last sampling interval.
    pub fn rate(&self) -> f64 {
        f32::from_bits(self.rate.load(Ordering::Relaxed)) as f64
    }

    /// Closes a sampling interval of `secs` seconds.
    pub fn sample(&self, secs: f64) {
        let now = self.get();
        let before = self.prev.swap(now, Ordering::Relaxed);
        let rate = if secs > 0.0 {
            now.saturating_sub(before) as f64 / secs
        } else {
            0.0
        };
        self.rate.store((rate as f32).to_bits(), Ordering::Relaxed);
    }
}

/// A level (a queue's depth) with its rate of change over the last sampling interval, which
/// may be negative.
#[derive(Debug, Default)]
pub struct Level {
    prev: AtomicU64,
    rate: AtomicU32,
}

impl Level {
    /// Closes an interval at which the level is `now`.
    pub fn sample(&self, now: u64, secs: f64) {
        let before = self.prev.swap(now, Ordering::Relaxed);
        let rate = if secs > 0.0 {
            (now as f64 - before as f64) / secs
        } else {
            0.0
        };
        self.rate.store((rate as f32).to_bits(), Ordering::Relaxed);
    }

    pub fn rate(&self) -> f64 {
        f32::from_bits(self.rate.load(Ordering::Relaxed)) as f64
    }
}

/// A queue's depths: all messages, ready, unacknowledged.
#[derive(Debug, Default)]
pub struct QueueDepth {
    pub messages: Level,
    pub ready: Level,
    pub unacked: Level,
}

impl QueueDepth {
    pub fn sample(&self, ready: u64, unacked: u64, secs: f64) {
        self.messages.sample(ready + unacked, secs);
        self.ready.sample(ready, secs);
        self.unacked.sample(unacked, secs);
    }
}

/// Declares a stats struct of named counters, with `sample` over all of them and `each` to
/// visit them by RabbitMQ's `message_stats` key.
macro_rules! counters {
    ($(#[$doc:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $(pub $field: Counter,)*
        }

        impl $name {
            pub fn sample(&self, secs: f64) {
                $(self.$field.sample(secs);)*
            }

            /// Each counter with its `message_stats` key.
            pub fn each(&self, mut f: impl FnMut(&'static str, &Counter)) {
                $(f(stringify!($field), &self.$field);)*
            }
        }
    };
}

counters!(
    /// A queue's message counters (RabbitMQ's `message_stats` of a queue).
    QueueStats {
        publish,
        deliver,
        deliver_no_ack,
        get,
        get_no_ack,
        get_empty,
        ack,
        redeliver,
    }
);

counters!(
    /// An exchange's counters: messages in, and messages routed on to at least one queue.
    ExchangeStats { publish_in, publish_out }
);

counters!(
    /// A channel's counters.
    ChannelStats {
        publish,
        confirm,
        deliver,
        deliver_no_ack,
        get,
        get_no_ack,
        get_empty,
        ack,
        redeliver,
        return_unroutable,
        drop_unroutable,
    }
);

counters!(
    /// A connection's traffic.
    ConnStats { recv_oct, recv_cnt, send_oct, send_cnt }
);

counters!(
    /// Node-wide totals: the overview's `message_stats`, `churn_rates` and Prometheus'
    /// `rabbitmq_global_*` counters.
    GlobalStats {
        publish,
        confirm,
        deliver,
        deliver_no_ack,
        get,
        get_no_ack,
        get_empty,
        ack,
        redeliver,
        return_unroutable,
        drop_unroutable,
        connection_created,
        connection_closed,
        channel_created,
        channel_closed,
        queue_declared,
        queue_created,
        queue_deleted,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_growth_over_the_interval() {
        let c = Counter::default();
        c.add(1000);
        c.sample(5.0);
        assert_eq!(c.rate(), 200.0);
        c.sample(5.0);
        assert_eq!(c.rate(), 0.0);
        c.inc();
        c.sample(0.5);
        assert_eq!(c.rate(), 2.0);
        assert_eq!(c.get(), 1001);
    }

    #[test]
    fn level_rates_go_both_ways() {
        let l = Level::default();
        l.sample(100, 5.0);
        assert_eq!(l.rate(), 20.0);
        l.sample(50, 5.0);
        assert_eq!(l.rate(), -10.0);
    }

    #[test]
    fn each_names_every_counter() {
        let s = ExchangeStats::default();
        s.publish_in.add(3);
        let mut seen = Vec::new();
        s.each(|k, c| seen.push((k, c.get())));
        assert_eq!(seen, vec![("publish_in", 3), ("publish_out", 0)]);
    }
}

/// One protocol's login attempts (RabbitMQ's auth attempt counters).
#[derive(Debug, Default)]
pub struct AuthCounts {
    attempts: AtomicU64,
    failed: AtomicU64,
    succeeded: AtomicU64,
}

impl AuthCounts {
    pub fn record(&self, ok: bool) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.succeeded.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (attempts, failed, succeeded)
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.attempts.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.succeeded.load(Ordering::Relaxed),
        )
    }

    pub fn reset(&self) {
        self.attempts.store(0, Ordering::Relaxed);
        self.failed.store(0, Ordering::Relaxed);
        self.succeeded.store(0, Ordering::Relaxed);
    }
}

/// Login attempts by protocol, with RabbitMQ's protocol names.
#[derive(Debug, Default)]
pub struct AuthAttempts {
    pub amqp: AuthCounts,
    pub http: AuthCounts,
}

impl AuthAttempts {
    /// Each protocol with RabbitMQ's name for it ("http", "amqp091").
    pub fn each(&self) -> [(&'static str, &AuthCounts); 2] {
        [("http", &self.http), ("amqp091", &self.amqp)]
    }
}
