//! Resource alarms as RabbitMQ's: while the memory or disk alarm is in effect, a connection
//! that publishes is blocked (connection.blocked with RabbitMQ's reason, its socket no longer
//! read, `state` "blocked" in the API) and unblocked when the alarm clears; a connection that
//! only consumes goes on; the health checks answer 503 with RabbitMQ's body; the node's JSON
//! and the Prometheus gauges say which alarm is in effect.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use lapin::options::BasicAckOptions;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_protocol::codec::{Decoder, Frame};
use warren_protocol::encode::encode_frame;
use warren_protocol::protocol::{basic, channel, confirm, connection, AMQPClass};
use warren_protocol::{AMQPValue, FieldTable, LongString};

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A raw client that says it understands connection.blocked, with channel 1 open in confirm
/// mode.
async fn blocked_aware_publisher(b: &warren_broker::Running) -> TcpStream {
    let mut caps = FieldTable::default();
    caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut v = Vec::new();
    for (ch, m) in [
        (
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: "en_US".into(),
            })),
        ),
        (
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 2047,
                frame_max: 131072,
                heartbeat: 0,
            })),
        ),
        (
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        ),
        (
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ),
        (
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        ),
    ] {
        encode_frame(&mut v, ch, &m).unwrap();
    }
    s.write_all(&v).await.unwrap();
    s
}

async fn publish(s: &mut TcpStream, queue: &str, body: &[u8]) {
    s.write_all(&publish_frames(queue, false, body, 131_072))
        .await
        .unwrap();
}

/// What the broker sent that this test watches for.
#[derive(Debug, PartialEq)]
enum Seen {
    Blocked(String),
    Unblocked,
    Ack(u64),
}

/// The same notifications, in either order (a confirm and a blocked notification for the
/// same batch may come in either order).
fn same(mut seen: Vec<Seen>, mut want: Vec<Seen>) {
    seen.sort_by_key(|s| format!("{s:?}"));
    want.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(seen, want);
}

/// Reads frames for up to `wait`, collecting blocked/unblocked notifications and confirms.
async fn read_for(s: &mut TcpStream, buf: &mut bytes::BytesMut, wait: Duration) -> Vec<Seen> {
    let d = Decoder::new(0);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        while let Some(f) = d.decode(buf).unwrap() {
            if let Frame::Method { class, .. } = f {
                match class {
                    AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
                        seen.push(Seen::Blocked(b.reason.to_string()))
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
                        seen.push(Seen::Unblocked)
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                        seen.push(Seen::Ack(a.delivery_tag))
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                        panic!("connection closed: {} {}", c.reply_code, c.reply_text)
                    }
                    _ => {}
                }
            }
        }
        match tokio::time::timeout_at(deadline, s.read_buf(buf)).await {
            Err(_) => return seen,
            Ok(r) => assert!(r.unwrap() > 0, "socket closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishers_until_it_clears() {
    let b = broker_with(|c| {
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c.prometheus_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
    })
    .await;
    let api = format!("http://{}/api", b.http.unwrap());
    let alarms = b.broker.alarms.clone();
    let data_dir = b.broker.config.data_dir.clone();
    let (status, body) = get(&format!("{api}/health/checks/alarms")).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    // A consumer connection that never publishes, and a publisher.
    let (_cc, cch) = channel(&b).await;
    let q = declare(&cch, "alarm-work").await;
    let mut consumer = consume(&cch, &q, false).await;
    let mut p = blocked_aware_publisher(&b).await;
    let mut buf = bytes::BytesMut::new();
    publish(&mut p, &q, b"before").await;
    assert_eq!(
        read_for(&mut p, &mut buf, Duration::from_millis(500)).await,
        vec![Seen::Ack(1)]
    );
    next(&mut consumer)
        .await
        .ack(BasicAckOptions::default())
        .await
        .unwrap();

    // The alarm goes on.
    alarms.set_memory_limit(0);
    alarms.check(&data_dir);
    let node = get(&format!("{api}/overview")).await.1["node"].clone();
    let (status, body) = get(&format!("{api}/health/checks/alarms")).await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        json!({"status": "failed", "reason": "There are alarms in effect in the cluster",
               "alarms": [{"node": node, "resource": "memory"}]})
    );
    let (status, body) = get(&format!("{api}/health/checks/local-alarms")).await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "There are alarms in effect on the node");
    let nodes = get(&format!("{api}/nodes")).await.1;
    assert_eq!(nodes[0]["mem_alarm"], true);
    assert_eq!(nodes[0]["disk_free_alarm"], false);
    assert_eq!(nodes[0]["mem_limit"], 0);
    let metrics = reqwest::get(format!("http://{}/metrics", b.prometheus.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\nrabbitmq_alarms_memory_used_watermark 1"),
        "memory alarm gauge"
    );
    assert!(metrics.contains("\nrabbitmq_alarms_free_disk_space_watermark 0"));

    // The publisher's next publish is taken (and confirmed), then it is blocked: told so, and
    // its socket is no longer read, so the one after waits.
    publish(&mut p, &q, b"first under alarm").await;
    same(
        read_for(&mut p, &mut buf, Duration::from_millis(500)).await,
        vec![Seen::Blocked("low on memory".into()), Seen::Ack(2)],
    );
    publish(&mut p, &q, b"held").await;
    assert_eq!(
        read_for(&mut p, &mut buf, Duration::from_millis(500)).await,
        vec![]
    );
    let conns = get(&format!("{api}/connections")).await.1;
    let states: Vec<&str> = conns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    // As RabbitMQ: the publisher is "blocked", every other connection "blocking" (it would
    // be blocked if it published).
    assert!(states.contains(&"blocked"), "{states:?}");
    assert!(
        states.contains(&"blocking"),
        "the consumer is not blocked: {states:?}"
    );

    // The consumer-only connection goes on: it gets what was taken and acks it.
    let d = next(&mut consumer).await;
    assert_eq!(d.data, b"first under alarm");
    d.ack(BasicAckOptions::default()).await.unwrap();
    nothing(&mut consumer).await;

    // The alarm clears: unblocked, and the held publish goes through.
    alarms.set_memory_limit(u64::MAX);
    alarms.check(&data_dir);
    assert_eq!(
        read_for(&mut p, &mut buf, Duration::from_millis(500)).await,
        vec![Seen::Unblocked, Seen::Ack(3)]
    );
    assert_eq!(next(&mut consumer).await.data, b"held");
    let (status, _) = get(&format!("{api}/health/checks/local-alarms")).await;
    assert_eq!(status, 200);

    // The disk alarm: RabbitMQ's resource name and reason.
    alarms.set_disk_free_limit(u64::MAX);
    alarms.check(&data_dir);
    let (status, body) = get(&format!("{api}/health/checks/alarms")).await;
    assert_eq!(status, 503);
    assert_eq!(body["alarms"][0]["resource"], "disk space");
    publish(&mut p, &q, b"disk").await;
    same(
        read_for(&mut p, &mut buf, Duration::from_millis(500)).await,
        vec![Seen::Blocked("low on disk".into()), Seen::Ack(4)],
    );
    alarms.set_disk_free_limit(0);
    alarms.check(&data_dir);
    // Nothing was published while blocked, so only the notification comes.
    assert_eq!(
        read_for(&mut p, &mut buf, Duration::from_millis(500)).await,
        vec![Seen::Unblocked]
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_close_ends_a_blocked_connection() {
    let b = broker_with(|c| {
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
    })
    .await;
    let api = format!("http://{}/api", b.http.unwrap());
    let mut p = blocked_aware_publisher(&b).await;
    let mut buf = bytes::BytesMut::new();
    b.broker.alarms.set_disk_free_limit(u64::MAX);
    b.broker.alarms.check(&b.broker.config.data_dir);
    publish(&mut p, "nowhere", b"x").await;
    same(
        read_for(&mut p, &mut buf, Duration::from_millis(500)).await,
        vec![Seen::Blocked("low on disk".into()), Seen::Ack(1)],
    );
    let conns = get(&format!("{api}/connections")).await.1;
    let name = conns[0]["name"].as_str().unwrap().to_string();
    let enc: String = name
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == b'.' {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    let r = reqwest::Client::new()
        .delete(format!("{api}/connections/{enc}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (code, text) = read_until_close(&mut p).await;
    assert_eq!(code, 320);
    assert!(text.contains("Closed via management plugin"), "{text}");
    b.stop().await;
}
