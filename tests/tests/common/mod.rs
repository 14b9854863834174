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
use warren_broker::{Config, Running};

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

pub fn text(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_message().to_string(),
        other => panic!("not a protocol error: {other:?}"),
    }
}
