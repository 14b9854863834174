//! Token bucket for `-r` (publish rate) and `-R` (consume rate). Tokens accrue at the rate and
//! are capped at 10 ms worth (at least one), so a stalled sender does not burst afterwards. A
//! producer takes what a whole batch may send at once and sleeps until the next token when there
//! is none; a consumer spends what it received and sleeps off the debt: no per-message sleeps.

use std::time::{Duration, Instant};

/// Seconds of tokens the bucket holds at most.
const BURST_SECONDS: f64 = 0.01;

#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A bucket for `rate` messages per second (> 0), holding one token at `now`.
    pub fn new(rate: f64, now: Instant) -> Self {
        let burst = (rate * BURST_SECONDS).max(1.0);
        RateLimiter {
            rate,
            burst,
            tokens: 1.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Takes up to `want` whole tokens; returns how many were taken.
    pub fn take(&mut self, now: Instant, want: u64) -> u64 {
        self.refill(now);
        let n = (self.tokens.floor().max(0.0) as u64).min(want);
        self.tokens -= n as f64;
        n
    }

    /// Spends `n` tokens whether or not they are there (the balance may go negative).
    pub fn spend(&mut self, now: Instant, n: u64) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// How long until at least one whole token is available (zero if one is).
    pub fn wait(&self) -> Duration {
        let missing = 1.0 - self.tokens;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate)
        }
    }

    /// How long until the balance is back to zero after [`RateLimiter::spend`].
    pub fn debt(&self) -> Duration {
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a producer-style loop on a simulated clock for `secs` and counts what it sent.
    fn simulate(rate: f64, batch: u64, secs: f64) -> u64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut rl = RateLimiter::new(rate, now);
        let end = t0 + Duration::from_secs_f64(secs);
        let mut sent = 0;
        while now < end {
            let n = rl.take(now, batch);
            sent += n;
            if n == 0 {
                // Sleeps overshoot, as real timers do.
                now += rl.wait().max(Duration::from_micros(50)) + Duration::from_micros(30);
            }
        }
        sent
    }

    #[test]
    fn holds_the_rate() {
        for rate in [10.0, 1_000.0, 10_000.0, 50_000.0] {
            let sent = simulate(rate, 500, 2.0) as f64;
            let expect = rate * 2.0;
            assert!(
                (sent - expect).abs() <= expect * 0.02 + 2.0,
                "rate {rate}: sent {sent}"
            );
        }
    }

    #[test]
    fn burst_is_capped_after_a_stall() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1_000.0, t0);
        assert_eq!(rl.take(t0, 100), 1);
        // Ten seconds of nothing: only 10 ms worth comes back at once.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(rl.take(later, 1_000_000), 10);
        assert_eq!(rl.take(later, 1), 0);
        assert!(rl.wait() > Duration::ZERO && rl.wait() <= Duration::from_millis(1));
    }

    #[test]
    fn low_rates_get_one_token() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(2.0, t0);
        assert_eq!(rl.take(t0, 10), 1);
        assert_eq!(rl.take(t0, 10), 0);
        assert_eq!(rl.wait(), Duration::from_millis(500));
        assert_eq!(rl.take(t0 + Duration::from_millis(500), 10), 1);
    }

    #[test]
    fn consumer_debt() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(100.0, t0);
        rl.spend(t0, 51);
        // 1 token was there, 50 owed: half a second.
        assert_eq!(rl.debt(), Duration::from_millis(500));
        rl.spend(t0 + Duration::from_millis(500), 0);
        assert_eq!(rl.debt(), Duration::ZERO);
    }
}
