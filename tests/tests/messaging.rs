//! Publish, consume, acks, prefetch, confirms, transactions and routing through lapin against
//! an in-process Warren.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use common::*;
use lapin::{
    options::*,
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .expect("publish");
}

#[tokio::test]
async fn roundtrip_and_large_bodies_split_to_frame_max() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    let q = declare(&ch, "").await;
    assert!(q.starts_with("amq.gen-"));
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    publish(&ch, "", &q, b"small").await;
    publish(&ch, "", &q, &big).await;
    publish(&ch, "", &q, b"").await;
    let mut cons = consume(&ch, &q, true).await;
    assert_eq!(next(&mut cons).await.data, b"small");
    assert_eq!(next(&mut cons).await.data, big);
    assert_eq!(next(&mut cons).await.data, b"");
    b.stop().await;
}

#[tokio::test]
async fn round_robin_and_prefetch() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    let q = declare(&ch, "rr").await;
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut a = consume(&ch, &q, false).await;
    let mut z = consume(&ch, &q, false).await;
    for i in 0..6u8 {
        publish(&ch, "", &q, &[i]).await;
    }
    let a1 = next(&mut a).await;
    let z1 = next(&mut z).await;
    let a2 = next(&mut a).await;
    let z2 = next(&mut z).await;
    assert_eq!(
        (a1.data[0], z1.data[0], a2.data[0], z2.data[0]),
        (0, 1, 2, 3)
    );
    // prefetch 2 each: nothing more until an ack
    nothing(&mut a).await;
    a1.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(next(&mut a).await.data[0], 4);
    nothing(&mut z).await;
    b.stop().await;
}

#[tokio::test]
async fn nack_requeue_keeps_place_and_marks_redelivered() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    let q = declare(&ch, "nq").await;
    for i in 0..3u8 {
        publish(&ch, "", &q, &[i]).await;
    }
    let g0 = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g0.message_count, 2);
    let g1 = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    g0.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await
    .unwrap();
    g1.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let again = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.data, [0]);
    assert!(again.redelivered);
    let last = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.data, [2]);
    assert!(!last.redelivered);
    assert!(ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .is_none());
    b.stop().await;
}

#[tokio::test]
async fn unacked_are_requeued_when_the_channel_closes() {
    let b = broker().await;
    let (c, ch) = channel(&b).await;
    let q = declare(&ch, "requeue").await;
    publish(&ch, "", &q, b"m").await;
    let mut cons = consume(&ch, &q, false).await;
    let d = next(&mut cons).await;
    assert!(!d.redelivered);
    ch.close(200, "bye".into()).await.unwrap();
    let ch2 = c.create_channel().await.unwrap();
    let got = ch2
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert!(got.redelivered);
    b.stop().await;
}

#[tokio::test]
async fn confirms_and_mandatory_returns() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = declare(&ch, "confirmed").await;
    for _ in 0..50 {
        let conf = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(conf.is_ack());
    }
    let conf = ch
        .basic_publish(
            "amq.direct".into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(conf.is_ack());
    let ret = conf.take_message().expect("returned message");
    assert_eq!(ret.reply_code, 312);
    assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(ret.data, b"lost");
    let e = ch.tx_select().await.unwrap_err();
    assert_eq!(code(&e), 406);
    b.stop().await;
}

#[tokio::test]
async fn transactions_cover_publishes_and_acks() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    let q = declare(&ch, "txq").await;
    ch.tx_select().await.unwrap();
    publish(&ch, "", &q, b"rolled back").await;
    ch.tx_rollback().await.unwrap();
    publish(&ch, "", &q, b"committed").await;
    let (_, ch2) = channel(&b).await;
    let ok = ch2
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(ok.message_count(), 0, "nothing visible before commit");
    ch.tx_commit().await.unwrap();
    let got = ch
        .basic_get(q.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"committed");
    got.ack(BasicAckOptions::default()).await.unwrap();
    ch.tx_rollback().await.unwrap();
    // the rolled-back ack leaves the message unacked; closing the channel requeues it
    ch.close(200, "".into()).await.unwrap();
    let back = ch2
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert!(back.redelivered);
    b.stop().await;
}

#[tokio::test]
async fn topic_headers_fanout_and_exchange_bindings() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    for q in ["t1", "t2", "h", "f"] {
        declare(&ch, q).await;
    }
    let none = FieldTable::default();
    ch.queue_bind(
        "t1".into(),
        "amq.topic".into(),
        "*.orange.*".into(),
        QueueBindOptions::default(),
        none.clone(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "t2".into(),
        "amq.topic".into(),
        "lazy.#".into(),
        QueueBindOptions::default(),
        none.clone(),
    )
    .await
    .unwrap();
    let mut hargs = FieldTable::default();
    hargs.insert(
        "x-match".into(),
        AMQPValue::LongString(LongString::from("any")),
    );
    hargs.insert(
        "kind".into(),
        AMQPValue::LongString(LongString::from("pdf")),
    );
    ch.queue_bind(
        "h".into(),
        "amq.headers".into(),
        "".into(),
        QueueBindOptions::default(),
        hargs,
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "fan".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        none.clone(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "fan".into(),
        "amq.topic".into(),
        "#".into(),
        ExchangeBindOptions::default(),
        none.clone(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "f".into(),
        "fan".into(),
        "".into(),
        QueueBindOptions::default(),
        none.clone(),
    )
    .await
    .unwrap();

    publish(&ch, "amq.topic", "lazy.orange.elephant", b"1").await;
    publish(&ch, "amq.topic", "quick.brown.fox", b"2").await;
    let mut headers = FieldTable::default();
    headers.insert(
        "kind".into(),
        AMQPValue::LongString(LongString::from("pdf")),
    );
    ch.basic_publish(
        "amq.headers".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"3",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();
    assert_eq!(count(&ch, "t1").await, 1);
    assert_eq!(count(&ch, "t2").await, 1);
    assert_eq!(count(&ch, "h").await, 1);
    assert_eq!(count(&ch, "f").await, 2);
    b.stop().await;
}

#[tokio::test]
async fn auto_delete_and_exclusive_queues_go_away() {
    let b = broker().await;
    let (c, ch) = channel(&b).await;
    ch.queue_declare(
        "ad".into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let cons = consume(&ch, "ad", true).await;
    ch.basic_cancel(cons.tag().as_str().into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let e = ch
        .queue_declare(
            "ad".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 404);

    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "mine".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (c2, other) = channel(&b).await;
    let e = other
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 405);
    c.close(200, "".into()).await.unwrap();
    let ch3 = c2.create_channel().await.unwrap();
    let e = ch3
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 404);
    b.stop().await;
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers() {
    let b = broker().await;
    let (_c, ch) = channel(&b).await;
    declare(&ch, "doomed").await;
    let mut cons = consume(&ch, "doomed", true).await;
    let (_c2, ch2) = channel(&b).await;
    let n = ch2
        .queue_delete("doomed".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(n, 0);
    let end = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        futures_lite::StreamExt::next(&mut cons),
    )
    .await
    .expect("cancel in time");
    assert!(end.is_none(), "consumer stream ends on basic.cancel");
    b.stop().await;
}

/// Issue 11: basic.get on a paged queue read the store with `block_in_place`, blocking a
/// runtime thread (and on a current-thread runtime it answered get-empty). The reader now
/// awaits the read. This test runs on a current-thread runtime on purpose.
#[tokio::test]
async fn get_on_a_paged_queue_awaits_the_store() {
    let faults = warren_storage::Faults::new();
    let f = faults.clone();
    let b = broker_with(move |c| {
        c.cache_memory = 256 * 1024;
        c.faults = Some(f);
    })
    .await;
    // Several store windows (1,024 messages or 4 MiB each) of 1 KiB messages.
    const N: u32 = 5000;
    let (_c, ch) = channel(&b).await;
    declare(&ch, "paged-get").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = vec![b'x'; 1024];
    let mut confirms = Vec::new();
    for i in 0..N {
        let mut m = i.to_be_bytes().to_vec();
        m.extend_from_slice(&body);
        confirms.push(
            ch.basic_publish(
                "".into(),
                "paged-get".into(),
                BasicPublishOptions::default(),
                &m,
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }
    // A slow store: the background loader is still reading when basic.get finds the head
    // empty.
    faults.set_read_delay(std::time::Duration::from_millis(50));
    for i in 0..N {
        let m = ch
            .basic_get("paged-get".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("message {i}: get-empty on a queue holding it"));
        assert_eq!(m.delivery.data[..4], i.to_be_bytes(), "order");
    }
    assert!(ch
        .basic_get("paged-get".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_none());
    b.stop().await;
}
