//! Resource limits, each a named setting, with RabbitMQ's replies: the handshake timeout,
//! channels per connection, consumers per channel, messages held by an open transaction, and
//! the node's connection limit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::{Duration, Instant};

use common::*;
use lapin::{options::*, types::FieldTable, BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_protocol::codec::{Decoder, Frame};
use warren_protocol::protocol::{channel, connection, AMQPClass};

/// Reads until the server closes the socket; returns how long that took.
async fn closed_after(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut sink = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept a silent client for 10 s"),
        }
    }
}

#[tokio::test]
async fn a_client_that_does_not_finish_the_handshake_is_dropped() {
    let b = broker_with(|c| c.handshake_timeout = 1).await;
    // Nothing at all.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let t = closed_after(&mut s).await;
    assert!(
        t >= Duration::from_millis(900) && t < Duration::from_secs(5),
        "{t:?}"
    );
    // The protocol header, then silence after connection.start.
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let t = closed_after(&mut s).await;
    assert!(
        t >= Duration::from_millis(800) && t < Duration::from_secs(5),
        "{t:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn channels_beyond_channel_max_are_530() {
    use warren_protocol::encode::encode_frame;
    let b = broker_with(|c| c.channel_max = 2).await;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut v = Vec::new();
    for m in [
        connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: Default::default(),
            mechanism: "PLAIN".into(),
            response: warren_protocol::LongString::from(&b"\0guest\0guest"[..]),
            locale: "en_US".into(),
        }),
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2,
            frame_max: 131072,
            heartbeat: 0,
        }),
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        }),
    ] {
        encode_frame(&mut v, 0, &AMQPClass::Connection(m)).unwrap();
    }
    for id in 1..=3u16 {
        encode_frame(
            &mut v,
            id,
            &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .unwrap();
    }
    s.write_all(&v).await.unwrap();
    let d = Decoder::new(0);
    let mut buf = bytes::BytesMut::new();
    let close = 'read: loop {
        while let Some(f) = d.decode(&mut buf).unwrap() {
            if let Frame::Method {
                class: AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                ..
            } = f
            {
                break 'read c;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed without connection.close");
    };
    assert_eq!(close.reply_code, 530);
    assert_eq!(
        close.reply_text.as_str(),
        "NOT_ALLOWED - number of channels opened (2) has reached the negotiated channel_max (2)"
    );
    b.stop().await;
}

#[tokio::test]
async fn consumers_beyond_the_channel_limit_are_530() {
    let b = broker_with(|c| c.consumer_max_per_channel = 2).await;
    let (_c, ch) = channel(&b).await;
    declare(&ch, "lim-q").await;
    // Kept: lapin cancels a consumer it drops.
    let _c1 = consume(&ch, "lim-q", true).await;
    let _c2 = consume(&ch, "lim-q", true).await;
    let e = ch
        .basic_consume(
            "lim-q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 530);
    assert_eq!(
        text(&e),
        "NOT_ALLOWED - reached maximum (2) of consumers per channel"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_transaction_holds_a_bounded_number_of_messages() {
    let b = broker_with(|c| c.tx_max_messages = 3).await;
    let (_c, ch) = channel(&b).await;
    declare(&ch, "tx-q").await;
    ch.tx_select().await.unwrap();
    for _ in 0..4 {
        ch.basic_publish(
            "".into(),
            "tx-q".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let e = ch.tx_commit().await.unwrap_err();
    assert_eq!(code(&e), 406);
    assert_eq!(
        text(&e),
        "PRECONDITION_FAILED - transaction too large: at most 3 messages and 67108864 body bytes are held until tx.commit"
    );
    // Nothing of the aborted transaction was published.
    let (_c2, ch2) = channel(&b).await;
    let n = ch2
        .queue_declare(
            "tx-q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(n, 0);
    b.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_with_530() {
    let b = broker_with(|c| c.max_connections = 2).await;
    let c1 = connect(&b).await;
    let _c2 = connect(&b).await;
    let e = Connection::connect(&b.url(), ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 530);
    assert_eq!(
        text(&e),
        "NOT_ALLOWED - connection refused: node connection limit (2) is reached"
    );
    c1.close(200, "bye".into()).await.unwrap();
    // A slot is free again (the count drops once the closed connection's task ends).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Connection::connect(&b.url(), ConnectionProperties::default()).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(code(&e), 530);
                assert!(Instant::now() < deadline, "the slot never came back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    b.stop().await;
}
