//! Store faults injected through the storage seam (`warren_storage::Faults`) into an
//! in-process broker: an outage holds confirms until the store is back, a write the store
//! refuses for good nacks only its publisher (and closes, with 541, a connection whose held
//! reply depends on it), a lost commit answer neither loses nor doubles, and a stopped writer
//! never confirms.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use lapin::{options::*, types::FieldTable, BasicProperties, Channel};
use warren_storage::Faults;

async fn setup(faults: &Arc<Faults>) -> (warren_broker::Running, lapin::Connection, Channel) {
    let f = faults.clone();
    let b = broker_with(move |c| c.faults = Some(f)).await;
    let (c, ch) = setup_channel(&b).await;
    (b, c, ch)
}

async fn publish(ch: &Channel, key: &str) -> lapin::PublisherConfirm {
    ch.basic_publish(
        "amq.direct".into(),
        key.into(),
        BasicPublishOptions::default(),
        key.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_holds_confirms_until_the_store_is_back() {
    let faults = Faults::new();
    let (b, _c, ch) = setup(&faults).await;
    faults.set_outage(true);
    let confirm = publish(&ch, "good").await;
    let early = tokio::time::timeout(Duration::from_millis(400), confirm).await;
    assert!(early.is_err(), "confirmed during the outage");
    faults.set_outage(false);
    let confirm = publish(&ch, "good").await;
    let c = tokio::time::timeout(Duration::from_secs(10), confirm)
        .await
        .expect("confirmed once the store is back")
        .unwrap();
    assert!(c.is_ack());
    b.stop().await;
}

/// Issue 11: commit failures were retried forever whatever the error; a refused write now
/// nacks its publisher and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_nacks_only_its_publish() {
    let faults = Faults::new();
    let (b, _c, ch) = setup(&faults).await;
    faults.reject_routing_key(Some("bad"));
    let confirms = vec![
        publish(&ch, "good").await,
        publish(&ch, "bad").await,
        publish(&ch, "good").await,
    ];
    let mut acks = Vec::new();
    for c in confirms {
        let c = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("an answer, not an endless retry")
            .unwrap();
        acks.push(c.is_ack());
    }
    assert_eq!(acks, vec![true, false, true]);
    faults.reject_routing_key(None);
    let c = publish(&ch, "bad").await.await.unwrap();
    assert!(c.is_ack(), "the writer keeps going");
    b.stop().await;
}

/// A reply held for the store (tx.commit-ok, a durable queue's declare-ok) went out even when
/// the store had refused the write it stands for. Now the connection is closed with 541
/// instead, whichever of the reply's writes was refused, and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_whose_write_the_store_refused_closes_with_541() {
    let faults = Faults::new();
    let (b, _c, ch) = setup(&faults).await;
    faults.reject_routing_key(Some("bad"));
    let (_c1, tx) = channel(&b).await;
    tx.tx_select().await.unwrap();
    // The refused message is not the transaction's last write.
    for key in ["bad", "good"] {
        tx.basic_publish(
            "amq.direct".into(),
            key.into(),
            BasicPublishOptions::default(),
            key.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    let e = tokio::time::timeout(Duration::from_secs(10), tx.tx_commit())
        .await
        .expect("an answer")
        .expect_err("commit-ok for a message the store refused");
    assert_eq!(code(&e), 541, "{e}");

    faults.reject_queue(Some("refused-q"));
    let (_c2, ch2) = channel(&b).await;
    let e = ch2
        .queue_declare(
            "refused-q".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("declare-ok for a queue the store refused");
    assert_eq!(code(&e), 541, "{e}");

    faults.reject_routing_key(None);
    faults.reject_queue(None);
    let c = publish(&ch, "good").await.await.unwrap();
    assert!(c.is_ack(), "other connections go on");
    b.stop().await;
}

/// After that 541 the connection acts on nothing more: a client that goes on sending, without
/// close-ok, has its frames ignored and its socket closed. The reader used to go on routing and
/// storing what came next until the client closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_reply_the_connection_acts_on_nothing_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warren_protocol::{
        encode::encode_frame,
        protocol::{queue, AMQPClass},
    };
    let faults = Faults::new();
    let (b, _c, ch) = setup(&faults).await;
    faults.reject_queue(Some("refused-q"));
    let mut s = handshake_to(&b, "/").await;
    open_channel(&mut s, 1).await;
    let mut declare = Vec::new();
    encode_frame(
        &mut declare,
        1,
        &AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "refused-q".into(),
            durable: true,
            ..Default::default()
        })),
    )
    .unwrap();
    s.write_all(&declare).await.unwrap();
    let (code, text) = read_until_close(&mut s).await;
    assert_eq!(code, 541, "{text}");
    // No close-ok: a publish to fq instead.
    s.write_all(&publish_frames("fq", false, b"after the close", 131_072))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the broker kept the socket open");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        count(&ch, "fq").await,
        0,
        "a publish after the close was routed"
    );
    b.stop().await;
}

/// A persistent message that reaches two durable queues is written once per queue. When the
/// store refused the first of those writes and took the second, the publisher got an ack: its
/// confirm judged the last write only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_is_nacked_when_any_of_its_queue_writes_is_refused() {
    let faults = Faults::new();
    let (b, _c, ch) = setup(&faults).await;
    faults.reject_positions_in(Some("fq-refused"));
    let durable = || QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("fq-refused".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    // Routing orders a message's queues by address: the refused queue's write must come
    // first, so its partner is a queue that sorts after it.
    let vhost = b.broker.vhost("/").unwrap();
    let address = |name: &str| Arc::as_ptr(&vhost.queue(name).unwrap()) as usize;
    let mut partner = None;
    for i in 0..32 {
        let name = format!("fq-partner-{i}");
        ch.queue_declare(name.as_str().into(), durable(), FieldTable::default())
            .await
            .unwrap();
        if address(&name) > address("fq-refused") {
            partner = Some(name);
            break;
        }
    }
    let partner = partner.expect("a queue allocated after the refused one");
    for q in ["fq-refused", partner.as_str()] {
        ch.queue_bind(
            q.into(),
            "amq.direct".into(),
            "both".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let c = tokio::time::timeout(Duration::from_secs(10), publish(&ch, "both").await)
        .await
        .expect("an answer")
        .unwrap();
    assert!(!c.is_ack(), "acked although one of its writes was refused");
    faults.reject_positions_in(None);
    let c = publish(&ch, "good").await.await.unwrap();
    assert!(c.is_ack(), "the writer keeps going");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_answer_neither_loses_nor_doubles() {
    let faults = Faults::new();
    let (b, _c, ch) = setup(&faults).await;
    faults.lose_answers(3);
    for _ in 0..3 {
        let c = publish(&ch, "good").await.await.unwrap();
        assert!(c.is_ack());
    }
    let config_dir = b.broker.config.data_dir.clone();
    b.stop().await;
    let mut config = warren_broker::Config::for_tests();
    config.data_dir = config_dir;
    let b = warren_broker::start(config).await.unwrap();
    let (_c, ch) = channel(&b).await;
    let n = ch
        .queue_declare(
            "fq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(n, 3);
    b.stop().await;
}

/// Issue 11: `Writer::submit` answered 0 ("nothing to wait for") once the writer was gone,
/// so a persistent publish would have been confirmed at once without being stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_writer_never_confirms() {
    let faults = Faults::new();
    let (b, _c, ch) = setup(&faults).await;
    b.broker.persist.writer.close();
    let confirm = publish(&ch, "good").await;
    let r = tokio::time::timeout(Duration::from_millis(500), confirm).await;
    assert!(r.is_err(), "confirmed without being stored: {r:?}");
    b.stop().await;
}

/// Issue 15: a persistent message that every durable queue holding it has had acknowledged is
/// confirmed without waiting for its commit (RabbitMQ confirms such a message too); one that a
/// queue still holds waits for the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acked_everywhere_is_confirmed_before_its_commit() {
    use futures_lite::StreamExt;
    let faults = Faults::new();
    let (b, c, ch) = setup(&faults).await;
    ch.queue_declare(
        "fq2".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in ["fq", "fq2"] {
        ch.queue_bind(
            q.into(),
            "amq.direct".into(),
            "both".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    // A consumer on fq acks everything it gets.
    let consumer_ch = c.create_channel().await.unwrap();
    let mut consumer = consumer_ch
        .basic_consume(
            "fq".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let acker = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    // Nothing commits from here on.
    faults.set_outage(true);
    let confirm = publish(&ch, "good").await;
    let c1 = tokio::time::timeout(Duration::from_secs(5), confirm)
        .await
        .expect("acked by its only queue: confirmed while the store is out")
        .unwrap();
    assert!(c1.is_ack());
    // In two queues, acked in one: it waits.
    let confirm = publish(&ch, "both").await;
    tokio::pin!(confirm);
    let early = tokio::time::timeout(Duration::from_millis(400), &mut confirm).await;
    assert!(
        early.is_err(),
        "confirmed while fq2 still holds it uncommitted"
    );
    // Acked in fq2 too: confirmed.
    let getter = c.create_channel().await.unwrap();
    let got = getter
        .basic_get("fq2".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("fq2 holds it");
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    let c2 = tokio::time::timeout(Duration::from_secs(5), &mut confirm)
        .await
        .expect("acked everywhere: confirmed while the store is out")
        .unwrap();
    assert!(c2.is_ack());
    // Not acked anywhere (fq2 has no consumer): it waits for the store.
    consumer_ch.close(200, "bye".into()).await.unwrap();
    acker.await.unwrap();
    let confirm = publish(&ch, "both").await;
    tokio::pin!(confirm);
    let early = tokio::time::timeout(Duration::from_millis(400), &mut confirm).await;
    assert!(
        early.is_err(),
        "confirmed with nothing acked and nothing committed"
    );
    faults.set_outage(false);
    let c3 = tokio::time::timeout(Duration::from_secs(10), confirm)
        .await
        .expect("committed: confirmed")
        .unwrap();
    assert!(c3.is_ack());
    b.stop().await;
}

/// During a store outage the management API answers what writes nothing to the store (a
/// transient queue's declaration) at once, although other clients' persistent messages wait in
/// the writer; a durable queue's declaration is answered once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::async_yields_async)] // a publish yields its confirm, awaited later on purpose
async fn an_outage_holds_only_the_http_changes_that_wrote() {
    let faults = Faults::new();
    let f = faults.clone();
    let b = broker_with(move |c| {
        c.faults = Some(f);
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
    })
    .await;
    let api = format!("http://{}/api", b.http.unwrap());
    let (_c, ch) = setup_channel(&b).await;
    faults.set_outage(true);
    // Another client's persistent message now waits in the writer.
    let held = publish(&ch, "good").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put = |name: &str, durable: bool| {
        reqwest::Client::new()
            .put(format!("{api}/queues/%2f/{name}"))
            .basic_auth("guest", Some("guest"))
            .header("content-type", "application/json")
            .body(format!("{{\"durable\": {durable}}}"))
            .send()
    };
    let r = tokio::time::timeout(Duration::from_secs(5), put("http-transient", false))
        .await
        .expect("a transient declaration waited for the unreachable store")
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let durable = tokio::spawn(put("http-durable", true));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !durable.is_finished(),
        "a durable declaration was answered during the outage"
    );
    faults.set_outage(false);
    let r = tokio::time::timeout(Duration::from_secs(30), durable)
        .await
        .expect("the durable declaration was not answered after the outage")
        .unwrap()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert!(held.await.unwrap().is_ack());
    b.stop().await;
}

/// A confirm-mode channel, and the durable queue `fq` bound to amq.direct with the keys "good"
/// and "bad".
async fn setup_channel(b: &warren_broker::Running) -> (lapin::Connection, Channel) {
    let (c, ch) = channel(b).await;
    ch.queue_declare(
        "fq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for key in ["good", "bad"] {
        ch.queue_bind(
            "fq".into(),
            "amq.direct".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (c, ch)
}

/// A declare that finds a durable queue or exchange whose record is not committed yet (another
/// connection created it during a store outage) is answered once that record is, not before:
/// declare-ok means the entity survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declare_finding_an_uncommitted_durable_entity_waits_for_its_commit() {
    let faults = Faults::new();
    let (b, _c, _ch) = setup(&faults).await;
    faults.set_outage(true);
    let durable = || QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let xdurable = || ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut conns = Vec::new();
    let mut chans = Vec::new();
    for _ in 0..4 {
        let (c, ch) = channel(&b).await;
        conns.push(c);
        chans.push(ch);
    }
    let queue = |ch: Channel| {
        tokio::spawn(async move {
            ch.queue_declare("uncommitted-q".into(), durable(), FieldTable::default())
                .await
                .map(|_| ())
        })
    };
    let exchange = |ch: Channel| {
        tokio::spawn(async move {
            ch.exchange_declare(
                "uncommitted-x".into(),
                lapin::ExchangeKind::Direct,
                xdurable(),
                FieldTable::default(),
            )
            .await
        })
    };
    let created = [queue(chans[0].clone()), exchange(chans[1].clone())];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let found = [queue(chans[2].clone()), exchange(chans[3].clone())];
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, t) in created.iter().chain(found.iter()).enumerate() {
        assert!(
            !t.is_finished(),
            "declare {i} was answered before its record was committed"
        );
    }
    faults.set_outage(false);
    for t in created.into_iter().chain(found) {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("not answered after the outage")
            .unwrap()
            .unwrap();
    }
    b.stop().await;
}

/// A rejected delivery whose body the cache dropped is dead-lettered after its body is read
/// back from the store. A read that fails because the store is down is retried until the
/// store is back: before, the message was left in the store, out of its queue's memory, and
/// reached the dead-letter queue only after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_whose_body_read_fails_arrives_once_the_store_is_back() {
    let faults = Faults::new();
    let f = faults.clone();
    let b = broker_with(move |c| {
        c.faults = Some(f);
        // Over budget with one message: a delivery's body goes to the cache.
        c.cache_memory = 4096;
    })
    .await;
    let (_c, ch) = channel(&b).await;
    let d = dead_letter_pair_with_one_taken(&ch, "dlf-source", "dlf-target", &[b'd'; 8192]).await;
    // What the delivery wrote is committed; then the cache drops the body and the store
    // goes down.
    let w = &b.broker.persist.writer;
    assert!(w.wait(w.last_ticket()).await);
    b.broker.persist.cache.invalidate_all();
    faults.set_outage(true);
    d.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    faults.set_outage(false);
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut n = 0;
    for _ in 0..100 {
        n = ch
            .queue_declare("dlf-target".into(), passive, FieldTable::default())
            .await
            .unwrap()
            .message_count();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n, 1, "the dead letter did not arrive");
    let got = ch
        .basic_get("dlf-target".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the dead letter");
    assert_eq!(got.data, vec![b'd'; 8192]);
    b.stop().await;
}

/// The same for a binding: a bind that finds a durable binding whose record is not committed
/// yet (another connection made it during an outage) was answered at once; bind-ok now waits
/// for that record, as the first bind's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_finding_an_uncommitted_durable_binding_waits_for_its_commit() {
    let faults = Faults::new();
    let (b, _c, _ch) = setup(&faults).await;
    faults.set_outage(true);
    let bind = |ch: Channel| {
        tokio::spawn(async move {
            ch.queue_bind(
                "fq".into(),
                "amq.direct".into(),
                "during-outage".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        })
    };
    let (_c1, ch1) = channel(&b).await;
    let (_c2, ch2) = channel(&b).await;
    let created = bind(ch1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let found = bind(ch2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !created.is_finished(),
        "bind-ok before its record was committed"
    );
    assert!(
        !found.is_finished(),
        "a bind finding the uncommitted binding was answered before its record was committed"
    );
    faults.set_outage(false);
    for t in [created, found] {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("not answered after the outage")
            .unwrap()
            .unwrap();
    }
    b.stop().await;
}
