//! A consumer: one connection, channel 1, basic.qos, one basic.consume per assigned queue, and a
//! single task that reads deliveries, measures consumer latency from the body's stamp, and acks
//! (each message, or multiple=true every `-A`), the acks of one read batch going out in one
//! write. `-R` is a token bucket: the task sleeps off what a batch overspent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
use amq_protocol::types::FieldTable;
use anyhow::{bail, Context, Result};
use warren_protocol::codec::Frame;

use crate::args::Config;
use crate::body::{latency_us, read_stamp};
use crate::conn::{self, short, Conn, Writer, CHANNEL};
use crate::rate::RateLimiter;
use crate::stats::{Ctx, Kind};

/// What a finished consumer reports.
#[derive(Debug)]
pub struct ConsumerReport {
    pub last_delivery: Option<Instant>,
}

/// Where the consumer is within a delivery.
#[derive(Debug, Clone, Copy)]
enum Rx {
    Idle,
    /// basic.deliver seen, content header next.
    Header(u64),
    Body {
        tag: u64,
        remaining: u64,
        stamped: bool,
    },
}

/// Acks as messages complete: one per message, or multiple=true every `every`.
struct Acker {
    autoack: bool,
    every: u32,
    unacked: u32,
    last_tag: u64,
}

impl Acker {
    fn done(&mut self, w: &mut Writer, tag: u64) -> Result<()> {
        if self.autoack {
            return Ok(());
        }
        self.last_tag = tag;
        if self.every <= 1 {
            return ack(w, tag, false);
        }
        self.unacked += 1;
        if self.unacked >= self.every {
            self.unacked = 0;
            return ack(w, tag, true);
        }
        Ok(())
    }

    /// Acks what is left at the end.
    fn finish(&mut self, w: &mut Writer) -> Result<()> {
        if self.unacked > 0 {
            self.unacked = 0;
            return ack(w, self.last_tag, true);
        }
        Ok(())
    }
}

fn ack(w: &mut Writer, delivery_tag: u64, multiple: bool) -> Result<()> {
    w.method(
        CHANNEL,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag,
            multiple,
        })),
    )
}

/// Connects, opens the channel and sets the prefetch. The basic.consume calls are made by
/// [`run`], so that deliveries racing the consume-ok of a later queue are not lost.
pub async fn setup(cfg: &Config, i: usize) -> Result<Conn> {
    let mut conn =
        conn::connect(&cfg.target, &format!("warren-perf {} consumer {i}", cfg.id)).await?;
    conn.open_channel().await?;
    if let Some(q) = cfg.qos {
        match conn
            .call(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: q,
                global: false,
            })))
            .await
            .context("basic.qos")?
        {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => {}
            other => bail!("expected basic.qos-ok, got {other:?}"),
        }
    }
    Ok(conn)
}

/// Consumes until stopped or `-D` is reached, then acks what is pending and closes.
pub async fn run(cfg: Arc<Config>, ctx: Arc<Ctx>, i: usize, conn: Conn) -> Result<ConsumerReport> {
    let Conn {
        mut reader,
        mut writer,
        heartbeat,
        ..
    } = conn;
    let queues = cfg.consumer_queues(i);
    for q in &queues {
        writer.method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: short(q)?,
                consumer_tag: "".into(),
                no_local: false,
                no_ack: cfg.autoack,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )?;
    }
    writer.flush().await?;

    let mut hist = ctx.local_hist(Kind::Consumer);
    let mut acker = Acker {
        autoack: cfg.autoack,
        every: cfg.multi_ack_every,
        unacked: 0,
        last_tag: 0,
    };
    let mut limiter = cfg
        .consumer_rate
        .map(|r| RateLimiter::new(r, Instant::now()));
    let limit = cfg.cmessages.unwrap_or(u64::MAX);
    let mut consume_oks = 0;
    let mut state = Rx::Idle;
    let mut consumed = 0u64;
    let mut last_delivery = None;
    let mut hb = tokio::time::interval(Duration::from_secs(heartbeat.max(1) as u64) / 2);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = ctx.stop_consumers.wait();
    tokio::pin!(stop);

    let outcome: Result<()> = async {
        while consumed < limit {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                r = reader.fill() => r?,
                _ = hb.tick(), if heartbeat > 0 => {
                    writer.heartbeat();
                    writer.flush().await?;
                    continue;
                }
            }
            let now_ns = ctx.clock.now_ns();
            let before = consumed;
            while consumed < limit {
                let Some(frame) = reader.next()? else { break };
                match frame {
                    Frame::Method { class, .. } => match class {
                        AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
                            if !matches!(state, Rx::Idle) {
                                bail!("basic.deliver in the middle of a message");
                            }
                            state = Rx::Header(d.delivery_tag);
                        }
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)) => {
                            consume_oks += 1;
                            if consume_oks == queues.len() {
                                ctx.consumers_ready.add_permits(1);
                            }
                        }
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
                            bail!(
                                "the broker cancelled consumer {} (queue deleted?)",
                                c.consumer_tag
                            )
                        }
                        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                            bail!(
                                "channel closed by the broker: {} {}",
                                c.reply_code,
                                c.reply_text
                            )
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                            bail!(
                                "connection closed by the broker: {} {}",
                                c.reply_code,
                                c.reply_text
                            )
                        }
                        _ => {}
                    },
                    Frame::Header { body_size, .. } => {
                        let Rx::Header(tag) = state else {
                            bail!("content header without basic.deliver");
                        };
                        if body_size == 0 {
                            state = Rx::Idle;
                            consumed += 1;
                            acker.done(&mut writer, tag)?;
                        } else {
                            state = Rx::Body {
                                tag,
                                remaining: body_size,
                                stamped: false,
                            };
                        }
                    }
                    Frame::Body { payload, .. } => {
                        let Rx::Body {
                            tag,
                            remaining,
                            stamped,
                        } = &mut state
                        else {
                            bail!("body frame without a content header");
                        };
                        if !*stamped {
                            *stamped = true;
                            if let Some((ts, _producer)) = read_stamp(&payload) {
                                hist.record(latency_us(ts, now_ns));
                            }
                        }
                        let len = payload.len() as u64;
                        if len > *remaining {
                            bail!("body longer than its content header said");
                        }
                        *remaining -= len;
                        if *remaining == 0 {
                            let tag = *tag;
                            state = Rx::Idle;
                            consumed += 1;
                            acker.done(&mut writer, tag)?;
                        }
                    }
                    Frame::Heartbeat { .. } => {}
                    // Made only by the broker's reader, never by decoding.
                    Frame::BodyInPlace { .. } => bail!("a body frame read in place"),
                }
            }
            if consumed >= limit {
                acker.finish(&mut writer)?;
            }
            writer.flush().await?;
            let got = consumed - before;
            if got > 0 {
                let now = Instant::now();
                last_delivery = Some(now);
                ctx.counters.consumed.fetch_add(got, Ordering::Relaxed);
                hist.maybe_flush(now);
                if let Some(l) = &mut limiter {
                    l.spend(now, got);
                    let debt = l.debt();
                    if !debt.is_zero() {
                        tokio::select! {
                            _ = tokio::time::sleep(debt) => {}
                            _ = &mut stop => break,
                        }
                    }
                }
            }
        }
        acker.finish(&mut writer)?;
        writer.flush().await
    }
    .await;
    hist.flush();
    outcome.with_context(|| format!("consumer {i}"))?;
    if let Err(e) = conn::close(&mut reader, &mut writer, true).await {
        eprintln!("consumer {i}: {e:#}");
    }
    Ok(ConsumerReport { last_delivery })
}
