//! Cluster step 1 against the built `warren` binary on the throwaway MariaDB: failover rounds
//! (two nodes; a publisher with confirms through whichever node answers; SIGKILL of the active
//! node mid-stream; every confirmed message must be delivered afterwards, and the time from the
//! kill to the first confirm through the survivor is measured), a paused active node (SIGSTOP
//! past its lease: the standby takes over; after SIGCONT the old node confirms nothing, writes
//! nothing and exits with code 3), SQLite refused at start, and on a 3-node Galera cluster a
//! failover round and the loss of the active node's database node under load.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties,
};
use warren_storage::cluster::NodeId;
use warren_storage::SqlStore;

/// The nodes' lease: 1 s keeps the tests short; `WARREN_FAILOVER_LEASE_MS` measures others
/// (the default flag value is 2,000).
fn lease_ms() -> u64 {
    std::env::var("WARREN_FAILOVER_LEASE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}
const QUEUE: &str = "failover";

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

struct Node {
    name: String,
    port: u16,
    child: Child,
}

impl Node {
    fn start(name: &str, port: u16, db: &str, dir: &Path) -> Node {
        Node::start_http(name, port, db, dir, None)
    }

    /// With the management API on `http` (served once the node is active).
    fn start_http(name: &str, port: u16, db: &str, dir: &Path, http: Option<u16>) -> Node {
        let http = http.map_or(String::new(), |p| format!("127.0.0.1:{p}"));
        let bin = warren_bin();
        assert!(
            bin.exists(),
            "{} missing: build the workspace first",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["--cluster-node", name, "--storage", db])
            .arg("--cluster-lease-ms")
            .arg(lease_ms().to_string())
            .arg("--amqp-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.join(name))
            .args(["--http-listen", &http, "--prometheus-listen", ""])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn warren");
        Node {
            name: name.to_string(),
            port,
            child,
        }
    }

    fn url(&self) -> String {
        url(self.port)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// The active node's name, once there is one (read from the database, as an operator would).
async fn wait_active(db: &SqlStore, not: Option<&NodeId>, within: Duration) -> NodeId {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(a)) = db.active_node().await {
            if Some(&a) != not {
                return a;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no node became active in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn channel(url: &str) -> Option<(Connection, Channel)> {
    let c = tokio::time::timeout(
        Duration::from_secs(3),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()?;
    let ch = c.create_channel().await.ok()?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok()?;
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .ok()?;
    Some((c, ch))
}

/// What the publisher saw: every confirmed number, and for each confirm when it arrived and
/// when its connection was opened (a confirm the dying node sent just before the kill is not
/// one through the survivor).
#[derive(Default)]
struct Confirms {
    ids: BTreeSet<u64>,
    times: Vec<(Instant, Instant)>,
}

/// Publishes numbered persistent messages with confirms through whichever port answers,
/// reconnecting (and republishing what was not confirmed) when a connection dies, until
/// `stop`. Returns the next number.
async fn publish(
    ports: Vec<u16>,
    mut next: u64,
    confirms: Arc<Mutex<Confirms>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let mut i = 0;
    let mut unconfirmed: Vec<u64> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let port = ports[i % ports.len()];
        i += 1;
        let opened = Instant::now();
        let Some((_c, ch)) = channel(&url(port)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        'conn: while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut batch = std::mem::take(&mut unconfirmed);
            while batch.len() < 20 {
                batch.push(next);
                next += 1;
            }
            let mut pending = Vec::new();
            for &n in &batch {
                match ch
                    .basic_publish(
                        "".into(),
                        QUEUE.into(),
                        BasicPublishOptions::default(),
                        n.to_string().as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                {
                    Ok(p) => pending.push((n, Some(p))),
                    Err(_) => pending.push((n, None)),
                }
            }
            let mut failed = false;
            for (n, p) in pending {
                let ok = match p {
                    Some(p) => matches!(
                        tokio::time::timeout(Duration::from_secs(10), p).await,
                        Ok(Ok(c)) if c.is_ack()
                    ),
                    None => false,
                };
                if ok {
                    let mut c = confirms.lock().unwrap();
                    c.ids.insert(n);
                    c.times.push((Instant::now(), opened));
                } else {
                    unconfirmed.push(n);
                    failed = true;
                }
            }
            if failed {
                break 'conn;
            }
        }
    }
    next
}

/// Reads the queue empty through `port`: every number in it.
async fn drain(port: u16) -> BTreeSet<u64> {
    let (c, ch) = channel(&url(port)).await.expect("drain connection");
    let mut consumer = ch
        .basic_consume(
            QUEUE.into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        seen.insert(std::str::from_utf8(&d.data).unwrap().parse().unwrap());
    }
    let _ = c.close(200, "drained".into()).await;
    seen
}

fn scratch_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "warren-cluster-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What each round kills.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// SIGKILL the active Warren node (it comes back as a standby for the next round).
    ActiveNode,
    /// SIGKILL the database node the active Warren node uses (the pid files of each Warren
    /// node's database node, by node index): that Warren node loses its lease and exits 3.
    DatabaseOfActive([&'static str; 2]),
}

/// The outcome of `failover_rounds`.
struct Rounds {
    failovers: Vec<Duration>,
    confirmed: usize,
    delivered: usize,
}

/// Two Warren nodes (n1 on `db_urls[0]`, n2 on `db_urls[1]`); per round, a publisher with
/// confirms through whichever node answers, then `kill` mid-stream, then the time to the first
/// confirm through the survivor. At the end the queue is drained through the active node and
/// every confirmed message must be there.
async fn failover_rounds(db_urls: [String; 2], rounds: usize, kill: Kill) -> Rounds {
    let db = SqlStore::open(&db_urls[1], true).await.unwrap();
    let dir = scratch_dir();
    let ports = [free_port(), free_port()];
    let mut nodes: Vec<Option<Node>> =
        vec![Some(Node::start("n1", ports[0], &db_urls[0], &dir)), None];
    let mut active = wait_active(&db, None, Duration::from_secs(30)).await;
    nodes[1] = Some(Node::start("n2", ports[1], &db_urls[1], &dir));
    let confirms = Arc::new(Mutex::new(Confirms::default()));
    let mut next = 0;
    let mut failovers = Vec::new();
    for round in 0..rounds {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publisher = tokio::spawn(publish(
            ports.to_vec(),
            next,
            confirms.clone(),
            stop.clone(),
        ));
        // Let some confirms through, then kill mid-stream.
        let before = confirms.lock().unwrap().ids.len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while confirms.lock().unwrap().ids.len() < before + 200 {
            assert!(
                Instant::now() < deadline,
                "round {round}: no confirms before the kill"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let idx = if active.name == "n1" { 0 } else { 1 };
        let killed_at = Instant::now();
        let victim = match kill {
            Kill::ActiveNode => {
                let mut v = nodes[idx].take().unwrap();
                v.kill();
                Some(v)
            }
            Kill::DatabaseOfActive(pid_files) => {
                let pid = std::fs::read_to_string(pid_files[idx]).unwrap();
                let ok = Command::new("kill")
                    .args(["-KILL", pid.trim()])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "kill the database node");
                None
            }
        };
        let survivor = wait_active(&db, Some(&active), Duration::from_secs(30)).await;
        assert_ne!(survivor.name, active.name);
        // The first confirm after the kill on a connection opened after it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            let t = confirms
                .lock()
                .unwrap()
                .times
                .iter()
                .find(|&&(_, opened)| opened > killed_at)
                .map(|&(t, _)| t);
            if let Some(t) = t {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no confirm after the kill"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        failovers.push(first - killed_at);
        // A little more traffic through the survivor, then stop.
        let after = confirms.lock().unwrap().ids.len();
        while confirms.lock().unwrap().ids.len() < after + 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        next = publisher.await.unwrap();
        match victim {
            // The killed node comes back as a standby.
            Some(v) => {
                nodes[idx] = Some(Node::start(&v.name, v.port, &db_urls[idx], &dir));
            }
            // Without its database node the Warren node stops by itself, with code 3.
            None => {
                let n = nodes[idx].as_mut().unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                let status = loop {
                    if let Some(s) = n.child.try_wait().unwrap() {
                        break s;
                    }
                    assert!(Instant::now() < deadline, "the cut-off node did not exit");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                assert_eq!(status.code(), Some(3));
            }
        }
        active = survivor;
    }
    let idx = if active.name == "n1" { 0 } else { 1 };
    let seen = drain(nodes[idx].as_ref().unwrap().port).await;
    let confirmed = confirms.lock().unwrap().ids.clone();
    let lost: Vec<&u64> = confirmed.difference(&seen).collect();
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?}");
    let _ = std::fs::remove_dir_all(dir);
    Rounds {
        failovers,
        confirmed: confirmed.len(),
        delivered: seen.len(),
    }
}

fn report(what: &str, r: &Rounds) -> Duration {
    let mut sorted = r.failovers.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    eprintln!(
        "{what}: {} rounds; kill to first confirm: median {median:?}, max {:?}, all {:?}; {} confirmed, {} delivered, 0 lost",
        sorted.len(),
        sorted[sorted.len() - 1],
        r.failovers,
        r.confirmed,
        r.delivered
    );
    median
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_rounds_lose_no_confirmed_message() {
    let rounds: usize = std::env::var("WARREN_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let url = warren_storage::suite::mysql_scratch_url().await;
    let r = failover_rounds([url.clone(), url], rounds, Kill::ActiveNode).await;
    let median = report("failover rounds", &r);
    assert!(
        median < Duration::from_secs(5),
        "median failover {median:?} is over 5 s"
    );
}

/// The Galera cluster scripts/galera.sh started (`WARREN_TEST_GALERA_URLS`, one URL per
/// database node, comma-separated; its pid files under target/galera).
fn galera() -> Vec<String> {
    let Ok(urls) = std::env::var("WARREN_TEST_GALERA_URLS") else {
        panic!(
            "WARREN_TEST_GALERA_URLS is not set: run scripts/test.sh, which starts a 3-node \
             Galera cluster with scripts/galera.sh"
        );
    };
    urls.split(',').map(str::to_string).collect()
}

/// On Galera, with the two Warren nodes on different database nodes: a failover round, then
/// the active Warren node's database node is killed under load, and Warren goes on through the
/// other database node (the standby takes over) with nothing confirmed lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_galera_failover_and_a_dead_database_node_lose_nothing() {
    let servers = galera();
    assert_eq!(servers.len(), 3, "{servers:?}");
    let started = Instant::now();
    let db = warren_storage::suite::galera_scratch_db(&servers).await;
    let url1 = format!("{}/{db}", servers[0].trim_end_matches('/'));
    let url2 = format!("{}/{db}", servers[1].trim_end_matches('/'));
    let r = failover_rounds([url1, url2], 1, Kill::ActiveNode).await;
    let median = report("Galera failover", &r);
    assert!(median < Duration::from_secs(5), "{median:?}");
    // Warren n1 on database node 3 (killed), n2 on database node 2.
    let galera_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/galera");
    let pid3: &'static str = Box::leak(
        galera_dir
            .join("node3/pid")
            .to_string_lossy()
            .into_owned()
            .into_boxed_str(),
    );
    let pid2: &'static str = Box::leak(
        galera_dir
            .join("node2/pid")
            .to_string_lossy()
            .into_owned()
            .into_boxed_str(),
    );
    let db = warren_storage::suite::galera_scratch_db(&servers).await;
    let url3 = format!("{}/{db}", servers[2].trim_end_matches('/'));
    let url2 = format!("{}/{db}", servers[1].trim_end_matches('/'));
    let r = failover_rounds([url3, url2], 1, Kill::DatabaseOfActive([pid3, pid2])).await;
    report("Galera database node killed", &r);
    eprintln!("Galera tests took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_active_node_confirms_nothing_after_a_takeover_and_exits() {
    let db_url = warren_storage::suite::mysql_scratch_url().await;
    let db = SqlStore::open(&db_url, true).await.unwrap();
    let dir = scratch_dir();
    let (p1, p2, h1) = (free_port(), free_port(), free_port());
    let mut n1 = Node::start_http("n1", p1, &db_url, &dir, Some(h1));
    let first = wait_active(&db, None, Duration::from_secs(30)).await;
    assert_eq!(first.name, "n1");
    let _n2 = Node::start("n2", p2, &db_url, &dir);
    // The active node's /api/nodes lists the members, which one is active, and lease ages.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let nodes: serde_json::Value = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{h1}/api/nodes"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let members = nodes[0]["cluster_members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let view: Vec<(String, bool)> = members
            .iter()
            .map(|m| (m["name"].as_str().unwrap().to_string(), m["active"] == true))
            .collect();
        if view == vec![("n1".to_string(), true), ("n2".to_string(), false)] {
            assert!(members.iter().all(|m| m["state"] == "live"));
            assert!(members
                .iter()
                .all(|m| m["lease_left_ms"].as_i64().unwrap() > 0));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members never shown: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ten confirmed messages straight to n1.
    let (_c, ch) = channel(&n1.url()).await.expect("n1 answers");
    for n in 0..10u64 {
        let c = ch
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                n.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }
    // Paused past its lease: n2 takes over.
    n1.signal("STOP");
    let second = wait_active(&db, Some(&first), Duration::from_secs(30)).await;
    assert_eq!(second.name, "n2");
    // Publishes sent to the paused n1 wait in its socket; after SIGCONT it must not confirm
    // them, must not write them, and must exit with code 3.
    let mut pending = Vec::new();
    for n in 100..110u64 {
        if let Ok(p) = ch
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                n.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
        {
            pending.push(p);
        }
    }
    n1.signal("CONT");
    for p in pending {
        let r = tokio::time::timeout(Duration::from_secs(15), p).await;
        assert!(
            !matches!(r, Ok(Ok(ref c)) if c.is_ack()),
            "the fenced node confirmed a publish: {r:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = n1.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the fenced node did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(3), "exit code of a fenced node");
    let seen = drain(p2).await;
    assert_eq!(seen, (0..10).collect::<BTreeSet<u64>>());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn cluster_mode_refuses_sqlite() {
    let dir = scratch_dir();
    let out = Command::new(warren_bin())
        .args(["--cluster-node", "n1", "--amqp-listen", "127.0.0.1:0"])
        .args(["--http-listen", "", "--prometheus-listen", ""])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--storage mysql"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
