//! The run, start to end: topology setup (exchange, queues, bindings), the extra idle
//! connections of `--connections`, consumers (all consuming before any producer starts),
//! producers, the progress loop and its end conditions, the stop sequence (producers first and
//! their confirms, then a drain until the consumers have what was published, then consumers),
//! and the numbers for the summary.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{exchange, queue, AMQPClass};
use amq_protocol::types::FieldTable;
use anyhow::{anyhow, bail, Context, Result};
use tokio::task::JoinSet;

use crate::args::Config;
use crate::body::Clock;
use crate::conn::{self, short, Conn};
use crate::consumer::{self, ConsumerReport};
use crate::procstat::Proc;
use crate::producer::{self, ProducerReport};
use crate::stats::{ConnectionsSummary, Ctx, Reporter, Summary, SummaryHead, Watched};

/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 64;
/// How long stopping tasks get before they are abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long consumers get to confirm their basic.consume calls.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

enum Done {
    Producer(ProducerReport),
    Consumer(ConsumerReport),
}

type CtrlC = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// The running load and what the progress loop tracks.
struct Run {
    cfg: Arc<Config>,
    ctx: Arc<Ctx>,
    reporter: Reporter,
    tasks: JoinSet<Result<Done>>,
    producers_done: usize,
    consumers_done: usize,
    publish_end: Option<Instant>,
    confirm_end: Option<Instant>,
    consume_end: Option<Instant>,
    fatal: Option<anyhow::Error>,
    interrupted: bool,
    tick: tokio::time::Interval,
    ctrl_c: CtrlC,
}

impl Run {
    /// Waits for one thing to happen (a progress tick, a task ending, Ctrl-C) or for `until`.
    /// Returns false when `until` passed first.
    async fn step(&mut self, until: Option<tokio::time::Instant>) -> bool {
        let sleep = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.tick.tick() => {
                self.reporter.tick(Instant::now(), self.ctx.counters.snapshot());
            }
            Some(joined) = self.tasks.join_next() => self.task_ended(joined),
            _ = &mut self.ctrl_c => {
                eprintln!("interrupted: stopping");
                self.interrupted = true;
                self.ctrl_c = Box::pin(std::future::pending());
            }
            _ = sleep => return false,
        }
        true
    }

    fn task_ended(&mut self, joined: Result<Result<Done>, tokio::task::JoinError>) {
        let later = |a: Option<Instant>, b: Option<Instant>| a.max(b);
        match joined {
            Ok(Ok(Done::Producer(r))) => {
                self.producers_done += 1;
                self.publish_end = later(self.publish_end, Some(r.publish_end));
                self.confirm_end = later(self.confirm_end, Some(r.confirm_end));
            }
            Ok(Ok(Done::Consumer(r))) => {
                self.consumers_done += 1;
                self.consume_end = later(self.consume_end, r.last_delivery);
            }
            Ok(Err(e)) => {
                if self.fatal.is_none() {
                    self.fatal = Some(e);
                }
            }
            Err(e) => {
                if self.fatal.is_none() {
                    self.fatal = Some(anyhow!("a task failed: {e}"));
                }
            }
        }
    }

    fn failed(&self) -> bool {
        self.fatal.is_some()
    }

    /// Whether the counts (`-C`, `-D`) say the run is over.
    fn counts_reached(&self) -> bool {
        let cfg = &self.cfg;
        let (x, y) = (cfg.producers, cfg.consumers);
        let producers_finished = x == 0 || self.producers_done == x;
        let consumers_finished = y == 0 || self.consumers_done == y;
        // Producers done (-C): go on to drain what they published, unless consumers count too.
        (x > 0 && producers_finished && (consumers_finished || cfg.cmessages.is_none()))
            // Consumers done (-D): producers without -C have nothing left to do.
            || (y > 0 && cfg.cmessages.is_some() && consumers_finished)
            // Nothing to run and no time to wait.
            || (x == 0 && y == 0 && cfg.time.is_none())
    }

    /// Messages the consumers should receive in all, when that is knowable.
    fn expected_consumed(&self) -> Option<u64> {
        let c = self.ctx.counters.snapshot();
        let base = if self.cfg.confirm.is_some() {
            c.confirmed
        } else {
            c.sent
        };
        self.cfg
            .fanout_factor
            .map(|f| base.saturating_sub(c.returned) * f)
    }

    /// Steps until `done` holds, something fails, or `timeout` passes (returning false then).
    async fn wait_for(&mut self, timeout: Duration, done: impl Fn(&Run) -> bool) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        while !done(self) && !self.failed() {
            if !self.step(Some(until)).await {
                return false;
            }
        }
        true
    }
}

/// Declares the exchange, the queues and their bindings; returns the server's product name.
async fn declare(cfg: &Config) -> Result<String> {
    let mut conn = conn::connect(&cfg.target, &format!("warren-perf {} setup", cfg.id)).await?;
    conn.open_channel().await?;
    if let Some(kind) = &cfg.declare_exchange {
        let decl = exchange::Declare {
            exchange: short(&cfg.exchange)?,
            kind: short(kind)?,
            passive: false,
            durable: cfg.durable,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        };
        match conn
            .call(AMQPClass::Exchange(exchange::AMQPMethod::Declare(decl)))
            .await
            .with_context(|| format!("declaring exchange {:?}", cfg.exchange))?
        {
            AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)) => {}
            other => bail!("expected exchange.declare-ok, got {other:?}"),
        }
    }
    for q in &cfg.queues {
        let decl = queue::Declare {
            queue: short(q)?,
            passive: false,
            durable: cfg.durable,
            exclusive: false,
            auto_delete: cfg.auto_delete,
            nowait: false,
            arguments: cfg.queue_args.clone(),
        };
        match conn
            .call(AMQPClass::Queue(queue::AMQPMethod::Declare(decl)))
            .await
            .with_context(|| format!("declaring queue {q:?}"))?
        {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)) => {}
            other => bail!("expected queue.declare-ok, got {other:?}"),
        }
        if !cfg.exchange.is_empty() {
            let bind = queue::Bind {
                queue: short(q)?,
                exchange: short(&cfg.exchange)?,
                routing_key: short(cfg.routing_key_for(q))?,
                nowait: false,
                arguments: FieldTable::default(),
            };
            match conn
                .call(AMQPClass::Queue(queue::AMQPMethod::Bind(bind)))
                .await
                .with_context(|| format!("binding queue {q:?} to {:?}", cfg.exchange))?
            {
                AMQPClass::Queue(queue::AMQPMethod::BindOk(_)) => {}
                other => bail!("expected queue.bind-ok, got {other:?}"),
            }
        }
    }
    let server = conn.server.clone();
    conn.close(true)
        .await
        .context("closing the setup connection")?;
    Ok(server)
}

/// Opens `n` connections, [`CONNECT_CONCURRENCY`] at a time, in order of index.
async fn open_all<F, Fut>(n: usize, open: F) -> Result<Vec<Conn>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<Conn>> + Send + 'static,
{
    let mut out: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < n || !set.is_empty() {
        while next < n && set.len() < CONNECT_CONCURRENCY {
            let fut = open(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok((i, conn))) => out[i] = Some(conn?),
            Some(Err(e)) => bail!("a connect task failed: {e}"),
            None => break,
        }
    }
    out.into_iter()
        .map(|c| c.context("a connection was not opened"))
        .collect()
}

/// Runs the whole test and returns its summary.
pub async fn run(cfg: Config) -> Result<Summary> {
    let cfg = Arc::new(cfg);
    for pid in &cfg.watch_pids {
        Proc::Pid(*pid)
            .rss_bytes()
            .with_context(|| format!("--watch-pid {pid}"))?;
    }
    let (ctx, hist_rx) = Ctx::new(Clock::new());
    let ctx = Arc::new(ctx);
    let server = declare(&cfg).await?;
    let mut watched: Vec<Watched> = cfg.watch_pids.iter().map(|p| Watched::new(*p)).collect();

    // Idle connections, for the connect rate and the broker's memory per connection.
    let mut idle = Vec::new();
    let mut connections = None;
    if cfg.connections > 0 {
        let before: Vec<u64> = watched.iter_mut().map(Watched::sample_rss).collect();
        let t0 = Instant::now();
        let c = cfg.clone();
        idle = open_all(cfg.connections, move |i| {
            let c = c.clone();
            async move { conn::connect(&c.target, &format!("warren-perf {} idle {i}", c.id)).await }
        })
        .await
        .context("opening --connections (raise `ulimit -n` for many)")?;
        let elapsed = t0.elapsed();
        // Let the broker settle before measuring its memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after: Vec<u64> = watched.iter_mut().map(Watched::sample_rss).collect();
        let s = ConnectionsSummary::new(idle.len(), elapsed, &before, &after);
        eprintln!(
            "opened {} idle connections in {:.2} s ({} conn/s)",
            s.opened, s.elapsed_s, s.connect_rate
        );
        connections = Some(s);
    }

    let consumer_conns = {
        let c = cfg.clone();
        open_all(cfg.consumers, move |i| {
            let c = c.clone();
            async move { consumer::setup(&c, i).await }
        })
        .await?
    };
    let producer_conns = {
        let c = cfg.clone();
        open_all(cfg.producers, move |i| {
            let c = c.clone();
            async move { producer::setup(&c, i).await }
        })
        .await?
    };

    let reporter = Reporter::new(
        cfg.id.clone(),
        cfg.confirm.is_some(),
        cfg.producers > 0,
        cfg.consumers > 0,
        hist_rx,
        std::mem::take(&mut watched),
    );
    let mut tasks = JoinSet::new();
    for (i, conn) in consumer_conns.into_iter().enumerate() {
        let (c, x) = (cfg.clone(), ctx.clone());
        tasks.spawn(async move { consumer::run(c, x, i, conn).await.map(Done::Consumer) });
    }
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + cfg.interval, cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut run = Run {
        cfg: cfg.clone(),
        ctx: ctx.clone(),
        reporter,
        tasks,
        producers_done: 0,
        consumers_done: 0,
        publish_end: None,
        confirm_end: None,
        consume_end: None,
        fatal: None,
        interrupted: false,
        tick,
        ctrl_c: Box::pin(tokio::signal::ctrl_c()),
    };
    // Every consumer is consuming before the first message is published.
    if cfg.consumers > 0 {
        let wanted = u32::try_from(cfg.consumers).context("too many consumers")?;
        let ready = ctx.consumers_ready.acquire_many(wanted);
        tokio::pin!(ready);
        let timeout = tokio::time::sleep(READY_TIMEOUT);
        tokio::pin!(timeout);
        loop {
            tokio::select! {
                r = &mut ready => {
                    r.context("waiting for consumers")?.forget();
                    break;
                }
                Some(joined) = run.tasks.join_next() => {
                    run.task_ended(joined);
                    if let Some(e) = run.fatal.take() {
                        return Err(e);
                    }
                }
                _ = &mut timeout => bail!("consumers were not all consuming after {READY_TIMEOUT:?}"),
                _ = &mut run.ctrl_c => bail!("interrupted"),
            }
        }
    }

    let start = Instant::now();
    let cpu_start = Proc::This.cpu_seconds()?;
    run.reporter.start(start, ctx.counters.snapshot());
    run.tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(start + cfg.interval),
        cfg.interval,
    );
    run.tick
        .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for (i, conn) in producer_conns.into_iter().enumerate() {
        let (c, x) = (cfg.clone(), ctx.clone());
        run.tasks
            .spawn(async move { producer::run(c, x, i, conn).await.map(Done::Producer) });
    }

    // The run proper.
    let deadline = cfg.time.map(|t| tokio::time::Instant::from_std(start + t));
    while !run.counts_reached() && !run.failed() && !run.interrupted {
        if !run.step(deadline).await {
            break;
        }
    }

    // Producers stop and collect their outstanding confirms.
    ctx.stop_producers.set();
    if !run
        .wait_for(STOP_TIMEOUT, |r| r.producers_done == r.cfg.producers)
        .await
    {
        eprintln!("producers did not stop within {STOP_TIMEOUT:?}");
    }

    // Drain: consumers go on until they have everything published, or nothing comes for
    // --drain-idle.
    if cfg.producers > 0 && run.consumers_done < cfg.consumers && !run.failed() && !run.interrupted
    {
        let mut last = ctx
            .counters
            .consumed
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut last_change = Instant::now();
        loop {
            let now = Instant::now();
            let consumed = ctx
                .counters
                .consumed
                .load(std::sync::atomic::Ordering::Relaxed);
            if run.expected_consumed().is_some_and(|e| consumed >= e) {
                break;
            }
            if consumed != last {
                last = consumed;
                last_change = now;
            }
            if now.duration_since(last_change) >= cfg.drain_idle
                || run.consumers_done == cfg.consumers
                || run.failed()
                || run.interrupted
            {
                break;
            }
            run.step(Some(
                tokio::time::Instant::now() + Duration::from_millis(20),
            ))
            .await;
        }
    }
    ctx.stop_consumers.set();
    if !run
        .wait_for(STOP_TIMEOUT, |r| r.consumers_done == r.cfg.consumers)
        .await
    {
        eprintln!("consumers did not stop within {STOP_TIMEOUT:?}");
    }
    run.tasks.abort_all();
    let end = Instant::now();
    let cpu = Proc::This.cpu_seconds()? - cpu_start;
    if let Some(e) = run.fatal.take() {
        return Err(e);
    }
    // A last progress line for the tail of the run, unless the tail is too short for a rate.
    if run.reporter.since_tick(end) >= cfg.interval / 2 {
        run.reporter.tick(end, ctx.counters.snapshot());
    }

    let counters = ctx.counters.snapshot();
    let head = SummaryHead {
        server,
        producers: cfg.producers,
        consumers: cfg.consumers,
        size: cfg.size,
        confirm: cfg.confirm,
        rate: cfg.rate,
        fanout_factor: cfg.fanout_factor,
        check_consumed: cfg.producers > 0
            && cfg.consumers > 0
            && cfg.cmessages.is_none()
            && !run.interrupted,
        connections,
        interrupted: run.interrupted,
    };
    let summary = run.reporter.finish(
        head,
        counters,
        end,
        run.publish_end,
        run.confirm_end.filter(|_| cfg.confirm.is_some()),
        run.consume_end,
        cpu,
    );

    if !idle.is_empty() {
        let mut closing = JoinSet::new();
        for c in idle {
            closing.spawn(async move { c.close(false).await });
        }
        let mut failed = 0;
        while let Some(r) = closing.join_next().await {
            if !matches!(r, Ok(Ok(()))) {
                failed += 1;
            }
        }
        if failed > 0 {
            eprintln!("{failed} idle connections did not close cleanly");
        }
    }
    Ok(summary)
}
