//! What the node reports about its process and host: resident memory, file descriptors and
//! free disk space under the data directory (read from /proc and statvfs; zero where the
//! platform does not say).

#[derive(Debug, Clone, Default)]
pub struct System {
    pub rss_bytes: u64,
    /// The host's memory (0 where the platform does not say).
    pub mem_total: u64,
    pub fds_used: u64,
    pub fds_total: u64,
    pub disk_free: u64,
}

/// The process's resident memory in bytes.
pub fn rss() -> u64 {
    // /proc/self/statm: size resident shared ... in pages.
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn fds() -> (u64, u64) {
    let used = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let total = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|x| x.parse().ok())
        })
        .unwrap_or(0);
    (used, total)
}

/// The host's memory in bytes.
pub fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|x| x.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Free space for this process under `dir` (or `/` while `dir` does not exist yet).
pub fn disk_free(dir: &std::path::Path) -> u64 {
    let dir = if dir.exists() {
        dir
    } else {
        std::path::Path::new("/")
    };
    match rustix::fs::statvfs(dir) {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
        Err(_) => 0,
    }
}

/// Reads the process and host figures now.
pub fn read_for(data_dir: &std::path::Path) -> System {
    let (fds_used, fds_total) = fds();
    System {
        rss_bytes: rss(),
        mem_total: mem_total(),
        fds_used,
        fds_total,
        disk_free: disk_free(data_dir),
    }
}
