//! RabbitMQ's error behaviour: reply codes and texts, channel versus connection errors, and
//! framing errors on a raw socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::{Duration, Instant};

use common::*;
use lapin::{options::*, types::FieldTable, ExchangeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_protocol::codec::{Decoder, Frame};

#[tokio::test]
async fn declare_errors_carry_rabbitmq_texts() {
    let b = broker().await;
    let c = connect(&b).await;
    let ch = c.create_channel().await.unwrap();
    let e = ch
        .queue_declare(
            "nope".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(text(&e), "NOT_FOUND - no queue 'nope' in vhost '/'");

    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 406);
    assert_eq!(text(&e), "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'");

    let ch = c.create_channel().await.unwrap();
    let e = ch
        .exchange_declare(
            "amq.mine".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 403);

    let ch = c.create_channel().await.unwrap();
    let e = ch
        .exchange_declare(
            "x".into(),
            ExchangeKind::Custom("nonsense".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        text(&e),
        "PRECONDITION_FAILED - unknown exchange type 'nonsense'"
    );

    let ch = c.create_channel().await.unwrap();
    let e = ch
        .queue_bind(
            "q".into(),
            "missing".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(text(&e), "NOT_FOUND - no exchange 'missing' in vhost '/'");
    // channel errors leave the connection usable
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    b.stop().await;
}

#[tokio::test]
async fn qos_prefetch_size_closes_the_connection_with_540() {
    let b = broker().await;
    let (c, ch) = channel(&b).await;
    // lapin cannot send prefetch_size; use a raw frame below instead. Here: channel.flow false.
    let e = ch
        .channel_flow(ChannelFlowOptions { active: false })
        .await
        .unwrap_err();
    assert_eq!(code(&e), 540);
    for _ in 0..100 {
        if !c.status().connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!c.status().connected());
    b.stop().await;
}

async fn raw(b: &warren_broker::Running) -> TcpStream {
    TcpStream::connect(b.addr).await.unwrap()
}

#[tokio::test]
async fn wrong_protocol_header_is_answered_with_ours() {
    let b = broker().await;
    let mut s = raw(&b).await;
    s.write_all(b"AMQP\x01\x01\x00\x0a").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"AMQP\x00\x00\x09\x01");
    b.stop().await;
}

/// Reads frames until a connection.close arrives; returns its reply code.
/// Reads frames until a channel.close arrives.
async fn read_until_channel_close(s: &mut TcpStream) -> warren_protocol::protocol::channel::Close {
    use warren_protocol::protocol::{channel, AMQPClass};
    let d = Decoder::new(0);
    let mut buf = bytes::BytesMut::new();
    loop {
        while let Some(f) = d.decode(&mut buf).unwrap() {
            if let Frame::Method {
                class: AMQPClass::Channel(channel::AMQPMethod::Close(c)),
                ..
            } = f
            {
                return c;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "socket closed before channel.close");
    }
}

/// Opens a raw connection through tune-ok/open with the given frame_max.
async fn handshake(b: &warren_broker::Running) -> TcpStream {
    handshake_to(b, "/").await
}

#[tokio::test]
async fn oversized_frame_is_501_before_its_payload_arrives() {
    let b = broker().await;
    let mut s = handshake(&b).await;
    // A body frame header declaring 1 MiB on channel 1; no payload follows.
    s.write_all(&[3, 0, 1, 0, 0x10, 0, 0]).await.unwrap();
    let (code, text) = read_until_close(&mut s).await;
    assert_eq!(code, 501);
    assert!(text.contains("frame_too_large"), "{text}");
    b.stop().await;
}

#[tokio::test]
async fn qos_with_prefetch_size_is_540() {
    use warren_protocol::{
        encode::encode_frame,
        protocol::{basic, channel, AMQPClass},
    };
    let b = broker().await;
    let mut s = handshake(&b).await;
    let mut v = Vec::new();
    encode_frame(
        &mut v,
        1,
        &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .unwrap();
    let start = v.len();
    encode_frame(
        &mut v,
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    )
    .unwrap();
    v[start + 7 + 4..start + 7 + 8].copy_from_slice(&4096u32.to_be_bytes());
    s.write_all(&v).await.unwrap();
    let (code, text) = read_until_close(&mut s).await;
    assert_eq!(
        (code, text.as_str()),
        (540, "NOT_IMPLEMENTED - prefetch_size!=0 (4096)")
    );
    b.stop().await;
}

#[tokio::test]
async fn message_over_max_size_is_406_and_never_buffered() {
    use warren_protocol::{
        encode::{content_header_payload, encode_frame},
        protocol::{basic, channel, AMQPClass},
        AMQPProperties,
    };
    let b = broker_with(|c| c.max_message_size = 1024).await;
    let mut s = handshake(&b).await;
    let mut v = Vec::new();
    encode_frame(
        &mut v,
        1,
        &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .unwrap();
    encode_frame(
        &mut v,
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .unwrap();
    let header = content_header_payload(60, 10 << 20, &AMQPProperties::default()).unwrap();
    v.extend_from_slice(&[2, 0, 1]);
    v.extend_from_slice(&(header.len() as u32).to_be_bytes());
    v.extend_from_slice(&header);
    v.push(0xCE);
    s.write_all(&v).await.unwrap();
    let close = read_until_channel_close(&mut s).await;
    assert_eq!(close.reply_code, 406);
    assert_eq!(
        close.reply_text.as_str(),
        "PRECONDITION_FAILED - message size 10485760 is larger than configured max size 1024"
    );
    b.stop().await;
}

#[tokio::test]
async fn bad_login_and_unknown_vhost() {
    let b = broker().await;
    let url = format!("amqp://guest:wrong@{}/%2f", b.addr);
    let e = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 403);
    let url = format!("amqp://guest:guest@{}/nowhere", b.addr);
    let e = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 530);
    assert_eq!(text(&e), "NOT_ALLOWED - vhost nowhere not found");
    b.stop().await;
}

/// Users live in the store (read through the data cache): a store written before the start
/// holds alice (permissions on "/") and bob (none); no default user is added to it.
#[tokio::test]
async fn stored_users_and_vhost_access() {
    use warren_storage::{
        MessageStore, MetaStore, Op, PermissionRecord, Plan, SqlStore, UserRecord,
    };
    let config = warren_broker::Config::for_tests();
    std::fs::create_dir_all(&config.data_dir).unwrap();
    {
        let store = SqlStore::open(&SqlStore::sqlite_url(&config.data_dir), true)
            .await
            .unwrap();
        let user = |name: &str, pass: &str| {
            Op::PutUser(UserRecord {
                name: name.to_string(),
                password_hash: warren_broker::auth::hash_password(pass),
                tags: String::new(),
                limits: "{}".into(),
            })
        };
        let ops = vec![
            user("alice", "a-secret"),
            user("bob", "b-secret"),
            Op::PutPermission(PermissionRecord {
                vhost: "/".to_string(),
                user: "alice".to_string(),
                configure: ".*".to_string(),
                write: ".*".to_string(),
                read: ".*".to_string(),
            }),
        ];
        store.apply(&Plan::from_ops(ops)).await.unwrap();
        assert!(store.has_users().await.unwrap());
    }
    let b = warren_broker::start(config).await.unwrap();
    let url = |creds: &str| format!("amqp://{creds}@{}/%2f", b.addr);
    let alice = lapin::Connection::connect(
        &url("alice:a-secret"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("alice may open /");
    alice.create_channel().await.unwrap();
    let e =
        lapin::Connection::connect(&url("bob:b-secret"), lapin::ConnectionProperties::default())
            .await
            .unwrap_err();
    assert_eq!(code(&e), 530);
    assert_eq!(
        text(&e),
        "NOT_ALLOWED - access to vhost '/' refused for user 'bob'"
    );
    let e = lapin::Connection::connect(
        &url("alice:b-secret"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e), 403);
    // The store was not empty: guest was not created.
    let e = lapin::Connection::connect(&url("guest:guest"), lapin::ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 403);
    b.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_with_320() {
    let b = broker().await;
    let mut s = handshake(&b).await;
    let c = connect(&b).await;
    let stopping = tokio::spawn(b.stop());
    let (code, text) = read_until_close(&mut s).await;
    assert_eq!(code, 320);
    assert_eq!(
        text,
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    );
    // the lapin client answered close-ok and is now disconnected
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    assert!(!c.status().connected());
}

#[tokio::test]
async fn unknown_delivery_tag_is_406_on_the_channel() {
    use warren_protocol::{
        encode::encode_frame,
        protocol::{basic, channel, AMQPClass},
    };
    let b = broker().await;
    let mut s = handshake(&b).await;
    let mut v = Vec::new();
    encode_frame(
        &mut v,
        1,
        &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .unwrap();
    encode_frame(
        &mut v,
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 99,
            multiple: false,
        })),
    )
    .unwrap();
    s.write_all(&v).await.unwrap();
    let close = read_until_channel_close(&mut s).await;
    assert_eq!(close.reply_code, 406);
    assert_eq!(
        close.reply_text.as_str(),
        "PRECONDITION_FAILED - unknown delivery tag 99"
    );
    assert_eq!((close.class_id, close.method_id), (60, 80));
    b.stop().await;
}

/// Issue 11: a panic in a connection task used to leave the connection half alive (heartbeats,
/// nothing answered) with its consumers, unacked deliveries and exclusive queues registered
/// until restart. Now the connection is closed with 541 and everything it held is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_is_closed_and_releases_what_it_held() {
    use futures_lite::StreamExt;
    use lapin::{options::*, BasicProperties};
    let b = broker_with(|c| c.fault_panic_on_queue = Some("boom".into())).await;
    let (a, ch) = channel(&b).await;
    declare(&ch, "held").await;
    ch.queue_declare(
        "excl-a".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for body in [&b"1"[..], b"2"] {
        ch.basic_publish(
            "".into(),
            "held".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let mut cons = consume(&ch, "held", false).await;
    next(&mut cons).await;
    next(&mut cons).await;
    let ch2 = a.create_channel().await.unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        ch2.queue_declare(
            "boom".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("an answer, not a half-alive connection")
    .unwrap_err();
    assert_eq!(code(&err), 541, "{err:?}");
    // The consumer's stream ends instead of hanging.
    let end = tokio::time::timeout(Duration::from_secs(5), cons.next()).await;
    assert!(end.is_ok(), "consumer still open after the connection died");

    let (_b2, chb) = channel(&b).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = chb
            .queue_declare(
                "held".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if n.message_count() == 2 && n.consumer_count() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deliveries not requeued: {} ready, {} consumers",
            n.message_count(),
            n.consumer_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = chb
        .basic_get("held".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("requeued message");
    assert!(m.delivery.redelivered);
    let err = chb
        .queue_declare(
            "excl-a".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        code(&err),
        404,
        "the exclusive queue went with its connection"
    );
    b.stop().await;
}

/// Issue 11: RabbitMQ answers unbind-ok when the binding, the queue or the exchange is already
/// gone (aio-pika's RPC clean-up unbinds after its auto-delete queue went); Warren said 404.
#[tokio::test]
async fn unbinding_what_is_gone_is_ok() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    declare(&ch, "ub-q").await;
    ch.exchange_declare(
        "ub-x".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let unbind = |q: &'static str, x: &'static str| {
        let ch = ch.clone();
        async move {
            ch.queue_unbind(q.into(), x.into(), "k".into(), FieldTable::default())
                .await
        }
    };
    unbind("ub-q", "ub-x").await.expect("binding never made");
    unbind("no-such-queue", "ub-x").await.expect("queue gone");
    unbind("ub-q", "no-such-exchange")
        .await
        .expect("exchange gone");
    ch.exchange_unbind(
        "ub-x".into(),
        "no-such-exchange".into(),
        "k".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("source gone");
    ch.exchange_unbind(
        "no-such-exchange".into(),
        "ub-x".into(),
        "k".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("destination gone");
    // Binding to what is missing is still 404.
    let err = ch
        .queue_bind(
            "no-such-queue".into(),
            "ub-x".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404);
    b.stop().await;
}

/// Issue 11: the default listener was IPv4 only (`amqp://localhost` resolving to ::1 failed).
/// `[::]` is dual-stack, and `--amqp-listen` may be given more than once.
#[tokio::test]
async fn listeners_are_dual_stack_and_repeatable() {
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let b = broker_with(|c| {
        c.amqp_listen = vec!["[::]:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()];
    })
    .await;
    assert_eq!(b.addrs.len(), 2);
    let wild = b.addrs[0].port();
    let mut urls = vec![
        format!("amqp://guest:guest@127.0.0.1:{wild}/%2f"),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", b.addrs[1].port()),
    ];
    if ipv6 {
        assert!(b.addrs[0].is_ipv6(), "IPv6 is on here: [::] must be bound");
        urls.push(format!("amqp://guest:guest@[::1]:{wild}/%2f"));
    }
    for url in urls {
        let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let ch = c.create_channel().await.unwrap();
        declare(&ch, "").await;
        c.close(200, "bye".into()).await.unwrap();
    }
    b.stop().await;
}

/// Issue 11: basic.return pushed bodies into the publisher's outbox without checking its room:
/// a client publishing mandatory unroutable messages and never reading grew the broker's
/// memory by everything it sent. Now the broker stops reading such a publisher once its
/// outbox is full, so TCP pushes back: the client cannot hand over more than the socket
/// buffers plus the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_to_a_client_that_does_not_read_push_back() {
    let b = broker().await;
    let mut s = handshake(&b).await;
    open_channel(&mut s, 1).await;
    // One mandatory publish of 64 KiB to a key nothing is bound to.
    let body = vec![7u8; 64 * 1024];
    let one = publish_frames("nowhere", true, &body, 131_072);
    // 256 MiB offered; the broker must stop taking it long before.
    let mut sent = 0usize;
    let writing = async {
        for _ in 0..4096 {
            s.write_all(&one).await.unwrap();
            sent += one.len();
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(5), writing).await;
    assert!(
        finished.is_err(),
        "the broker read all 256 MiB while its returns went unread"
    );
    assert!(sent < 64 << 20, "{sent} bytes taken before pushing back");
    // The broker still serves others.
    let (_c, ch) = channel(&b).await;
    declare(&ch, "").await;
    drop(s);
    b.stop().await;
}

/// Multi-frame bodies: whatever the socket delivers at a time (a frame header alone, a frame end
/// alone, a frame and a half, the whole message), every body arrives intact and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_arrive_intact_however_the_socket_splits_them() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    let q = declare(&ch, "split-bodies").await;
    let mut s = handshake(&b).await;
    open_channel(&mut s, 1).await;
    // handshake_to tunes frame_max to 131072.
    let frame_max = 131_072;
    let sizes = [40_000, frame_max - 8, frame_max - 7, 300_000, (1 << 20) + 5];
    let mut sent = Vec::new();
    for (i, size) in sizes.into_iter().enumerate() {
        for split in 0..4 {
            let body: Vec<u8> = (0..size)
                .map(|j| (j as u64 * 31 + i as u64 * 7 + split as u64) as u8)
                .collect();
            let bytes = publish_frames(&q, false, &body, frame_max);
            match split {
                // The whole message in one write.
                0 => s.write_all(&bytes).await.unwrap(),
                // Pieces that straddle frame boundaries at different offsets.
                1 | 2 => {
                    let piece = if split == 1 { 65_539 } else { 4_093 };
                    for p in bytes.chunks(piece) {
                        s.write_all(p).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                // Each body frame's header, payload and frame end as separate writes.
                _ => {
                    let mut at = 0;
                    while at < bytes.len() {
                        let len = 8 + u32::from_be_bytes([
                            bytes[at + 3],
                            bytes[at + 4],
                            bytes[at + 5],
                            bytes[at + 6],
                        ]) as usize;
                        let frame = &bytes[at..at + len];
                        for p in [&frame[..7], &frame[7..len - 1], &frame[len - 1..]] {
                            s.write_all(p).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        at += len;
                    }
                }
            }
            sent.push(body);
        }
    }
    bodies_arrive_in_order(&ch, &q, &sent).await;
    drop(s);
    b.stop().await;
}

/// Every one of `sent` reaches `q`, whole and in order (taken with basic.get).
async fn bodies_arrive_in_order(ch: &lapin::Channel, q: &str, sent: &[Vec<u8>]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(ch, q).await < sent.len() as u32 {
        assert!(Instant::now() < deadline, "not every message arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (n, body) in sent.iter().enumerate() {
        let d = ch
            .basic_get(q.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(d.data.len(), body.len(), "message {n}: size");
        assert!(d.data == *body, "message {n}: body differs");
    }
}

/// Frames of `bytes` (a channel 1 publish from `publish_frames`), moved to `channel`.
fn frames_on(bytes: &[u8], channel: u16) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len =
            8 + u32::from_be_bytes([bytes[at + 3], bytes[at + 4], bytes[at + 5], bytes[at + 6]])
                as usize;
        let mut f = bytes[at..at + len].to_vec();
        f[1..3].copy_from_slice(&channel.to_be_bytes());
        frames.push(f);
        at += len;
    }
    frames
}

/// Two channels publish large bodies with their frames interleaved (AMQP allows frames of
/// different channels between a content's frames): each body is read into its own message,
/// whole writes or 1,000-byte pieces alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_large_bodies_of_two_channels_arrive_intact() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    let q = declare(&ch, "interleaved").await;
    let mut s = handshake(&b).await;
    open_channel(&mut s, 1).await;
    open_channel(&mut s, 2).await;
    let mut sent = Vec::new();
    for (round, piece) in [(0u8, usize::MAX), (1, 1000)] {
        let bodies: Vec<Vec<u8>> = [700_000usize, 450_000]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (0..*n)
                    .map(|j| (j * 13 + i * 101 + round as usize) as u8)
                    .collect()
            })
            .collect();
        let one = frames_on(&publish_frames(&q, false, &bodies[0], 131_072), 1);
        let two = frames_on(&publish_frames(&q, false, &bodies[1], 131_072), 2);
        let mut wire = Vec::new();
        for k in 0..one.len().max(two.len()) {
            for frames in [&one, &two] {
                if let Some(f) = frames.get(k) {
                    wire.extend_from_slice(f);
                }
            }
        }
        for p in wire.chunks(piece) {
            s.write_all(p).await.unwrap();
        }
        // Channel 2's message is the shorter: it completes first.
        sent.push(bodies[1].clone());
        sent.push(bodies[0].clone());
    }
    bodies_arrive_in_order(&ch, &q, &sent).await;
    drop(s);
    b.stop().await;
}

/// A bad frame end after the first of a message's body frames is a 501 (the half-assembled
/// message is dropped), and the broker serves others.
#[tokio::test]
async fn a_bad_frame_end_after_a_large_body_frame_is_501() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    let q = declare(&ch, "bad-end").await;
    let mut s = handshake(&b).await;
    open_channel(&mut s, 1).await;
    let body = vec![5u8; 200_000];
    let mut bytes = publish_frames(&q, false, &body, 131_072);
    // The first body frame's end: after the method, the header and 131,064 bytes of payload.
    let first_end = bytes.len() - (body.len() - 131_064) - 8 - 1;
    assert_eq!(bytes[first_end], 0xCE);
    bytes[first_end] = 0;
    s.write_all(&bytes).await.unwrap();
    let (code, _) = read_until_close(&mut s).await;
    assert_eq!(code, 501);
    assert_eq!(count(&ch, &q).await, 0);
    declare(&ch, "after-bad-end").await;
    b.stop().await;
}
