//! Command line: PerfTest's flag names and meanings (clap), their validation, the `--uri`,
//! `--queue-args` and `--queue-pattern` syntaxes, and the plan derived from them (which queues
//! exist, which queues each producer publishes to and each consumer consumes from).

use std::time::Duration;

use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use anyhow::{anyhow, bail, Context, Result};
use clap::{ArgAction, Parser, ValueEnum};

use crate::body::STAMP_LEN;

/// Queue used when neither `-u` nor `--queue-pattern` is given.
pub const DEFAULT_QUEUE: &str = "warren-perf";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "warren-perf",
    version,
    about = "AMQP 0-9-1 load generator with RabbitMQ PerfTest's flags",
    after_help = "Example: warren-perf -x1 -y1 -s1024 -z10 --uri amqp://guest:guest@127.0.0.1:5672/%2f"
)]
pub struct Args {
    /// Broker URI: amqp://user:pass@host:port/vhost (vhost percent-encoded, %2f is "/";
    /// ?heartbeat=N asks for heartbeats every N seconds).
    #[arg(long, default_value = "amqp://guest:guest@localhost:5672/%2f")]
    pub uri: String,
    /// Producer count (one connection each).
    #[arg(short = 'x', long, default_value_t = 1)]
    pub producers: usize,
    /// Consumer count (one connection each).
    #[arg(short = 'y', long, default_value_t = 1)]
    pub consumers: usize,
    /// Message body size in bytes (at least 12: timestamp and producer id).
    #[arg(short = 's', long, default_value_t = 12)]
    pub size: usize,
    /// Queue name (default: warren-perf, unless --queue-pattern is given).
    #[arg(short = 'u', long)]
    pub queue: Option<String>,
    /// Exchange to publish to; declared with -t unless it is "" or amq.*; queues are bound to it.
    #[arg(short = 'e', long)]
    pub exchange: Option<String>,
    /// Exchange type for -e.
    #[arg(short = 't', long = "type", default_value = "direct")]
    pub exchange_type: String,
    /// Routing key (default: the queue name) and binding key.
    #[arg(short = 'k', long)]
    pub routing_key: Option<String>,
    /// Queue name pattern with %d (or %0Nd), e.g. perf-%d; producers and consumers spread over
    /// the queues from --queue-pattern-from to --queue-pattern-to.
    #[arg(long)]
    pub queue_pattern: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub queue_pattern_from: u32,
    #[arg(long)]
    pub queue_pattern_to: Option<u32>,
    /// Message flag, repeatable: persistent (delivery mode 2, durable queue), mandatory.
    #[arg(short = 'f', long = "flag", value_enum)]
    pub flags: Vec<Flag>,
    /// Publisher confirms, at most N outstanding per producer.
    #[arg(short = 'c', long = "confirm")]
    pub confirm: Option<u32>,
    /// Consumer prefetch (basic.qos).
    #[arg(short = 'q', long)]
    pub qos: Option<u16>,
    /// Consume with no-ack.
    #[arg(short = 'a', long)]
    pub autoack: bool,
    /// Ack with multiple=true every N messages (1: ack each message).
    #[arg(short = 'A', long, default_value_t = 1)]
    pub multi_ack_every: u32,
    /// Publish rate per producer, messages per second (default: unlimited).
    #[arg(short = 'r', long)]
    pub rate: Option<f64>,
    /// Consume rate per consumer, messages per second (default: unlimited).
    #[arg(short = 'R', long)]
    pub consumer_rate: Option<f64>,
    /// Run time in seconds (default: until the counts are reached or Ctrl-C).
    #[arg(short = 'z', long)]
    pub time: Option<f64>,
    /// Messages each producer publishes.
    #[arg(short = 'C', long)]
    pub pmessages: Option<u64>,
    /// Messages each consumer consumes.
    #[arg(short = 'D', long)]
    pub cmessages: Option<u64>,
    /// Queue arguments: key=value,... (integers as long ints, anything else as strings).
    #[arg(long)]
    pub queue_args: Option<String>,
    /// Declare queues auto-delete (PerfTest's default is true).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub auto_delete: bool,
    /// Open N extra idle connections first and report the connect rate (and the watched
    /// processes' RSS per connection).
    #[arg(long, default_value_t = 0)]
    pub connections: usize,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Sample this process's CPU time and RSS (repeatable); reports CPU µs per message and
    /// peak RSS.
    #[arg(long = "watch-pid")]
    pub watch_pid: Vec<u32>,
    /// Test id shown in the output.
    #[arg(long)]
    pub id: Option<String>,
    /// Progress interval in seconds.
    #[arg(short = 'i', long, default_value_t = 1.0)]
    pub interval: f64,
    /// After the run, keep consuming until the confirmed (or sent) messages have all arrived or
    /// none arrived for this many seconds.
    #[arg(long, default_value_t = 2.0)]
    pub drain_idle: f64,
    /// Worker threads of the client runtime (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Persistent,
    Mandatory,
}

/// Where and how to connect, from `--uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub pass: String,
    pub vhost: String,
    /// Heartbeat interval the client asks for (0: none).
    pub heartbeat: u16,
}

impl Target {
    /// `host:port` for connecting.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Validated settings for a run.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: String,
    pub target: Target,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub exchange: String,
    /// Declare `exchange` with this type first (None for "" and amq.*).
    pub declare_exchange: Option<String>,
    pub queues: Vec<String>,
    pub routing_key: Option<String>,
    pub durable: bool,
    pub auto_delete: bool,
    pub queue_args: FieldTable,
    pub persistent: bool,
    pub mandatory: bool,
    pub confirm: Option<u32>,
    pub qos: Option<u16>,
    pub autoack: bool,
    pub multi_ack_every: u32,
    pub rate: Option<f64>,
    pub consumer_rate: Option<f64>,
    pub time: Option<Duration>,
    pub pmessages: Option<u64>,
    pub cmessages: Option<u64>,
    pub connections: usize,
    pub json: bool,
    pub watch_pids: Vec<u32>,
    pub interval: Duration,
    pub drain_idle: Duration,
    pub threads: Option<usize>,
    /// Queues a published message reaches (None when the exchange type makes it unknowable).
    pub fanout_factor: Option<u64>,
}

impl Config {
    /// Queues producer `i` publishes to, round-robin.
    pub fn producer_queues(&self, i: usize) -> Vec<&str> {
        spread(&self.queues, self.producers, i)
    }

    /// Queues consumer `i` consumes from (one basic.consume each, on one channel).
    pub fn consumer_queues(&self, i: usize) -> Vec<&str> {
        spread(&self.queues, self.consumers, i)
    }

    /// Routing key for a message aimed at `queue`.
    pub fn routing_key_for<'a>(&'a self, queue: &'a str) -> &'a str {
        self.routing_key.as_deref().unwrap_or(queue)
    }
}

/// Participant `i` of `n` gets queue `i % len` when there are at least as many participants as
/// queues, otherwise every queue `j` with `j % n == i`: every queue gets someone either way.
fn spread(queues: &[String], n: usize, i: usize) -> Vec<&str> {
    if queues.is_empty() || n == 0 {
        return Vec::new();
    }
    if n >= queues.len() {
        vec![queues[i % queues.len()].as_str()]
    } else {
        queues
            .iter()
            .enumerate()
            .filter(|(j, _)| j % n == i)
            .map(|(_, q)| q.as_str())
            .collect()
    }
}

impl Args {
    pub fn into_config(self) -> Result<Config> {
        let target = parse_uri(&self.uri).with_context(|| format!("--uri {}", self.uri))?;
        if self.size < STAMP_LEN {
            bail!("-s/--size must be at least {STAMP_LEN} (timestamp and producer id)");
        }
        let queues = match (&self.queue_pattern, &self.queue) {
            (Some(_), Some(_)) => bail!("give either -u/--queue or --queue-pattern, not both"),
            (Some(p), None) => {
                let to = self
                    .queue_pattern_to
                    .context("--queue-pattern needs --queue-pattern-to")?;
                if to < self.queue_pattern_from {
                    bail!("--queue-pattern-to is below --queue-pattern-from");
                }
                (self.queue_pattern_from..=to)
                    .map(|i| expand_pattern(p, i))
                    .collect::<Result<Vec<_>>>()?
            }
            (None, Some(q)) => vec![q.clone()],
            (None, None) => vec![DEFAULT_QUEUE.to_string()],
        };
        let queue_args = match &self.queue_args {
            Some(s) => parse_queue_args(s).context("--queue-args")?,
            None => FieldTable::default(),
        };
        let persistent = self.flags.contains(&Flag::Persistent);
        // Quorum queues and streams must be durable and cannot be auto-delete.
        let replicated = matches!(
            queue_args.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(t)) if matches!(t.as_bytes(), b"quorum" | b"stream")
        );
        let exchange = self.exchange.clone().unwrap_or_default();
        let declare_exchange = if exchange.is_empty() || exchange.starts_with("amq.") {
            None
        } else {
            Some(self.exchange_type.clone())
        };
        let kind = if exchange.is_empty() {
            "direct"
        } else if exchange == "amq.fanout" {
            "fanout"
        } else if let Some(t) = exchange.strip_prefix("amq.") {
            t
        } else {
            self.exchange_type.as_str()
        };
        let fanout_factor = match kind {
            "fanout" => Some(queues.len() as u64),
            "direct" if self.routing_key.is_some() && !exchange.is_empty() => {
                Some(queues.len() as u64)
            }
            "direct" => Some(1),
            _ => None,
        };
        for q in &queues {
            check_short("queue name", q)?;
        }
        check_short("exchange", &exchange)?;
        check_short("exchange type", &self.exchange_type)?;
        check_short("vhost", &target.vhost)?;
        if let Some(k) = &self.routing_key {
            check_short("routing key", k)?;
        }
        if self.confirm == Some(0) {
            bail!("-c/--confirm needs a window of at least 1");
        }
        if self.multi_ack_every == 0 {
            bail!("-A/--multi-ack-every must be at least 1");
        }
        if let Some(q) = self.qos {
            if q > 0 && !self.autoack && self.multi_ack_every > u32::from(q) {
                bail!("-A/--multi-ack-every above -q/--qos stalls the consumers (the broker stops at the prefetch)");
            }
        }
        for (name, r) in [
            ("-r/--rate", self.rate),
            ("-R/--consumer-rate", self.consumer_rate),
        ] {
            if let Some(r) = r {
                if !(r > 0.0 && r.is_finite()) {
                    bail!("{name} must be a positive number of messages per second");
                }
            }
        }
        let secs = |name: &str, v: f64| -> Result<Duration> {
            Duration::try_from_secs_f64(v).with_context(|| format!("{name}: not a duration"))
        };
        let time = self.time.map(|t| secs("-z/--time", t)).transpose()?;
        let interval = secs("-i/--interval", self.interval)?;
        if interval < Duration::from_millis(100) {
            bail!("-i/--interval must be at least 0.1 s");
        }
        Ok(Config {
            id: self.id.unwrap_or_else(default_id),
            target,
            producers: self.producers,
            consumers: self.consumers,
            size: self.size,
            exchange,
            declare_exchange,
            queues,
            routing_key: self.routing_key,
            durable: persistent || replicated,
            auto_delete: self.auto_delete && !replicated,
            queue_args,
            persistent,
            mandatory: self.flags.contains(&Flag::Mandatory),
            confirm: self.confirm,
            qos: self.qos,
            autoack: self.autoack,
            multi_ack_every: self.multi_ack_every,
            rate: self.rate,
            consumer_rate: self.consumer_rate,
            time,
            pmessages: self.pmessages,
            cmessages: self.cmessages,
            connections: self.connections,
            json: self.json,
            watch_pids: self.watch_pid,
            interval,
            drain_idle: secs("--drain-idle", self.drain_idle)?,
            threads: self.threads,
            fanout_factor,
        })
    }
}

/// Names travel as AMQP short strings: at most 255 bytes.
fn check_short(what: &str, s: &str) -> Result<()> {
    if s.len() > 255 {
        bail!("{what} is {} bytes long; AMQP allows 255", s.len());
    }
    Ok(())
}

fn default_id() -> String {
    format!("perf-{}", std::process::id())
}

/// Parses `amqp://user:pass@host:port/vhost?heartbeat=N`. Missing parts default to
/// guest/guest, localhost, 5672 and "/"; the vhost is percent-decoded ("%2f" is "/").
pub fn parse_uri(uri: &str) -> Result<Target> {
    let rest = uri
        .strip_prefix("amqp://")
        .context("only amqp:// URIs are supported (no TLS)")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, vhost) = match rest.split_once('/') {
        Some((a, v)) => (a, Some(v)),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, pass) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((u, p)) => (percent_decode(u)?, percent_decode(p)?),
            None => (percent_decode(u)?, String::new()),
        },
        None => ("guest".to_string(), "guest".to_string()),
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']').context("unclosed [ in host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => bail!("junk after ]"),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .with_context(|| format!("bad port {p:?}"))?,
        None => 5672,
    };
    let host = if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    };
    let vhost = match vhost {
        None => "/".to_string(),
        Some(v) => percent_decode(v)?,
    };
    let mut heartbeat = 0;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("heartbeat", v)) => {
                heartbeat = v.parse().with_context(|| format!("bad heartbeat {v:?}"))?
            }
            _ => bail!("unsupported URI query parameter {pair:?}"),
        }
    }
    Ok(Target {
        host,
        port,
        user,
        pass,
        vhost,
        heartbeat,
    })
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).context("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad %-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("%-escapes are not UTF-8")
}

/// Parses `x-max-length=10,x-queue-type=quorum`: integers become long ints (AMQP's signed
/// 32-bit `I`; long-long `l` beyond that range), anything else (`true` included) a long string.
pub fn parse_queue_args(s: &str) -> Result<FieldTable> {
    let mut t = FieldTable::default();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("{item:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            bail!("empty key in {item:?}");
        }
        let value = match v.parse::<i64>() {
            Ok(n) => match i32::try_from(n) {
                Ok(n) => AMQPValue::LongInt(n),
                Err(_) => AMQPValue::LongLongInt(n),
            },
            Err(_) => AMQPValue::LongString(LongString::from(v)),
        };
        let key = ShortString::try_new(k).map_err(|e| anyhow!("key {k:?}: {e}"))?;
        t.insert(key, value);
    }
    Ok(t)
}

/// Replaces the `%d` (or `%0Nd`) in `pattern` with `i`.
pub fn expand_pattern(pattern: &str, i: u32) -> Result<String> {
    let start = pattern
        .find('%')
        .with_context(|| format!("queue pattern {pattern:?} has no %d"))?;
    let spec = &pattern[start + 1..];
    let d = spec
        .find('d')
        .with_context(|| format!("queue pattern {pattern:?} has no %d"))?;
    let width = &spec[..d];
    let formatted = if width.is_empty() {
        i.to_string()
    } else {
        let w: usize = width
            .trim_start_matches('0')
            .parse()
            .with_context(|| format!("bad width in queue pattern {pattern:?}"))?;
        if width.starts_with('0') {
            format!("{i:0w$}")
        } else {
            format!("{i:w$}")
        }
    };
    let rest = &spec[d + 1..];
    if rest.contains('%') {
        bail!("queue pattern {pattern:?} has more than one %");
    }
    Ok(format!("{}{}{}", &pattern[..start], formatted, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config> {
        let mut v = vec!["warren-perf"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)?.into_config()
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.producers, 1);
        assert_eq!(c.consumers, 1);
        assert_eq!(c.size, 12);
        assert_eq!(c.queues, vec![DEFAULT_QUEUE]);
        assert_eq!(c.exchange, "");
        assert!(c.declare_exchange.is_none());
        assert!(c.auto_delete && !c.durable && !c.persistent && !c.mandatory);
        assert_eq!(c.confirm, None);
        assert_eq!(c.multi_ack_every, 1);
        assert_eq!(c.time, None);
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(
            c.target,
            Target {
                host: "localhost".into(),
                port: 5672,
                user: "guest".into(),
                pass: "guest".into(),
                vhost: "/".into(),
                heartbeat: 0
            }
        );
        assert_eq!(c.fanout_factor, Some(1));
    }

    #[test]
    fn perftest_short_flags() {
        let c = config(&[
            "-x",
            "2",
            "-y",
            "3",
            "-s",
            "1024",
            "-f",
            "persistent",
            "-f",
            "mandatory",
            "-c",
            "1000",
            "-q",
            "500",
            "-A",
            "100",
            "-r",
            "1000",
            "-R",
            "900",
            "-z",
            "15",
            "-C",
            "10",
            "-D",
            "20",
            "-u",
            "q1",
            "-e",
            "ex",
            "-t",
            "topic",
            "-k",
            "rk",
            "-a",
        ])
        .unwrap();
        assert_eq!((c.producers, c.consumers, c.size), (2, 3, 1024));
        assert!(c.persistent && c.mandatory && c.durable);
        assert_eq!(c.confirm, Some(1000));
        assert_eq!(c.qos, Some(500));
        assert_eq!(c.multi_ack_every, 100);
        assert_eq!((c.rate, c.consumer_rate), (Some(1000.0), Some(900.0)));
        assert_eq!(c.time, Some(Duration::from_secs(15)));
        assert_eq!((c.pmessages, c.cmessages), (Some(10), Some(20)));
        assert_eq!(c.queues, vec!["q1"]);
        assert_eq!(c.exchange, "ex");
        assert_eq!(c.declare_exchange.as_deref(), Some("topic"));
        assert_eq!(c.routing_key_for("q1"), "rk");
        assert!(c.autoack);
        assert_eq!(c.fanout_factor, None);
    }

    #[test]
    fn long_flags_and_auto_delete() {
        let c = config(&[
            "--producers",
            "0",
            "--consumers",
            "1",
            "--queue",
            "q",
            "--auto-delete",
            "false",
            "--json",
            "--watch-pid",
            "1",
            "--watch-pid",
            "2",
            "--connections",
            "100",
            "--id",
            "t1",
            "--confirm",
            "10",
            "--multi-ack-every",
            "5",
        ])
        .unwrap();
        assert_eq!((c.producers, c.consumers), (0, 1));
        assert!(!c.auto_delete);
        assert!(c.json);
        assert_eq!(c.watch_pids, vec![1, 2]);
        assert_eq!(c.connections, 100);
        assert_eq!(c.id, "t1");
    }

    #[test]
    fn rejects_bad_values() {
        assert!(config(&["-s", "11"]).is_err());
        assert!(config(&["-c", "0"]).is_err());
        assert!(config(&["-A", "0"]).is_err());
        assert!(config(&["-A", "100", "-q", "50"]).is_err());
        assert!(config(&["-A", "100", "-q", "50", "-a"]).is_ok());
        assert!(config(&["-r", "0"]).is_err());
        assert!(config(&["-r", "-5"]).is_err());
        assert!(config(&["-f", "immediate"]).is_err());
        assert!(config(&[
            "-u",
            "a",
            "--queue-pattern",
            "p-%d",
            "--queue-pattern-to",
            "2"
        ])
        .is_err());
        assert!(config(&["--queue-pattern", "p-%d"]).is_err());
        assert!(config(&["--uri", "amqps://h"]).is_err());
        assert!(config(&["-z", "-1"]).is_err());
        assert!(config(&["-u", &"q".repeat(256)]).is_err());
        assert!(parse_queue_args(&format!("{}=1", "k".repeat(256))).is_err());
    }

    #[test]
    fn queue_pattern_spreads_producers_and_consumers() {
        let c = config(&[
            "--queue-pattern",
            "perf-%d",
            "--queue-pattern-from",
            "1",
            "--queue-pattern-to",
            "4",
            "-x",
            "2",
            "-y",
            "8",
        ])
        .unwrap();
        assert_eq!(c.queues, vec!["perf-1", "perf-2", "perf-3", "perf-4"]);
        assert_eq!(c.producer_queues(0), vec!["perf-1", "perf-3"]);
        assert_eq!(c.producer_queues(1), vec!["perf-2", "perf-4"]);
        assert_eq!(c.consumer_queues(5), vec!["perf-2"]);
        assert_eq!(c.routing_key_for("perf-3"), "perf-3");
        assert_eq!(expand_pattern("q-%05d-x", 42).unwrap(), "q-00042-x");
        assert_eq!(expand_pattern("%d", 7).unwrap(), "7");
        assert!(expand_pattern("nope", 1).is_err());
        assert!(expand_pattern("a%d%d", 1).is_err());
    }

    #[test]
    fn fanout_factor() {
        let c = config(&[
            "-e",
            "amq.fanout",
            "--queue-pattern",
            "f-%d",
            "--queue-pattern-to",
            "10",
        ])
        .unwrap();
        assert_eq!(c.fanout_factor, Some(10));
        assert!(c.declare_exchange.is_none());
        let c = config(&["-e", "mine", "-t", "fanout", "-u", "q"]).unwrap();
        assert_eq!(c.fanout_factor, Some(1));
        assert_eq!(c.declare_exchange.as_deref(), Some("fanout"));
    }

    #[test]
    fn queue_args() {
        let t = parse_queue_args(
            "x-max-length=10, x-queue-type=quorum,x-message-ttl=-1,x-max-length-bytes=5000000000",
        )
        .unwrap();
        let m = t.inner();
        assert_eq!(m.get("x-max-length"), Some(&AMQPValue::LongInt(10)));
        assert_eq!(m.get("x-message-ttl"), Some(&AMQPValue::LongInt(-1)));
        assert_eq!(
            m.get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(5_000_000_000))
        );
        assert_eq!(
            m.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert!(parse_queue_args("").unwrap().inner().is_empty());
        assert!(parse_queue_args("novalue").is_err());
        assert!(parse_queue_args("=3").is_err());
        let c = config(&["--queue-args", "x-queue-type=quorum"]).unwrap();
        assert!(c.durable && !c.auto_delete);
    }

    #[test]
    fn uris() {
        let t = parse_uri("amqp://u%40x:p%3Aw@127.0.0.1:5673/my%2fvhost?heartbeat=30").unwrap();
        assert_eq!(t.user, "u@x");
        assert_eq!(t.pass, "p:w");
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.port, 5673);
        assert_eq!(t.vhost, "my/vhost");
        assert_eq!(t.heartbeat, 30);
        assert_eq!(t.addr(), "127.0.0.1:5673");
        let t = parse_uri("amqp://[::1]:5674/%2f").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.vhost.as_str()),
            ("::1", 5674, "/")
        );
        assert_eq!(t.addr(), "[::1]:5674");
        let t = parse_uri("amqp://broker").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.vhost.as_str()),
            ("broker", 5672, "/")
        );
        assert_eq!(t.user, "guest");
        assert!(parse_uri("amqp://h:notaport/").is_err());
        assert!(parse_uri("amqp://h/%zz").is_err());
        assert!(parse_uri("amqp://h/?frame_max=1").is_err());
    }
}
