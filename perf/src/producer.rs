//! A producer: one connection, channel 1, optional confirm.select. The publishing task encodes
//! whole batches (basic.publish and the content header are encoded once by `amq-protocol` and
//! copied; only the 12-byte stamp varies) and writes each batch at once; the `-r` token bucket and
//! the `-c` confirm window are checked per batch. A reader task per connection takes acks, nacks
//! and returns off the socket and settles the confirm window (a lock-free ring of send times).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, channel, confirm, connection, AMQPClass};
use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::{oneshot, Notify};
use warren_protocol::codec::Frame;
use warren_protocol::encode::{content_header_payload, encode_frame};
use warren_protocol::{AMQPProperties, CLASS_BASIC, FRAME_END, FRAME_OVERHEAD};

use crate::args::Config;
use crate::body::{latency_us, stamp, STAMP_LEN};
use crate::conn::{self, short, Conn, Reader, Writer, CHANNEL};
use crate::rate::RateLimiter;
use crate::stats::{Ctx, Kind, LocalHist};

/// Wire bytes a batch aims at; the message count per batch follows from the message size.
const BATCH_BYTES: usize = 64 * 1024;
const MAX_BATCH: u64 = 1024;
/// How long a stopping producer waits for its outstanding confirms.
const CONFIRM_DRAIN: Duration = Duration::from_secs(10);

/// What a finished producer reports.
#[derive(Debug)]
pub struct ProducerReport {
    pub publish_end: Instant,
    pub confirm_end: Instant,
}

/// The confirm window: send times of unsettled messages by sequence number (slot
/// `seq % capacity`, 0 when settled), the highest sequence published, and the contiguous settled
/// watermark. The writer only reuses a slot once the watermark has passed it.
struct Window {
    slots: Box<[AtomicU64]>,
    published: AtomicU64,
    low: AtomicU64,
}

impl Window {
    fn new(capacity: u32) -> Self {
        Window {
            slots: (0..capacity.max(1)).map(|_| AtomicU64::new(0)).collect(),
            published: AtomicU64::new(0),
            low: AtomicU64::new(0),
        }
    }

    fn slot(&self, seq: u64) -> &AtomicU64 {
        &self.slots[(seq % self.slots.len() as u64) as usize]
    }

    fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Messages the writer may publish now.
    fn available(&self) -> u64 {
        let out = self.published.load(Ordering::Relaxed) - self.low.load(Ordering::Acquire);
        self.capacity().saturating_sub(out)
    }

    fn outstanding(&self) -> u64 {
        self.published.load(Ordering::Relaxed) - self.low.load(Ordering::Acquire)
    }

    /// Writer side: records the send time of the next `n` messages, then publishes them.
    fn record_sent(&self, n: u64, ts_ns: u64) {
        let first = self.published.load(Ordering::Relaxed) + 1;
        for seq in first..first + n {
            self.slot(seq).store(ts_ns, Ordering::Relaxed);
        }
        self.published.store(first + n - 1, Ordering::Release);
    }

    /// Reader side: settles `tag` (and everything below it when `multiple`), recording confirm
    /// latencies into `hist` when given. Returns how many messages were newly settled.
    fn settle(
        &self,
        low: &mut u64,
        tag: u64,
        multiple: bool,
        now_ns: u64,
        mut hist: Option<&mut LocalHist>,
    ) -> u64 {
        let published = self.published.load(Ordering::Acquire);
        let tag = tag.min(published);
        let mut n = 0;
        let mut take = |seq: u64| {
            let sent = self.slot(seq).swap(0, Ordering::AcqRel);
            if sent != 0 {
                n += 1;
                if let Some(h) = hist.as_deref_mut() {
                    h.record(latency_us(sent, now_ns));
                }
            }
        };
        if multiple {
            for seq in *low + 1..=tag {
                take(seq);
            }
        } else if tag > *low {
            take(tag);
        }
        while *low < published && self.slot(*low + 1).load(Ordering::Acquire) == 0 {
            *low += 1;
        }
        self.low.store(*low, Ordering::Release);
        n
    }
}

/// What the publishing task and the reader task share.
struct Link {
    window: Option<Window>,
    /// Woken when confirms free the window or the reader fails.
    notify: Notify,
    failed: AtomicBool,
}

/// Pre-encoded basic.publish frame plus content header frame, per routing target.
fn templates(cfg: &Config, i: usize, frame_max: usize) -> Result<Vec<Vec<u8>>> {
    let mut props = AMQPProperties::default();
    if cfg.persistent {
        props = props.with_delivery_mode(2);
    }
    let header = content_header_payload(CLASS_BASIC, cfg.size as u64, &props)
        .context("encoding the content header")?;
    if header.len() + FRAME_OVERHEAD > frame_max {
        bail!("content header larger than frame_max");
    }
    let mut out = Vec::new();
    let queues = cfg.producer_queues(i);
    let queues = if queues.is_empty() { vec![""] } else { queues };
    for q in queues {
        let mut v = Vec::with_capacity(128);
        let publish = basic::Publish {
            exchange: short(&cfg.exchange)?,
            routing_key: short(cfg.routing_key_for(q))?,
            mandatory: cfg.mandatory,
            immediate: false,
        };
        encode_frame(
            &mut v,
            CHANNEL,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(publish)),
        )
        .context("encoding basic.publish")?;
        v.push(2);
        v.extend_from_slice(&CHANNEL.to_be_bytes());
        v.extend_from_slice(&(header.len() as u32).to_be_bytes());
        v.extend_from_slice(&header);
        v.push(FRAME_END);
        out.push(v);
    }
    Ok(out)
}

/// Appends one message: its publish + header template, then the body split to frame_max with
/// the stamp at the front and zeros after.
fn push_message(w: &mut Writer, template: &[u8], stamp: &[u8; STAMP_LEN], size: usize, fm: usize) {
    w.raw(template);
    let max_payload = fm - FRAME_OVERHEAD;
    let mut off = 0;
    while off < size {
        let n = (size - off).min(max_payload);
        w.frame_header(3, CHANNEL, n);
        if off == 0 {
            w.raw(stamp);
            w.zeros(n - STAMP_LEN);
        } else {
            w.zeros(n);
        }
        w.frame_end();
        off += n;
    }
}

/// Wire bytes of one message.
fn wire_size(template_len: usize, size: usize, fm: usize) -> usize {
    let frames = size.div_ceil(fm - FRAME_OVERHEAD);
    template_len + size + frames * FRAME_OVERHEAD
}

/// Connects, opens the channel and selects confirms.
pub async fn setup(cfg: &Config, i: usize) -> Result<Conn> {
    let mut conn =
        conn::connect(&cfg.target, &format!("warren-perf {} producer {i}", cfg.id)).await?;
    conn.open_channel().await?;
    if cfg.confirm.is_some() {
        match conn
            .call(AMQPClass::Confirm(confirm::AMQPMethod::Select(
                confirm::Select { nowait: false },
            )))
            .await
            .context("confirm.select")?
        {
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => {}
            other => bail!("expected confirm.select-ok, got {other:?}"),
        }
    }
    Ok(conn)
}

/// Publishes until stopped or `-C` is reached, waits for outstanding confirms, closes.
pub async fn run(cfg: Arc<Config>, ctx: Arc<Ctx>, i: usize, conn: Conn) -> Result<ProducerReport> {
    let Conn {
        reader,
        mut writer,
        frame_max,
        heartbeat,
        ..
    } = conn;
    let link = Arc::new(Link {
        window: cfg.confirm.map(Window::new),
        notify: Notify::new(),
        failed: AtomicBool::new(false),
    });
    let (stop_reader, stop_rx) = oneshot::channel();
    let reader_task = tokio::spawn(read_loop(reader, link.clone(), ctx.clone(), stop_rx));

    let templates = templates(&cfg, i, frame_max)?;
    let per_msg = wire_size(templates[0].len(), cfg.size, frame_max);
    let batch = ((BATCH_BYTES / per_msg) as u64).clamp(1, MAX_BATCH);
    let id = i as u32;
    let hb = (heartbeat > 0).then(|| Duration::from_secs(heartbeat as u64) / 2);
    let mut limiter = cfg.rate.map(|r| RateLimiter::new(r, Instant::now()));
    let mut sent = 0u64;
    let mut next_template = 0usize;
    let mut last_write = Instant::now();

    let outcome: Result<()> = async {
        loop {
            if ctx.stop_producers.is_set() || link.failed.load(Ordering::Acquire) {
                break;
            }
            if let Some(hb) = hb {
                if last_write.elapsed() >= hb {
                    writer.heartbeat();
                    writer.flush().await?;
                    last_write = Instant::now();
                }
            }
            let mut n = batch;
            if let Some(c) = cfg.pmessages {
                n = n.min(c - sent);
                if n == 0 {
                    break;
                }
            }
            if let Some(w) = &link.window {
                let avail = w.available();
                if avail == 0 {
                    wait_a_bit(&link.notify, &ctx, hb).await;
                    continue;
                }
                n = n.min(avail);
            }
            if let Some(l) = &mut limiter {
                let got = l.take(Instant::now(), n);
                if got == 0 {
                    let nap = hb.map_or(l.wait(), |hb| l.wait().min(hb));
                    tokio::select! {
                        _ = tokio::time::sleep(nap) => {}
                        _ = ctx.stop_producers.wait() => {}
                    }
                    continue;
                }
                n = got;
            }
            let ts = ctx.clock.now_ns();
            let st = stamp(ts, id);
            for _ in 0..n {
                push_message(
                    &mut writer,
                    &templates[next_template],
                    &st,
                    cfg.size,
                    frame_max,
                );
                next_template += 1;
                if next_template == templates.len() {
                    next_template = 0;
                }
            }
            if let Some(w) = &link.window {
                w.record_sent(n, ts);
            }
            writer.flush().await?;
            last_write = Instant::now();
            sent += n;
            ctx.counters.sent.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    let publish_end = Instant::now();

    // Outstanding confirms, unless something already failed.
    if outcome.is_ok() {
        if let Some(w) = &link.window {
            let deadline = tokio::time::Instant::now() + CONFIRM_DRAIN;
            while w.outstanding() > 0 && !link.failed.load(Ordering::Acquire) {
                let notified = link.notify.notified();
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    eprintln!(
                        "producer {i}: {} confirms still outstanding after {:?}",
                        w.outstanding(),
                        CONFIRM_DRAIN
                    );
                    break;
                }
            }
        }
    }
    let confirm_end = Instant::now();
    let _ = stop_reader.send(());
    let mut reader = reader_task
        .await
        .map_err(|e| anyhow!("producer {i} reader task: {e}"))?
        .with_context(|| format!("producer {i}"))?;
    outcome.with_context(|| format!("producer {i}"))?;
    if let Err(e) = conn::close(&mut reader, &mut writer, true).await {
        eprintln!("producer {i}: {e:#}");
    }
    Ok(ProducerReport {
        publish_end,
        confirm_end,
    })
}

/// Waits for the window to open (or a stop, or a heartbeat being due).
async fn wait_a_bit(notify: &Notify, ctx: &Ctx, hb: Option<Duration>) {
    let nap = hb.unwrap_or(Duration::from_secs(1));
    tokio::select! {
        _ = notify.notified() => {}
        _ = ctx.stop_producers.wait() => {}
        _ = tokio::time::sleep(nap) => {}
    }
}

/// The producer connection's reader: settles confirms, counts returns, fails on a close from
/// the broker. Hands the [`Reader`] back when told to stop, for the polite close.
async fn read_loop(
    reader: Reader,
    link: Arc<Link>,
    ctx: Arc<Ctx>,
    stop: oneshot::Receiver<()>,
) -> Result<Reader> {
    let r = read_loop_inner(reader, &link, &ctx, stop).await;
    if r.is_err() {
        link.failed.store(true, Ordering::Release);
        link.notify.notify_one();
    }
    r
}

async fn read_loop_inner(
    mut reader: Reader,
    link: &Link,
    ctx: &Ctx,
    mut stop: oneshot::Receiver<()>,
) -> Result<Reader> {
    let mut hist = ctx.local_hist(Kind::Confirm);
    let mut low = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            r = reader.fill() => r?,
        }
        let now_ns = ctx.clock.now_ns();
        let (mut acked, mut nacked, mut returned) = (0u64, 0u64, 0u64);
        while let Some(frame) = reader.next()? {
            let Frame::Method { class, .. } = frame else {
                // Heartbeats, and the content of returned messages.
                continue;
            };
            match class {
                AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                    if let Some(w) = &link.window {
                        acked += w.settle(
                            &mut low,
                            a.delivery_tag,
                            a.multiple,
                            now_ns,
                            Some(&mut hist),
                        );
                    }
                }
                AMQPClass::Basic(basic::AMQPMethod::Nack(a)) => {
                    if let Some(w) = &link.window {
                        nacked += w.settle(&mut low, a.delivery_tag, a.multiple, now_ns, None);
                    }
                }
                AMQPClass::Basic(basic::AMQPMethod::Return(_)) => returned += 1,
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
                AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
                    eprintln!("the broker blocked publishing: {}", b.reason)
                }
                _ => {}
            }
        }
        let counters = &ctx.counters;
        if acked + nacked > 0 {
            counters.confirmed.fetch_add(acked, Ordering::Relaxed);
            counters.nacked.fetch_add(nacked, Ordering::Relaxed);
            link.notify.notify_one();
        }
        if returned > 0 {
            counters.returned.fetch_add(returned, Ordering::Relaxed);
        }
        hist.maybe_flush(Instant::now());
    }
    hist.flush();
    Ok(reader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use bytes::BytesMut;
    use clap::Parser;
    use warren_protocol::codec::Decoder;

    #[test]
    fn window_settles_single_multiple_and_out_of_order() {
        let w = Window::new(4);
        let mut low = 0;
        assert_eq!(w.available(), 4);
        w.record_sent(4, 1_000);
        assert_eq!(w.available(), 0);
        // Out of order single ack: frees nothing until 1 is settled.
        assert_eq!(w.settle(&mut low, 2, false, 2_000, None), 1);
        assert_eq!((low, w.available()), (0, 0));
        assert_eq!(w.settle(&mut low, 1, false, 2_000, None), 1);
        assert_eq!((low, w.available()), (2, 2));
        // Multiple up to 4, 2 already settled.
        assert_eq!(w.settle(&mut low, 4, true, 2_000, None), 2);
        assert_eq!((low, w.available()), (4, 4));
        // Duplicate and beyond-published tags change nothing.
        assert_eq!(w.settle(&mut low, 4, false, 2_000, None), 0);
        assert_eq!(w.settle(&mut low, 99, true, 2_000, None), 0);
        // Slots are reused.
        w.record_sent(3, 5_000);
        assert_eq!(w.outstanding(), 3);
        assert_eq!(w.settle(&mut low, 7, true, 6_000, None), 3);
        assert_eq!(w.outstanding(), 0);
    }

    #[tokio::test]
    async fn messages_encode_to_valid_frames() {
        use tokio::io::AsyncReadExt;
        let cfg = Args::parse_from(["p", "-s", "20000", "-f", "persistent", "-u", "q", "-e", "x"])
            .into_config()
            .unwrap();
        let fm = 8192;
        let t = templates(&cfg, 0, fm).unwrap();
        assert_eq!(t.len(), 1);
        // A real socket pair, so the vectored write of shared zero slices is exercised too.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_rd, wr) = client.unwrap().into_split();
        let (mut server, _) = accepted.unwrap();
        let mut w = Writer::new(wr);
        push_message(&mut w, &t[0], &stamp(123, 7), cfg.size, fm);
        push_message(&mut w, &t[0], &stamp(456, 8), cfg.size, fm);
        w.flush().await.unwrap();
        drop(w);
        let mut wire = Vec::new();
        server.read_to_end(&mut wire).await.unwrap();
        assert_eq!(wire.len(), 2 * wire_size(t[0].len(), cfg.size, fm));
        let mut wire = BytesMut::from(&wire[..]);
        let d = Decoder::new(fm as u32);
        for expect in [(123, 7), (456, 8)] {
            match d.decode(&mut wire).unwrap() {
                Some(Frame::Method {
                    channel: 1,
                    class: AMQPClass::Basic(basic::AMQPMethod::Publish(p)),
                    ..
                }) => {
                    assert_eq!(p.exchange.as_str(), "x");
                    assert_eq!(p.routing_key.as_str(), "q");
                }
                other => panic!("unexpected {other:?}"),
            }
            match d.decode(&mut wire).unwrap() {
                Some(Frame::Header {
                    body_size: 20000,
                    properties,
                    ..
                }) => assert_eq!(properties.delivery_mode(), &Some(2)),
                other => panic!("unexpected {other:?}"),
            }
            let mut sizes = Vec::new();
            while sizes.iter().sum::<usize>() < 20000 {
                let Some(Frame::Body { payload, .. }) = d.decode(&mut wire).unwrap() else {
                    panic!("expected a body frame")
                };
                if sizes.is_empty() {
                    assert_eq!(crate::body::read_stamp(&payload), Some(expect));
                    assert!(payload[STAMP_LEN..].iter().all(|b| *b == 0));
                }
                sizes.push(payload.len());
            }
            assert_eq!(sizes, vec![8184, 8184, 20000 - 2 * 8184]);
        }
        assert!(wire.is_empty());
    }
}
