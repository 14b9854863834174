//! Permissions as RabbitMQ enforces them: configure/write/read patterns per vhost checked on
//! every method of its access-control table, topic permissions on routing keys, 403
//! ACCESS_REFUSED (channel.close) with RabbitMQ's texts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use common::*;
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties,
};
use warren_storage::{
    MessageStore, Op, PermissionRecord, Plan, SqlStore, TopicPermissionRecord, UserRecord,
};

async fn start_with_users() -> warren_broker::Running {
    let config = warren_broker::Config::for_tests();
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let store = SqlStore::open(&SqlStore::sqlite_url(&config.data_dir), true)
        .await
        .unwrap();
    let user = |name: &str| {
        Op::PutUser(UserRecord {
            name: name.to_string(),
            password_hash: warren_broker::auth::hash_password("pw"),
            tags: String::new(),
            limits: "{}".into(),
        })
    };
    let perm = |name: &str, c: &str, w: &str, r: &str| {
        Op::PutPermission(PermissionRecord {
            vhost: "/".to_string(),
            user: name.to_string(),
            configure: c.to_string(),
            write: w.to_string(),
            read: r.to_string(),
        })
    };
    let ops = vec![
        user("admin"),
        perm("admin", ".*", ".*", ".*"),
        // The user: every pattern ^$.
        user("none"),
        perm("none", "^$", "^$", "^$"),
        user("bob"),
        perm(
            "bob",
            "^bob-",
            "^(bob-.*|amq\\.default|amq\\.topic)$",
            "^(bob-.*|amq\\.topic)$",
        ),
        Op::PutTopicPermission(TopicPermissionRecord {
            vhost: "/".to_string(),
            user: "bob".to_string(),
            exchange: "amq.topic".to_string(),
            write: "^{username}\\.".to_string(),
            read: "^{username}\\.".to_string(),
        }),
    ];
    store.apply(&Plan::from_ops(ops)).await.unwrap();
    drop(store);
    warren_broker::start(config).await.unwrap()
}

async fn login(b: &warren_broker::Running, user: &str) -> (Connection, Channel) {
    let c = Connection::connect(
        &format!("amqp://{user}:pw@{}/%2f", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = c.create_channel().await.unwrap();
    (c, ch)
}

/// The 403 a refused method closes its channel with; a new channel for the next check.
async fn refused<T: std::fmt::Debug>(
    c: &Connection,
    ch: &mut Channel,
    r: Result<T, lapin::Error>,
) -> String {
    let e = r.expect_err("refused");
    assert_eq!(code(&e), 403, "{e:?}");
    *ch = c.create_channel().await.unwrap();
    text(&e)
}

/// Publishes with a confirm and returns how the channel answered: Ok when confirmed, the
/// channel's close error otherwise.
async fn publish(ch: &Channel, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    )
    .await?
    .await?;
    // A refusal closes the channel asynchronously: a round trip makes it visible.
    ch.basic_qos(0, BasicQosOptions::default()).await
}

fn qopts(passive: bool) -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_user_with_empty_patterns_can_do_nothing_but_connect() {
    let b = start_with_users().await;
    let (_a, admin) = login(&b, "admin").await;
    declare(&admin, "shared").await;
    admin
        .basic_publish(
            "".into(),
            "shared".into(),
            BasicPublishOptions::default(),
            b"secret",
            BasicProperties::default(),
        )
        .await
        .unwrap();

    let (c, mut ch) = login(&b, "none").await;
    let r = ch
        .queue_declare("q".into(), qopts(false), FieldTable::default())
        .await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - configure access to queue 'q' in vhost '/' refused for user 'none'"
    );
    let r = ch
        .queue_declare("".into(), qopts(false), FieldTable::default())
        .await;
    let t = refused(&c, &mut ch, r).await;
    assert!(
        t.starts_with("ACCESS_REFUSED - configure access to queue 'amq.gen-"),
        "{t}"
    );
    let r = publish(&ch, "", "shared").await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'none'"
    );
    let r = publish(&ch, "amq.fanout", "").await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - write access to exchange 'amq.fanout' in vhost '/' refused for user 'none'"
    );
    let r = ch
        .basic_get("shared".into(), BasicGetOptions { no_ack: true })
        .await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - read access to queue 'shared' in vhost '/' refused for user 'none'"
    );
    let r = ch
        .basic_consume(
            "shared".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    refused(&c, &mut ch, r).await;
    let r = ch
        .queue_purge("shared".into(), QueuePurgeOptions::default())
        .await;
    refused(&c, &mut ch, r).await;
    let r = ch
        .queue_delete("shared".into(), QueueDeleteOptions::default())
        .await;
    refused(&c, &mut ch, r).await;
    let r = ch
        .queue_bind(
            "shared".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - write access to queue 'shared' in vhost '/' refused for user 'none'"
    );
    let r = ch
        .exchange_declare(
            "x".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - configure access to exchange 'x' in vhost '/' refused for user 'none'"
    );
    // Passive declares are not checked (RabbitMQ 3.x).
    let n = ch
        .queue_declare("shared".into(), qopts(true), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(n.message_count(), 1, "nothing was taken");
    b.stop().await;
}

#[tokio::test]
async fn patterns_and_topic_permissions_scope_a_user() {
    let b = start_with_users().await;
    let (_a, admin) = login(&b, "admin").await;
    declare(&admin, "alice-q").await;
    let (c, mut ch) = login(&b, "bob").await;
    declare(&ch, "bob-q").await;
    let r = ch
        .queue_declare("alice-q2".into(), qopts(false), FieldTable::default())
        .await;
    refused(&c, &mut ch, r).await;
    // A dead-letter exchange needs write on it.
    let mut dl = FieldTable::default();
    dl.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("amq.direct".into()),
    );
    let r = ch.queue_declare("bob-dl".into(), qopts(false), dl).await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - write access to exchange 'amq.direct' in vhost '/' refused for user 'bob'"
    );
    // Binding: write on the queue, read on the exchange, read on the topic key.
    let bind = |q: &'static str, x: &'static str, k: &'static str| {
        let ch = ch.clone();
        async move {
            ch.queue_bind(
                q.into(),
                x.into(),
                k.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    };
    bind("bob-q", "amq.topic", "bob.#").await.unwrap();
    let r = bind("bob-q", "amq.topic", "alice.#").await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - read access to topic 'alice.#' in exchange 'amq.topic' in vhost '/' refused for user 'bob'"
    );
    let bind = |q: &'static str, x: &'static str, k: &'static str| {
        let ch = ch.clone();
        async move {
            ch.queue_bind(
                q.into(),
                x.into(),
                k.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    };
    let r = bind("bob-q", "amq.direct", "k").await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - read access to exchange 'amq.direct' in vhost '/' refused for user 'bob'"
    );
    // Publishing: write on the exchange, then write on the topic key.
    publish(&ch, "amq.topic", "bob.1").await.unwrap();
    let r = publish(&ch, "amq.topic", "alice.1").await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - write access to topic 'alice.1' in exchange 'amq.topic' in vhost '/' refused for user 'bob'"
    );
    publish(&ch, "", "bob-q").await.unwrap();
    let got = ch
        .basic_get("bob-q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(got.is_some());
    let r = ch
        .basic_get("alice-q".into(), BasicGetOptions { no_ack: true })
        .await;
    refused(&c, &mut ch, r).await;
    let r = ch
        .queue_delete("alice-q".into(), QueueDeleteOptions::default())
        .await;
    assert_eq!(
        refused(&c, &mut ch, r).await,
        "ACCESS_REFUSED - configure access to queue 'alice-q' in vhost '/' refused for user 'bob'"
    );
    ch.queue_delete("bob-q".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    b.stop().await;
}
