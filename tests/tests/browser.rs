//! The console's message endpoints: browse and search a queue without consuming it (messages in
//! memory and paged out to the store), list unacknowledged deliveries, move, copy, return to
//! origin and delete; a SIGKILL in the middle of a large move leaves each message in exactly
//! one of the two queues; and the console's page and assets are served.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use warren_broker::Running;

async fn broker_http(cache: Option<u64>) -> Running {
    broker_with(|c| {
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c.prometheus_listen = Default::default();
        if let Some(bytes) = cache {
            c.cache_memory = bytes;
        }
    })
    .await
}

fn base(b: &Running) -> String {
    format!("http://{}", b.http.unwrap())
}

async fn call(
    method: reqwest::Method,
    url: &str,
    user: (&str, &str),
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .request(method, url)
        .basic_auth(user.0, Some(user.1));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

const GUEST: (&str, &str) = ("guest", "guest");

async fn get(url: &str) -> Value {
    let (s, v) = call(reqwest::Method::GET, url, GUEST, None).await;
    assert_eq!(s, 200, "GET {url}: {v}");
    v
}

async fn post(url: &str, body: Value) -> Value {
    let (s, v) = call(reqwest::Method::POST, url, GUEST, Some(body)).await;
    assert_eq!(s, 200, "POST {url}: {v}");
    v
}

fn props(n: u64) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("n".into(), AMQPValue::LongLongInt(n as i64));
    h.insert(
        "colour".into(),
        AMQPValue::LongString(LongString::from(if n.is_multiple_of(2) {
            "red"
        } else {
            "blue"
        })),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(format!("m-{n}").into())
        .with_correlation_id(format!("c-{n}").into())
        .with_headers(h)
}

async fn durable(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

/// Publishes messages `range` to `queue` through the default exchange, with confirms.
async fn fill(ch: &Channel, queue: &str, range: std::ops::Range<u64>, body_len: usize) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut pending = Vec::new();
    for n in range {
        let mut body = format!("{{\"n\": {n}}}").into_bytes();
        body.resize(body_len.max(body.len()), b' ');
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props(n),
            )
            .await
            .unwrap(),
        );
        if pending.len() >= 200 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
}

/// Consumes everything in `queue` (acking), returning (n, redelivered) in delivery order.
async fn drain(ch: &Channel, queue: &str) -> Vec<(u64, bool)> {
    let mut c = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), c.next()).await {
        let v: Value = serde_json::from_slice(&d.data).unwrap();
        out.push((v["n"].as_u64().unwrap(), d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    ch.basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    out
}

/// Consumes (acking) as many messages as `queue` says it holds, each within 60 s, then checks
/// that nothing more comes; returns (n, redelivered) in delivery order.
async fn drain_counted(ch: &Channel, queue: &str) -> Vec<(u64, bool)> {
    let count = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    let mut c = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < count as usize {
        let d = tokio::time::timeout(Duration::from_secs(60), c.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{queue}: {} of {count} delivered, then none for 60 s",
                    out.len()
                )
            })
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&d.data).unwrap();
        out.push((v["n"].as_u64().unwrap(), d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    if let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), c.next()).await {
        panic!(
            "{queue}: more than its count: {:?}",
            String::from_utf8_lossy(&d.data)
        );
    }
    ch.basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    out
}

fn numbers(items: &Value) -> Vec<u64> {
    items["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let v: Value = serde_json::from_str(m["payload"].as_str().unwrap().trim()).unwrap();
            v["n"].as_u64().unwrap()
        })
        .collect()
}

/// Every message of a queue through the browser, following `next`.
async fn browse_all(b: &Running, queue: &str, count: usize) -> (Vec<u64>, Vec<Value>) {
    let mut from = 0u64;
    let (mut ns, mut items) = (Vec::new(), Vec::new());
    loop {
        let page = get(&format!(
            "{}/api/queues/%2F/{queue}/messages?from={from}&count={count}",
            base(b)
        ))
        .await;
        ns.extend(numbers(&page));
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next"].as_u64() {
            Some(n) => from = n,
            None => return (ns, items),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_in_memory_and_paged_messages_changes_nothing() {
    // A small cache: most of the 600 messages are paged out to the store.
    let b = broker_http(Some(64 * 1024)).await;
    let (_c, ch) = channel(&b).await;
    durable(&ch, "b1", FieldTable::default()).await;
    fill(&ch, "b1", 0..600, 300).await;
    let q = get(&format!("{}/api/queues/%2F/b1", base(&b))).await;
    assert_eq!(q["messages"], 600);
    assert!(
        q["messages_paged_out"].as_u64().unwrap() > 100,
        "the test needs paged messages: {q}"
    );

    // Pages of 70 follow the cursor through memory and the store, in order.
    let (ns, items) = browse_all(&b, "b1", 70).await;
    assert_eq!(ns, (0..600).collect::<Vec<_>>());
    let positions: Vec<u64> = items
        .iter()
        .map(|m| m["position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    assert!(items.iter().any(|m| m["paged"] == true));
    assert!(items.iter().any(|m| m["paged"] == false));
    let m5 = &items[5];
    assert_eq!(m5["properties"]["message_id"], "m-5");
    assert_eq!(m5["properties"]["headers"]["colour"], "blue");
    assert_eq!(m5["routing_key"], "b1");
    assert_eq!(m5["exchange"], "");
    assert_eq!(m5["redelivered"], false);
    assert_eq!(m5["payload_encoding"], "string");
    assert_eq!(m5["payload_bytes"], 300);

    // A page from the middle of the store part starts exactly there.
    let at = positions[450];
    let page = get(&format!(
        "{}/api/queues/%2F/b1/messages?from={at}&count=3&truncate=5",
        base(&b)
    ))
    .await;
    assert_eq!(page["items"][0]["position"], at);
    assert_eq!(page["items"][0]["payload"], "{\"n\":");
    assert_eq!(page["items"][0]["payload_truncated"], true);
    assert_eq!(page["items"].as_array().unwrap().len(), 3);

    // Nothing changed: same depth, and consumers get everything once, in order, not
    // redelivered.
    let q = get(&format!("{}/api/queues/%2F/b1", base(&b))).await;
    assert_eq!(q["messages"], 600);
    let got = drain(&ch, "b1").await;
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        (0..600).collect::<Vec<_>>()
    );
    assert!(
        got.iter().all(|g| !g.1),
        "browsing marked messages redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_is_bounded_and_matches_each_field() {
    let b = broker_http(Some(64 * 1024)).await;
    let (_c, ch) = channel(&b).await;
    durable(&ch, "s1", FieldTable::default()).await;
    fill(&ch, "s1", 0..400, 200).await;
    let url = |q: &str| format!("{}/api/queues/%2F/s1/messages?count=1000&{q}", base(&b));

    let r = get(&url("q=m-399&field=message_id")).await;
    assert_eq!(numbers(&r), vec![399]);
    assert_eq!(r["scanned"], 400);
    assert_eq!(r["next"], Value::Null);
    assert_eq!(
        numbers(&get(&url("q=c-301&field=correlation_id")).await),
        vec![301]
    );
    assert_eq!(numbers(&get(&url("q=n=42&field=header")).await), vec![42]);
    assert_eq!(
        numbers(&get(&url("q=red&field=header")).await).len(),
        200,
        "a bare value matches any header"
    );
    assert_eq!(
        numbers(&get(&url("q=%22n%22%3A%20399&field=body")).await),
        vec![399]
    );
    assert_eq!(
        numbers(&get(&url("q=s1&field=routing_key")).await).len(),
        400
    );
    assert_eq!(
        numbers(&get(&url("q=m-12")).await),
        vec![12, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129]
    );

    // A bounded scan says how far it got, and the next call goes on from there.
    let r = get(&url("q=red&field=header&scan=50")).await;
    assert_eq!(r["scanned"], 50);
    assert_eq!(numbers(&r).len(), 25);
    let next = r["next"].as_u64().unwrap();
    let r2 = get(&url(&format!("q=red&field=header&scan=50&from={next}"))).await;
    assert_eq!(numbers(&r2)[0], 50);

    // Bad requests.
    for q in [
        "count=0",
        "count=5000",
        "from=x",
        "q=a&field=nope",
        "scan=0",
        "encoding=rot13",
    ] {
        let (s, v) = call(reqwest::Method::GET, &url(q), GUEST, None).await;
        assert_eq!(s, 400, "{q}: {v}");
    }
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{}/api/queues/%2F/nope/messages", base(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_copying_and_deleting_keep_order_and_flags() {
    let b = broker_http(Some(64 * 1024)).await;
    let (_c, ch) = channel(&b).await;
    for q in ["m1", "m2", "m3"] {
        durable(&ch, q, FieldTable::default()).await;
    }
    // The loader brings one window (1,024) back into memory; the rest stays in the store.
    fill(&ch, "m1", 0..1500, 200).await;
    let (_, items) = browse_all(&b, "m1", 1000).await;
    let pos = |n: usize| items[n]["position"].as_u64().unwrap();
    let paged_at = items.iter().position(|m| m["paged"] == true).unwrap();
    assert!(paged_at < 1400, "the test needs paged messages");

    // Move one in memory and two paged ones to m2; they arrive in position order.
    let r = post(
        &format!("{}/api/queues/%2F/m1/messages/move", base(&b)),
        json!({"positions": [pos(1460), pos(3), pos(1480)], "queue": "m2"}),
    )
    .await;
    assert_eq!(r["done"], 3, "{r}");
    // Again: they are gone now.
    let r = post(
        &format!("{}/api/queues/%2F/m1/messages/move", base(&b)),
        json!({"positions": [pos(3)], "queue": "m2"}),
    )
    .await;
    assert_eq!((r["done"].as_u64(), r["gone"].as_u64()), (Some(0), Some(1)));

    // Copy by filter through an exchange: m1 keeps them.
    ch.queue_bind(
        "m3".into(),
        "amq.direct".into(),
        "copies".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let r = post(
        &format!("{}/api/queues/%2F/m1/messages/copy", base(&b)),
        json!({"q": "n=1", "field": "header", "exchange": "amq.direct", "routing_key": "copies"}),
    )
    .await;
    assert_eq!(r["done"], 1, "{r}");
    // Unroutable: nothing bound for that key, the message stays.
    let r = post(
        &format!("{}/api/queues/%2F/m1/messages/move", base(&b)),
        json!({"positions": [pos(10)], "exchange": "amq.direct", "routing_key": "nowhere"}),
    )
    .await;
    assert_eq!(r["unroutable"], 1, "{r}");
    // Delete two, one of them paged.
    let r = post(
        &format!("{}/api/queues/%2F/m1/messages/delete", base(&b)),
        json!({"positions": [pos(4), pos(1490)]}),
    )
    .await;
    assert_eq!(r["done"], 2, "{r}");

    // Errors: no destination, unknown destination, the source itself, no selection.
    let u = format!("{}/api/queues/%2F/m1/messages/move", base(&b));
    for (body, status) in [
        (json!({"positions": [1]}), 400),
        (json!({"positions": [1], "queue": "nope"}), 404),
        (json!({"positions": [1], "queue": "m1"}), 400),
        (json!({"queue": "m2"}), 400),
        (json!({"positions": "x", "queue": "m2"}), 400),
        (json!({"positions": [1], "exchange": "nope"}), 404),
    ] {
        let (s, v) = call(reqwest::Method::POST, &u, GUEST, Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {v}");
    }
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{}/api/queues/%2F/m1/messages/teleport", base(&b)),
        GUEST,
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(s, 404);

    // What each queue holds now, in order.
    let mut expect: Vec<u64> = (0..1500).collect();
    expect.retain(|n| ![3, 1460, 1480, 4, 1490].contains(n));
    let got = drain(&ch, "m1").await;
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), expect);
    assert!(got.iter().all(|g| !g.1));
    assert_eq!(
        drain(&ch, "m2").await,
        vec![(3, false), (1460, false), (1480, false)]
    );
    assert_eq!(drain(&ch, "m3").await, vec![(1, false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_redelivered_message_keeps_its_flag_and_the_rest_keep_theirs() {
    let b = broker_http(None).await;
    let (_c, ch) = channel(&b).await;
    durable(&ch, "r1", FieldTable::default()).await;
    durable(&ch, "r2", FieldTable::default()).await;
    fill(&ch, "r1", 0..5, 10).await;
    // Deliver 0 and 1, then requeue them: redelivered now.
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut c = consume(&ch, "r1", false).await;
    let _d0 = next(&mut c).await;
    let d1 = next(&mut c).await;
    // Who holds what: two deliveries on this consumer.
    let held = get(&format!("{}/api/queues/%2F/r1/unacked", base(&b))).await;
    let held = held.as_array().unwrap();
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(held[0]["consumer_tag"], c.tag().as_str());
    assert!(held[0]["delivered_at"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(held[0]["payload_bytes"], 10);
    // Browsing lists the ready ones only.
    let (ns, _) = browse_all(&b, "r1", 10).await;
    assert_eq!(ns, vec![2, 3, 4]);
    ch.basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    ch.basic_nack(
        d1.delivery_tag,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (ns, items) = browse_all(&b, "r1", 10).await;
    assert_eq!(ns, vec![0, 1, 2, 3, 4]);
    assert_eq!(items[0]["redelivered"], true);
    assert_eq!(items[2]["redelivered"], false);
    let r = post(
        &format!("{}/api/queues/%2F/r1/messages/move", base(&b)),
        json!({"positions": [items[1]["position"]], "queue": "r2"}),
    )
    .await;
    assert_eq!(r["done"], 1);
    assert_eq!(drain(&ch, "r2").await, vec![(1, true)]);
    assert_eq!(
        drain(&ch, "r1").await,
        vec![(0, true), (2, false), (3, false), (4, false)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_return_to_their_origin() {
    let b = broker_http(None).await;
    let (_c, ch) = channel(&b).await;
    durable(&ch, "dlq", FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString("dlq".into()),
    );
    durable(&ch, "work", args).await;
    fill(&ch, "work", 0..4, 10).await;
    // Reject two: they go to dlq with x-death naming "work".
    ch.basic_qos(4, BasicQosOptions::default()).await.unwrap();
    let mut c = consume(&ch, "work", false).await;
    for _ in 0..4 {
        let d = next(&mut c).await;
        let v: Value = serde_json::from_slice(&d.data).unwrap();
        if v["n"].as_u64().unwrap().is_multiple_of(2) {
            d.reject(BasicRejectOptions { requeue: false })
                .await
                .unwrap();
        } else {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    ch.basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (ns, items) = browse_all(&b, "dlq", 10).await;
    assert_eq!(ns, vec![0, 2]);
    let death = &items[0]["properties"]["headers"]["x-death"][0];
    assert_eq!(death["queue"], "work");
    assert_eq!(death["reason"], "rejected");
    assert_eq!(items[0]["routing_key"], "dlq");
    // Return both to where they died, by filter (all of the queue).
    let r = post(
        &format!("{}/api/queues/%2F/dlq/messages/return", base(&b)),
        json!({"all": true}),
    )
    .await;
    assert_eq!(r["done"], 2, "{r}");
    let (ns, items) = browse_all(&b, "work", 10).await;
    assert_eq!(ns, vec![0, 2]);
    assert_eq!(items[0]["routing_key"], "work", "the original routing key");
    assert_eq!(items[0]["exchange"], "");
    assert!(browse_all(&b, "dlq", 10).await.0.is_empty());
    // A message that was never dead-lettered has no origin: it stays.
    fill(&ch, "dlq", 10..11, 10).await;
    let r = post(
        &format!("{}/api/queues/%2F/dlq/messages/return", base(&b)),
        json!({"all": true}),
    )
    .await;
    assert_eq!(r["unroutable"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitoring_user_browses_but_cannot_change_and_the_console_is_served() {
    let b = broker_http(None).await;
    let (_c, ch) = channel(&b).await;
    durable(&ch, "p1", FieldTable::default()).await;
    durable(&ch, "p2", FieldTable::default()).await;
    fill(&ch, "p1", 0..3, 10).await;
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{}/api/users/watcher", base(&b)),
        GUEST,
        Some(json!({"password": "w", "tags": "monitoring"})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        reqwest::Method::PUT,
        &format!("{}/api/permissions/%2F/watcher", base(&b)),
        GUEST,
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
    assert_eq!(s, 201);
    let w = ("watcher", "w");
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{}/api/queues/%2F/p1/messages", base(&b)),
        w,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    for action in ["move", "copy", "delete", "return"] {
        let (s, v) = call(
            reqwest::Method::POST,
            &format!("{}/api/queues/%2F/p1/messages/{action}", base(&b)),
            w,
            Some(json!({"all": true, "queue": "p2"})),
        )
        .await;
        assert_eq!(s, 401, "{action}: {v}");
    }
    assert_eq!(browse_all(&b, "p1", 10).await.0, vec![0, 1, 2]);
    // Without credentials: 401.
    let r = reqwest::get(format!("{}/api/queues/%2F/p1/messages", base(&b)))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    // From script (the console): no browser credentials prompt.
    let r = reqwest::Client::new()
        .get(format!("{}/api/whoami", base(&b)))
        .basic_auth("watcher", Some("wrong"))
        .header("x-requested-with", "XMLHttpRequest")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(!r.headers().contains_key("www-authenticate"));

    // The console: the page and its assets, embedded, with a strict content policy.
    let page = reqwest::get(format!("{}/", base(&b))).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    assert!(page.text().await.unwrap().contains("/console/app.js"));
    for (path, ct) in [
        ("console/app.js", "text/javascript"),
        ("console/app.css", "text/css"),
        (
            "console/vendor/uplot-1.6.32/uPlot.iife.min.js",
            "text/javascript",
        ),
        ("console/vendor/uplot-1.6.32/LICENSE", "text/plain"),
    ] {
        let r = reqwest::get(format!("{}/{path}", base(&b))).await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(ct));
        assert!(!r.bytes().await.unwrap().is_empty());
    }
    let r = reqwest::get(format!("{}/console/../Cargo.toml", base(&b)))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

// ----- a SIGKILL during a large move, against the binary -----

fn warren_bin() -> PathBuf {
    std::env::var_os("WARREN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/warren"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    amqp: String,
    http: String,
}

impl Server {
    async fn start(dir: &Path, storage: Option<&str>) -> Server {
        let (port, http) = (free_port(), free_port());
        let mut cmd = Command::new(warren_bin());
        cmd.arg("--amqp-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{http}"))
            .args(["--prometheus-listen", "", "--cache-memory", "1MiB"])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(s) = storage {
            cmd.args(["--storage", s]);
        }
        let child = cmd.spawn().expect("spawn warren");
        let deadline = Instant::now() + Duration::from_secs(120);
        while tokio::net::TcpStream::connect(("127.0.0.1", http))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "warren did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server {
            child,
            amqp: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            http: format!("http://127.0.0.1:{http}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn sigkill_during_a_large_move(storage: Option<&str>) {
    const N: u64 = 20_000;
    let dir = std::env::temp_dir().join(format!(
        "warren-move-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let s = Server::start(&dir, storage).await;
    let conn = Connection::connect(&s.amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in ["from", "to"] {
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        durable(&ch, q, FieldTable::default()).await;
    }
    fill(&ch, "from", 0..N, 200).await;
    let _ = conn.close(200, "bye".into()).await;

    // Move everything; kill the broker once part of it has arrived.
    let url = format!("{}/api/queues/%2F/from/messages/move", s.http);
    // The call fails when the broker dies under it.
    let mover = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .basic_auth("guest", Some("guest"))
            .json(&json!({"all": true, "queue": "to"}))
            .send()
            .await
            .map(|r| r.status())
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, q) = call(
            reqwest::Method::GET,
            &format!("{}/api/queues/%2F/to", s.http),
            GUEST,
            None,
        )
        .await;
        if q["messages"].as_u64().unwrap_or(0) >= N / 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the move did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    drop(s); // SIGKILL
    let moved = mover.await.unwrap();
    assert!(
        moved.is_err(),
        "the move finished before the kill: {moved:?}"
    );
    eprintln!("killed; the move call failed {:?} later", t.elapsed());

    let s = Server::start(&dir, storage).await;
    let conn = Connection::connect(&s.amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // As many as each queue says it holds: a paged queue's delivery may pause for seconds while
    // the store commits the acks before it (its loader waits for the writer), which an idle
    // timeout would take for the end.
    let from = drain_counted(&ch, "from").await;
    let to = drain_counted(&ch, "to").await;
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for (n, _) in from.iter().chain(to.iter()) {
        *seen.entry(*n).or_default() += 1;
    }
    let doubled: Vec<_> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(doubled.is_empty(), "in both queues: {doubled:?}");
    let lost: Vec<u64> = (0..N).filter(|n| !seen.contains_key(n)).collect();
    assert!(
        lost.is_empty(),
        "in neither queue: {} lost ({:?}..{:?}); from {} to {}",
        lost.len(),
        lost.first(),
        lost.last(),
        from.len(),
        to.len()
    );
    assert!(
        !to.is_empty() && !from.is_empty(),
        "the kill came mid-move: {} moved",
        to.len()
    );
    // Each queue is still in order.
    for part in [&from, &to] {
        assert!(part.windows(2).all(|w| w[0].0 < w[1].0));
    }
    eprintln!(
        "sigkill mid-move: {} moved, {} left, none lost or doubled",
        to.len(),
        from.len()
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_large_move_on_sqlite() {
    sigkill_during_a_large_move(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_large_move_on_mariadb() {
    let url = warren_storage::suite::mysql_scratch_url().await;
    eprintln!("scratch {url}");
    sigkill_during_a_large_move(Some(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_streams_samples_of_what_passes_an_exchange() {
    let b = broker_http(None).await;
    let (_c, ch) = channel(&b).await;
    durable(&ch, "t1", FieldTable::default()).await;
    ch.queue_bind(
        "t1".into(),
        "amq.topic".into(),
        "a.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/exchanges/%2F/amq.topic/tail", base(&b)))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    for (rk, body) in [("a.b", "one"), ("z", "two")] {
        ch.basic_publish(
            "amq.topic".into(),
            rk.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_message_id("tailed".into()),
        )
        .await
        .unwrap();
    }
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while text.matches("\n\n").count() < 2 {
        assert!(Instant::now() < deadline, "no samples: {text:?}");
        if let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(1), resp.chunk()).await
        {
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events[0]["routing_key"], "a.b");
    assert_eq!(events[0]["queues"], json!(["t1"]));
    assert_eq!(events[0]["payload"], "one");
    assert_eq!(events[0]["properties"]["message_id"], "tailed");
    assert_eq!(events[1]["routing_key"], "z");
    assert_eq!(events[1]["queues"], json!([]), "unroutable");
    // Reached through an exchange-to-exchange binding, a message is seen too.
    ch.exchange_bind(
        "amq.topic".into(),
        "amq.direct".into(),
        "a.c".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "amq.direct".into(),
        "a.c".into(),
        BasicPublishOptions::default(),
        b"three",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while text.matches("\n\n").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "no sample through the e2e binding: {text:?}"
        );
        if let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(1), resp.chunk()).await
        {
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
    let third: Value = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .nth(2)
        .map(|d| serde_json::from_str(d).unwrap())
        .unwrap();
    assert_eq!(third["payload"], "three");
    assert_eq!(third["queues"], json!(["t1"]));
    drop(resp);
    // The queue got its message as usual: watching takes nothing.
    let (_, page) = call(
        reqwest::Method::GET,
        &format!("{}/api/queues/%2F/t1/messages", base(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(page["items"][0]["payload"], "one");
    // Unknown exchange and vhost: 404.
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{}/api/exchanges/%2F/nope/tail", base(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 404);
}

/// Drop-head on a queue whose head is paged out owes its drops until the loader reads that
/// head. The browser waits for them, and does not show the messages they take: before, it
/// listed them, more messages than the queue's count. (Store reads are slowed, so the
/// loader's read is still under way when the browser looks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_hides_what_drop_head_owes_from_a_paged_head() {
    let faults = warren_storage::Faults::new();
    let b = broker_with(|c| {
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c.prometheus_listen = Default::default();
        // Two 2 KiB messages fill it: the rest page out.
        c.cache_memory = 4096;
        c.faults = Some(faults.clone());
    })
    .await;
    let (_c, ch) = channel(&b).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(3));
    durable(&ch, "owed", args).await;
    faults.set_read_delay(Duration::from_millis(1500));
    // 0 and 1 stay in memory and are dropped at once; 2, 3 and 4 are dropped from the paged
    // part, which the loader is still reading.
    fill(&ch, "owed", 0..8, 2048).await;
    assert_eq!(count(&ch, "owed").await, 3);
    let (ns, _) = browse_all(&b, "owed", 100).await;
    assert_eq!(ns, vec![5, 6, 7]);
    faults.set_read_delay(Duration::ZERO);
    assert_eq!(drain(&ch, "owed").await.len(), 3);
    b.stop().await;
}
