//! Resource alarms, as RabbitMQ's: the memory alarm (the process's resident memory above the
//! high watermark) and the disk alarm (free space under the data directory below the limit).
//! A monitor task checks both every second; while either is in effect, connections that
//! publish are blocked (the connection code waits on `Alarms::subscribe`), and the health
//! checks, the node's JSON and the Prometheus alarm gauges say so. Thresholds start from the
//! settings and can be changed at run time (as `rabbitmqctl set_vm_memory_high_watermark`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How often the monitor reads memory and disk.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Which alarms are in effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmState {
    pub memory: bool,
    pub disk: bool,
}

impl AlarmState {
    pub fn any(&self) -> bool {
        self.memory || self.disk
    }

    /// The connection.blocked reason RabbitMQ sends for these alarms.
    pub fn reason(&self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & low on disk",
            (true, false) => "low on memory",
            _ => "low on disk",
        }
    }

    /// RabbitMQ's resource names, as the health checks list them.
    pub fn resources(&self) -> Vec<&'static str> {
        // RabbitMQ lists disk before memory when both are in effect.
        let mut r = Vec::new();
        if self.disk {
            r.push("disk space");
        }
        if self.memory {
            r.push("memory");
        }
        r
    }
}

/// The node's alarms and their thresholds.
#[derive(Debug)]
pub struct Alarms {
    state: watch::Sender<AlarmState>,
    /// The memory high watermark in bytes.
    memory_limit: AtomicU64,
    /// The free-disk limit in bytes.
    disk_free_limit: AtomicU64,
}

impl Alarms {
    pub fn new(cfg: &Config) -> Alarms {
        let memory_limit = match cfg.vm_memory_high_watermark_absolute {
            Some(b) => b,
            None => relative_limit(cfg.vm_memory_high_watermark),
        };
        Alarms {
            state: watch::Sender::new(AlarmState::default()),
            memory_limit: AtomicU64::new(memory_limit),
            disk_free_limit: AtomicU64::new(cfg.disk_free_limit),
        }
    }

    pub fn state(&self) -> AlarmState {
        *self.state.borrow()
    }

    /// Follows the alarm state (connections wait on it while blocked).
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.state.subscribe()
    }

    pub fn memory_limit(&self) -> u64 {
        self.memory_limit.load(Ordering::Relaxed)
    }

    pub fn disk_free_limit(&self) -> u64 {
        self.disk_free_limit.load(Ordering::Relaxed)
    }

    /// Sets the memory high watermark in bytes; takes effect at the next check.
    pub fn set_memory_limit(&self, bytes: u64) {
        self.memory_limit.store(bytes, Ordering::Relaxed);
    }

    /// Sets the free-disk limit in bytes; takes effect at the next check.
    pub fn set_disk_free_limit(&self, bytes: u64) {
        self.disk_free_limit.store(bytes, Ordering::Relaxed);
    }

    /// Applies one reading of resident memory and free disk: sets or clears each alarm,
    /// logging each change as RabbitMQ does.
    pub fn update(&self, memory_used: u64, disk_free: u64) {
        let mem_limit = self.memory_limit();
        let disk_limit = self.disk_free_limit();
        let next = AlarmState {
            memory: memory_used > mem_limit,
            disk: disk_free < disk_limit,
        };
        let prev = self.state();
        if next == prev {
            return;
        }
        for (resource, was, now, reading, limit) in [
            ("memory", prev.memory, next.memory, memory_used, mem_limit),
            ("disk", prev.disk, next.disk, disk_free, disk_limit),
        ] {
            match (was, now) {
                (false, true) => tracing::warn!(
                    resource,
                    reading,
                    limit,
                    "resource limit alarm set: publishers will be blocked until this alarm clears"
                ),
                (true, false) => {
                    tracing::warn!(resource, reading, limit, "resource limit alarm cleared")
                }
                _ => {}
            }
        }
        self.state.send_replace(next);
    }

    /// Checks now: reads resident memory and the free space under `data_dir`.
    pub fn check(&self, data_dir: &std::path::Path) {
        self.update(crate::system::rss(), crate::system::disk_free(data_dir));
    }

    /// Checks every `CHECK_INTERVAL` until `shutdown`.
    pub fn start_monitor(
        self: &Arc<Self>,
        data_dir: std::path::PathBuf,
        shutdown: CancellationToken,
    ) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let Some(a) = me.upgrade() else { return };
                // statvfs and /proc reads are quick but are system calls: off the reactor.
                let dir = data_dir.clone();
                let reading = tokio::task::spawn_blocking(move || {
                    (crate::system::rss(), crate::system::disk_free(&dir))
                })
                .await;
                if let Ok((mem, disk)) = reading {
                    a.update(mem, disk);
                }
            }
        });
    }
}

/// A fraction of the host's memory in bytes (u64::MAX where the host's memory is unknown, so
/// the alarm never fires on a platform that does not say).
fn relative_limit(fraction: f64) -> u64 {
    let total = crate::system::mem_total();
    if total == 0 {
        return u64::MAX;
    }
    (total as f64 * fraction) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarms(mem: u64, disk: u64) -> Alarms {
        let mut cfg = Config::for_tests();
        cfg.vm_memory_high_watermark_absolute = Some(mem);
        cfg.disk_free_limit = disk;
        Alarms::new(&cfg)
    }

    #[test]
    fn alarms_follow_readings_and_thresholds() {
        let a = alarms(1000, 500);
        let mut rx = a.subscribe();
        a.update(999, 500);
        assert_eq!(a.state(), AlarmState::default());
        assert!(!rx.has_changed().unwrap_or(true));
        a.update(1001, 500);
        assert_eq!(
            a.state(),
            AlarmState {
                memory: true,
                disk: false
            }
        );
        assert!(rx.has_changed().unwrap_or(false));
        rx.mark_unchanged();
        assert_eq!(a.state().reason(), "low on memory");
        a.update(1001, 499);
        assert_eq!(a.state().reason(), "low on memory & low on disk");
        assert_eq!(a.state().resources(), vec!["disk space", "memory"]);
        a.set_memory_limit(2000);
        a.update(1001, 499);
        assert_eq!(a.state().reason(), "low on disk");
        a.set_disk_free_limit(0);
        a.update(1001, 0);
        assert!(!a.state().any());
    }
}
