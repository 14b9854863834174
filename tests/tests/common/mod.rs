//! Shared helpers: start Warren in-process on 127.0.0.1:0 and connect lapin to it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicConsumeOptions, QueueDeclareOptions},
    types::FieldTable,
    Channel, Connection, ConnectionProperties, Consumer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_broker::{Config, Running};
use warren_protocol::codec::{Decoder, Frame};

pub async fn broker() -> Running {
    broker_with(|_| {}).await
}

pub async fn broker_with(f: impl FnOnce(&mut Config)) -> Running {
    let mut c = Config::for_tests();
    f(&mut c);
    warren_broker::start(c).await.expect("start broker")
}

pub async fn connect(b: &Running) -> Connection {
    Connection::connect(&b.url(), ConnectionProperties::default())
        .await
        .expect("connect")
}

pub async fn channel(b: &Running) -> (Connection, Channel) {
    let c = connect(b).await;
    let ch = c.create_channel().await.expect("channel");
    (c, ch)
}

pub async fn declare(ch: &Channel, name: &str) -> String {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare")
    .name()
    .as_str()
    .to_string()
}

pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("consume")
}

/// The next delivery, failing the test after 5 s.
pub async fn next(c: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .expect("delivery in time")
        .expect("consumer open")
        .expect("delivery ok")
}

/// A queue's ready messages, by passive declare.
pub async fn count(ch: &Channel, q: &str) -> u32 {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

/// Asserts nothing arrives for a short while.
pub async fn nothing(c: &mut Consumer) {
    assert!(
        tokio::time::timeout(Duration::from_millis(200), c.next())
            .await
            .is_err(),
        "unexpected delivery"
    );
}

/// The AMQP reply code inside a lapin error.
pub fn code(e: &lapin::Error) -> u16 {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_id(),
        other => panic!("not a protocol error: {other:?}"),
    }
}

/// The channel or connection error the broker sends on its own, after a method that has no
/// reply (basic.publish). Waiting on the next synchronous method instead races the broker's
/// close: lapin answers `InvalidChannelState(Closing)` if the close arrived first.
pub async fn refusal(
    events: &mut (impl futures_lite::Stream<Item = lapin::Event> + Unpin),
) -> lapin::Error {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an error from the broker in time")
            .expect("the connection's events stream stays open");
        if let lapin::Event::Error(e) = event {
            if matches!(e.kind(), lapin::ErrorKind::ProtocolError(_)) {
                return e;
            }
        }
    }
}

pub fn text(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_message().to_string(),
        other => panic!("not a protocol error: {other:?}"),
    }
}

/// A raw AMQP connection, opened as guest into `vhost` (its replies are left unread).
pub async fn handshake_to(b: &warren_broker::Running, vhost: &str) -> TcpStream {
    use warren_protocol::{
        encode::encode_frame,
        protocol::{connection, AMQPClass},
        LongString,
    };
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut v = Vec::new();
    encode_frame(
        &mut v,
        0,
        &AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: Default::default(),
            mechanism: "PLAIN".into(),
            response: LongString::from(&b"\0guest\0guest"[..]),
            locale: "en_US".into(),
        })),
    )
    .unwrap();
    encode_frame(
        &mut v,
        0,
        &AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 0,
        })),
    )
    .unwrap();
    encode_frame(
        &mut v,
        0,
        &AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: vhost.into(),
        })),
    )
    .unwrap();
    s.write_all(&v).await.unwrap();
    s
}

/// Sends channel.open for channel `id` on a raw socket.
pub async fn open_channel(s: &mut TcpStream, id: u16) {
    use warren_protocol::{
        encode::encode_frame,
        protocol::{channel, AMQPClass},
    };
    let mut open = Vec::new();
    encode_frame(
        &mut open,
        id,
        &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .unwrap();
    s.write_all(&open).await.unwrap();
}

/// Reads frames until a connection.close arrives: its code and text.
pub async fn read_until_close(s: &mut TcpStream) -> (u16, String) {
    use warren_protocol::protocol::{connection, AMQPClass};
    let d = Decoder::new(0);
    let mut buf = bytes::BytesMut::new();
    loop {
        while let Some(f) = d.decode(&mut buf).unwrap() {
            if let Frame::Method {
                class: AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                ..
            } = f
            {
                return (c.reply_code, c.reply_text.to_string());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "socket closed before connection.close");
    }
}

/// basic.publish of `body` to the default exchange with `routing_key` on channel 1: the method,
/// the content header and the body in frames of at most `frame_max` bytes, as a client sends them
/// (a raw socket after `handshake_to` and channel.open).
pub fn publish_frames(
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    frame_max: usize,
) -> Vec<u8> {
    use warren_protocol::{
        encode::{content_header_payload, encode_frame},
        protocol::{basic, AMQPClass},
        AMQPProperties,
    };
    let mut v = Vec::new();
    encode_frame(
        &mut v,
        1,
        &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: routing_key.into(),
            mandatory,
            immediate: false,
        })),
    )
    .unwrap();
    let header = content_header_payload(60, body.len() as u64, &AMQPProperties::default()).unwrap();
    v.extend_from_slice(&[2, 0, 1]);
    v.extend_from_slice(&(header.len() as u32).to_be_bytes());
    v.extend_from_slice(&header);
    v.push(0xCE);
    for part in body.chunks(frame_max - 8) {
        v.extend_from_slice(&[3, 0, 1]);
        v.extend_from_slice(&(part.len() as u32).to_be_bytes());
        v.extend_from_slice(part);
        v.push(0xCE);
    }
    v
}

/// Declares the durable queues `target` and `source`, whose dead letters go to `target`
/// through the default exchange; publishes one persistent message with `body` to `source`
/// (confirmed) and takes it with basic.get, unacked: returns that delivery.
pub async fn dead_letter_pair_with_one_taken(
    ch: &Channel,
    source: &str,
    target: &str,
    body: &[u8],
) -> lapin::message::BasicGetMessage {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::AMQPValue;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(target.into(), durable, FieldTable::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(target.into()),
    );
    ch.queue_declare(source.into(), durable, args)
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        source.into(),
        BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    ch.basic_get(source.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("the message")
}
