//! A second load generator, to cross-check warren-perf with a client it shares no code with:
//! lapin, one publishing connection and one no-ack consuming connection on a fresh queue, for
//! S1 (transient, autoack). Bodies carry the send time; prints what was sent and received per
//! second over the run and the consumer's latency percentiles.
//!
//!   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f lapin_rate [SIZE_BYTES] [SECONDS]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use futures_lite::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties,
};

/// Tasks publishing concurrently on the one publishing channel.
const PUBLISH_TASKS: usize = 8;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = warren_examples::args()?;
    let size: usize = args.first().map_or(Ok(16), |s| s.parse())?;
    let seconds: u64 = args.get(1).map_or(Ok(10), |s| s.parse())?;
    if size < 8 {
        bail!("SIZE_BYTES must be at least 8 (the send time)");
    }
    let queue = format!("lapin-rate-{}", std::process::id());

    let consumer_conn = warren_examples::connect("lapin_rate consumer").await?;
    let cch = consumer_conn.create_channel().await?;
    cch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "lapin-rate".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publisher_conn = warren_examples::connect("lapin_rate publisher").await?;
    let pch = publisher_conn.create_channel().await?;
    // lapin resolves each publish once its IO loop has taken the frames: one awaiting task
    // would measure that round trip, so a few tasks publish on the same channel.
    let mut publishing = Vec::new();
    for _ in 0..PUBLISH_TASKS {
        let (stop, sent, queue, pch) = (stop.clone(), sent.clone(), queue.clone(), pch.clone());
        publishing.push(tokio::spawn(async move {
            let mut body = vec![0u8; size];
            while !stop.load(Ordering::Relaxed) {
                body[..8].copy_from_slice(&now_ns().to_be_bytes());
                if pch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut received = 0u64;
    let mut latencies_us: Vec<u64> = Vec::with_capacity(1 << 20);
    while Instant::now() < end {
        let next = tokio::time::timeout_at(end.into(), consumer.next()).await;
        let Ok(Some(delivery)) = next else {
            break;
        };
        let delivery = delivery?;
        received += 1;
        if let Some(stamp) = delivery.data.get(..8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(stamp);
            let sent_ns = u64::from_be_bytes(b);
            // One sample in 16 keeps the vector small at a million messages a second.
            if received.is_multiple_of(16) {
                latencies_us.push(now_ns().saturating_sub(sent_ns) / 1000);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let sent = sent.load(Ordering::Relaxed);
    latencies_us.sort_unstable();
    let pct = |p: f64| {
        latencies_us
            .get(
                ((latencies_us.len() as f64 * p) as usize)
                    .min(latencies_us.len().saturating_sub(1)),
            )
            .copied()
            .unwrap_or(0)
    };
    println!(
        "lapin_rate: size {size} B, {elapsed:.1} s: sent {:.0} msg/s, received {:.0} msg/s, \
         consumer latency p50 {} µs p99 {} µs",
        sent as f64 / elapsed,
        received as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
    for p in publishing {
        p.abort();
    }
    let _ = publisher_conn.close(200, "OK".into()).await;
    let _ = consumer_conn.close(200, "OK".into()).await;
    Ok(())
}
