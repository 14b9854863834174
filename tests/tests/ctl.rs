//! `warrenctl` against an in-process broker: rabbitmqctl's commands over the management API,
//! table and JSON output, exit codes, and `ping` as the health check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;
use warren_broker::Running;

fn warrenctl() -> PathBuf {
    let p = std::env::var_os("WARRENCTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/warrenctl")
        });
    assert!(
        p.exists(),
        "{} missing: build the workspace first",
        p.display()
    );
    p
}

/// Runs warrenctl against `b`: (exit code, stdout, stderr).
fn ctl(b: &Running, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(warrenctl())
        .arg("--url")
        .arg(format!("http://{}", b.http.unwrap()))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn broker_http() -> Running {
    broker_with(|c| {
        c.http_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmqctl_commands_work_over_the_api() {
    let b = broker_http().await;
    // Each call blocks on a child process: run them off the runtime's threads.
    let run = |args: Vec<&'static str>| {
        let b = &b;
        tokio::task::block_in_place(|| ctl(b, &args))
    };
    let (code, out, _) = run(vec!["ping"]);
    assert_eq!(code, 0);
    assert!(out.contains("Ping succeeded"), "{out}");
    assert_eq!(run(vec!["add_vhost", "ctl-v"]).0, 0);
    assert_eq!(run(vec!["add_user", "carol", "pw"]).0, 0);
    let (code, _, err) = run(vec!["add_user", "carol", "pw"]);
    assert_ne!(code, 0, "adding an existing user fails");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        run(vec!["set_user_tags", "carol", "management", "monitoring"]).0,
        0
    );
    assert_eq!(
        run(vec![
            "set_permissions",
            "-p",
            "ctl-v",
            "carol",
            ".*",
            ".*",
            ".*"
        ])
        .0,
        0
    );
    let (_, out, _) = run(vec!["-q", "list_users"]);
    let carol = out
        .lines()
        .find(|l| l.starts_with("carol\t"))
        .expect("carol listed");
    assert_eq!(carol, "carol\tmanagement,monitoring");
    let (_, out, _) = run(vec!["-q", "--formatter", "json", "list_vhosts"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v.as_array().unwrap().iter().any(|x| x["name"] == "ctl-v"));
    // The user logs in over AMQP with what warrenctl set.
    let url = format!("amqp://carol:pw@{}/ctl-v", b.addr);
    let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("carol logs in");
    let ch = c.create_channel().await.unwrap();
    declare(&ch, "ctl-q").await;
    let (_, out, _) = run(vec![
        "-q",
        "-p",
        "ctl-v",
        "list_queues",
        "name",
        "messages",
        "durable",
    ]);
    assert_eq!(out, "name\tmessages\tdurable\nctl-q\t0\tfalse\n");
    assert_eq!(run(vec!["change_password", "carol", "pw2"]).0, 0);
    assert_eq!(
        run(vec![
            "set_policy",
            "-p",
            "ctl-v",
            "cap",
            "^ctl",
            r#"{"max-length":1}"#,
            "--apply-to",
            "queues"
        ])
        .0,
        0
    );
    let (_, out, _) = run(vec!["-q", "-p", "ctl-v", "list_policies"]);
    assert!(out.contains("cap\t^ctl\tqueues"), "{out}");
    let (_, out, _) = run(vec!["-q", "--no-table-headers", "list_connections", "user"]);
    assert_eq!(out, "carol\n");
    let (code, out, _) = run(vec![
        "-q",
        "--formatter",
        "json",
        "list_connections",
        "name",
    ]);
    assert_eq!(code, 0);
    let conns: Value = serde_json::from_str(out.trim()).unwrap();
    let name = conns[0]["name"].as_str().unwrap().to_string();
    let b2 = &b;
    let (code, _, _) = tokio::task::block_in_place(|| ctl(b2, &["close_connection", &name, "bye"]));
    assert_eq!(code, 0);
    for _ in 0..100 {
        if !c.status().connected() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!c.status().connected());
    // Export and import.
    let dir = std::env::temp_dir().join(format!("warrenctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("defs.json");
    let f = file.to_str().unwrap().to_string();
    let (code, _, _) = tokio::task::block_in_place(|| ctl(b2, &["export_definitions", &f]));
    assert_eq!(code, 0);
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(d["queues"]
        .as_array()
        .unwrap()
        .iter()
        .any(|q| q["name"] == "ctl-q"));
    assert_eq!(run(vec!["delete_queue", "-p", "ctl-v", "ctl-q"]).0, 0);
    let (code, _, _) = tokio::task::block_in_place(|| ctl(b2, &["import_definitions", &f]));
    assert_eq!(code, 0);
    assert!(b.broker.vhost("ctl-v").unwrap().queue("ctl-q").is_some());
    assert_eq!(run(vec!["purge_queue", "-p", "ctl-v", "ctl-q"]).0, 0);
    assert_eq!(run(vec!["clear_policy", "-p", "ctl-v", "cap"]).0, 0);
    assert_eq!(run(vec!["delete_user", "carol"]).0, 0);
    assert_eq!(run(vec!["delete_vhost", "ctl-v"]).0, 0);
    let (code, out, _) = run(vec!["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("Listeners"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
    b.stop().await;
    // With the node gone, ping fails (the health check turns unhealthy).
    let gone = broker_http().await;
    let addr = gone.http.unwrap();
    gone.stop().await;
    let out = Command::new(warrenctl())
        .args(["--url", &format!("http://{addr}"), "-t", "2", "ping"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
}
