//! CPU time and resident memory of a process, read from Linux's /proc: utime + stime from
//! /proc/PID/stat and VmRSS from /proc/PID/status. Used for this process (client CPU per
//! message) and for `--watch-pid` (broker CPU per message, peak RSS).

use anyhow::{Context, Result};

/// /proc reports CPU times in USER_HZ ticks, which Linux fixes at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// A process: a pid, or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    This,
    Pid(u32),
}

impl Proc {
    fn path(&self, file: &str) -> String {
        match self {
            Proc::This => format!("/proc/self/{file}"),
            Proc::Pid(p) => format!("/proc/{p}/{file}"),
        }
    }

    /// User plus system CPU seconds used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let path = self.path("stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_stat_cpu(&stat).with_context(|| format!("parsing {path}"))
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let path = self.path("status");
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_status_rss(&status).with_context(|| format!("parsing {path}"))
    }
}

/// utime + stime in seconds from the text of /proc/PID/stat. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from the last ')'.
pub fn parse_stat_cpu(stat: &str) -> Result<f64> {
    let rest = &stat[stat.rfind(')').context("no ')' in stat")? + 1..];
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next().context("no utime")?.parse()?;
    let stime: u64 = fields.next().context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// VmRSS in bytes from the text of /proc/PID/status.
pub fn parse_status_rss(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("empty VmRSS line")?
        .parse()?;
    Ok(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let stat = "1234 (beam.smp (x) y) S 1 1234 1234 0 -1 4194560 12345 0 0 0 250 75 0 0 20 0 \
                    30 0 100 2000000 5000 18446744073709551615";
        assert!((parse_stat_cpu(stat).unwrap() - 3.25).abs() < 1e-9);
        assert!(parse_stat_cpu("garbage").is_err());
    }

    #[test]
    fn status_rss() {
        let status = "Name:\tbeam.smp\nVmPeak:\t  200 kB\nVmRSS:\t   1536 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss(status).unwrap(), 1536 * 1024);
        assert!(parse_status_rss("Name: x\n").is_err());
    }

    #[test]
    fn this_process() {
        assert!(Proc::This.cpu_seconds().unwrap() >= 0.0);
        assert!(Proc::This.rss_bytes().unwrap() > 0);
    }
}
