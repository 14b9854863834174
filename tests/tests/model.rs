//! The randomized model test: seeded sequences of client operations, restarts (graceful and
//! crash), and store outages against an in-process broker, checked after every step against a
//! model of RabbitMQ's semantics.
//!
//! Operations: publish (persistent and transient, with and without confirms, to one queue or
//! through a fanout to two), transactions (rolled back, or committed, sometimes through a store
//! outage that must hold commit-ok), basic.get and consumers with prefetch (manual acks), ack / nack
//! (requeue) / reject (no requeue, dead-lettering from the queue that has a DLX), channel close
//! (requeue), purge, drain, max-length drop-head with dead-lettering, TTL expiry into the
//! dead-letter queue, a policy set and cleared through the management API (max-length 4 on q1,
//! lower than its argument, so the policy's limit wins and drop-head runs at once when it is
//! set), the message browser (browse a queue through the API: order, flags and x-death
//! origin as the model says, nothing consumed; move chosen or all messages to a queue or
//! through a fanout, copy, return dead-lettered ones to their origin, delete), a fence (a confirmed publish: everything before it is committed), a
//! graceful restart (SIGTERM's path), a crash (the broker's runtime is dropped mid-flight: no
//! shutdown code runs, only what the store committed survives), and a store outage.
//!
//! Invariants: every confirmed persistent message in a durable queue is delivered until acked,
//! and none after; no message is delivered that was never published; counts match the model;
//! nothing is undeliverable (a drain finds what the count says); redelivered flags are right;
//! order is publish order (requeues go back to their place; a moved message goes to its
//! target's tail, keeping its redelivered flag). After a crash, a change made since
//! the last fence may or may not have reached the store: the model allows both (a moved
//! message is in its source or its target, never both, never neither), then adopts what the
//! broker shows.
//!
//! Runs on SQLite and MariaDB, with a small memory budget on even seeds and a tiny one on odd. `WARREN_MODEL_SEEDS` (default 2) seeds × `WARREN_MODEL_STEPS`
//! (default 150) steps each; `WARREN_MODEL_SEED=N` replays one seed. A failure prints its seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::{
    options::*,
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use warren_broker::Config;
use warren_storage::Faults;

const Q0: usize = 0;
const Q1: usize = 1;
const DLQ: usize = 2;
const TQ: usize = 3;
const Q2: usize = 4;
const NAMES: [&str; 5] = ["m.q0", "m.q1", "m.dlq", "m.tq", "m.q2"];
/// q1's x-max-length (drop-head, dead-lettered to dlq).
const Q1_MAX: usize = 8;
/// The max-length of the policy the model sets on q1 and clears.
const Q1_POLICY_MAX: usize = 4;
/// q2's x-message-ttl (dead-lettered to dlq).
const Q2_TTL_MS: u64 = 30;
/// Channels that get and consume (each holds its own unacked deliveries).
const SLOTS: usize = 2;

fn durable(q: usize) -> bool {
    q != TQ
}

// ---------------------------------------------------------------------------------------------
// The broker, in a thread with its own runtime so that a crash can drop it mid-flight.

enum Stop {
    Graceful,
    Crash,
}

struct Life {
    addr: SocketAddr,
    /// The management API's address.
    http: SocketAddr,
    stop: std::sync::mpsc::Sender<Stop>,
    thread: std::thread::JoinHandle<()>,
}

impl Life {
    fn start(config: Config) -> Life {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let running = rt
                .block_on(warren_broker::start(config))
                .expect("broker starts");
            addr_tx
                .send((running.addr, running.http.expect("the API listens")))
                .unwrap();
            match stop_rx.recv() {
                Ok(Stop::Graceful) => rt.block_on(running.stop()),
                Ok(Stop::Crash) | Err(_) => {
                    // Every task is dropped where it stands: no shutdown path, no flush.
                    drop(running);
                    rt.shutdown_background();
                }
            }
        });
        let (addr, http) = addr_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("broker started");
        Life {
            addr,
            http,
            stop: stop_tx,
            thread,
        }
    }

    fn end(self, how: Stop) {
        let _ = self.stop.send(how);
        self.thread.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// The model.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    Ready(usize),
    /// (queue, slot, delivery tag)
    Unacked(usize, usize, u64),
    Gone,
}

impl Place {
    /// Where the message is once unacked deliveries are requeued and q2's messages expired.
    fn settled(self) -> Option<usize> {
        match self {
            Place::Ready(Q2) | Place::Unacked(Q2, ..) => Some(DLQ),
            Place::Ready(q) | Place::Unacked(q, ..) => Some(q),
            Place::Gone => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Msg {
    /// The publish (the body); a fanout publish makes one Msg per queue.
    pid: u64,
    persistent: bool,
    place: Place,
    /// Order within its queue (publish order; a dead-lettered message gets a new one).
    seq: u64,
    delivered: bool,
    /// At the last fence: where it was (None: its publish was not known stored) and whether
    /// it had been delivered.
    durable_place: Option<Place>,
    durable_delivered: bool,
    /// Queues (settled) it has been in since the last fence, one bit each: after a crash the
    /// store may hold it in any of them (it holds some prefix of what was submitted).
    since_fence: u8,
    /// The queue it was last dead-lettered from (its newest x-death entry).
    origin: Option<usize>,
    /// Queues it was dead-lettered from, one bit each, while that dead-lettering may still be
    /// under way: a body the broker no longer holds is read back from the store first, so
    /// the move can commit after a later fence. Not cleared by fences; cleared once the
    /// dead-letter queue is seen holding every dead letter (`dead_letters_arrived`).
    dl_pending: u8,
}

#[derive(Default)]
struct Model {
    msgs: Vec<Msg>,
    next_pid: u64,
    next_seq: u64,
    /// When q2 last got a message: dlq is observed only once they have expired.
    q2_last: Option<Instant>,
    /// The max-length policy is set on q1 (stored before the API answered, so it survives
    /// restarts and crashes).
    q1_policy: bool,
}

impl Model {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn ready(&self, q: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.msgs.len())
            .filter(|&i| self.msgs[i].place == Place::Ready(q))
            .collect();
        v.sort_by_key(|&i| self.msgs[i].seq);
        v
    }

    fn unacked(&self, slot: usize) -> Vec<usize> {
        (0..self.msgs.len())
            .filter(|&i| matches!(self.msgs[i].place, Place::Unacked(_, s, _) if s == slot))
            .collect()
    }

    fn add(&mut self, pid: u64, q: usize, persistent: bool) {
        let seq = self.seq();
        self.msgs.push(Msg {
            pid,
            persistent,
            place: Place::Ready(q),
            seq,
            delivered: false,
            durable_place: None,
            durable_delivered: false,
            since_fence: Place::Ready(q).settled().map_or(0, |s| 1 << s),
            origin: None,
            dl_pending: 0,
        });
        if q == Q1 {
            // x-max-length drop-head: the oldest ready ones go to the dead-letter queue.
            self.enforce_q1();
        }
        if q == Q2 {
            self.q2_last = Some(Instant::now());
        }
    }

    /// A dead-lettered message is published anew to the dead-letter queue: never delivered
    /// from there yet.
    fn dead_letter(&mut self, i: usize) {
        if let Place::Ready(q) | Place::Unacked(q, ..) = self.msgs[i].place {
            self.msgs[i].origin = Some(q);
            self.msgs[i].dl_pending |= 1 << q;
        }
        let seq = self.seq();
        self.msgs[i].place = Place::Ready(DLQ);
        self.msgs[i].seq = seq;
        self.msgs[i].delivered = false;
        self.msgs[i].since_fence |= 1 << DLQ;
    }

    /// Message `i` goes to the tail of `q` (moved by the browser: its flags stay).
    fn place_at(&mut self, i: usize, q: usize) {
        let seq = self.seq();
        let m = &mut self.msgs[i];
        m.place = Place::Ready(q);
        m.seq = seq;
        m.since_fence |= 1 << q | Place::Ready(q).settled().map_or(0, |s| 1 << s);
        if q == Q2 {
            self.q2_last = Some(Instant::now());
        }
    }

    /// A copy of message `i` at the tail of `q`: a new message as far as the store goes.
    fn copy_to(&mut self, i: usize, q: usize) {
        let mut m = self.msgs[i].clone();
        m.durable_place = None;
        m.durable_delivered = false;
        m.since_fence = 0;
        m.dl_pending = 0;
        self.msgs.push(m);
        let j = self.msgs.len() - 1;
        self.place_at(j, q);
    }

    /// q1's limit: the lower of its argument and the policy's.
    fn q1_max(&self) -> usize {
        if self.q1_policy {
            Q1_MAX.min(Q1_POLICY_MAX)
        } else {
            Q1_MAX
        }
    }

    /// q1's drop-head after a publish, a requeue or a policy change (RabbitMQ runs it after
    /// each).
    fn enforce_q1(&mut self) {
        let ready = self.ready(Q1);
        for &i in ready.iter().take(ready.len().saturating_sub(self.q1_max())) {
            self.dead_letter(i);
        }
    }

    /// Whether q1 may come back over its limit (unacked deliveries requeued; after a crash
    /// also what was acked or moved since the last fence), so that drop-head may move any of
    /// its messages (which ones depends on the order channels close and gets run in).
    fn q1_may_overflow(&self, crash: bool) -> bool {
        self.msgs
            .iter()
            .filter(|m| {
                m.place.settled() == Some(Q1)
                    || (crash && m.durable_place.and_then(Place::settled) == Some(Q1))
                    || (crash && m.since_fence & (1 << Q1) != 0)
            })
            .count()
            > self.q1_max()
    }

    /// q2's messages have expired into the dead-letter queue (their TTL has passed).
    fn expire_q2(&mut self) {
        for i in self.ready(Q2) {
            self.dead_letter(i);
        }
    }

    /// Everything so far is committed.
    fn fence(&mut self) {
        for m in &mut self.msgs {
            m.durable_place = Some(m.place);
            m.durable_delivered = m.delivered;
            m.since_fence = m.place.settled().map_or(0, |s| 1 << s);
        }
    }

    /// A graceful restart flushes the store: every change so far is durable; transient
    /// messages and the non-durable queue are gone.
    fn restart(&mut self) {
        self.fence();
        // A graceful stop finishes the dead-lettering under way (`Persistence::follow_ups`).
        for m in &mut self.msgs {
            m.dl_pending = 0;
        }
        for m in &mut self.msgs {
            let keep = m.persistent && m.place.settled().is_some_and(durable);
            if !keep {
                m.place = Place::Gone;
                m.durable_place = Some(Place::Gone);
            }
        }
        self.msgs.retain(|m| m.place != Place::Gone);
    }
}

// ---------------------------------------------------------------------------------------------
// The client side.

struct Client {
    conn: Connection,
    /// Confirm-mode channel: confirmed publishes and fences.
    confirm: Channel,
    /// Plain channel: unconfirmed publishes, purges, counts.
    plain: Channel,
    slots: Vec<Option<Channel>>,
}

async fn declare(ch: &Channel, q: usize) {
    let mut args = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    match q {
        Q1 => {
            args.insert("x-max-length".into(), AMQPValue::LongInt(Q1_MAX as i32));
            args.insert("x-dead-letter-exchange".into(), s(""));
            args.insert("x-dead-letter-routing-key".into(), s(NAMES[DLQ]));
        }
        Q2 => {
            args.insert("x-message-ttl".into(), AMQPValue::LongInt(Q2_TTL_MS as i32));
            args.insert("x-dead-letter-exchange".into(), s(""));
            args.insert("x-dead-letter-routing-key".into(), s(NAMES[DLQ]));
        }
        _ => {}
    }
    ch.queue_declare(
        NAMES[q].into(),
        QueueDeclareOptions {
            durable: durable(q),
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let conn = Connection::connect(
            &format!("amqp://guest:guest@{addr}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let confirm = conn.create_channel().await.unwrap();
        confirm
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let plain = conn.create_channel().await.unwrap();
        for q in [DLQ, Q0, Q1, TQ, Q2] {
            declare(&plain, q).await;
        }
        plain
            .exchange_declare(
                "m.fan".into(),
                lapin::ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        for q in [Q0, Q1] {
            plain
                .queue_bind(
                    NAMES[q].into(),
                    "m.fan".into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        let mut fence = FieldTable::default();
        fence.insert("x-max-length".into(), AMQPValue::LongInt(1));
        plain
            .queue_declare(
                "m.fence".into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                fence,
            )
            .await
            .unwrap();
        Client {
            conn,
            confirm,
            plain,
            slots: (0..SLOTS).map(|_| None).collect(),
        }
    }

    async fn slot(&mut self, s: usize) -> Channel {
        if self.slots[s].is_none() {
            self.slots[s] = Some(self.conn.create_channel().await.unwrap());
        }
        self.slots[s].clone().unwrap()
    }

    async fn fence(&self) {
        let c = self
            .confirm
            .basic_publish(
                "".into(),
                "m.fence".into(),
                BasicPublishOptions::default(),
                b"fence",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack(), "fence not confirmed");
    }

    async fn count(&self, q: usize) -> u32 {
        self.plain
            .queue_declare(
                NAMES[q].into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }
}

/// Every 16th message is large (40,000 bytes, so its body frame is read in place); the rest
/// carry only their pid.
const LARGE_BODY: usize = 40_000;

/// A published message's properties: delivery mode 2 when persistent.
fn properties(persistent: bool) -> BasicProperties {
    if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    }
}

/// The body published for `pid`: its number, and for a large one `#` and a pattern that
/// depends on the pid, so a body cut short or mixed with another's is caught.
fn body_of(pid: u64) -> Vec<u8> {
    let mut b = pid.to_string().into_bytes();
    if pid % 16 == 5 {
        b.push(b'#');
        let at = b.len();
        b.extend((at..LARGE_BODY).map(|i| b'a' + ((i as u64 + pid) % 26) as u8));
    }
    b
}

fn pid_of(data: &[u8]) -> u64 {
    let head = data.split(|b| *b == b'#').next().unwrap_or(data);
    std::str::from_utf8(head)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|pid| body_of(*pid) == data)
        .unwrap_or_else(|| {
            panic!(
                "a message nobody published ({} bytes): {:?}",
                data.len(),
                String::from_utf8_lossy(&data[..data.len().min(64)])
            )
        })
}

/// A consumer's next delivery within 5 s, or what came instead.
async fn next_delivery(
    consumer: &mut lapin::Consumer,
    what: String,
) -> Result<lapin::message::Delivery, String> {
    match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
        Ok(Some(Ok(d))) => Ok(d),
        other => Err(format!("{what}: {other:?}")),
    }
}

/// The queue named by the newest x-death entry of a message's headers.
fn origin_in(headers: Option<&FieldTable>) -> Option<usize> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(t) = deaths.as_slice().first()? else {
        return None;
    };
    let AMQPValue::LongString(q) = t.inner().get("queue")? else {
        return None;
    };
    NAMES.iter().position(|n| n.as_bytes() == q.as_bytes())
}

/// Whether a message stayed in `q` since the last fence, so that after a crash its flags are
/// known. (One in q2 at the fence, or since, reaches dlq dead-lettered anew: its flag resets.)
fn stayed(m: &Msg, q: usize) -> bool {
    m.place.settled() == Some(q)
        && m.durable_place.and_then(Place::settled) == Some(q)
        && m.durable_place != Some(Place::Ready(Q2))
        && m.since_fence == 1 << q
}

/// Whether a redelivered flag seen after a crash fits a message that stayed.
fn flags_fit(m: &Msg, redelivered: bool) -> bool {
    (!m.durable_delivered || redelivered) && (m.delivered || !redelivered)
}

/// One message as the browser API shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    pid: u64,
    redelivered: bool,
    origin: Option<usize>,
    position: u64,
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Run {
    seed: u64,
    rng: StdRng,
    model: Model,
    config: Config,
    faults: Arc<Faults>,
    life: Option<Life>,
    client: Option<Client>,
    log: Vec<String>,
}

impl Run {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().unwrap()
    }

    fn fail(&self, what: String) -> ! {
        let path = std::env::temp_dir().join(format!("warren-model-{}.log", self.seed));
        let _ = std::fs::write(&path, self.log.join("\n"));
        eprintln!("model test: the whole run is in {}", path.display());
        let tail: Vec<&String> = self.log.iter().rev().take(12).rev().collect();
        panic!(
            "model test seed {} failed: {what}\nlast steps: {tail:#?}\nreplay: WARREN_MODEL_SEED={}",
            self.seed, self.seed
        );
    }

    /// Waits until q2's messages have expired into the dead-letter queue (the broker's timer
    /// fires at the deadline; under load, later), then moves them in the model.
    async fn wait_q2(&mut self) {
        if let Some(t) = self.model.q2_last {
            let due = t + Duration::from_millis(Q2_TTL_MS);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        self.q2_empty().await;
        self.model.expire_q2();
        self.dead_letters_arrived().await;
    }

    /// Dead-lettering is asynchronous where the body must first be read back from the store
    /// (a paged message dropped from q1's head, a rejected delivery whose body was evicted):
    /// waits until the dead-letter queue holds at least what the model says, for up to 10 s.
    /// Fewer after that, or more at any time, fails the check that follows.
    async fn dead_letters_arrived(&mut self) {
        let want = self.model.ready(DLQ).len() as u32;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.client().count(DLQ).await;
            if n == want {
                // Every dead letter so far has arrived.
                for m in &mut self.model.msgs {
                    m.dl_pending = 0;
                }
            }
            if n >= want || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn q2_empty(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.client().count(Q2).await;
            if n == 0 {
                return;
            }
            if Instant::now() > deadline {
                self.fail(format!(
                    "{} still holds {n} messages past their TTL",
                    NAMES[Q2]
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Where a publish goes: (exchange, routing key, the queues it reaches), one of the four
    /// queues through the default exchange or q0 and q1 through the fanout.
    fn target(&mut self) -> (&'static str, &'static str, Vec<usize>) {
        match self.rng.random_range(0..5usize) {
            4 => ("m.fan", "", vec![Q0, Q1]),
            q => ("", NAMES[[Q0, Q1, TQ, Q2][q]], vec![[Q0, Q1, TQ, Q2][q]]),
        }
    }

    async fn publish(&mut self) {
        let (exchange, key, queues) = self.target();
        let persistent = self.rng.random_bool(0.7);
        let confirm = self.rng.random_bool(0.8);
        let n = self.rng.random_range(1..=4);
        self.log.push(format!(
            "publish {n} to {exchange}/{key} persistent={persistent} confirm={confirm} (from {})",
            self.model.next_pid + 1
        ));
        let props = properties(persistent);
        for _ in 0..n {
            self.model.next_pid += 1;
            let pid = self.model.next_pid;
            let c = self.client();
            let ch = if confirm { &c.confirm } else { &c.plain };
            let pending = ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &body_of(pid),
                    props.clone(),
                )
                .await
                .unwrap();
            if confirm {
                let got = pending.await.unwrap();
                if !got.is_ack() {
                    self.fail(format!("publish {pid} nacked"));
                }
            }
            for &q in &queues {
                self.model.add(pid, q, persistent);
            }
            if confirm && persistent && queues.iter().all(|&q| durable(q)) {
                // Confirmed once its commit landed; the writer commits in submission order,
                // so everything before it is committed too: a fence.
                self.model.fence();
            }
        }
    }

    /// A transaction on a channel of its own: publishes, then a rollback (none of them arrive)
    /// or a commit (all of them arrive, and commit-ok means the persistent ones are stored: a
    /// fence when every target is durable). Sometimes a store outage holds the commit, which
    /// must not be answered before the store is back when it wrote persistent messages.
    async fn transaction(&mut self) {
        let (exchange, key, queues) = self.target();
        let persistent = self.rng.random_bool(0.7);
        let n = self.rng.random_range(1..=4);
        let commit = self.rng.random_bool(0.75);
        let outage = commit && self.rng.random_bool(0.25);
        self.log.push(format!(
            "transaction of {n} to {exchange}/{key} persistent={persistent} commit={commit} \
             outage={outage} (from {})",
            self.model.next_pid + 1
        ));
        let ch = self.client().conn.create_channel().await.unwrap();
        ch.tx_select().await.unwrap();
        let props = properties(persistent);
        let first = self.model.next_pid + 1;
        for pid in first..first + n {
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body_of(pid),
                props.clone(),
            )
            .await
            .unwrap();
        }
        self.model.next_pid += n;
        if !commit {
            ch.tx_rollback().await.unwrap();
            let _ = ch.close(200, "done".into()).await;
            return;
        }
        if outage {
            self.faults.set_outage(true);
        }
        let committed = ch.tx_commit();
        tokio::pin!(committed);
        let mut answer = None;
        if outage {
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(150), &mut committed).await {
                if persistent && queues.iter().any(|&q| durable(q)) {
                    self.fail(format!(
                        "transaction from {first} committed during a store outage"
                    ));
                }
                answer = Some(r);
            }
            self.faults.set_outage(false);
        }
        let answer = match answer {
            Some(r) => Ok(r),
            None => tokio::time::timeout(Duration::from_secs(20), committed).await,
        };
        match answer {
            Ok(Ok(())) => {}
            other => self.fail(format!("transaction from {first}: {other:?}")),
        }
        for pid in first..first + n {
            for &q in &queues {
                self.model.add(pid, q, persistent);
            }
        }
        if persistent && queues.iter().all(|&q| durable(q)) {
            // commit-ok came once the commit landed; the writer commits in order.
            self.model.fence();
        }
        let _ = ch.close(200, "done".into()).await;
    }

    /// basic.get with a manual ack: the head (any ready message for the dead-letter queue,
    /// whose arrival order depends on timers).
    async fn get(&mut self) {
        let q = [Q0, Q1, DLQ, TQ][self.rng.random_range(0..4)];
        if q == DLQ {
            self.wait_q2().await;
        }
        let slot = self.rng.random_range(0..SLOTS);
        self.log.push(format!("get {} on slot {slot}", NAMES[q]));
        let ch = self.client().slot(slot).await;
        let got = ch
            .basic_get(NAMES[q].into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap();
        let ready = self.model.ready(q);
        match got {
            None if ready.is_empty() => {}
            None => self.fail(format!("get-empty on {} holding {}", NAMES[q], ready.len())),
            Some(m) => {
                let pid = pid_of(&m.delivery.data);
                let i = if q == DLQ {
                    ready
                        .iter()
                        .copied()
                        .find(|&i| self.model.msgs[i].pid == pid)
                } else {
                    ready
                        .first()
                        .copied()
                        .filter(|&i| self.model.msgs[i].pid == pid)
                };
                let Some(i) = i else {
                    self.fail(format!(
                        "get on {} gave {pid}; the model's head is {:?}",
                        NAMES[q],
                        ready.first().map(|&i| self.model.msgs[i].pid)
                    ));
                };
                self.deliver(i, q, slot, m.delivery.delivery_tag, m.delivery.redelivered);
            }
        }
    }

    fn deliver(&mut self, i: usize, q: usize, slot: usize, tag: u64, redelivered: bool) {
        self.log.push(format!(
            "  delivered {} from {} tag {tag} redelivered={redelivered}",
            self.model.msgs[i].pid, NAMES[q]
        ));
        let m = &mut self.model.msgs[i];
        if redelivered != m.delivered {
            let (pid, want) = (m.pid, m.delivered);
            self.fail(format!(
                "message {pid} from {}: redelivered={redelivered}, expected {want}",
                NAMES[q]
            ));
        }
        m.delivered = true;
        m.place = Place::Unacked(q, slot, tag);
    }

    /// A consumer with a prefetch takes the first `min(prefetch, ready)` messages in order,
    /// then is cancelled (its deliveries stay unacked on the channel).
    async fn consume(&mut self) {
        let q = [Q0, Q1][self.rng.random_range(0..2)];
        let slot = self.rng.random_range(0..SLOTS);
        let prefetch = self.rng.random_range(1..=4u16);
        self.log.push(format!(
            "consume {} prefetch {prefetch} on slot {slot}",
            NAMES[q]
        ));
        let ready = self.model.ready(q);
        let expect = ready.len().min(prefetch as usize);
        let ch = self.client().slot(slot).await;
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                NAMES[q].into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for &i in ready.iter().take(expect) {
            let d = match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                other => self.fail(format!(
                    "consumer on {} got {other:?}; expected message {}",
                    NAMES[q], self.model.msgs[i].pid
                )),
            };
            let pid = pid_of(&d.data);
            if pid != self.model.msgs[i].pid {
                self.fail(format!(
                    "consumer on {} got {pid}, expected {} (order)",
                    NAMES[q], self.model.msgs[i].pid
                ));
            }
            self.deliver(i, q, slot, d.delivery_tag, d.redelivered);
        }
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .unwrap();
        // Nothing beyond the prefetch (or the queue) was delivered.
        if let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(20), consumer.next()).await
        {
            self.fail(format!(
                "consumer got {} beyond its prefetch",
                pid_of(&d.data)
            ));
        }
    }

    async fn settle(&mut self) {
        let slot = self.rng.random_range(0..SLOTS);
        let held = self.model.unacked(slot);
        if held.is_empty() {
            return;
        }
        let ch = self.client().slot(slot).await;
        let take = self.rng.random_range(1..=held.len());
        for _ in 0..take {
            let held = self.model.unacked(slot);
            let Some(&i) = held.get(self.rng.random_range(0..held.len().max(1))) else {
                break;
            };
            let Place::Unacked(q, _, tag) = self.model.msgs[i].place else {
                unreachable!()
            };
            let pid = self.model.msgs[i].pid;
            match self.rng.random_range(0..10) {
                0..=4 => {
                    self.log.push(format!("ack {pid} from {}", NAMES[q]));
                    ch.basic_ack(tag, BasicAckOptions::default()).await.unwrap();
                    self.model.msgs[i].place = Place::Gone;
                }
                5..=7 => {
                    self.log.push(format!("nack-requeue {pid} to {}", NAMES[q]));
                    ch.basic_nack(
                        tag,
                        BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                    self.model.msgs[i].place = Place::Ready(q);
                    self.model.enforce_q1();
                }
                _ => {
                    self.log.push(format!("reject {pid} from {}", NAMES[q]));
                    ch.basic_reject(tag, BasicRejectOptions { requeue: false })
                        .await
                        .unwrap();
                    if q == Q1 {
                        self.model.dead_letter(i);
                    } else {
                        self.model.msgs[i].place = Place::Gone;
                    }
                }
            }
        }
    }

    async fn close_slot(&mut self) {
        let slot = self.rng.random_range(0..SLOTS);
        let Some(ch) = self.client().slots[slot].take() else {
            return;
        };
        self.log.push(format!("close slot {slot}"));
        ch.close(200, "bye".into()).await.unwrap();
        for i in self.model.unacked(slot) {
            if let Place::Unacked(q, ..) = self.model.msgs[i].place {
                self.model.msgs[i].place = Place::Ready(q);
            }
        }
        self.model.enforce_q1();
    }

    async fn purge(&mut self) {
        let q = [Q0, Q1, DLQ, TQ][self.rng.random_range(0..4)];
        if q == DLQ {
            self.wait_q2().await;
        }
        self.log.push(format!("purge {}", NAMES[q]));
        let n = self
            .client()
            .plain
            .queue_purge(NAMES[q].into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        let ready = self.model.ready(q);
        if n as usize != ready.len() {
            self.fail(format!(
                "purge of {} said {n}, model {}",
                NAMES[q],
                ready.len()
            ));
        }
        for i in ready {
            self.model.msgs[i].place = Place::Gone;
        }
    }

    /// Takes every ready message of `q` with no-ack: order (but for the dead-letter queue)
    /// and redelivered flags as the model says, nothing missing, nothing extra.
    async fn drain(&mut self, q: usize) {
        if q == DLQ {
            self.wait_q2().await;
        }
        self.log.push(format!("drain {}", NAMES[q]));
        let mut got = Vec::new();
        loop {
            let m = self
                .client()
                .plain
                .basic_get(NAMES[q].into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
            let Some(m) = m else { break };
            got.push((pid_of(&m.delivery.data), m.delivery.redelivered));
        }
        let mut want: Vec<(u64, bool)> = self
            .model
            .ready(q)
            .iter()
            .map(|&i| (self.model.msgs[i].pid, self.model.msgs[i].delivered))
            .collect();
        if q == DLQ {
            got.sort_unstable();
            want.sort_unstable();
        }
        if got != want {
            self.fail(format!(
                "drain of {}: got {got:?}, model {want:?}",
                NAMES[q]
            ));
        }
        for i in self.model.ready(q) {
            self.model.msgs[i].place = Place::Gone;
        }
    }

    async fn check_count(&mut self, q: usize) {
        if q == DLQ {
            self.wait_q2().await;
        }
        let want = self.model.ready(q).len();
        // Dead letters may still be on their way to dlq: drop-head drops owed by q1's paged
        // head (after a restart its messages start in the store) are taken, and dead-lettered,
        // when q1's loader reads them. A count short of the model's is read again for a while;
        // one that never gets there, or overshoots, fails.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.client().count(q).await as usize;
            if n == want {
                return;
            }
            if q != DLQ || n > want || Instant::now() > deadline {
                self.fail(format!("{} counts {n}, model {want}", NAMES[q]));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sets or clears the max-length policy on q1 through the management API. The API
    /// answers once the policy is stored and applied: q1's drop-head has run.
    async fn policy(&mut self) {
        let set = !self.model.q1_policy;
        self.log
            .push(if set { "policy set" } else { "policy clear" }.into());
        let http = self.life.as_ref().unwrap().http;
        let url = format!("http://{http}/api/policies/%2F/m-q1-limit");
        let client = reqwest::Client::new();
        let req = if set {
            client.put(&url).json(&serde_json::json!({
                "pattern": "^m\\.q1$",
                "apply-to": "queues",
                "definition": {"max-length": Q1_POLICY_MAX},
            }))
        } else {
            client.delete(&url)
        };
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            req.basic_auth("guest", Some("guest")).send(),
        )
        .await;
        match r {
            Ok(Ok(r)) if r.status().is_success() => {}
            other => self.fail(format!("policy change failed: {other:?}")),
        }
        self.model.q1_policy = set;
        if set {
            self.model.enforce_q1();
        }
        self.check_count(Q1).await;
        self.check_count(DLQ).await;
    }

    /// Persistent publishes to q0 with confirms while a consumer takes and acks everything q0
    /// holds: a message acked before its commit may be confirmed at once (and then need never
    /// be written), so these confirms are not fences.
    async fn publish_consumed(&mut self) {
        let n = self.rng.random_range(1..=4);
        let ready = self.model.ready(Q0);
        self.log.push(format!(
            "publish {n} to q0 consumed (after {} ready)",
            ready.len()
        ));
        let ch = self.client().conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                NAMES[Q0].into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for &i in &ready {
            let what = format!("consumer on q0, expecting {}", self.model.msgs[i].pid);
            let d = match next_delivery(&mut consumer, what).await {
                Ok(d) => d,
                Err(e) => self.fail(e),
            };
            let pid = pid_of(&d.data);
            if pid != self.model.msgs[i].pid || d.redelivered != self.model.msgs[i].delivered {
                self.fail(format!(
                    "consumer on q0 got {pid} redelivered={}; the model's next is {:?}",
                    d.redelivered, self.model.msgs[i]
                ));
            }
            d.ack(BasicAckOptions::default()).await.unwrap();
            self.model.msgs[i].place = Place::Gone;
        }
        for _ in 0..n {
            self.model.next_pid += 1;
            let pid = self.model.next_pid;
            let confirm = self
                .client()
                .confirm
                .basic_publish(
                    "".into(),
                    NAMES[Q0].into(),
                    BasicPublishOptions::default(),
                    &body_of(pid),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            let d = match next_delivery(&mut consumer, format!("consumer on q0, expecting {pid}"))
                .await
            {
                Ok(d) => d,
                Err(e) => self.fail(e),
            };
            if pid_of(&d.data) != pid || d.redelivered {
                self.fail(format!(
                    "consumer on q0 got {} redelivered={}, expected fresh {pid}",
                    pid_of(&d.data),
                    d.redelivered
                ));
            }
            d.ack(BasicAckOptions::default()).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(20), confirm).await {
                Ok(Ok(c)) if c.is_ack() => {}
                other => self.fail(format!("publish {pid} (consumed): {other:?}")),
            }
            self.model.add(pid, Q0, true);
            let i = self.model.msgs.len() - 1;
            self.model.msgs[i].place = Place::Gone;
        }
        ch.close(200, "bye".into()).await.unwrap();
    }

    /// A call of the management API that must succeed; its JSON answer.
    async fn api(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let http = self.life.as_ref().unwrap().http;
        let mut req = reqwest::Client::new()
            .request(method, format!("http://{http}{path}"))
            .basic_auth("guest", Some("guest"));
        if let Some(b) = &body {
            req = req.json(b);
        }
        let r = tokio::time::timeout(Duration::from_secs(30), req.send()).await;
        match r {
            Ok(Ok(r)) if r.status().is_success() => match r.json().await {
                Ok(v) => v,
                Err(e) => self.fail(format!("{path}: not JSON: {e}")),
            },
            Ok(Ok(r)) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                self.fail(format!("{path}: {status} {text}"))
            }
            other => self.fail(format!("{path}: {other:?}")),
        }
    }

    /// A queue's ready messages through the browser API, in position order.
    async fn browsed(&mut self, q: usize) -> Vec<Seen> {
        let path = format!("/api/queues/%2F/{}/messages?count=1000", NAMES[q]);
        let v = self.api(reqwest::Method::GET, &path, None).await;
        let Some(items) = v["items"].as_array() else {
            self.fail(format!("{path}: no items in {v}"));
        };
        if !v["next"].is_null() {
            self.fail(format!("{path}: more than one page for a model queue: {v}"));
        }
        let mut out = Vec::new();
        for it in items {
            let pid = pid_of(it["payload"].as_str().unwrap_or("?").as_bytes());
            let origin = it["properties"]["headers"]["x-death"][0]["queue"]
                .as_str()
                .and_then(|n| NAMES.iter().position(|x| *x == n));
            out.push(Seen {
                pid,
                redelivered: it["redelivered"].as_bool().unwrap_or(false),
                origin,
                position: it["position"].as_u64().unwrap_or(0),
            });
        }
        if out.windows(2).any(|w| w[0].position >= w[1].position) {
            self.fail(format!("{path}: positions not increasing: {out:?}"));
        }
        out
    }

    /// The model's ready messages of `q` as the browser should show them, matched to what it
    /// showed (in queue order; the dead-letter queue's order depends on timers, so there by
    /// content). Fails on any difference.
    async fn browse_matched(&mut self, q: usize) -> Vec<(usize, Seen)> {
        if q == DLQ {
            self.wait_q2().await;
        }
        let seen = self.browsed(q).await;
        let ready = self.model.ready(q);
        let key = |m: &Msg| (m.pid, m.delivered, m.origin);
        let mut matched = Vec::new();
        if q == DLQ {
            let mut free: Vec<usize> = ready.clone();
            for s in &seen {
                let Some(k) = free
                    .iter()
                    .position(|&i| key(&self.model.msgs[i]) == (s.pid, s.redelivered, s.origin))
                else {
                    break;
                };
                matched.push((free.swap_remove(k), s.clone()));
            }
        } else {
            for (&i, s) in ready.iter().zip(&seen) {
                if key(&self.model.msgs[i]) != (s.pid, s.redelivered, s.origin) {
                    break;
                }
                matched.push((i, s.clone()));
            }
        }
        if matched.len() != ready.len() || matched.len() != seen.len() {
            let want: Vec<_> = ready.iter().map(|&i| key(&self.model.msgs[i])).collect();
            self.fail(format!(
                "browse of {}: shows {seen:?}; the model holds (pid, delivered, origin) {want:?}",
                NAMES[q]
            ));
        }
        matched
    }

    /// Browses a queue: what the model holds, in order, with its flags; nothing changes.
    async fn browse(&mut self) {
        let q = [Q0, Q1, DLQ, TQ][self.rng.random_range(0..4)];
        self.log.push(format!("browse {}", NAMES[q]));
        self.browse_matched(q).await;
    }

    /// Acts on some or all of a queue's messages through the browser API: move (to a queue or
    /// through the fanout), copy, return to origin, or delete.
    async fn act(&mut self) {
        let src = [Q0, Q1, DLQ, TQ][self.rng.random_range(0..4)];
        let matched = self.browse_matched(src).await;
        let all = self.rng.random_bool(0.3);
        let chosen: Vec<(usize, Seen)> = if all {
            matched
        } else {
            matched
                .into_iter()
                .filter(|_| self.rng.random_bool(0.5))
                .collect()
        };
        let others: Vec<usize> = [Q0, Q1, DLQ, TQ, Q2]
            .into_iter()
            .filter(|&q| q != src)
            .collect();
        let dest = others[self.rng.random_range(0..others.len())];
        // What each chosen message becomes: (action, JSON destination).
        let (action, target) = match self.rng.random_range(0..20) {
            0..=7 => ("move", serde_json::json!({"queue": NAMES[dest]})),
            // To q0 and q1 (the source itself, at its tail, when it is one of them).
            8..=9 => ("fanout", serde_json::json!({"exchange": "m.fan"})),
            10..=12 => ("copy", serde_json::json!({"queue": NAMES[dest]})),
            13..=15 => ("return", serde_json::json!({})),
            _ => ("delete", serde_json::json!({})),
        };
        let mut body = target;
        if all {
            body["all"] = serde_json::json!(true);
        } else {
            body["positions"] = chosen.iter().map(|(_, s)| s.position).collect();
        }
        let verb = if action == "fanout" { "move" } else { action };
        self.log.push(format!(
            "{action} {} of {} ({:?}) {body}",
            if all { "all" } else { "some" },
            NAMES[src],
            chosen.iter().map(|(_, s)| s.pid).collect::<Vec<_>>()
        ));
        let path = format!("/api/queues/%2F/{}/messages/{verb}", NAMES[src]);
        let report = self.api(reqwest::Method::POST, &path, Some(body)).await;
        let mut unroutable = 0;
        for &(i, _) in &chosen {
            match action {
                "move" => self.model.place_at(i, dest),
                "fanout" => {
                    self.model.copy_to(i, Q1);
                    self.model.place_at(i, Q0);
                }
                "copy" => self.model.copy_to(i, dest),
                "return" => match self.model.msgs[i].origin {
                    Some(o) => self.model.place_at(i, o),
                    None => unroutable += 1,
                },
                _ => self.model.msgs[i].place = Place::Gone,
            }
        }
        self.model.enforce_q1();
        let want = serde_json::json!({
            "done": chosen.len() - unroutable,
            "gone": 0,
            "unroutable": unroutable,
            "scanned": chosen.len(),
        });
        let got = serde_json::json!({
            "done": report["done"],
            "gone": report["gone"],
            "unroutable": report["unroutable"],
            "scanned": report["scanned"],
        });
        if got != want {
            self.fail(format!(
                "{action} from {}: {report}, expected {want}",
                NAMES[src]
            ));
        }
        // (q2's count depends on its TTL's timers.)
        for q in [src, dest].into_iter().filter(|&q| q != Q2) {
            self.check_count(q).await;
        }
    }

    async fn fence(&mut self) {
        self.log.push("fence".into());
        self.client().fence().await;
        self.model.fence();
    }

    async fn outage(&mut self) {
        self.model.next_pid += 1;
        let pid = self.model.next_pid;
        self.log.push(format!("outage around publish {pid}"));
        self.faults.set_outage(true);
        let pending = self
            .client()
            .confirm
            .basic_publish(
                "".into(),
                NAMES[Q0].into(),
                BasicPublishOptions::default(),
                &body_of(pid),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        tokio::pin!(pending);
        if tokio::time::timeout(Duration::from_millis(150), &mut pending)
            .await
            .is_ok()
        {
            self.fail(format!("publish {pid} confirmed during a store outage"));
        }
        self.faults.set_outage(false);
        match tokio::time::timeout(Duration::from_secs(20), pending).await {
            Ok(Ok(c)) if c.is_ack() => {}
            other => self.fail(format!("publish {pid} after the outage: {other:?}")),
        }
        self.model.add(pid, Q0, true);
        self.model.fence();
    }

    async fn start(&mut self) {
        let life = Life::start(self.config.clone());
        let client = Client::connect(life.addr).await;
        self.life = Some(life);
        self.client = Some(client);
    }

    async fn restart(&mut self, crash: bool) {
        self.log
            .push(if crash { "CRASH" } else { "restart" }.into());
        if let Some(c) = self.client.take() {
            if !crash {
                let _ = c.conn.close(200, "restart".into()).await;
            }
        }
        if let Some(life) = self.life.take() {
            life.end(if crash { Stop::Crash } else { Stop::Graceful });
        }
        let overflow = self.model.q1_may_overflow(crash);
        if !crash {
            self.model.restart();
        }
        self.start().await;
        self.reconcile(overflow).await;
    }

    /// After a crash: each change since the last fence may or may not have reached the store.
    /// Reads every queue (gets, then nack-requeue), checks what may and must be there, and
    /// adopts it.
    async fn reconcile(&mut self, q1_overflow: bool) {
        // q2's recovered messages expire into dlq shortly after the start.
        self.q2_empty().await;
        // pid -> candidates (queue index) per message.
        let mut seen: HashMap<usize, usize> = HashMap::new(); // msg index -> queue seen in
        let mut origins: HashMap<usize, Option<usize>> = HashMap::new(); // msg index -> x-death
        let mut orders: Vec<Vec<usize>> = Vec::new(); // per queue, msg indexes in queue order
        let ch = self.client().slot(0).await;
        for q in [Q0, Q1, DLQ] {
            let mut order = Vec::new();
            loop {
                let m = ch
                    .basic_get(NAMES[q].into(), BasicGetOptions { no_ack: false })
                    .await
                    .unwrap();
                let Some(m) = m else { break };
                let pid = pid_of(&m.delivery.data);
                let candidates = |m: &Msg| {
                    let now = m.place.settled();
                    let then = m.durable_place.and_then(Place::settled);
                    // Requeued at the stop into a full q1, drop-head may have moved it.
                    let dropped = q1_overflow && q == DLQ && (now == Some(Q1) || then == Some(Q1));
                    let passed = (m.since_fence | m.dl_pending) & (1 << q) != 0;
                    m.persistent && (now == Some(q) || then == Some(q) || passed || dropped)
                };
                // Several messages may share a body (fanout, copies): prefer one whose flags
                // and x-death fit, then one whose flags are not known, then any that may be here.
                let redelivered = m.delivery.redelivered;
                let origin = origin_in(m.delivery.properties.headers().as_ref());
                let may = |i: &usize| {
                    self.model.msgs[*i].pid == pid
                        && !seen.contains_key(i)
                        && candidates(&self.model.msgs[*i])
                };
                let fits = |i: &usize| {
                    let m = &self.model.msgs[*i];
                    stayed(m, q) && flags_fit(m, redelivered) && m.origin == origin
                };
                let all = 0..self.model.msgs.len();
                let Some(i) = all
                    .clone()
                    .find(|i| may(i) && fits(i))
                    .or_else(|| {
                        all.clone()
                            .find(|i| may(i) && !stayed(&self.model.msgs[*i], q))
                    })
                    .or_else(|| all.clone().find(may))
                else {
                    self.fail(format!(
                        "after the crash {} holds {pid}, which the model never put there",
                        NAMES[q]
                    ));
                };
                if seen.insert(i, q).is_some() {
                    self.fail(format!("after the crash message {pid} is there twice"));
                }
                origins.insert(i, origin);
                let msg = &self.model.msgs[i];
                let stayed = stayed(msg, q);
                if stayed && msg.durable_delivered && !m.delivery.redelivered {
                    self.fail(format!(
                        "message {pid} in {} was delivered before; redelivered=false ({msg:?})",
                        NAMES[q]
                    ));
                }
                if stayed && !msg.delivered && m.delivery.redelivered {
                    self.fail(format!(
                        "message {pid} in {} was never delivered; redelivered=true ({msg:?})",
                        NAMES[q]
                    ));
                }
                order.push(i);
            }
            // Messages that were only ever in q since the last fence keep their order (a
            // requeue goes back to its place; moves, dead-lettering and publishes append).
            let stable: Vec<u64> = order
                .iter()
                .map(|&i| &self.model.msgs[i])
                .filter(|m| {
                    q != DLQ
                        && m.place.settled() == Some(q)
                        && m.since_fence == 1 << q
                        && m.durable_place.is_none_or(|p| p.settled() == Some(q))
                        // A body several messages share (fanout, copies) may have been matched
                        // to the other one: its order says nothing.
                        && self.model.msgs.iter().filter(|o| o.pid == m.pid).count() == 1
                })
                .map(|m| m.seq)
                .collect();
            if stable.windows(2).any(|w| w[0] > w[1]) {
                let pids: Vec<u64> = order.iter().map(|&i| self.model.msgs[i].pid).collect();
                self.fail(format!(
                    "after the crash {} is out of order: {pids:?}",
                    NAMES[q]
                ));
            }
            orders.push(order);
        }
        // What must have survived: persistent, in a durable queue at the last fence, and
        // still there now.
        for (i, m) in self.model.msgs.iter().enumerate() {
            let then = m.durable_place.and_then(Place::settled);
            let now = m.place.settled();
            // A persistent message moves between durable queues atomically, so one still
            // alive must be in one of its two places.
            if m.persistent
                && then.is_some_and(durable)
                && now.is_some_and(durable)
                && !seen.contains_key(&i)
            {
                let pid = m.pid;
                let mut rows = Vec::new();
                if self.config.storage.is_none() {
                    use warren_storage::MessageStore;
                    let url = warren_storage::SqlStore::sqlite_url(&self.config.data_dir);
                    if let Ok(st) = warren_storage::SqlStore::open(&url, false).await {
                        for qid in 1..12 {
                            if let Ok(r) = st.read_queue(qid, 0, 100_000, usize::MAX).await {
                                for e in r {
                                    if e.message.body.as_ref() == body_of(pid).as_slice() {
                                        rows.push((qid, e.seq, e.message.id));
                                    }
                                }
                            }
                        }
                    }
                }
                let m = &self.model.msgs[i];
                self.fail(format!(
                    "message {} (stored in {} before the crash) is lost; store rows (queue id, seq, id) {rows:?}; {m:?}",
                    m.pid,
                    NAMES[then.unwrap_or(0)]
                ));
            }
        }
        ch.basic_nack(
            0,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .unwrap();
        // The gets above reported deliveries: make them (and the requeue) durable before the
        // model says so.
        self.client().fence().await;
        // Adopt: what was seen is ready where it was seen, in the order seen, delivered, with
        // the x-death it showed; the rest is gone.
        let mut kept = Vec::new();
        for i in orders.into_iter().flatten() {
            let mut m = self.model.msgs[i].clone();
            m.place = Place::Ready(seen[&i]);
            m.delivered = true;
            m.origin = origins[&i];
            m.dl_pending = 0;
            m.seq = self.model.seq();
            kept.push(m);
        }
        self.model.msgs = kept;
        self.model.q2_last = None;
        // The requeue runs q1's drop-head.
        self.model.enforce_q1();
        self.model.fence();
        for q in [Q0, Q1, DLQ, TQ] {
            self.check_count(q).await;
        }
    }

    async fn step(&mut self) {
        match self.rng.random_range(0..100) {
            0..=25 => self.publish().await,
            26..=27 => self.transaction().await,
            28..=29 => self.publish_consumed().await,
            30..=44 => self.get().await,
            45..=52 => self.consume().await,
            53..=67 => self.settle().await,
            68..=71 => self.close_slot().await,
            72..=73 => self.purge().await,
            74 => self.browse().await,
            75..=79 => {
                let q = [Q0, Q1, DLQ, TQ][self.rng.random_range(0..4)];
                self.drain(q).await;
            }
            80..=82 => self.fence().await,
            83..=85 => self.act().await,
            86..=87 => self.policy().await,
            88..=90 => self.restart(false).await,
            91..=95 => self.restart(true).await,
            _ => self.outage().await,
        }
        // After every step: one queue's count against the model.
        let q = [Q0, Q1, TQ][self.rng.random_range(0..3)];
        self.check_count(q).await;
        if std::env::var("WARREN_MODEL_STORE_CHECK").is_ok() {
            self.check_store().await;
        }
    }

    /// Diagnostic (`WARREN_MODEL_STORE_CHECK`, SQLite): every persistent message stored in q1
    /// at the last fence and still in q1 has its row in the store.
    async fn check_store(&mut self) {
        use warren_storage::MessageStore;
        if self.config.storage.is_some() {
            return;
        }
        // What was submitted is committed first.
        self.client().fence().await;
        self.model.fence();
        let url = warren_storage::SqlStore::sqlite_url(&self.config.data_dir);
        let Ok(st) = warren_storage::SqlStore::open(&url, false).await else {
            return;
        };
        use warren_storage::MetaStore;
        let Ok(meta) = st.load_meta().await else {
            return;
        };
        let Some(q1) = meta
            .queues
            .iter()
            .find(|q| q.name == NAMES[Q1])
            .map(|q| q.id)
        else {
            return;
        };
        let mut bodies = std::collections::HashSet::new();
        if let Ok(r) = st.read_queue(q1, 0, 100_000, usize::MAX).await {
            for e in r {
                bodies.insert(e.message.body.to_vec());
            }
        }
        for m in &self.model.msgs {
            if m.persistent && m.place.settled() == Some(Q1) && !bodies.contains(&body_of(m.pid)) {
                let m = m.clone();
                self.fail(format!("store check: {m:?} has no row"));
            }
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run_seed(seed: u64, steps: u64, storage: Option<String>) {
    let faults = Faults::new();
    let mut config = Config::for_tests();
    config.faults = Some(faults.clone());
    config.storage = storage;
    // A small budget so that queues also page to the store. On odd seeds a tiny one (a dozen
    // messages), so that memory is over budget most of the time: most messages page, and
    // unacked deliveries give their bodies up to the store.
    config.cache_memory = if seed.is_multiple_of(2) {
        64 * 1024
    } else {
        4 * 1024
    };
    // Unacked deliveries give their bodies up at the next sweep (a tenth of a second).
    config.unacked_page_after_ms = 0;
    // The management API, for the policy operation.
    config.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let mut run = Run {
        seed,
        rng: StdRng::seed_from_u64(seed),
        model: Model::default(),
        config,
        faults,
        life: None,
        client: None,
        log: Vec::new(),
    };
    run.start().await;
    for _ in 0..steps {
        run.step().await;
    }
    // The end: a graceful restart, then every queue drained against the model.
    run.restart(false).await;
    for q in [Q0, Q1, DLQ, TQ] {
        run.drain(q).await;
    }
    let stats: BTreeMap<&str, usize> = run.log.iter().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(l.split_whitespace().next().unwrap_or(""))
            .or_default() += 1;
        m
    });
    eprintln!("model seed {seed}: {steps} steps passed; ops {stats:?}");
    if let Some(c) = run.client.take() {
        let _ = c.conn.close(200, "done".into()).await;
    }
    if let Some(life) = run.life.take() {
        life.end(Stop::Graceful);
    }
    let _ = std::fs::remove_dir_all(&run.config.data_dir);
}

async fn run_all(storage: impl Fn() -> Option<String>, base: u64) {
    // `WARREN_MODEL_LOG=warren_core=debug` shows the broker's own log (a diagnostic).
    if let Ok(filter) = std::env::var("WARREN_MODEL_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let steps = env_u64("WARREN_MODEL_STEPS", 150);
    if let Ok(seed) = std::env::var("WARREN_MODEL_SEED") {
        run_seed(seed.parse().unwrap(), steps, storage()).await;
        return;
    }
    for s in 0..env_u64("WARREN_MODEL_SEEDS", 2) {
        run_seed(base + s, steps, storage()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_on_sqlite() {
    run_all(|| None, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_on_mariadb() {
    // One scratch database per seed.
    let urls: Vec<String> = {
        let n = if std::env::var("WARREN_MODEL_SEED").is_ok() {
            1
        } else {
            env_u64("WARREN_MODEL_SEEDS", 2)
        };
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(warren_storage::suite::mysql_scratch_url().await);
        }
        v
    };
    let urls = std::sync::Mutex::new(urls);
    run_all(|| urls.lock().unwrap().pop(), 2000).await;
}
