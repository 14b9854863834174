//! Durability against the built `warren` binary and in-process: confirmed persistent messages
//! survive SIGKILL (SQLite and MariaDB), restarts recover topology and messages (redelivered
//! when they were delivered before), transient messages do not survive, and a backlog far over
//! the memory budget pages out with order kept and RSS bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_lite::StreamExt;
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties,
};

/// The binary the test command built (`WARREN_BIN` overrides).
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

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "warren-durability-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    async fn start(port: u16, dir: &Path, extra: &[&str]) -> Server {
        let bin = warren_bin();
        assert!(
            bin.exists(),
            "{} missing: build the workspace first",
            bin.display()
        );
        let child = Command::new(bin)
            .arg("--amqp-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir)
            // No HTTP listeners: tests run side by side, and 15672 is a fixed port.
            .args(["--http-listen", "", "--prometheus-listen", ""])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn warren");
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "warren did not start listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server { child, url }
    }

    fn kill(mut self) {
        // SIGKILL: no shutdown path runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn open(url: &str) -> (Connection, Channel) {
    let c = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = c.create_channel().await.expect("channel");
    (c, ch)
}

async fn durable_queue(ch: &Channel, name: &str) -> u32 {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare")
    .message_count()
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Publishes numbered persistent messages with confirms until the connection dies; records
/// every number whose confirm arrived.
async fn publish_until_killed(
    url: String,
    start: u64,
    confirmed: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
) {
    let (_c, ch) = open(&url).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut n = start;
    loop {
        let mut pending = Vec::new();
        for _ in 0..50 {
            let body = n.to_string();
            match ch
                .basic_publish(
                    "".into(),
                    "crash".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    persistent(),
                )
                .await
            {
                Ok(p) => pending.push((n, p)),
                Err(_) => return,
            }
            n += 1;
        }
        for (i, p) in pending {
            match p.await {
                Ok(c) if c.is_ack() => confirmed.lock().unwrap().push(i),
                _ => return,
            }
        }
    }
}

/// Everything in the queue, by number (acked).
async fn drain_numbers(ch: &Channel, queue: &str) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        let Some(d) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        else {
            return got;
        };
        got.push(std::str::from_utf8(&d.data).unwrap().parse().unwrap());
    }
}

async fn crash_rounds(extra: &[&str], tag: &str) {
    let dir = scratch_dir(tag);
    let port = free_port();
    let mut expected: BTreeSet<u64> = BTreeSet::new();
    let mut next = 0u64;
    for round in 0..3 {
        let server = Server::start(port, &dir, extra).await;
        {
            let (_c, ch) = open(&server.url).await;
            durable_queue(&ch, "crash").await;
        }
        let confirmed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let publisher = tokio::spawn(publish_until_killed(
            server.url.clone(),
            next,
            confirmed.clone(),
        ));
        // Let it run, then kill mid-stream.
        let deadline = Instant::now() + Duration::from_secs(10);
        while confirmed.lock().unwrap().len() < 500 + round * 300 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
        let got = confirmed.lock().unwrap().clone();
        assert!(!got.is_empty(), "round {round}: nothing was confirmed");
        next = got.iter().max().unwrap() + 1_000_000;
        expected.extend(got);
    }
    // Restart and check every confirmed message is there.
    let server = Server::start(port, &dir, extra).await;
    let (_c, ch) = open(&server.url).await;
    let count = durable_queue(&ch, "crash").await;
    let present: BTreeSet<u64> = drain_numbers(&ch, "crash").await.into_iter().collect();
    assert!(
        count as usize >= expected.len(),
        "declare-ok count {count} < {}",
        expected.len()
    );
    let lost: Vec<&u64> = expected.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 11: after a SIGKILL with the lowest of three deliveries unacked, the delivered
/// watermark is above every stored seq; messages published after the restart used to be
/// counted and never delivered (the loader wanted consecutive seqs after the stored maximum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_after_a_restart_with_a_gap_are_delivered() {
    let dir = scratch_dir("gap");
    let port = free_port();
    let server = Server::start(port, &dir, &[]).await;
    {
        let (_c, ch) = open(&server.url).await;
        durable_queue(&ch, "gap").await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for body in ["m1", "m2", "m3"] {
            ch.basic_publish(
                "".into(),
                "gap".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                persistent(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let mut cons = consume(&ch, "gap", false).await;
        let d1 = next(&mut cons).await;
        let d2 = next(&mut cons).await;
        let d3 = next(&mut cons).await;
        assert_eq!(&d1.data[..], b"m1");
        d2.ack(BasicAckOptions::default()).await.unwrap();
        d3.ack(BasicAckOptions::default()).await.unwrap();
        // A confirmed publish after the acks: its commit also carries the acks' removals.
        ch.basic_publish(
            "".into(),
            "other".into(),
            BasicPublishOptions::default(),
            b"",
            persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.kill();
    }
    let server = Server::start(port, &dir, &[]).await;
    let (_c, ch) = open(&server.url).await;
    assert_eq!(durable_queue(&ch, "gap").await, 1);
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for body in ["m4", "m5"] {
        ch.basic_publish(
            "".into(),
            "gap".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(durable_queue(&ch, "gap").await, 3);
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(
            Duration::from_secs(5),
            ch.basic_get("gap".into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get answered")
        .unwrap()
        .expect("a message, not get-empty");
        got.push((String::from_utf8(d.data.clone()).unwrap(), d.redelivered));
    }
    assert_eq!(
        got,
        vec![
            ("m1".to_string(), true),
            ("m4".to_string(), false),
            ("m5".to_string(), false)
        ]
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_confirmed_message_on_sqlite() {
    crash_rounds(&[], "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_confirmed_message_on_mariadb() {
    let url = warren_storage::suite::mysql_scratch_url().await;
    crash_rounds(&["--storage", &url], "mariadb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_topology_and_persistent_messages_only() {
    let config = warren_broker::Config::for_tests();
    let dir = config.data_dir.clone();
    let b = warren_broker::start(config).await.unwrap();
    {
        let (_c, ch) = channel(&b).await;
        ch.exchange_declare(
            "durable-x".into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        durable_queue(&ch, "kept").await;
        ch.queue_bind(
            "kept".into(),
            "durable-x".into(),
            "a.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        declare(&ch, "transient-q").await;
        for (body, props) in [
            (&b"p1"[..], persistent()),
            (b"t1", BasicProperties::default()),
            (b"p2", persistent()),
            (b"p3", persistent()),
        ] {
            ch.basic_publish(
                "durable-x".into(),
                "a.b".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap();
        }
        // p1 is delivered and left unacked when the broker stops.
        let d = ch
            .basic_get("kept".into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("p1");
        assert_eq!(&d.data[..], b"p1");
        assert!(!d.redelivered);
    }
    b.stop().await;

    let mut config = warren_broker::Config::for_tests();
    config.data_dir = dir.clone();
    let b = warren_broker::start(config).await.unwrap();
    let (_c, ch) = channel(&b).await;
    assert_eq!(
        durable_queue(&ch, "kept").await,
        3,
        "p1, p2, p3 (t1 was transient)"
    );
    let err = ch
        .queue_declare(
            "transient-q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404);
    let (_c, ch) = channel(&b).await;
    let mut cons = consume(&ch, "kept", false).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = next(&mut cons).await;
        seen.push((String::from_utf8(d.data.clone()).unwrap(), d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(
        seen,
        vec![
            ("p1".to_string(), true),
            ("p2".to_string(), false),
            ("p3".to_string(), false)
        ]
    );
    // the durable binding came back too
    ch.basic_publish(
        "durable-x".into(),
        "a.c".into(),
        BasicPublishOptions::default(),
        b"p4",
        persistent(),
    )
    .await
    .unwrap();
    assert_eq!(&next(&mut cons).await.data[..], b"p4");
    b.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_over_budget_pages_out_in_order_with_rss_bounded() {
    const N: usize = 30_000;
    const SIZE: usize = 4096; // 120 MB of bodies against an 8 MiB budget
    let dir = scratch_dir("backlog");
    let port = free_port();
    let server = Server::start(
        port,
        &dir,
        &[
            "--cache-memory",
            "8MiB",
            "--store-hold-bytes",
            "8MiB",
            "--commit-max-bytes",
            "1MiB",
        ],
    )
    .await;
    let base = server.rss_kib();
    let (_c, ch) = open(&server.url).await;
    declare(&ch, "backlog").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut peak = 0;
    let mut body = vec![0u8; SIZE];
    for chunk in 0..N / 500 {
        let mut pending = Vec::new();
        for i in chunk * 500..(chunk + 1) * 500 {
            body[..8].copy_from_slice(&(i as u64).to_be_bytes());
            pending.push(
                ch.basic_publish(
                    "".into(),
                    "backlog".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await
                .unwrap(),
            );
        }
        for p in pending {
            assert!(p.await.unwrap().is_ack());
        }
        peak = peak.max(server.rss_kib());
    }
    let declared = ch
        .queue_declare(
            "backlog".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count() as usize, N);
    let data_mb = (N * SIZE) >> 20;
    let grown_mb = peak.saturating_sub(base) / 1024;
    eprintln!("backlog: {data_mb} MB of bodies; RSS {base} KiB at start, peak {peak} KiB (+{grown_mb} MB)");
    assert!(
        grown_mb < (data_mb as u64) / 2,
        "RSS grew {grown_mb} MB for {data_mb} MB of backlog: not paged out"
    );
    // Drain with a consumer: every message, in order.
    ch.basic_qos(200, BasicQosOptions::default()).await.unwrap();
    let mut cons = consume(&ch, "backlog", false).await;
    for i in 0..N {
        let d = tokio::time::timeout(Duration::from_secs(30), cons.next())
            .await
            .expect("drain stalled")
            .unwrap()
            .unwrap();
        let n = u64::from_be_bytes(d.data[..8].try_into().unwrap());
        assert_eq!(n, i as u64, "out of order");
        assert_eq!(d.data.len(), SIZE);
        if i % 100 == 99 {
            d.ack(BasicAckOptions { multiple: true }).await.unwrap();
        }
        peak = peak.max(server.rss_kib());
    }
    let grown_mb = peak.saturating_sub(base) / 1024;
    assert!(
        grown_mb < (data_mb as u64) / 2,
        "RSS grew {grown_mb} MB while draining"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// A TCP proxy in front of the database that the test can cut: `cut` drops every open connection
/// and closes new ones at once (the database is "unreachable"); `restore` lets them through again.
struct CuttableProxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> CuttableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, l) = (cut.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                l.lock().unwrap().push(task.abort_handle());
            }
        });
        CuttableProxy { port, cut, links }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The database goes away mid-stream: confirms of persistent messages wait, the publisher is
/// blocked once the held bytes pass --store-hold-bytes, transient traffic keeps flowing, and when
/// the database is back everything held is committed and confirmed, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::async_yields_async)] // a publish yields its confirm, awaited later on purpose
async fn database_outage_holds_confirms_blocks_publishers_and_resumes_without_loss() {
    let scratch = warren_storage::suite::mysql_scratch_url().await;
    // mysql://user:pass@host:port/db -> host:port and the rest.
    let (prefix, rest) = scratch.split_once('@').unwrap();
    let (upstream, db) = rest.split_once('/').unwrap();
    let proxy = CuttableProxy::start(upstream.to_string()).await;
    let storage = format!("{prefix}@127.0.0.1:{}/{db}", proxy.port);
    let dir = scratch_dir("outage");
    let port = free_port();
    let args = [
        "--storage",
        storage.as_str(),
        "--store-hold-bytes",
        "256KiB",
    ];
    let server = Server::start(port, &dir, &args).await;

    let (conn, ch) = open(&server.url).await;
    durable_queue(&ch, "outage").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = {
        let ch = ch.clone();
        move |n: u64| {
            let ch = ch.clone();
            async move {
                let body = format!("{n:<1024}").into_bytes();
                ch.basic_publish(
                    "".into(),
                    "outage".into(),
                    BasicPublishOptions::default(),
                    &body,
                    persistent(),
                )
                .await
                .unwrap()
            }
        }
    };
    // Before the outage: confirmed as usual.
    let mut before = Vec::new();
    for n in 0..200 {
        before.push(publish(n).await);
    }
    for p in before {
        assert!(p.await.unwrap().is_ack());
    }

    proxy.cut();
    // 1,000 x 1 KiB is well past the 256 KiB hold bound. The publishes go out from a task: once
    // the broker stops reading this connection, the socket fills and lapin's writes wait.
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let nacked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let during = tokio::spawn({
        let publish = publish.clone();
        let (acked, nacked) = (acked.clone(), nacked.clone());
        async move {
            for n in 200..1200 {
                let confirm = publish(n).await;
                let (acked, nacked) = (acked.clone(), nacked.clone());
                tokio::spawn(async move {
                    let counter = match confirm.await {
                        Ok(c) if c.is_ack() => acked,
                        _ => nacked,
                    };
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        }
    });
    // Meanwhile transient messages on another connection flow through a transient queue.
    let (_c2, ch2) = open(&server.url).await;
    ch2.queue_declare(
        "outage-transient".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..100u32 {
        ch2.basic_publish(
            "".into(),
            "outage-transient".into(),
            BasicPublishOptions::default(),
            i.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let mut flowed = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while flowed < 100 && Instant::now() < deadline {
        match ch2
            .basic_get("outage-transient".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(_) => flowed += 1,
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert_eq!(flowed, 100, "transient traffic stopped during the outage");

    // The publisher is blocked, and nothing published after the cut has been confirmed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !conn.status().blocked() {
        assert!(
            Instant::now() < deadline,
            "no connection.blocked while the database was unreachable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The outage lasts a while: no confirm for anything published after the cut.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        acked.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a message was confirmed while the database was unreachable"
    );
    assert!(
        !during.is_finished(),
        "every publish went through although the broker should have stopped reading"
    );

    proxy.restore();
    tokio::time::timeout(Duration::from_secs(60), during)
        .await
        .expect("publishes did not resume after the database came back")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 1000 {
        assert_eq!(
            nacked.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a held message was nacked"
        );
        assert!(
            Instant::now() < deadline,
            "only {} of 1000 held messages confirmed after the database came back",
            acked.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.status().blocked() {
        assert!(Instant::now() < deadline, "no connection.unblocked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(ch2);
    drop(_c2);
    drop(conn);

    // Everything confirmed is committed: it survives SIGKILL, once each, in order.
    server.kill();
    let server = Server::start(port, &dir, &args).await;
    let (_c, ch) = open(&server.url).await;
    assert_eq!(durable_queue(&ch, "outage").await, 1200);
    let mut got = Vec::new();
    loop {
        let Some(d) = ch
            .basic_get("outage".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        else {
            break;
        };
        got.push(
            std::str::from_utf8(&d.data)
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert_eq!(got, (0..1200).collect::<Vec<u64>>());
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// During a database outage only the replies of methods that wrote to the store wait for it:
/// transient declares on one connection answer at once however busy another connection keeps
/// the store writer, and a durable declare's connection stays alive (the broker keeps sending
/// heartbeats) until its declare-ok can go out, after the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_holds_only_replies_that_wrote_and_keeps_heartbeats() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let scratch = warren_storage::suite::mysql_scratch_url().await;
    let (prefix, rest) = scratch.split_once('@').unwrap();
    let (upstream, db) = rest.split_once('/').unwrap();
    let proxy = CuttableProxy::start(upstream.to_string()).await;
    let storage = format!("{prefix}@127.0.0.1:{}/{db}", proxy.port);
    let dir = scratch_dir("outage-replies");
    // A hold bound the publisher never reaches: it keeps submitting through the outage.
    let args = ["--storage", storage.as_str(), "--store-hold-bytes", "1GiB"];
    let server = Server::start(free_port(), &dir, &args).await;

    let (_c1, ch1) = open(&server.url).await;
    durable_queue(&ch1, "busy").await;
    proxy.cut();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                ch1.basic_publish(
                    "".into(),
                    "busy".into(),
                    BasicPublishOptions::default(),
                    b"persistent",
                    persistent(),
                )
                .await
                .unwrap();
                n += 1;
                if n.is_multiple_of(16) {
                    // Steady, not a flood: the point is that tickets keep moving.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            n
        }
    });

    // lapin gives up on a server it has heard nothing from for twice the heartbeat (4 s).
    let (c2, ch2) = open(&format!("{}?heartbeat=2", server.url)).await;
    for i in 0..200 {
        tokio::time::timeout(
            Duration::from_secs(5),
            ch2.queue_declare(
                format!("transient-{i}").as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("transient declare {i} waited for the unreachable store"))
        .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    assert!(publisher.await.unwrap() > 0);
    let durable = tokio::spawn({
        let ch2 = ch2.clone();
        async move { durable_queue(&ch2, "declared-during-outage").await }
    });
    // Past lapin's limit with the declare-ok held back.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        !durable.is_finished(),
        "a durable declare was answered while the database was unreachable"
    );
    assert!(
        c2.status().connected(),
        "the connection died while its reply waited for the store"
    );
    proxy.restore();
    tokio::time::timeout(Duration::from_secs(60), durable)
        .await
        .expect("the durable declare was not answered after the database came back")
        .unwrap();
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// A rejected delivery whose body the cache dropped is dead-lettered after its body is read
/// back from the store. A graceful stop waits for that read: before, the broker closed the
/// store first, and after the restart the rejected message was back in its queue, not in the
/// dead-letter queue. (The store's reads are slowed so that the stop comes first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_finishes_dead_lettering_what_was_rejected() {
    let faults = warren_storage::Faults::new();
    let mut config = warren_broker::Config::for_tests();
    let dir = config.data_dir.clone();
    // Over budget with one message: a delivery's body goes to the cache.
    config.cache_memory = 4096;
    config.faults = Some(faults.clone());
    let b = warren_broker::start(config).await.unwrap();
    {
        let (_c, ch) = channel(&b).await;
        let d = dead_letter_pair_with_one_taken(&ch, "dl-source", "dl-target", &[b'r'; 8192]).await;
        // The cache drops the body (as it may at any time), and reads are slow.
        b.broker.persist.cache.invalidate_all();
        faults.set_read_delay(Duration::from_millis(500));
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
        // A round trip on the same channel: the reject has been handled.
        durable_queue(&ch, "dl-target").await;
    }
    b.stop().await;

    let mut config = warren_broker::Config::for_tests();
    config.data_dir = dir.clone();
    let b = warren_broker::start(config).await.unwrap();
    let (_c, ch) = channel(&b).await;
    assert_eq!(durable_queue(&ch, "dl-target").await, 1, "dead-lettered");
    let d = ch
        .basic_get("dl-target".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the dead letter");
    assert_eq!(d.data, vec![b'r'; 8192]);
    let left = ch
        .queue_declare(
            "dl-source".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    assert_eq!(left, 0, "the rejected message came back to its queue");
    b.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
