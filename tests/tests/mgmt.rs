//! The management HTTP API and the Prometheus endpoint, driven by real clients: the
//! `rabbitmq_http_client` crate (what rabbitmqadmin v2 is built on) for every endpoint it
//! covers, reqwest for exact status codes, headers and error bodies, and lapin over AMQP to
//! check that what the API created works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rabbitmq_http_client::api::Client;
use rabbitmq_http_client::password_hashing;
use rabbitmq_http_client::requests::{
    ExchangeParams, MessageProperties, Permissions, QueueParams, TopicPermissions, UserParams,
    VirtualHostParams,
};
use serde_json::{json, Value};
use warren_broker::{Config, Running};

async fn broker_http() -> Running {
    broker_with(|c| {
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c.prometheus_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
    })
    .await
}

fn api(b: &Running) -> String {
    format!("http://{}/api", b.http.unwrap())
}

fn client(b: &Running) -> Client<String, String, String> {
    Client::new(api(b), "guest".to_string(), "guest".to_string())
}

fn amqp_url(b: &Running, user: &str, pass: &str, vhost: &str) -> String {
    let v: String = vhost
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    format!("amqp://{user}:{pass}@{}/{v}", b.addr)
}

fn user_params<'a>(name: &'a str, hash: &'a str, tags: &'a str) -> UserParams<'a> {
    UserParams {
        name,
        password_hash: hash,
        tags,
    }
}

fn hash(password: &str) -> String {
    let salt = password_hashing::salt();
    password_hashing::base64_encoded_salted_password_hash_sha256(&salt, password)
}

/// Raw HTTP: status, headers and the JSON body.
async fn raw(
    method: reqwest::Method,
    url: &str,
    auth: Option<(&str, &str)>,
    body: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let http = reqwest::Client::new();
    let mut r = http.request(method, url);
    if let Some((u, p)) = auth {
        r = r.basic_auth(u, Some(p));
    }
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, v)
}

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_users_and_permissions_made_by_the_api_work_over_amqp() {
    let b = broker_http().await;
    let rc = client(&b);
    let overview = rc.overview().await.unwrap();
    assert_eq!(overview.node, rc.list_nodes().await.unwrap()[0].name);
    assert_eq!(rc.current_user().await.unwrap().name, "guest");

    let vp = VirtualHostParams {
        name: "v1",
        description: Some("first"),
        tags: Some(vec!["a", "b"]),
        default_queue_type: None,
        tracing: false,
    };
    rc.create_vhost(&vp).await.unwrap();
    let v = rc.get_vhost("v1").await.unwrap();
    assert_eq!(v.name, "v1");
    assert_eq!(v.description.as_deref(), Some("first"));
    let names: Vec<String> = rc
        .list_vhosts()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["/".to_string(), "v1".to_string()]);

    let h = hash("s3cret");
    rc.create_user(&user_params("alice", &h, "monitoring"))
        .await
        .unwrap();
    let alice = rc.get_user("alice").await.unwrap();
    assert_eq!(alice.name, "alice");
    assert_eq!(alice.password_hash, h);
    assert!(rc
        .list_users()
        .await
        .unwrap()
        .iter()
        .any(|u| u.name == "alice"));
    assert!(rc
        .list_users_without_permissions()
        .await
        .unwrap()
        .iter()
        .any(|u| u.name == "alice"));
    rc.declare_permissions(&Permissions {
        user: "alice",
        vhost: "v1",
        configure: "^alice\\.",
        read: ".*",
        write: ".*",
    })
    .await
    .unwrap();
    let p = rc.get_permissions("v1", "alice").await.unwrap();
    assert_eq!(p.configure, "^alice\\.");
    assert_eq!(rc.list_permissions_of("alice").await.unwrap().len(), 1);
    rc.declare_topic_permissions(&TopicPermissions {
        user: "alice",
        vhost: "v1",
        exchange: "amq.topic",
        write: "^a",
        read: ".*",
    })
    .await
    .unwrap();
    assert_eq!(
        rc.list_topic_permissions_of("alice").await.unwrap().len(),
        1
    );

    // The user the API made logs in over AMQP, into the vhost the API made, with the
    // permissions the API set.
    let conn = Connection::connect(
        &amqp_url(&b, "alice", "s3cret", "v1"),
        ConnectionProperties::default(),
    )
    .await
    .expect("alice logs in to v1");
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "alice.q").await;
    let ch2 = conn.create_channel().await.unwrap();
    let e = ch2
        .queue_declare(
            "bob.q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 403);
    let qs = rc.list_queues_in("v1").await.unwrap();
    assert_eq!(qs.len(), 1);
    assert_eq!(qs[0].name, "alice.q");
    // A monitoring user reads the API; it cannot manage users.
    let mon = Client::new(api(&b), "alice".to_string(), "s3cret".to_string());
    assert_eq!(mon.list_queues().await.unwrap().len(), 1);
    let (status, _, body) = raw(
        reqwest::Method::GET,
        &format!("{}/users", api(&b)),
        Some(("alice", "s3cret")),
        None,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"error": "not_authorised", "reason": "Not administrator user"})
    );

    // A password change through the API takes effect for the next login.
    let h2 = hash("changed");
    rc.create_user(&user_params("alice", &h2, "monitoring"))
        .await
        .unwrap();
    let e = Connection::connect(
        &amqp_url(&b, "alice", "s3cret", "v1"),
        ConnectionProperties::default(),
    )
    .await;
    assert!(e.is_err(), "the old password no longer works");
    Connection::connect(
        &amqp_url(&b, "alice", "changed", "v1"),
        ConnectionProperties::default(),
    )
    .await
    .expect("the new one does");

    rc.clear_permissions("v1", "alice", false).await.unwrap();
    assert!(rc.get_permissions("v1", "alice").await.is_err());
    rc.delete_user("alice", false).await.unwrap();
    assert!(rc.get_user("alice").await.is_err());
    assert!(rc.delete_user("alice", false).await.is_err());
    rc.delete_user("alice", true).await.unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_vhost_closes_its_connections_and_removes_its_entities() {
    let b = broker_http().await;
    let rc = client(&b);
    rc.create_vhost(&VirtualHostParams {
        name: "gone",
        description: None,
        tags: None,
        default_queue_type: None,
        tracing: false,
    })
    .await
    .unwrap();
    rc.grant_full_permissions("guest", "gone").await.unwrap();
    let conn = Connection::connect(
        &amqp_url(&b, "guest", "guest", "gone"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "durable.q".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut s = handshake_to(&b, "gone").await;
    // Both connections are open once the API lists them in the vhost (a connection is listed
    // from its accept on, but in a vhost only once connection.open has been taken).
    for _ in 0..200 {
        let (_, _, in_vhost) = raw(
            reqwest::Method::GET,
            &format!("{}/vhosts/gone/connections", api(&b)),
            GUEST,
            None,
        )
        .await;
        if in_vhost.as_array().is_some_and(|a| a.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rc.delete_vhost("gone", false).await.unwrap();
    let (code, text) = read_until_close(&mut s).await;
    assert_eq!(code, 320);
    assert_eq!(text, "CONNECTION_FORCED - vhost 'gone' is deleted");
    for _ in 0..100 {
        if !conn.status().connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!conn.status().connected());
    assert!(rc.get_vhost("gone").await.is_err());
    // Recreated, it is empty: the durable queue went with it.
    rc.create_vhost(&VirtualHostParams {
        name: "gone",
        description: None,
        tags: None,
        default_queue_type: None,
        tracing: false,
    })
    .await
    .unwrap();
    assert!(rc.list_queues_in("gone").await.unwrap().is_empty());
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_messages_and_bindings_through_the_api() {
    let b = broker_http().await;
    let rc = client(&b);
    let mut args = serde_json::Map::new();
    args.insert("x-max-length".into(), json!(100));
    rc.declare_queue(
        "/",
        &QueueParams::new_durable_classic_queue("api.q", Some(args)),
    )
    .await
    .unwrap();
    rc.declare_exchange("/", &ExchangeParams::durable_topic("api.x", None))
        .await
        .unwrap();
    rc.bind_queue("/", "api.q", "api.x", Some("a.#"), None)
        .await
        .unwrap();
    let bs = rc.list_queue_bindings("/", "api.q").await.unwrap();
    // The default exchange's implicit binding, then ours.
    assert_eq!(bs.len(), 2);
    assert!(bs
        .iter()
        .any(|x| x.source == "api.x" && x.routing_key == "a.#"));
    assert_eq!(
        rc.list_exchange_bindings_with_source("/", "api.x")
            .await
            .unwrap()
            .len(),
        1
    );

    let routed = rc
        .publish_message("/", "api.x", "a.b", "hello", MessageProperties::default())
        .await
        .unwrap();
    assert!(routed.routed);
    let routed = rc
        .publish_message("/", "api.x", "zzz", "nobody", MessageProperties::default())
        .await
        .unwrap();
    assert!(!routed.routed);
    let q = rc.get_queue_info("/", "api.q").await.unwrap();
    assert_eq!(q.message_count, 1);
    assert!(q.durable);
    let got = rc
        .get_messages("/", "api.q", 5, "ack_requeue_true")
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, "hello");
    assert_eq!(got[0].routing_key, "a.b");
    // Requeued: still there, and redelivered next time.
    let got = rc
        .get_messages("/", "api.q", 5, "ack_requeue_false")
        .await
        .unwrap();
    assert!(got[0].redelivered);
    assert_eq!(
        rc.get_queue_info("/", "api.q").await.unwrap().message_count,
        0
    );

    // The same over AMQP: what the API declared works for clients.
    let (_c, ch) = channel(&b).await;
    ch.basic_publish(
        "api.x".into(),
        "a.c".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut n = 0;
    for _ in 0..50 {
        n = rc.get_queue_info("/", "api.q").await.unwrap().message_count;
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(n, 1);
    rc.purge_queue("/", "api.q").await.unwrap();
    assert_eq!(
        rc.get_queue_info("/", "api.q").await.unwrap().message_count,
        0
    );

    rc.delete_exchange("/", "api.x", false).await.unwrap();
    assert!(rc.get_exchange_info("/", "api.x").await.is_err());
    rc.delete_queue("/", "api.q", false).await.unwrap();
    assert!(rc.get_queue_info("/", "api.q").await.is_err());
    rc.delete_queue("/", "api.q", true).await.unwrap();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_and_consumers_are_listed_and_closed() {
    let b = broker_http().await;
    let rc = client(&b);
    let (_conn, ch) = channel(&b).await;
    declare(&ch, "cq").await;
    ch.basic_qos(7, Default::default()).await.unwrap();
    let _consumer = consume(&ch, "cq", false).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        "cq".into(),
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let conns = rc.list_connections().await.unwrap();
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert_eq!(c.username, "guest");
    assert_eq!(c.protocol, "AMQP 0-9-1");
    assert_eq!(c.channel_count, 1);
    let chans = rc.list_channels().await.unwrap();
    assert_eq!(chans.len(), 1);
    assert_eq!(chans[0].prefetch_count, 7);
    let consumers = rc.list_consumers().await.unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0].queue.name, "cq");

    // Counters: the publish reached the channel, the queue and the node.
    let (_, _, q) = raw(
        reqwest::Method::GET,
        &format!("{}/queues/%2F/cq", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(q["message_stats"]["publish"], 1);
    assert_eq!(q["message_stats"]["deliver"], 1);
    assert_eq!(q["messages_unacknowledged"], 1);
    let (_, _, o) = raw(
        reqwest::Method::GET,
        &format!("{}/overview", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(o["message_stats"]["publish"], 1);
    assert_eq!(o["message_stats"]["confirm"], 1);
    assert_eq!(o["object_totals"]["consumers"], 1);
    assert_eq!(o["queue_totals"]["messages_unacknowledged"], 1);

    rc.close_connection(&c.name, None, false).await.unwrap();
    // A raw client sees the close and its text.
    let mut s = handshake_to(&b, "/").await;
    let raw_name = loop {
        let cs = rc.list_connections().await.unwrap();
        if let Some(x) = cs.iter().find(|x| x.name != c.name) {
            break x.name.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    rc.close_connection(&raw_name, Some("maintenance"), false)
        .await
        .unwrap();
    let (code, text) = read_until_close(&mut s).await;
    assert_eq!(code, 320);
    assert_eq!(text, "CONNECTION_FORCED - maintenance");
    drop(s);
    for _ in 0..50 {
        if rc.list_connections().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rc.list_connections().await.unwrap().is_empty());
    // The unacked message went back to the queue.
    assert_eq!(rc.get_queue_info("/", "cq").await.unwrap().message_count, 1);
    b.stop().await;
}

/// Rates are the growth of a counter over the sampling interval: 1,000 publishes over an
/// interval of 5 s read as 200/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_are_counter_growth_per_second() {
    let b = broker_http().await;
    let (_c, ch) = channel(&b).await;
    declare(&ch, "rq").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..1000 {
        ch.basic_publish(
            "".into(),
            "rq".into(),
            BasicPublishOptions::default(),
            b"r",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    b.broker.sample_rates(5.0);
    let (_, _, q) = raw(
        reqwest::Method::GET,
        &format!("{}/queues/%2F/rq", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(q["message_stats"]["publish_details"]["rate"], 200.0);
    assert_eq!(q["messages_details"]["rate"], 200.0);
    let (_, _, o) = raw(
        reqwest::Method::GET,
        &format!("{}/overview", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(o["message_stats"]["publish_details"]["rate"], 200.0);
    b.broker.sample_rates(5.0);
    let (_, _, q) = raw(
        reqwest::Method::GET,
        &format!("{}/queues/%2F/rq", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(q["message_stats"]["publish_details"]["rate"], 0.0);
    assert_eq!(q["message_stats"]["publish"], 1000);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_headers_and_error_bodies_are_rabbitmqs() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    let (s, h, body) = raw(M::GET, &format!("{a}/overview"), None, None).await;
    assert_eq!(s, 401);
    assert!(h["www-authenticate"].to_str().unwrap().starts_with("Basic"));
    assert_eq!(body, json!(""));
    let (s, h, body) = raw(
        M::GET,
        &format!("{a}/overview"),
        Some(("guest", "nope")),
        None,
    )
    .await;
    assert_eq!(s, 401);
    assert!(h.contains_key("www-authenticate"));
    assert_eq!(
        body,
        json!({"error": "not_authorized", "reason": "Login failed"})
    );
    // Reserved names are an access refusal: 401 "Access refused.", as RabbitMQ.
    let (s, _, body) = raw(M::PUT, &format!("{a}/queues/%2F/amq.x"), GUEST, Some("{}")).await;
    assert_eq!(
        (s, body),
        (
            401,
            json!({"error": "not_authorised", "reason": "Access refused."})
        )
    );
    let (s, _, body) = raw(M::GET, &format!("{a}/queues/%2F/nope"), GUEST, None).await;
    assert_eq!(s, 404);
    assert_eq!(
        body,
        json!({"error": "Object Not Found", "reason": "Not Found"})
    );
    let (s, _, _) = raw(M::GET, &format!("{a}/queues/novhost"), GUEST, None).await;
    assert_eq!(s, 404);
    let (s, _, body) = raw(
        M::PUT,
        &format!("{a}/queues/%2F/bad"),
        GUEST,
        Some("{not json"),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(body["error"], "bad_request");
    let (s, _, body) = raw(
        M::GET,
        &format!("{a}/queues?page=1&page_size=501"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(body["error"], "invalid_pagination_parameters");
    // Without page, page_size is ignored, as RabbitMQ does.
    let (s, _, _) = raw(M::GET, &format!("{a}/queues?page_size=501"), GUEST, None).await;
    assert_eq!(s, 200);
    let (s, _, _) = raw(
        M::GET,
        &format!("{a}/queues?page=1&name=(&use_regex=true"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 400);
    // PUT: 201 on create, 204 on update; a trailing slash is the same route.
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/queues/%2F/tq"),
        GUEST,
        Some("{\"durable\":false}"),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/queues/%2F/tq"),
        GUEST,
        Some("{\"durable\":false}"),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _, body) = raw(
        M::PUT,
        &format!("{a}/queues/%2F/tq"),
        GUEST,
        Some("{\"durable\":true}"),
    )
    .await;
    assert_eq!(s, 400, "an inequivalent redeclare is refused: {body}");
    assert_eq!(
        body["reason"],
        "inequivalent arg 'durable' for queue 'tq' in vhost '/': received 'true' but current is 'false'"
    );
    let (s, _, list) = raw(M::GET, &format!("{a}/queues/"), GUEST, None).await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().map(|l| l.len()), Some(1));
    // POST a binding: 201 with a Location ending in the binding's properties key.
    let (s, h, _) = raw(
        M::POST,
        &format!("{a}/bindings/%2F/e/amq.direct/q/tq"),
        GUEST,
        Some("{\"routing_key\":\"k 1\",\"arguments\":{}}"),
    )
    .await;
    assert_eq!(s, 201);
    let loc = h["location"].to_str().unwrap().to_string();
    assert_eq!(loc, "tq/k%201", "relative, as RabbitMQ's");
    let (_, _, bs) = raw(
        M::GET,
        &format!("{a}/bindings/%2F/e/amq.direct/q/tq"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(bs[0]["properties_key"], "k%201");
    let (s, _, _) = raw(
        M::DELETE,
        &format!("{a}/bindings/%2F/e/amq.direct/q/tq/k%201"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _, _) = raw(
        M::DELETE,
        &format!("{a}/bindings/%2F/e/amq.direct/q/tq/k%201"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 404);
    // The default exchange is amq.default in paths.
    let (s, _, x) = raw(
        M::GET,
        &format!("{a}/exchanges/%2F/amq.default"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(x["name"], "");
    // Pagination.
    for i in 0..7 {
        raw(M::PUT, &format!("{a}/queues/%2F/p{i}"), GUEST, Some("{}")).await;
    }
    let (_, _, page) = raw(
        M::GET,
        &format!("{a}/queues?page=2&page_size=3&name=p"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(page["total_count"], 8);
    assert_eq!(page["filtered_count"], 7);
    assert_eq!(page["page_count"], 3);
    assert_eq!(page["item_count"], 3);
    assert_eq!(page["items"][0]["name"], "p3");
    let (_, _, page) = raw(
        M::GET,
        &format!("{a}/queues?page=1&page_size=2&sort=name&sort_reverse=true&columns=name,vhost"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(page["items"][0], json!({"name": "tq", "vhost": "/"}));
    // Health checks.
    let (s, _, body) = raw(M::GET, &format!("{a}/health/checks/alarms"), GUEST, None).await;
    assert_eq!((s, body), (200, json!({"status": "ok"})));
    let port = b.addr.port();
    let (s, _, _) = raw(
        M::GET,
        &format!("{a}/health/checks/port-listener/{port}"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, body) = raw(
        M::GET,
        &format!("{a}/health/checks/port-listener/1"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(
        body,
        json!({"status": "failed", "reason": "No active listener", "missing": 1,
               "ports": [port, b.http.unwrap().port(), b.prometheus.unwrap().port()]})
    );
    for (proto, name) in [
        ("amqp", "amqp"),
        ("amqp091", "amqp"),
        ("AMQP", "amqp"),
        ("http", "http"),
        ("prometheus", "http/prometheus"),
        ("http/prometheus", "http/prometheus"),
    ] {
        let (s, _, body) = raw(
            M::GET,
            &format!(
                "{a}/health/checks/protocol-listener/{}",
                proto.replace('/', "%2F")
            ),
            GUEST,
            None,
        )
        .await;
        assert_eq!((s, body), (200, json!({"status": "ok", "protocol": name})));
    }
    for (bad, status) in [("abc", 400), ("99999", 503), ("-1", 503)] {
        let (s, _, body) = raw(
            M::GET,
            &format!("{a}/health/checks/port-listener/{bad}"),
            GUEST,
            None,
        )
        .await;
        assert_eq!(s, status, "{bad}: {body}");
        if status == 400 {
            assert_eq!(
                body,
                json!({"error": "bad_request", "reason": "Invalid port"})
            );
        } else {
            assert_eq!(body["missing"], json!(bad.parse::<i64>().unwrap()));
        }
    }
    let (s, _, body) = raw(
        M::GET,
        &format!("{a}/health/checks/protocol-listener/mqtt"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(
        body,
        json!({"status": "failed", "reason": "No active listener", "missing": "mqtt",
               "protocols": ["amqp", "http", "http/prometheus"]})
    );
    let (s, _, body) = raw(M::GET, &format!("{a}/aliveness-test/%2F"), GUEST, None).await;
    assert_eq!((s, body), (200, json!({"status": "ok"})));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_limits_are_enforced() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/vhost-limits/%2F/max-queues"),
        GUEST,
        Some("{\"value\":1}"),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/vhost-limits/%2F/max-connections"),
        GUEST,
        Some("{\"value\":1}"),
    )
    .await;
    assert_eq!(s, 204);
    let (_, _, l) = raw(M::GET, &format!("{a}/vhost-limits/%2F"), GUEST, None).await;
    assert_eq!(
        l,
        json!([{"vhost": "/", "value": {"max-queues": 1, "max-connections": 1}}])
    );
    let (_c, ch) = channel(&b).await;
    declare(&ch, "one").await;
    let e = ch
        .queue_declare(
            "two".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), 406);
    let e = Connection::connect(&b.url(), ConnectionProperties::default())
        .await
        .unwrap_err();
    assert_eq!(code(&e), 530);
    let (s, _, _) = raw(
        M::DELETE,
        &format!("{a}/vhost-limits/%2F/max-connections"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 204);
    Connection::connect(&b.url(), ConnectionProperties::default())
        .await
        .expect("the limit is gone");
    b.stop().await;
}

/// A Prometheus text-format (0.0.4) parser: every line is a comment or a sample; each family
/// has one TYPE, before its samples; returns sample -> value keyed by "name{labels}".
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let name = it.next().unwrap().to_string();
            let kind = it.next().unwrap().to_string();
            assert!(
                ["counter", "gauge", "untyped", "histogram", "summary"].contains(&kind.as_str()),
                "{line}"
            );
            assert!(
                types.insert(name.clone(), kind).is_none(),
                "family {name} twice"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap();
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line}"
        );
        assert!(types.contains_key(name), "sample before its TYPE: {line}");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(
            out.insert(key.to_string(), v).is_none(),
            "duplicate sample {key}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_have_rabbitmq_names_and_parse() {
    let b = broker_http().await;
    let (_c, ch) = channel(&b).await;
    declare(&ch, "mq").await;
    for _ in 0..3 {
        ch.basic_publish(
            "".into(),
            "mq".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let base = format!("http://{}", b.prometheus.unwrap());
    let mut m = HashMap::new();
    for _ in 0..50 {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        m = parse_prometheus(&text);
        if m.get("rabbitmq_queue_messages_ready") == Some(&3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m["rabbitmq_queue_messages_ready"], 3.0);
    assert_eq!(m["rabbitmq_connections"], 1.0);
    assert_eq!(m["rabbitmq_channels"], 1.0);
    assert_eq!(m["rabbitmq_queues"], 1.0);
    assert_eq!(
        m["rabbitmq_global_messages_received_total{protocol=\"amqp091\"}"],
        3.0
    );
    assert!(m
        .keys()
        .any(|k| k.starts_with("rabbitmq_identity_info{rabbitmq_node=")));
    assert!(m.keys().any(|k| k.starts_with("rabbitmq_build_info{")));
    assert!(m["rabbitmq_process_resident_memory_bytes"] > 0.0);
    let text = reqwest::get(format!("{base}/metrics/per-object"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = parse_prometheus(&text);
    assert_eq!(
        m["rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"mq\"}"],
        3.0
    );
    assert_eq!(
        m["rabbitmq_queue_messages_published_total{vhost=\"/\",queue=\"mq\"}"],
        3.0
    );
    let text = reqwest::get(format!(
        "{base}/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count"
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let m = parse_prometheus(&text);
    assert_eq!(
        m["rabbitmq_detailed_queue_messages_ready{vhost=\"/\",queue=\"mq\"}"],
        3.0
    );
    assert_eq!(
        m["rabbitmq_detailed_queue_consumers{vhost=\"/\",queue=\"mq\"}"],
        0.0
    );
    assert!(!m
        .keys()
        .any(|k| k.starts_with("rabbitmq_detailed_queue_messages_published")));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_apply_to_existing_and_new_queues_and_merge_as_rabbitmq() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    let (_c, ch) = channel(&b).await;
    // A queue with its own max-length 10 and dead-letter exchange, declared before any policy.
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(10),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("mine".into()),
    );
    ch.queue_declare("pol.a".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    for i in 0..8u8 {
        ch.basic_publish(
            "".into(),
            "pol.a".into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/policies/%2F/limits"),
        GUEST,
        Some(r#"{"pattern":"^pol[.]","apply-to":"queues","priority":1,
                 "definition":{"max-length":5,"dead-letter-exchange":"theirs","message-ttl":60000}}"#),
    )
    .await;
    assert_eq!(s, 201);
    // Applied at once to the existing queue: the lower max-length (5) wins and drops the head.
    let (_, _, q) = raw(M::GET, &format!("{a}/queues/%2F/pol.a"), GUEST, None).await;
    assert_eq!(q["policy"], "limits");
    assert_eq!(q["messages"], 5);
    assert_eq!(q["effective_policy_definition"]["max-length"], 5);
    // The queue's own dead-letter exchange wins over the policy's.
    assert_eq!(
        b.broker
            .vhost("/")
            .unwrap()
            .queue("pol.a")
            .unwrap()
            .args()
            .dead_letter_exchange
            .as_deref(),
        Some("mine")
    );
    // An operator policy with a lower limit wins over both.
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/operator-policies/%2F/cap"),
        GUEST,
        Some(r#"{"pattern":".*","apply-to":"queues","definition":{"max-length":3}}"#),
    )
    .await;
    assert_eq!(s, 201);
    let (_, _, q) = raw(M::GET, &format!("{a}/queues/%2F/pol.a"), GUEST, None).await;
    assert_eq!(q["operator_policy"], "cap");
    assert_eq!(q["messages"], 3);
    // A queue declared later gets the policies too, and message-ttl expires its messages.
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/policies/%2F/short"),
        GUEST,
        Some(r#"{"pattern":"^ttl[.]","apply-to":"queues","definition":{"message-ttl":50}}"#),
    )
    .await;
    assert_eq!(s, 201);
    declare(&ch, "ttl.q").await;
    ch.basic_publish(
        "".into(),
        "ttl.q".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, _, q) = raw(M::GET, &format!("{a}/queues/%2F/ttl.q"), GUEST, None).await;
    assert_eq!(q["policy"], "short");
    assert_eq!(q["messages"], 0, "expired by the policy's TTL");
    // Removing the policy restores the queue's own arguments.
    let (s, _, _) = raw(
        M::DELETE,
        &format!("{a}/operator-policies/%2F/cap"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _, _) = raw(M::DELETE, &format!("{a}/policies/%2F/limits"), GUEST, None).await;
    assert_eq!(s, 204);
    let (_, _, q) = raw(M::GET, &format!("{a}/queues/%2F/pol.a"), GUEST, None).await;
    assert_eq!(q["policy"], Value::Null);
    assert_eq!(
        b.broker
            .vhost("/")
            .unwrap()
            .queue("pol.a")
            .unwrap()
            .args()
            .max_length,
        Some(10)
    );
    // Listing and validation.
    let (_, _, l) = raw(M::GET, &format!("{a}/policies"), GUEST, None).await;
    assert_eq!(l.as_array().map(|l| l.len()), Some(1));
    assert_eq!(l[0]["name"], "short");
    assert_eq!(l[0]["vhost"], "/");
    assert_eq!(l[0]["apply-to"], "queues");
    let (s, _, body) = raw(
        M::PUT,
        &format!("{a}/policies/%2F/bad"),
        GUEST,
        Some(r#"{"pattern":".*","definition":{"no-such-key":1}}"#),
    )
    .await;
    assert_eq!(s, 400);
    assert!(body["reason"]
        .as_str()
        .unwrap()
        .contains("are not recognised policy settings"));
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/policies/%2F/bad"),
        GUEST,
        Some(r#"{"pattern":"(","definition":{"max-length":1}}"#),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/operator-policies/%2F/bad"),
        GUEST,
        Some(r#"{"pattern":".*","definition":{"dead-letter-exchange":"x"}}"#),
    )
    .await;
    assert_eq!(s, 400);
    b.stop().await;
}

/// A policy survives a restart (it is a stored parameter) and applies to recovered queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_survive_a_restart() {
    let b = broker_http().await;
    let dir = b.broker.config.data_dir.clone();
    let a = api(&b);
    let (s, _, _) = raw(
        reqwest::Method::PUT,
        &format!("{a}/policies/%2F/keep"),
        GUEST,
        Some(r#"{"pattern":"^d[.]","definition":{"max-length":2}}"#),
    )
    .await;
    assert_eq!(s, 201);
    let (_c, ch) = channel(&b).await;
    ch.queue_declare(
        "d.q".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    drop(ch);
    b.stop().await;
    let b = broker_with(|c| {
        c.data_dir = dir.clone();
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
    })
    .await;
    let (_, _, q) = raw(
        reqwest::Method::GET,
        &format!("{}/queues/%2F/d.q", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(q["policy"], "keep");
    assert_eq!(
        b.broker
            .vhost("/")
            .unwrap()
            .queue("d.q")
            .unwrap()
            .args()
            .max_length,
        Some(2)
    );
    b.stop().await;
}

/// A definitions file exported by RabbitMQ 3.10 (captured from Debian's rabbitmq-server)
/// imports into Warren: its users log in with their passwords (the hashes are RabbitMQ's), its
/// vhosts, permissions, policies, limits, queues, exchanges and bindings exist; Warren's own
/// export then imports into a fresh Warren and exports the same again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_from_rabbitmq_import_and_round_trip() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    let file = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/rabbitmq-3.10-definitions.json"),
    )
    .unwrap();
    let (s, _, body) = raw(M::POST, &format!("{a}/definitions"), GUEST, Some(&file)).await;
    assert_eq!(s, 204, "{body}");
    // alice's password is "secret" in the RabbitMQ that exported the file.
    let c = Connection::connect(
        &amqp_url(&b, "alice", "secret", "/"),
        ConnectionProperties::default(),
    )
    .await
    .expect("a user imported from RabbitMQ logs in");
    drop(c);
    let rc = client(&b);
    assert_eq!(
        rc.get_queue_info("/", "q1")
            .await
            .unwrap()
            .arguments
            .0
            .get("x-message-ttl"),
        Some(&json!(3600000))
    );
    let (_, _, q1) = raw(M::GET, &format!("{a}/queues/%2F/q1"), GUEST, None).await;
    assert_eq!(q1["policy"], "p1");
    assert_eq!(q1["operator_policy"], "op1");
    let (_, _, l) = raw(M::GET, &format!("{a}/vhost-limits/v1"), GUEST, None).await;
    assert_eq!(l[0]["value"]["max-connections"], 10);
    assert_eq!(
        rc.list_exchange_bindings_with_source("/", "ex1")
            .await
            .unwrap()
            .len(),
        2
    );

    let (s, _, exported) = raw(M::GET, &format!("{a}/definitions"), GUEST, None).await;
    assert_eq!(s, 200);
    for key in [
        "users",
        "vhosts",
        "permissions",
        "topic_permissions",
        "parameters",
        "global_parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    ] {
        assert!(exported[key].is_array(), "{key} missing");
    }
    let b2 = broker_http().await;
    let (s, _, body) = raw(
        M::POST,
        &format!("{}/definitions", api(&b2)),
        GUEST,
        Some(&exported.to_string()),
    )
    .await;
    assert_eq!(s, 204, "{body}");
    let (_, _, again) = raw(M::GET, &format!("{}/definitions", api(&b2)), GUEST, None).await;
    for key in [
        "vhosts",
        "permissions",
        "topic_permissions",
        "parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    ] {
        assert_eq!(
            again[key], exported[key],
            "{key} differs after a round trip"
        );
    }
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&again["users"]), names(&exported["users"]));
    // One vhost's definitions carry no vhost members and no users.
    let (_, _, one) = raw(M::GET, &format!("{a}/definitions/%2F"), GUEST, None).await;
    assert!(one.get("users").is_none());
    assert!(one["queues"][0].get("vhost").is_none());
    // A bad file is refused with 400 and a reason naming the object.
    let (s, _, body) = raw(
        M::POST,
        &format!("{a}/definitions"),
        GUEST,
        Some(r#"{"queues":[{"name":"bad","vhost":"nope","durable":true}]}"#),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        body["reason"].as_str().unwrap().contains("queue 'bad'"),
        "{body}"
    );
    b.stop().await;
    b2.stop().await;
}

/// `--load-definitions` at start creates what is missing and leaves existing objects alone
/// (RabbitMQ 4.x's vhost metadata form is read too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_definitions_at_start_creates_only_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("warren-defs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("defs.json");
    let defs = json!({
        "users": [{"name": "app", "password": "app-pw", "tags": "management"}],
        "vhosts": [{"name": "prod", "metadata": {"description": "production", "tags": ["a"]}}],
        "permissions": [{"user": "app", "vhost": "prod", "configure": ".*", "write": ".*", "read": ".*"}],
        "queues": [{"name": "jobs", "vhost": "prod", "durable": true, "auto_delete": false,
                    "arguments": {"x-max-length": 100}}],
        "exchanges": [{"name": "work", "vhost": "prod", "type": "direct", "durable": true,
                       "auto_delete": false, "internal": false, "arguments": {}}],
        "bindings": [{"source": "work", "vhost": "prod", "destination": "jobs",
                      "destination_type": "queue", "routing_key": "jobs", "arguments": {}}],
        "policies": [{"vhost": "prod", "name": "cap", "pattern": "^jobs$", "apply-to": "queues",
                      "definition": {"max-length": 50}, "priority": 0}]
    });
    std::fs::write(&file, defs.to_string()).unwrap();
    let data = Config::for_tests().data_dir;
    let start = |f: std::path::PathBuf, d: std::path::PathBuf| {
        broker_with(move |c| {
            c.data_dir = d;
            c.load_definitions = Some(f);
            c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        })
    };
    let b = start(file.clone(), data.clone()).await;
    let c = Connection::connect(
        &amqp_url(&b, "app", "app-pw", "prod"),
        ConnectionProperties::default(),
    )
    .await
    .expect("the user the file defines logs in");
    let ch = c.create_channel().await.unwrap();
    ch.basic_publish(
        "work".into(),
        "jobs".into(),
        BasicPublishOptions::default(),
        b"j",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let (_, _, q) = raw(
        reqwest::Method::GET,
        &format!("{}/queues/prod/jobs", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(q["policy"], "cap");
    let (_, _, v) = raw(
        reqwest::Method::GET,
        &format!("{}/vhosts/prod", api(&b)),
        GUEST,
        None,
    )
    .await;
    assert_eq!(v["description"], "production");
    drop(c);
    // An operator changes the password; a restart with the same file keeps the change.
    let (s, _, _) = raw(
        reqwest::Method::PUT,
        &format!("{}/users/app", api(&b)),
        GUEST,
        Some(r#"{"password":"changed","tags":"management"}"#),
    )
    .await;
    assert_eq!(s, 204);
    b.stop().await;
    let b = start(file.clone(), data.clone()).await;
    Connection::connect(
        &amqp_url(&b, "app", "changed", "prod"),
        ConnectionProperties::default(),
    )
    .await
    .expect("the existing user was left alone");
    b.stop().await;
    // A file that does not parse stops the start.
    std::fs::write(&file, "{not json").unwrap();
    assert!(warren_broker::start({
        let mut c = Config::for_tests();
        c.load_definitions = Some(file.clone());
        c
    })
    .await
    .is_err());
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_parameters_api_as_rabbitmq() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    let put = |path: &str, body: &str| {
        let url = format!("{a}{path}");
        let body = body.to_string();
        async move { raw(M::PUT, &url, GUEST, Some(&body)).await }
    };
    let (s, _, _) = put(
        "/policies/%2F/p1",
        r#"{"pattern":"^q","definition":{"max-length":5}}"#,
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, _) = put(
        "/parameters/operator_policy/%2F/op1",
        r#"{"value":{"pattern":"^q","definition":{"max-length-bytes":1048576},"priority":0,"apply-to":"queues"}}"#,
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, _) = put(
        "/parameters/vhost-limits/%2F/limits",
        r#"{"value":{"max-queues":100}}"#,
    )
    .await;
    assert_eq!(s, 201);
    // The full list leaves user policies out; by component they are listed.
    let (s, _, all) = raw(M::GET, &format!("{a}/parameters"), GUEST, None).await;
    assert_eq!(s, 200);
    let components: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["component"].as_str().unwrap())
        .collect();
    assert_eq!(components, vec!["operator_policy", "vhost-limits"]);
    let (_, _, one) = raw(
        M::GET,
        &format!("{a}/parameters/vhost-limits/%2F/limits"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(
        one,
        json!({"value": {"max-queues": 100}, "vhost": "/", "component": "vhost-limits", "name": "limits"})
    );
    let (_, _, pols) = raw(M::GET, &format!("{a}/parameters/policy"), GUEST, None).await;
    assert_eq!(pols[0]["name"], "p1");
    let (_, _, none) = raw(M::GET, &format!("{a}/parameters/foo"), GUEST, None).await;
    assert_eq!(none, json!([]));
    let (_, _, limits) = raw(M::GET, &format!("{a}/vhost-limits/%2F"), GUEST, None).await;
    assert_eq!(
        limits,
        json!([{"vhost": "/", "value": {"max-queues": 100}}])
    );

    // RabbitMQ's refusals, texts included.
    for (path, body, want) in [
        (
            "/parameters/federation-upstream/%2F/up1",
            r#"{"value":{"uri":"amqp://x"}}"#,
            json!({"error": "bad_request", "reason": "Validation failed\n\ncomponent federation-upstream not found\n"}),
        ),
        (
            "/parameters/policy/%2F/pp1",
            r#"{"value":{"pattern":"x","definition":{}}}"#,
            json!({"error": "bad_request", "reason": "policies may not be set using this method"}),
        ),
        (
            "/parameters/vhost-limits/%2F/limits",
            r#"{"valu":{}}"#,
            json!({"error": "bad_request", "reason": "[{key_missing,value}]"}),
        ),
        (
            "/parameters/vhost-limits/%2F/limits",
            r#"{"value":{"max-bogus":5}}"#,
            json!({"error": "bad_request", "reason": "Validation failed\n\nUnrecognised terms [{&lt;&lt;\"max-bogus\"&gt;&gt;,5}] in limits\n"}),
        ),
        (
            "/parameters/vhost-limits/%2F/limits",
            r#"{"value":{"max-connections":"five"}}"#,
            json!({"error": "bad_request", "reason": "Validation failed\n\nmax-connections should be a number, actually was &lt;&lt;\"five\"&gt;&gt;\n"}),
        ),
        (
            "/vhost-limits/%2F/max-queues",
            r#"{"value":"x"}"#,
            json!({"error": "bad_request", "reason": "Validation failed\n\nmax-queues should be a number, actually was <<\"x\">>\n"}),
        ),
        (
            "/vhost-limits/%2F/max-foo",
            r#"{"value":1}"#,
            json!({"error": "bad_request", "reason": "Validation failed\n\nUnrecognised terms [{<<\"max-foo\">>,1}] in limits\n"}),
        ),
    ] {
        let (s, _, body) = put(path, body).await;
        assert_eq!((s, body), (400, want), "{path}");
    }
    let (s, _, body) = put(
        "/parameters/vhost-limits/nosuchvhost/limits",
        r#"{"value":{}}"#,
    )
    .await;
    assert_eq!(
        (s, body),
        (
            404,
            json!({"error": "not_found", "reason": "vhost_not_found"})
        )
    );

    // Monitoring users may not read parameters; policymakers may, and may set limits.
    for (user, tags) in [("mon", "monitoring"), ("pol", "policymaker")] {
        let (s, _, _) = put(
            &format!("/users/{user}"),
            &format!(r#"{{"password":"pw","tags":"{tags}"}}"#),
        )
        .await;
        assert_eq!(s, 201);
        put(
            &format!("/permissions/%2F/{user}"),
            r#"{"configure":".*","write":".*","read":".*"}"#,
        )
        .await;
    }
    let (s, _, body) = raw(
        M::GET,
        &format!("{a}/parameters"),
        Some(("mon", "pw")),
        None,
    )
    .await;
    assert_eq!(
        (s, body),
        (
            401,
            json!({"error": "not_authorised", "reason": "User not authorised to access object"})
        )
    );
    let (s, _, _) = raw(
        M::PUT,
        &format!("{a}/parameters/vhost-limits/%2F/limits"),
        Some(("pol", "pw")),
        Some(r#"{"value":{"max-queues":50}}"#),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _, _) = raw(
        M::DELETE,
        &format!("{a}/parameters/vhost-limits/%2F/limits"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _, _) = raw(
        M::DELETE,
        &format!("{a}/parameters/vhost-limits/%2F/limits"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, _, limits) = raw(M::GET, &format!("{a}/vhost-limits"), GUEST, None).await;
    assert_eq!(limits, json!([]));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limits_are_set_through_the_api_and_enforced() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    let put = |path: &str, body: &str| {
        let url = format!("{a}{path}");
        let body = body.to_string();
        async move { raw(M::PUT, &url, GUEST, Some(&body)).await }
    };
    put("/users/lim", r#"{"password":"pw","tags":""}"#).await;
    put(
        "/permissions/%2F/lim",
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await;
    let (_, _, none) = raw(M::GET, &format!("{a}/user-limits"), GUEST, None).await;
    assert_eq!(none, json!([]));
    for (path, body, want) in [
        (
            "/user-limits/lim/max-bogus",
            r#"{"value":2}"#,
            json!("Unrecognised terms [{<<\"max-bogus\">>,2}] in user-limits"),
        ),
        (
            "/user-limits/lim/max-connections",
            r#"{"value":"two"}"#,
            json!("max-connections should be a number, actually was <<\"two\">>"),
        ),
        (
            "/user-limits/lim/max-connections",
            r#"{"value":2.5}"#,
            json!("max-connections should be a number, actually was 2.5"),
        ),
        (
            "/user-limits/lim/max-connections",
            r#"{"valu":2}"#,
            json!("[{key_missing,value}]"),
        ),
        (
            "/user-limits/nobody/max-connections",
            r#"{"value":2}"#,
            json!(["no_such_user", "nobody"]),
        ),
    ] {
        let (s, _, body) = put(path, body).await;
        assert_eq!((s, &body["reason"]), (400, &want), "{path}: {body}");
    }
    let (s, _, _) = put("/user-limits/lim/max-connections", r#"{"value":1}"#).await;
    assert_eq!(s, 204);
    let (s, _, _) = put("/user-limits/lim/max-channels", r#"{"value":2}"#).await;
    assert_eq!(s, 204);
    // A new password keeps the limits.
    put("/users/lim", r#"{"password":"pw2","tags":""}"#).await;
    let (_, _, all) = raw(M::GET, &format!("{a}/user-limits"), GUEST, None).await;
    assert_eq!(
        all,
        json!([{"user": "lim", "value": {"max-channels": 2, "max-connections": 1}}])
    );
    let (_, _, user) = raw(M::GET, &format!("{a}/users/lim"), GUEST, None).await;
    assert_eq!(
        user["limits"],
        json!({"max-channels": 2, "max-connections": 1})
    );
    let (_, _, defs) = raw(M::GET, &format!("{a}/definitions"), GUEST, None).await;
    let exported = defs["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "lim")
        .unwrap()
        .clone();
    assert_eq!(exported["limits"]["max-connections"], 1);

    // Enforced over AMQP with RabbitMQ's codes and texts.
    let url = amqp_url(&b, "lim", "pw2", "/");
    let c1 = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let e = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect_err("a second connection is refused");
    assert_eq!(code(&e), 530);
    assert_eq!(
        text(&e),
        "NOT_ALLOWED - connection refused for user 'lim': user connection limit (1) is reached"
    );
    let _ch1 = c1.create_channel().await.unwrap();
    let _ch2 = c1.create_channel().await.unwrap();
    let e = c1
        .create_channel()
        .await
        .expect_err("a third channel is refused");
    assert_eq!(code(&e), 530);
    assert_eq!(
        text(&e),
        "NOT_ALLOWED - number of channels opened for user 'lim' has reached the maximum \
         allowed user limit of (2)"
    );
    // Cleared: connections are taken again (clearing one that is not set is no error).
    for l in ["max-connections", "max-channels", "max-channels"] {
        let (s, _, _) = raw(M::DELETE, &format!("{a}/user-limits/lim/{l}"), GUEST, None).await;
        assert_eq!(s, 204);
    }
    let c2 = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let c3 = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    for _ in 0..3 {
        c3.create_channel().await.unwrap();
    }
    let _ = c2.close(200, "done".into()).await;
    let _ = c3.close(200, "done".into()).await;
    let (_, _, none) = raw(M::GET, &format!("{a}/user-limits/lim"), GUEST, None).await;
    assert_eq!(none, json!([]));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_attempts_are_counted_by_protocol() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    let (_, _, overview) = raw(M::GET, &format!("{a}/overview"), GUEST, None).await;
    let node = overview["node"].as_str().unwrap().to_string();
    let (s, _, _) = raw(
        M::GET,
        &format!("{a}/overview"),
        Some(("guest", "wrong")),
        None,
    )
    .await;
    assert_eq!(s, 401);
    Connection::connect(&b.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let bad = format!("amqp://guest:wrong@{}/%2f", b.addr);
    let e = Connection::connect(&bad, ConnectionProperties::default())
        .await
        .expect_err("a wrong password is refused");
    assert_eq!(code(&e), 403);
    let (s, _, body) = raw(M::GET, &format!("{a}/auth/attempts/{node}"), GUEST, None).await;
    assert_eq!(s, 200);
    // HTTP: the overview, the refused login and this request.
    assert_eq!(
        body,
        json!([
            {"protocol": "http", "auth_attempts": 3, "auth_attempts_failed": 1, "auth_attempts_succeeded": 2},
            {"protocol": "amqp091", "auth_attempts": 2, "auth_attempts_failed": 1, "auth_attempts_succeeded": 1},
        ])
    );
    let metrics = reqwest::get(format!("http://{}/metrics", b.prometheus.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("rabbitmq_auth_attempts_failed_total{protocol=\"amqp091\"} 1"));
    assert!(metrics.contains("rabbitmq_auth_attempts_total{protocol=\"http\"} 3"));
    let (s, _, _) = raw(M::DELETE, &format!("{a}/auth/attempts/{node}"), GUEST, None).await;
    assert_eq!(s, 204);
    let (_, _, body) = raw(M::GET, &format!("{a}/auth/attempts/{node}"), GUEST, None).await;
    assert_eq!(
        body,
        json!([{"protocol": "http", "auth_attempts": 1, "auth_attempts_failed": 0, "auth_attempts_succeeded": 1}])
    );
    let (_, _, body) = raw(
        M::GET,
        &format!("{a}/auth/attempts/{node}/source"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(body, json!([]));
    let (s, _, _) = raw(
        M::GET,
        &format!("{a}/auth/attempts/rabbit@elsewhere"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, _, flags) = raw(M::GET, &format!("{a}/feature-flags"), GUEST, None).await;
    let names: Vec<&str> = flags
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"user_limits"), "{names:?}");
    assert!(!names.contains(&"quorum_queue"), "{names:?}");
    // The memory breakdown: RabbitMQ's categories, summing to the resident total.
    let (s, _, mem) = raw(M::GET, &format!("{a}/nodes/{node}/memory"), GUEST, None).await;
    assert_eq!(s, 200);
    let m = mem["memory"].as_object().unwrap();
    assert_eq!(m.len(), 29, "{m:?}");
    assert_eq!(m["strategy"], "rss");
    let sum: u64 = m.values().filter_map(Value::as_u64).sum();
    assert_eq!(sum, m["total"]["rss"].as_u64().unwrap());
    assert!(sum > 0);
    let (_, _, rel) = raw(
        M::GET,
        &format!("{a}/nodes/{node}/memory/relative"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(rel["memory"]["total"], 100);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_methods_and_bulk_delete_as_rabbitmq() {
    let b = broker_http().await;
    let a = api(&b);
    use reqwest::Method as M;
    // OPTIONS needs no login and lists the route's methods.
    let r = reqwest::Client::new()
        .request(M::OPTIONS, format!("{a}/queues/%2F/q1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let allow = r.headers()["allow"].to_str().unwrap().to_string();
    for m in ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"] {
        assert!(allow.contains(m), "{allow}");
    }
    let (s, h, _) = raw(M::POST, &format!("{a}/overview"), GUEST, Some("{}")).await;
    assert_eq!(s, 405);
    assert!(h["allow"].to_str().unwrap().contains("GET"));
    // Bulk delete: in order, an unknown user stops it with RabbitMQ's 400.
    for u in ["carol", "dave"] {
        raw(
            M::PUT,
            &format!("{a}/users/{u}"),
            GUEST,
            Some(r#"{"password":"pw","tags":""}"#),
        )
        .await;
    }
    let (s, _, body) = raw(
        M::POST,
        &format!("{a}/users/bulk-delete"),
        GUEST,
        Some(r#"{"users":["carol","nobody","dave"]}"#),
    )
    .await;
    assert_eq!(
        (s, body),
        (
            400,
            json!({"error": "bad_request", "reason": ["no_such_user", "nobody"]})
        )
    );
    let (s, _, _) = raw(M::GET, &format!("{a}/users/carol"), GUEST, None).await;
    assert_eq!(s, 404);
    let (s, _, _) = raw(
        M::POST,
        &format!("{a}/users/bulk-delete"),
        GUEST,
        Some(r#"{"users":["dave"]}"#),
    )
    .await;
    assert_eq!(s, 204);
    b.stop().await;
}
