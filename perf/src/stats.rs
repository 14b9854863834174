//! Run-wide shared state and reporting: the message counters (atomics, bumped once per batch),
//! the stop signals, per-task latency histograms handed to the reporter a few times a second
//! (no lock on the hot path), the once-per-interval progress line, the watched processes, and the
//! final summary (human-readable or JSON).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{Notify, Semaphore};

use crate::body::Clock;
use crate::procstat::Proc;

/// Latencies are kept in microseconds, up to a minute (larger ones are clamped).
const HIST_MAX_US: u64 = 60_000_000;
/// How often a task hands its latency samples to the reporter, at most.
const HIST_FLUSH: Duration = Duration::from_millis(200);
/// Samples a task buffers before folding them into its own histogram. Slow tasks (thousands of
/// connections at a few msg/s) only ever send these small vectors; a histogram (some 140 KB to
/// allocate, zero and merge) is only built by tasks that record more than this per hand-over.
const SAMPLE_BUFFER: usize = 1024;

/// A histogram for latencies in microseconds.
pub fn new_hist() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// Message counts over the whole run.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub returned: AtomicU64,
    pub consumed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub sent: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    pub consumed: u64,
}

impl Counters {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sent: self.sent.load(Ordering::Relaxed),
            confirmed: self.confirmed.load(Ordering::Relaxed),
            nacked: self.nacked.load(Ordering::Relaxed),
            returned: self.returned.load(Ordering::Relaxed),
            consumed: self.consumed.load(Ordering::Relaxed),
        }
    }
}

/// A one-way stop signal: a flag the loops check per batch, and a wake-up for waiters.
#[derive(Debug, Default)]
pub struct Stop {
    flag: AtomicBool,
    notify: Notify,
}

impl Stop {
    pub fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once the signal is set.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Confirm,
    Consumer,
}

/// What every producer and consumer task shares.
pub struct Ctx {
    pub counters: Counters,
    pub stop_producers: Stop,
    pub stop_consumers: Stop,
    pub clock: Clock,
    /// A permit per consumer whose basic.consume calls are all confirmed.
    pub consumers_ready: Semaphore,
    hist_tx: UnboundedSender<(Kind, Samples)>,
}

impl Ctx {
    pub fn new(clock: Clock) -> (Self, UnboundedReceiver<(Kind, Samples)>) {
        let (hist_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = Ctx {
            counters: Counters::default(),
            stop_producers: Stop::default(),
            stop_consumers: Stop::default(),
            clock,
            consumers_ready: Semaphore::new(0),
            hist_tx,
        };
        (ctx, rx)
    }

    pub fn local_hist(&self, kind: Kind) -> LocalHist {
        LocalHist {
            kind,
            buf: Vec::with_capacity(16),
            h: None,
            last: Instant::now(),
            tx: self.hist_tx.clone(),
        }
    }
}

/// Latency samples handed from a task to the reporter.
pub enum Samples {
    Few(Vec<u64>),
    Many(Box<Histogram<u64>>),
}

/// A task's own latency samples, handed to the reporter every [`HIST_FLUSH`] at most.
pub struct LocalHist {
    kind: Kind,
    buf: Vec<u64>,
    h: Option<Box<Histogram<u64>>>,
    last: Instant,
    tx: UnboundedSender<(Kind, Samples)>,
}

impl LocalHist {
    pub fn record(&mut self, us: u64) {
        if self.buf.len() == SAMPLE_BUFFER {
            let h = self.h.get_or_insert_with(|| Box::new(new_hist()));
            for v in self.buf.drain(..) {
                h.saturating_record(v);
            }
        }
        self.buf.push(us);
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.h.is_none()
    }

    /// Hands the samples over if the last hand-over is old enough; call once per batch.
    pub fn maybe_flush(&mut self, now: Instant) {
        if !self.is_empty() && now.duration_since(self.last) >= HIST_FLUSH {
            self.flush();
            self.last = now;
        }
    }

    pub fn flush(&mut self) {
        let samples = match self.h.take() {
            Some(mut h) => {
                for v in self.buf.drain(..) {
                    h.saturating_record(v);
                }
                Samples::Many(h)
            }
            None if !self.buf.is_empty() => {
                Samples::Few(std::mem::replace(&mut self.buf, Vec::with_capacity(16)))
            }
            None => return,
        };
        // The reporter only goes away at the very end; samples after that do not matter.
        let _ = self.tx.send((self.kind, samples));
    }
}

impl Drop for LocalHist {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p75: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        Some(Latency {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p75: h.value_at_quantile(0.75),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        })
    }
}

/// One progress interval, kept for the JSON summary's time series.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds since the start of the run.
    pub t: f64,
    pub sent_rate: f64,
    pub confirmed_rate: f64,
    pub received_rate: f64,
    pub confirm_p99_us: Option<u64>,
    pub consumer_p50_us: Option<u64>,
    pub consumer_p99_us: Option<u64>,
    /// RSS of each watched process, in `--watch-pid` order.
    pub rss_bytes: Vec<u64>,
}

/// A process named by `--watch-pid`.
#[derive(Debug)]
pub struct Watched {
    pub pid: u32,
    cpu_start: Option<f64>,
    pub rss_start: u64,
    pub rss_peak: u64,
    pub rss_last: u64,
    error: Option<String>,
}

impl Watched {
    pub fn new(pid: u32) -> Self {
        let mut w = Watched {
            pid,
            cpu_start: None,
            rss_start: 0,
            rss_peak: 0,
            rss_last: 0,
            error: None,
        };
        w.sample_rss();
        w.rss_start = w.rss_last;
        w
    }

    /// Starts the CPU measurement (at the start of the load).
    pub fn start_cpu(&mut self) {
        match Proc::Pid(self.pid).cpu_seconds() {
            Ok(c) => self.cpu_start = Some(c),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    pub fn sample_rss(&mut self) -> u64 {
        match Proc::Pid(self.pid).rss_bytes() {
            Ok(r) => {
                self.rss_last = r;
                self.rss_peak = self.rss_peak.max(r);
            }
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(format!("{e:#}"));
                }
            }
        }
        self.rss_last
    }

    fn summary(&mut self, msgs: u64) -> WatchedSummary {
        self.sample_rss();
        let cpu = match (self.cpu_start, Proc::Pid(self.pid).cpu_seconds()) {
            (Some(a), Ok(b)) => Some(b - a),
            (_, Err(e)) => {
                if self.error.is_none() {
                    self.error = Some(format!("{e:#}"));
                }
                None
            }
            _ => None,
        };
        WatchedSummary {
            pid: self.pid,
            cpu_s: cpu.map(round2),
            cpu_us_per_msg: cpu.and_then(|c| per_msg_us(c, msgs)),
            rss_start_bytes: self.rss_start,
            rss_end_bytes: self.rss_last,
            rss_peak_bytes: self.rss_peak,
            error: self.error.clone(),
        }
    }
}

fn per_msg_us(cpu_s: f64, msgs: u64) -> Option<f64> {
    (msgs > 0).then(|| round2(cpu_s * 1e6 / msgs as f64))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[derive(Debug, Clone, Serialize)]
pub struct WatchedSummary {
    pub pid: u32,
    pub cpu_s: Option<f64>,
    /// CPU microseconds per message, messages being max(sent, consumed).
    pub cpu_us_per_msg: Option<f64>,
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
    pub rss_peak_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `--connections` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsSummary {
    pub opened: usize,
    pub elapsed_s: f64,
    pub connect_rate: f64,
    /// Growth of each watched process's RSS divided by the connections opened.
    pub rss_per_connection_bytes: Vec<Option<f64>>,
}

impl ConnectionsSummary {
    pub fn new(opened: usize, elapsed: Duration, rss_before: &[u64], rss_after: &[u64]) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        ConnectionsSummary {
            opened,
            elapsed_s: round2(secs),
            connect_rate: round2(opened as f64 / secs),
            rss_per_connection_bytes: rss_before
                .iter()
                .zip(rss_after)
                .map(|(b, a)| {
                    (opened > 0).then(|| ((*a as f64 - *b as f64) / opened as f64).round())
                })
                .collect(),
        }
    }
}

/// The final summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub id: String,
    pub server: String,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub confirm: Option<u32>,
    pub rate: Option<f64>,
    /// Seconds from the start of the load until the last task stopped.
    pub elapsed_s: f64,
    pub sent: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    pub consumed: u64,
    /// sent / seconds until the last producer stopped publishing.
    pub send_rate: f64,
    /// confirmed / seconds until the last confirm arrived.
    pub confirm_rate: f64,
    /// consumed / seconds until the last delivery.
    pub receive_rate: f64,
    pub confirm_latency_us: Option<Latency>,
    pub consumer_latency_us: Option<Latency>,
    pub client_cpu_s: f64,
    /// Client CPU microseconds per message, messages being max(sent, consumed).
    pub client_cpu_us_per_msg: Option<f64>,
    pub watched: Vec<WatchedSummary>,
    pub connections: Option<ConnectionsSummary>,
    /// What the consumers should have received: (confirmed, or sent without confirms, less
    /// returned) times the queues each message reaches; null when that is unknowable.
    pub expected_consumed: Option<u64>,
    /// consumed == expected_consumed, when both apply.
    pub consumed_matches: Option<bool>,
    pub interrupted: bool,
    pub series: Vec<Point>,
}

/// Periodic progress and the totals behind the summary.
pub struct Reporter {
    id: String,
    confirms: bool,
    producers: bool,
    consumers: bool,
    rx: UnboundedReceiver<(Kind, Samples)>,
    iv_confirm: Histogram<u64>,
    iv_consumer: Histogram<u64>,
    total_confirm: Histogram<u64>,
    total_consumer: Histogram<u64>,
    start: Instant,
    last_t: Instant,
    last: Snapshot,
    series: Vec<Point>,
    pub watched: Vec<Watched>,
}

impl Reporter {
    pub fn new(
        id: String,
        confirms: bool,
        producers: bool,
        consumers: bool,
        rx: UnboundedReceiver<(Kind, Samples)>,
        watched: Vec<Watched>,
    ) -> Self {
        let now = Instant::now();
        Reporter {
            id,
            confirms,
            producers,
            consumers,
            rx,
            iv_confirm: new_hist(),
            iv_consumer: new_hist(),
            total_confirm: new_hist(),
            total_consumer: new_hist(),
            start: now,
            last_t: now,
            last: Snapshot::default(),
            series: Vec::new(),
            watched,
        }
    }

    /// Marks the start of the load: rates and CPU are measured from here.
    pub fn start(&mut self, now: Instant, counters: Snapshot) {
        self.start = now;
        self.last_t = now;
        self.last = counters;
        for w in &mut self.watched {
            w.start_cpu();
        }
    }

    fn drain(&mut self) {
        while let Ok((kind, samples)) = self.rx.try_recv() {
            let (iv, total) = match kind {
                Kind::Confirm => (&mut self.iv_confirm, &mut self.total_confirm),
                Kind::Consumer => (&mut self.iv_consumer, &mut self.total_consumer),
            };
            match samples {
                Samples::Few(v) => {
                    for us in v {
                        iv.saturating_record(us);
                        total.saturating_record(us);
                    }
                }
                Samples::Many(h) => {
                    // Same bounds everywhere, so adding cannot fail.
                    let _ = iv.add(&*h);
                    let _ = total.add(&*h);
                }
            }
        }
    }

    /// Time since the last progress line (or the start).
    pub fn since_tick(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_t)
    }

    /// Prints one progress line to stderr and records it.
    pub fn tick(&mut self, now: Instant, c: Snapshot) {
        self.drain();
        let dt = now.duration_since(self.last_t).as_secs_f64().max(1e-9);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        let t = now.duration_since(self.start).as_secs_f64();
        let sent = rate(c.sent, self.last.sent);
        let confirmed = rate(c.confirmed, self.last.confirmed);
        let nacked = rate(c.nacked, self.last.nacked);
        let received = rate(c.consumed, self.last.consumed);
        let mut line = format!("id: {}, time: {:.1}s", self.id, t);
        if self.producers {
            line += &format!(", sent: {sent:.0} msg/s");
            if self.confirms {
                line += &format!(", confirmed: {confirmed:.0} msg/s, nacked: {nacked:.0} msg/s");
            }
            if c.returned > 0 {
                line += &format!(", returned: {}", c.returned);
            }
        }
        if self.consumers {
            line += &format!(", received: {received:.0} msg/s");
        }
        let pct = |h: &Histogram<u64>| {
            if h.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{}/{}/{}",
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.95),
                    h.value_at_quantile(0.99)
                )
            }
        };
        if self.confirms {
            line += &format!(", confirm latency p50/95/99: {} µs", pct(&self.iv_confirm));
        }
        if self.consumers {
            line += &format!(
                ", consumer latency p50/95/99: {} µs",
                pct(&self.iv_consumer)
            );
        }
        let rss: Vec<u64> = self.watched.iter_mut().map(Watched::sample_rss).collect();
        for (w, r) in self.watched.iter().zip(&rss) {
            line += &format!(", pid {} rss: {:.1} MiB", w.pid, *r as f64 / 1048576.0);
        }
        eprintln!("{line}");
        let q = |h: &Histogram<u64>, p: f64| (!h.is_empty()).then(|| h.value_at_quantile(p));
        self.series.push(Point {
            t: round2(t),
            sent_rate: sent.round(),
            confirmed_rate: confirmed.round(),
            received_rate: received.round(),
            confirm_p99_us: q(&self.iv_confirm, 0.99),
            consumer_p50_us: q(&self.iv_consumer, 0.5),
            consumer_p99_us: q(&self.iv_consumer, 0.99),
            rss_bytes: rss,
        });
        self.iv_confirm.reset();
        self.iv_consumer.reset();
        self.last = c;
        self.last_t = now;
    }

    /// Builds the summary. `publish_end`, `confirm_end` and `consume_end` bound the rates.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        mut self,
        head: SummaryHead,
        c: Snapshot,
        end: Instant,
        publish_end: Option<Instant>,
        confirm_end: Option<Instant>,
        consume_end: Option<Instant>,
        client_cpu_s: f64,
    ) -> Summary {
        self.drain();
        let since = |t: Option<Instant>| {
            t.map(|t| t.saturating_duration_since(self.start).as_secs_f64())
                .filter(|s| *s > 0.0)
        };
        let rate =
            |n: u64, secs: Option<f64>| secs.map_or(0.0, |s| (n as f64 / s * 10.0).round() / 10.0);
        let msgs = c.sent.max(c.consumed);
        let watched = self.watched.iter_mut().map(|w| w.summary(msgs)).collect();
        let expected_consumed = head.fanout_factor.map(|f| {
            let base = if head.confirm.is_some() {
                c.confirmed
            } else {
                c.sent
            };
            base.saturating_sub(c.returned) * f
        });
        let expected_consumed = expected_consumed.filter(|_| head.check_consumed);
        Summary {
            id: self.id,
            server: head.server,
            producers: head.producers,
            consumers: head.consumers,
            size: head.size,
            confirm: head.confirm,
            rate: head.rate,
            elapsed_s: round2(end.duration_since(self.start).as_secs_f64()),
            sent: c.sent,
            confirmed: c.confirmed,
            nacked: c.nacked,
            returned: c.returned,
            consumed: c.consumed,
            send_rate: rate(c.sent, since(publish_end)),
            confirm_rate: rate(c.confirmed, since(confirm_end)),
            receive_rate: rate(c.consumed, since(consume_end)),
            confirm_latency_us: Latency::of(&self.total_confirm),
            consumer_latency_us: Latency::of(&self.total_consumer),
            client_cpu_s: round2(client_cpu_s),
            client_cpu_us_per_msg: per_msg_us(client_cpu_s, msgs),
            watched,
            connections: head.connections,
            consumed_matches: expected_consumed.map(|e| e == c.consumed),
            expected_consumed,
            interrupted: head.interrupted,
            series: self.series,
        }
    }
}

/// Summary fields that come from the configuration and the run, not the counters.
pub struct SummaryHead {
    pub server: String,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub confirm: Option<u32>,
    pub rate: Option<f64>,
    pub fanout_factor: Option<u64>,
    /// Whether consumed should match what was published (both sides ran, nothing cut short).
    pub check_consumed: bool,
    pub connections: Option<ConnectionsSummary>,
    pub interrupted: bool,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

impl Summary {
    /// The human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "id: {}, server: {}, {} producer(s), {} consumer(s), {} B messages, {:.2} s{}",
            self.id,
            self.server,
            self.producers,
            self.consumers,
            self.size,
            self.elapsed_s,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        ));
        if self.producers > 0 {
            line(format!(
                "sent: {} msgs, {} msg/s",
                self.sent, self.send_rate
            ));
            if self.confirm.is_some() {
                line(format!(
                    "confirmed: {} msgs, {} msg/s; nacked: {}",
                    self.confirmed, self.confirm_rate, self.nacked
                ));
            }
            if self.returned > 0 {
                line(format!("returned (unroutable): {}", self.returned));
            }
        }
        if self.consumers > 0 {
            line(format!(
                "received: {} msgs, {} msg/s",
                self.consumed, self.receive_rate
            ));
        }
        let lat = |name: &str, l: &Option<Latency>| {
            l.as_ref().map(|l| {
                format!(
                    "{name} latency µs: min {} p50 {} p75 {} p95 {} p99 {} max {} (mean {}, {} samples)",
                    l.min, l.p50, l.p75, l.p95, l.p99, l.max, l.mean, l.count
                )
            })
        };
        if let Some(l) = lat("confirm", &self.confirm_latency_us) {
            line(l);
        }
        if let Some(l) = lat("consumer", &self.consumer_latency_us) {
            line(l);
        }
        line(format!(
            "client CPU: {:.2} s{}",
            self.client_cpu_s,
            self.client_cpu_us_per_msg
                .map(|u| format!(", {u} µs/msg"))
                .unwrap_or_default()
        ));
        for w in &self.watched {
            let cpu = match (w.cpu_s, w.cpu_us_per_msg) {
                (Some(c), Some(u)) => format!("CPU {c:.2} s, {u} µs/msg"),
                (Some(c), None) => format!("CPU {c:.2} s"),
                _ => "CPU unknown".to_string(),
            };
            line(format!(
                "pid {}: {cpu}, RSS start {} end {} peak {}{}",
                w.pid,
                mib(w.rss_start_bytes),
                mib(w.rss_end_bytes),
                mib(w.rss_peak_bytes),
                w.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ));
        }
        if let Some(c) = &self.connections {
            let per: Vec<String> = c
                .rss_per_connection_bytes
                .iter()
                .map(|b| b.map_or("?".into(), |b| format!("{:.1} KiB", b / 1024.0)))
                .collect();
            line(format!(
                "connections: {} opened in {:.2} s ({} conn/s){}",
                c.opened,
                c.elapsed_s,
                c.connect_rate,
                if per.is_empty() {
                    String::new()
                } else {
                    format!(", watched RSS per connection: {}", per.join(", "))
                }
            ));
        }
        match (self.expected_consumed, self.consumed_matches) {
            (Some(e), Some(true)) => line(format!("consumed == expected: yes ({e})")),
            (Some(e), Some(false)) => line(format!(
                "MISMATCH: consumed {} but expected {} (confirmed {}, sent {})",
                self.consumed, e, self.confirmed, self.sent
            )),
            _ => {}
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let l = Latency::of(&h).unwrap();
        assert_eq!(l.count, 1000);
        assert_eq!((l.min, l.max), (1, 1000));
        assert!((499..=501).contains(&l.p50));
        assert!((989..=991).contains(&l.p99));
        assert!(Latency::of(&new_hist()).is_none());
        // Beyond the top is clamped, not lost.
        let mut h = new_hist();
        h.saturating_record(u64::MAX);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn connections_summary() {
        let c = ConnectionsSummary::new(
            1000,
            Duration::from_millis(500),
            &[100 << 20],
            &[(100 << 20) + 1000 * 2048],
        );
        assert_eq!(c.connect_rate, 2000.0);
        assert_eq!(c.rss_per_connection_bytes, vec![Some(2048.0)]);
    }

    #[test]
    fn local_samples_reach_the_reporter() {
        let (ctx, rx) = Ctx::new(Clock::new());
        let mut r = Reporter::new("t".into(), true, true, true, rx, Vec::new());
        let mut few = ctx.local_hist(Kind::Consumer);
        few.record(10);
        few.record(20);
        let mut many = ctx.local_hist(Kind::Confirm);
        for v in 0..(SAMPLE_BUFFER as u64 * 3 + 5) {
            many.record(v);
        }
        drop(few);
        many.flush();
        r.drain();
        assert_eq!(r.total_consumer.len(), 2);
        assert_eq!(r.total_confirm.len(), SAMPLE_BUFFER as u64 * 3 + 5);
        assert_eq!(r.iv_consumer.max(), 20);
    }

    #[tokio::test]
    async fn stop_wakes_waiters() {
        let stop = std::sync::Arc::new(Stop::default());
        let s2 = stop.clone();
        let waiter = tokio::spawn(async move { s2.wait().await });
        tokio::task::yield_now().await;
        stop.set();
        waiter.await.unwrap();
        assert!(stop.is_set());
        // Already set: returns at once.
        stop.wait().await;
    }
}
