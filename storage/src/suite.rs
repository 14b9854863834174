//! The behaviour every store backend must show, run against SQLite and MariaDB/MySQL by the
//! tests, plus the scratch-database helper those tests use. `WARREN_TEST_MYSQL_URL` names a
//! server (`mysql://user:pass@host:port`) on which the user may create databases; the test
//! command starts one when none is reachable. Test code: a panic is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::*;

pub fn exchange(name: &str) -> ExchangeRecord {
    ExchangeRecord {
        vhost: "/".into(),
        name: name.into(),
        kind: "topic".into(),
        auto_delete: false,
        internal: false,
        arguments: Bytes::from_static(b"\0\0\0\0"),
    }
}

pub fn queue(id: i64, name: &str) -> QueueRecord {
    QueueRecord {
        id,
        vhost: "/".into(),
        name: name.into(),
        auto_delete: false,
        arguments: Bytes::new(),
        delivered_seq: 0,
    }
}

pub fn binding(source: &str, dest: &str, key: &str) -> BindingRecord {
    BindingRecord {
        vhost: "/".into(),
        source: source.into(),
        destination: dest.into(),
        destination_kind: DestinationKind::Queue,
        routing_key: key.into(),
        arguments: Bytes::new(),
    }
}

pub fn message(id: i64, persistent: bool, body: Bytes) -> Arc<MessageRow> {
    Arc::new(MessageRow {
        id,
        persistent,
        exchange: "amq.direct".into(),
        routing_key: format!("key-{id}"),
        header: Bytes::from(vec![0, 60, 0, 0, id as u8]),
        body,
        published_ms: 1_700_000_000_000 + id,
    })
}

/// A fresh database on the MySQL server named by `WARREN_TEST_MYSQL_URL`. Panics (fails the
/// test) when the variable is unset: the test command always sets it.
pub async fn mysql_scratch_url() -> String {
    let Ok(server) = std::env::var("WARREN_TEST_MYSQL_URL") else {
        panic!(
            "WARREN_TEST_MYSQL_URL is not set: run scripts/test.sh, which starts MariaDB, or point \
             it at a MySQL server (mysql://user:pass@host:port) where the user may create databases"
        );
    };
    mysql_scratch_db(&server).await.0
}

/// A fresh database on the MySQL server at `server` (mysql://user:pass@host:port): its URL and
/// its name (on a Galera cluster the database exists on every node under that name).
pub async fn mysql_scratch_db(server: &str) -> (String, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let server = server.trim_end_matches('/').to_string();
    let db = format!(
        "warren_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&server).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    (format!("{server}/{db}"), db)
}

/// A fresh database on a Galera cluster (`servers`: one URL per database node): created
/// through the first node, returned once every node lists it. Galera applies DDL on the other
/// nodes after the creating node answers, so a connection to another node right after the
/// CREATE may find no such database (error 1049).
pub async fn galera_scratch_db(servers: &[String]) -> String {
    let (_, db) = mysql_scratch_db(&servers[0]).await;
    for server in &servers[1..] {
        let pool = sqlx::AnyPool::connect(server.trim_end_matches('/'))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let found = sqlx::query(sqlx::AssertSqlSafe(format!("SHOW DATABASES LIKE '{db}'")))
                .fetch_optional(&pool)
                .await
                .unwrap();
            if found.is_some() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "database {db} did not reach {server} within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        pool.close().await;
    }
    db
}

/// Users and permissions: replaced by name, names case-sensitive, looked up one at a time.
async fn users_and_permissions<S: MetaStore + MessageStore>(s: &S) {
    assert!(!s.has_users().await.unwrap());
    assert_eq!(s.user("guest").await.unwrap(), None);
    let user = |name: &str, hash: &[u8]| UserRecord {
        name: name.to_string(),
        password_hash: hash.to_vec(),
        tags: "administrator".to_string(),
        limits: "{}".into(),
    };
    let perm = |vhost: &str, user: &str, read: &str| PermissionRecord {
        vhost: vhost.to_string(),
        user: user.to_string(),
        configure: ".*".to_string(),
        write: ".*".to_string(),
        read: read.to_string(),
    };
    apply(
        s,
        vec![
            Op::PutUser(user("guest", &[1, 2, 3, 0, 255])),
            Op::PutUser(user("Guest", &[9])),
            Op::PutUser(user("guest", &[4, 5, 6, 0, 255])),
            Op::PutPermission(perm("/", "guest", ".*")),
            Op::PutPermission(perm("/", "guest", "^amq\\.")),
        ],
    )
    .await;
    assert!(s.has_users().await.unwrap());
    assert_eq!(
        s.user("guest").await.unwrap(),
        Some(user("guest", &[4, 5, 6, 0, 255]))
    );
    assert_eq!(s.user("Guest").await.unwrap(), Some(user("Guest", &[9])));
    assert_eq!(s.user("GUEST").await.unwrap(), None);
    // User limits are part of the record: stored, read back, replaced with it.
    let limited = UserRecord {
        limits: r#"{"max-connections":2}"#.to_string(),
        ..user("Guest", &[9])
    };
    apply(s, vec![Op::PutUser(limited.clone())]).await;
    assert_eq!(s.user("Guest").await.unwrap(), Some(limited.clone()));
    assert!(s.list_users().await.unwrap().contains(&limited));
    apply(s, vec![Op::PutUser(user("Guest", &[9]))]).await;
    assert_eq!(s.user("Guest").await.unwrap(), Some(user("Guest", &[9])));
    assert_eq!(
        s.permission("/", "guest").await.unwrap(),
        Some(perm("/", "guest", "^amq\\."))
    );
    assert_eq!(s.permission("/", "Guest").await.unwrap(), None);
    assert_eq!(s.permission("other", "guest").await.unwrap(), None);
    let topic = |x: &str, w: &str| TopicPermissionRecord {
        vhost: "/".to_string(),
        user: "guest".to_string(),
        exchange: x.to_string(),
        write: w.to_string(),
        read: "^r\\.".to_string(),
    };
    assert_eq!(s.topic_permissions("/", "guest").await.unwrap(), vec![]);
    apply(
        s,
        vec![
            Op::PutTopicPermission(topic("amq.topic", "^a")),
            Op::PutTopicPermission(topic("logs", "^{username}\\.")),
            Op::PutTopicPermission(topic("amq.topic", "^b")),
        ],
    )
    .await;
    assert_eq!(
        s.topic_permissions("/", "guest").await.unwrap(),
        vec![topic("amq.topic", "^b"), topic("logs", "^{username}\\.")]
    );
    assert_eq!(s.topic_permissions("/", "Guest").await.unwrap(), vec![]);
}

pub fn default_vhost() -> VhostRecord {
    VhostRecord {
        name: "/".to_string(),
        description: "Default virtual host".to_string(),
        tags: String::new(),
        default_queue_type: "classic".to_string(),
    }
}

/// Vhosts and runtime parameters: replaced by key, listed in key order; deleting a vhost takes
/// everything in it and nothing outside it; deleting a user takes its permissions.
async fn vhosts_and_parameters<S: MetaStore + MessageStore>(s: &S) {
    let vhost = |name: &str, d: &str| VhostRecord {
        name: name.to_string(),
        description: d.to_string(),
        tags: "a,b".to_string(),
        default_queue_type: "classic".to_string(),
    };
    let param = |v: &str, c: &str, n: &str, value: &str| ParameterRecord {
        vhost: v.to_string(),
        component: c.to_string(),
        name: n.to_string(),
        value: value.to_string(),
    };
    let perm = |vhost: &str, user: &str| PermissionRecord {
        vhost: vhost.to_string(),
        user: user.to_string(),
        configure: ".*".to_string(),
        write: ".*".to_string(),
        read: ".*".to_string(),
    };
    let mut x = exchange("x");
    x.vhost = "v1".to_string();
    apply(
        s,
        vec![
            Op::PutVhost(vhost("v1", "one")),
            Op::PutVhost(vhost("v1", "first")),
            Op::PutVhost(vhost("v2", "")),
            Op::PutParameter(param("v1", "policy", "p", "{\"pattern\":\"^q\"}")),
            Op::PutParameter(param("v1", "policy", "p", "{\"pattern\":\".*\"}")),
            Op::PutParameter(param("v2", "policy", "p", "{}")),
            Op::PutParameter(param("v1", "vhost-limits", "limits", "{\"max-queues\":3}")),
            Op::PutGlobalParameter(GlobalParameterRecord {
                name: "cluster_name".to_string(),
                value: "\"w\"".to_string(),
            }),
            Op::PutPermission(perm("v1", "guest")),
            Op::PutPermission(perm("v2", "guest")),
            Op::PutExchange(x),
        ],
    )
    .await;
    let m = s.load_meta().await.unwrap();
    assert_eq!(
        m.vhosts,
        vec![default_vhost(), vhost("v1", "first"), vhost("v2", "")]
    );
    assert_eq!(
        m.parameters,
        vec![
            param("v1", "policy", "p", "{\"pattern\":\".*\"}"),
            param("v1", "vhost-limits", "limits", "{\"max-queues\":3}"),
            param("v2", "policy", "p", "{}"),
        ]
    );
    assert_eq!(m.global_parameters.len(), 1);
    assert_eq!(m.exchanges.len(), 1);
    apply(
        s,
        vec![
            Op::DeleteVhost {
                name: "v1".to_string(),
            },
            Op::DeleteParameter {
                vhost: "v2".to_string(),
                component: "policy".to_string(),
                name: "p".to_string(),
            },
            Op::DeleteGlobalParameter {
                name: "cluster_name".to_string(),
            },
        ],
    )
    .await;
    let m = s.load_meta().await.unwrap();
    assert_eq!(m.vhosts, vec![default_vhost(), vhost("v2", "")]);
    assert_eq!(m.parameters, vec![]);
    assert_eq!(m.global_parameters, vec![]);
    assert_eq!(m.exchanges, vec![]);
    assert_eq!(s.permission("v1", "guest").await.unwrap(), None);
    assert_eq!(
        s.permission("v2", "guest").await.unwrap(),
        Some(perm("v2", "guest"))
    );
    let listed: Vec<_> = s.list_permissions().await.unwrap();
    assert_eq!(listed.iter().filter(|p| p.vhost == "v2").count(), 1);
    assert!(s
        .list_users()
        .await
        .unwrap()
        .iter()
        .any(|u| u.name == "Guest"));
    apply(
        s,
        vec![
            Op::DeleteUser {
                name: "guest".to_string(),
            },
            Op::DeleteVhost {
                name: "v2".to_string(),
            },
        ],
    )
    .await;
    assert_eq!(s.user("guest").await.unwrap(), None);
    assert_eq!(s.permission("/", "guest").await.unwrap(), None);
    assert_eq!(s.topic_permissions("/", "guest").await.unwrap(), vec![]);
    assert!(s.list_topic_permissions().await.unwrap().is_empty());
    let names: Vec<_> = s
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, vec!["Guest".to_string()]);
    assert_eq!(s.load_meta().await.unwrap().vhosts, vec![default_vhost()]);
}

async fn apply<S: MessageStore>(store: &S, ops: Vec<Op>) {
    store.apply(&Plan::from_ops(ops)).await.unwrap();
}

pub async fn run<S: MetaStore + MessageStore>(store: Arc<S>) {
    let s = &*store;
    let r = s.recover().await.unwrap();
    assert_eq!(
        r.snapshot,
        Snapshot {
            vhosts: vec![default_vhost()],
            ..Snapshot::default()
        }
    );
    assert_eq!((r.next_message_id, r.next_queue_id), (1, 1));

    users_and_permissions(s).await;
    vhosts_and_parameters(s).await;

    // Metadata, written through ops; names are case-sensitive.
    apply(
        s,
        vec![
            Op::PutExchange(exchange("x")),
            Op::PutExchange(exchange("x")),
            Op::PutExchange(exchange("X")),
            Op::PutQueue(queue(1, "q1")),
            Op::PutQueue(queue(2, "q2")),
            Op::PutQueue(queue(3, "Q2")),
            Op::PutBinding(binding("x", "q1", "a.#")),
            Op::PutBinding(binding("x", "q1", "a.#")),
            Op::PutBinding(binding("x", "q2", "b")),
        ],
    )
    .await;
    let m = s.load_meta().await.unwrap();
    assert_eq!(m.exchanges, vec![exchange("X"), exchange("x")]);
    assert_eq!(
        m.queues,
        vec![queue(1, "q1"), queue(2, "q2"), queue(3, "Q2")]
    );
    assert_eq!(m.bindings.len(), 2);
    apply(
        s,
        vec![
            Op::DeleteBinding(binding("x", "q2", "b")),
            Op::DeleteQueue {
                id: 3,
                vhost: "/".into(),
                name: "Q2".into(),
            },
        ],
    )
    .await;
    let m = s.load_meta().await.unwrap();
    assert_eq!(m.bindings, vec![binding("x", "q1", "a.#")]);
    assert_eq!(m.queues.len(), 2);

    // A message in two queues is stored once and goes with its last position.
    let big = Bytes::from(
        (0..(3 * sql::CHUNK + 5))
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
    apply(
        s,
        vec![
            Op::Insert {
                message: message(10, true, Bytes::from_static(b"hello")),
                entries: vec![(1, 1), (2, 1)],
            },
            Op::Insert {
                message: message(11, true, big.clone()),
                entries: vec![(1, 2)],
            },
            Op::Insert {
                message: message(12, false, Bytes::new()),
                entries: vec![(1, 3)],
            },
        ],
    )
    .await;
    let sum = s.queue_summary(1).await.unwrap();
    assert_eq!((sum.count, sum.min_seq, sum.max_seq), (3, 1, 3));
    assert_eq!(
        s.queue_bytes(1).await.unwrap(),
        5 + big.len() as u64,
        "inline and chunked bodies"
    );
    let page = s.read_queue(1, 0, 10, usize::MAX).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        page[0].message,
        *message(10, true, Bytes::from_static(b"hello"))
    );
    assert_eq!(page[1].message.body, big);
    assert_eq!(page[2].message.body, Bytes::new());
    // after_seq and the byte cap (at least one entry always comes back)
    let page = s.read_queue(1, 1, 10, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].seq, 2);

    apply(
        s,
        vec![Op::Remove {
            queue_id: 1,
            seq: 1,
            message_id: 10,
        }],
    )
    .await;
    assert!(s.read_message(10).await.unwrap().is_some());
    apply(
        s,
        vec![
            Op::Remove {
                queue_id: 2,
                seq: 1,
                message_id: 10,
            },
            Op::Remove {
                queue_id: 1,
                seq: 2,
                message_id: 11,
            },
        ],
    )
    .await;
    assert!(s.read_message(10).await.unwrap().is_none());
    assert!(s.read_message(11).await.unwrap().is_none());
    assert_eq!(s.queue_summary(2).await.unwrap().count, 0);

    // Delivered marks only grow.
    apply(
        s,
        vec![
            Op::Delivered {
                queue_id: 1,
                seq: 7,
            },
            Op::Delivered {
                queue_id: 2,
                seq: 4,
            },
        ],
    )
    .await;
    apply(
        s,
        vec![Op::Delivered {
            queue_id: 1,
            seq: 5,
        }],
    )
    .await;
    let m = s.load_meta().await.unwrap();
    let marks: Vec<i64> = m.queues.iter().map(|q| q.delivered_seq).collect();
    assert_eq!(marks, vec![7, 4]);

    // A position marked redelivered reads back marked, in the same batch as its insert or
    // later; a mark on a position that is gone (or removed in the same batch) changes nothing,
    // and a position written anew is not marked.
    apply(
        s,
        vec![
            Op::Insert {
                message: message(30, true, Bytes::from_static(b"moved")),
                entries: vec![(2, 30)],
            },
            Op::Redelivered {
                queue_id: 2,
                seq: 30,
            },
            Op::Insert {
                message: message(31, true, Bytes::from_static(b"plain")),
                entries: vec![(2, 31), (2, 32)],
            },
            Op::Redelivered {
                queue_id: 2,
                seq: 99,
            },
        ],
    )
    .await;
    apply(
        s,
        vec![
            Op::Redelivered {
                queue_id: 2,
                seq: 32,
            },
            Op::Remove {
                queue_id: 2,
                seq: 31,
                message_id: 31,
            },
            Op::Redelivered {
                queue_id: 2,
                seq: 31,
            },
        ],
    )
    .await;
    let marked = |rows: Vec<crate::StoredEntry>| -> Vec<(i64, bool)> {
        rows.iter().map(|e| (e.seq, e.redelivered)).collect()
    };
    let rows = s.read_queue(2, 29, 10, usize::MAX).await.unwrap();
    assert_eq!(marked(rows), vec![(30, true), (32, true)]);
    apply(
        s,
        vec![Op::Insert {
            message: message(31, true, Bytes::from_static(b"plain")),
            entries: vec![(2, 31)],
        }],
    )
    .await;
    let rows = s.read_queue(2, 29, 10, usize::MAX).await.unwrap();
    assert_eq!(marked(rows), vec![(30, true), (31, false), (32, true)]);
    apply(
        s,
        vec![Op::Purge {
            queue_id: 2,
            after_seq: 29,
        }],
    )
    .await;

    // Recovery drops transient messages and positions of queues that are gone.
    apply(
        s,
        vec![
            Op::Insert {
                message: message(20, true, Bytes::from_static(b"kept")),
                entries: vec![(2, 5), (99, 1)],
            },
            Op::Insert {
                message: message(21, true, Bytes::from_static(b"orphan")),
                entries: vec![(99, 2)],
            },
        ],
    )
    .await;
    let r = s.recover().await.unwrap();
    assert_eq!(r.next_message_id, 21);
    assert_eq!(r.next_queue_id, 3);
    assert!(
        s.read_message(12).await.unwrap().is_none(),
        "transient kept"
    );
    assert!(s.read_message(21).await.unwrap().is_none(), "orphan kept");
    assert_eq!(s.queue_summary(1).await.unwrap().count, 0);
    let page = s.read_queue(2, 0, 10, usize::MAX).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].message.body, Bytes::from_static(b"kept"));

    // Purge, and a queue delete takes its messages and bindings.
    apply(
        s,
        vec![
            Op::Insert {
                message: message(30, true, Bytes::from_static(b"a")),
                entries: vec![(1, 10), (2, 6)],
            },
            Op::Purge {
                queue_id: 2,
                after_seq: 0,
            },
        ],
    )
    .await;
    assert_eq!(s.queue_summary(2).await.unwrap().count, 0);
    assert_eq!(s.queue_summary(1).await.unwrap().count, 1);
    assert!(s.read_message(30).await.unwrap().is_some());
    apply(
        s,
        vec![Op::Insert {
            message: message(31, true, Bytes::from_static(b"b")),
            entries: vec![(1, 11)],
        }],
    )
    .await;
    apply(
        s,
        vec![
            Op::DeleteQueue {
                id: 1,
                vhost: "/".into(),
                name: "q1".into(),
            },
            Op::DeleteExchange {
                vhost: "/".into(),
                name: "x".into(),
            },
        ],
    )
    .await;
    assert!(s.read_message(30).await.unwrap().is_none());
    assert!(s.read_message(31).await.unwrap().is_none());
    let m = s.load_meta().await.unwrap();
    assert_eq!(
        m.queues,
        vec![QueueRecord {
            delivered_seq: 4,
            ..queue(2, "q2")
        }]
    );
    assert!(m.bindings.is_empty());
    assert_eq!(m.exchanges, vec![exchange("X")]);

    writer_batches(store.clone()).await;
}

/// The writer: tickets commit in order; an insert removed in the same batch is never written.
async fn writer_batches<S: MessageStore>(store: Arc<S>) {
    let (w, task) = Writer::start(store.clone(), WriterSettings::default());
    let mut last = 0;
    for i in 0..200i64 {
        last = w.submit(Op::Insert {
            message: message(1000 + i, true, Bytes::from(vec![1u8; 100])),
            entries: vec![(2, 100 + i)],
        });
    }
    let cancelled = w.submit(Op::Insert {
        message: message(5000, true, Bytes::from_static(b"never")),
        entries: vec![(2, 9999)],
    });
    w.submit(Op::Remove {
        queue_id: 2,
        seq: 9999,
        message_id: 5000,
    });
    assert!(cancelled > last);
    w.wait(cancelled + 1).await;
    assert!(w.committed() > last);
    assert_eq!(w.held_bytes(), 0);
    assert!(store.read_message(5000).await.unwrap().is_none());
    assert_eq!(store.queue_summary(2).await.unwrap().count, 200);
    w.close();
    task.await.unwrap();
    assert_eq!(
        w.submit(Op::Purge {
            queue_id: 2,
            after_seq: 0
        }),
        crate::writer::NEVER,
        "a closed writer's ticket is never committed"
    );
}

/// A chunked body's rows go with its message, however the message goes: its last position
/// acked, a purge, its queue deleted, or recovery dropping what was transient. Checked in the
/// table itself: nothing reads an orphaned chunk back, so only the disk would show a leak.
pub async fn chunks_go_with_their_messages(s: &SqlStore) {
    let chunks = |id: i64| async move {
        sqlx::query("SELECT COUNT(*) FROM message_chunks WHERE message_id = ?")
            .bind(id)
            .fetch_one(&s.pool)
            .await
            .and_then(|r| sqlx::Row::try_get::<i64, _>(&r, 0))
            .unwrap()
    };
    let big = |n: u8| Bytes::from(vec![n; sql::CHUNK + 1]);
    s.recover().await.unwrap();
    apply(
        s,
        vec![
            Op::PutQueue(queue(1, "c1")),
            Op::PutQueue(queue(2, "c2")),
            Op::Insert {
                message: message(50, true, big(50)),
                entries: vec![(1, 1), (2, 1)],
            },
            Op::Insert {
                message: message(51, true, big(51)),
                entries: vec![(1, 2)],
            },
            Op::Insert {
                message: message(52, true, big(52)),
                entries: vec![(1, 3)],
            },
            Op::Insert {
                message: message(53, false, big(53)),
                entries: vec![(2, 2)],
            },
        ],
    )
    .await;
    for id in 50..54 {
        assert_eq!(chunks(id).await, 2, "message {id} stored in two chunks");
    }
    let remove = |queue_id, seq, message_id| Op::Remove {
        queue_id,
        seq,
        message_id,
    };
    apply(s, vec![remove(1, 1, 50)]).await;
    assert_eq!(chunks(50).await, 2, "still in queue 2");
    apply(s, vec![remove(2, 1, 50)]).await;
    assert_eq!(chunks(50).await, 0, "acked from both queues");
    apply(
        s,
        vec![Op::Purge {
            queue_id: 1,
            after_seq: 2,
        }],
    )
    .await;
    assert_eq!(
        (chunks(51).await, chunks(52).await),
        (2, 0),
        "purged after 2"
    );
    apply(
        s,
        vec![Op::DeleteQueue {
            id: 1,
            vhost: "/".into(),
            name: "c1".into(),
        }],
    )
    .await;
    assert_eq!(chunks(51).await, 0, "its queue deleted");
    assert_eq!(chunks(53).await, 2);
    s.recover().await.unwrap();
    assert_eq!(chunks(53).await, 0, "transient, dropped by recovery");
    let left: i64 = sqlx::query("SELECT COUNT(*) FROM message_chunks")
        .fetch_one(&s.pool)
        .await
        .and_then(|r| sqlx::Row::try_get(&r, 0))
        .unwrap();
    assert_eq!(left, 0);
}
