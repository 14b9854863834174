//! Message bodies and the clock behind them: the first 12 bytes of every body are a timestamp
//! (u64 nanoseconds since the UNIX epoch, big-endian) and the producer id (u32, big-endian); the
//! rest is zero padding. The timestamp comes from a monotonic clock anchored to the wall clock once
//! per process, so latencies within a process never go backwards and runs in separate processes on
//! one host (publish-only, then consume-only) still compare.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Bytes of the body the timestamp and producer id take; also the smallest body `-s` accepts.
pub const STAMP_LEN: usize = 12;

/// Monotonic nanoseconds since the UNIX epoch.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    epoch_ns_at_base: u64,
}

impl Clock {
    pub fn new() -> Self {
        let base = Instant::now();
        let epoch_ns_at_base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Clock {
            base,
            epoch_ns_at_base,
        }
    }

    /// Nanoseconds since the UNIX epoch, now.
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// Nanoseconds since the UNIX epoch at `t` (an instant before the anchor maps to the anchor).
    pub fn ns_at(&self, t: Instant) -> u64 {
        self.epoch_ns_at_base + t.saturating_duration_since(self.base).as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The 12-byte stamp for a message sent at `ts_ns` by producer `producer_id`.
pub fn stamp(ts_ns: u64, producer_id: u32) -> [u8; STAMP_LEN] {
    let mut s = [0u8; STAMP_LEN];
    s[..8].copy_from_slice(&ts_ns.to_be_bytes());
    s[8..].copy_from_slice(&producer_id.to_be_bytes());
    s
}

/// Timestamp and producer id from the front of a body, if it is long enough.
pub fn read_stamp(body: &[u8]) -> Option<(u64, u32)> {
    let ts = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let id = u32::from_be_bytes(body.get(8..STAMP_LEN)?.try_into().ok()?);
    Some((ts, id))
}

/// Microseconds from `sent_ns` to `now_ns`, 0 if the clocks disagree.
pub fn latency_us(sent_ns: u64, now_ns: u64) -> u64 {
    now_ns.saturating_sub(sent_ns) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamp_roundtrip() {
        let s = stamp(0x0102_0304_0506_0708, 42);
        assert_eq!(s[..8], [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut body = s.to_vec();
        body.extend_from_slice(&[0; 100]);
        assert_eq!(read_stamp(&body), Some((0x0102_0304_0506_0708, 42)));
        assert_eq!(read_stamp(&body[..11]), None);
        assert_eq!(read_stamp(&[]), None);
    }

    #[test]
    fn clock_is_epoch_based_and_monotonic() {
        let c = Clock::new();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let a = c.now_ns();
        // Anchored to the wall clock: within a second of it.
        assert!(a.abs_diff(wall) < 1_000_000_000);
        let later = Instant::now() + Duration::from_millis(5);
        assert!(c.ns_at(later) >= a + 5_000_000);
        assert!(c.now_ns() >= a);
    }

    #[test]
    fn latency_in_micros() {
        assert_eq!(latency_us(1_000_000, 3_500_000), 2_500);
        assert_eq!(latency_us(5, 1), 0);
    }
}
