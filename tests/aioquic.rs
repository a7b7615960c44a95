//! An independent client: `tests/aioquic/client.py`, a WebTransport client on Python's aioquic
//! (another QUIC and HTTP/3 stack than the server's quinn), written from PROTOCOL.md alone,
//! runs a subset of the end-to-end checks: events in order with their payloads, heartbeat
//! datagrams naming the head, PING answered on the control stream, exact resume, refusal.
//!
//! The Python environment is [`support::python`].

mod support;

use std::process::Stdio;

use serde_json::{json, Value};
use support::{python, TestServer};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Runs the client until it ends; `on_subscribed` runs once its first SUBSCRIBED is printed.
/// Returns every line it printed.
async fn run_client<F: std::future::Future<Output = ()>>(
    url: &str,
    hash: &str,
    events: usize,
    flags: &[&str],
    on_subscribed: impl FnOnce() -> F,
) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aioquic/client.py");
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(script)
        .arg(url)
        .arg(hash)
        .arg(events.to_string())
        .args(flags);
    let mut child = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run the aioquic client");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    let mut hook = Some(on_subscribed);
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value =
                serde_json::from_str(&line).unwrap_or(json!({"t": "text", "line": line}));
            let subscribed = v["t"] == "subscribed";
            out.push(v);
            if subscribed {
                if let Some(h) = hook.take() {
                    h().await;
                }
            }
        }
    };
    tokio::time::timeout(support::HANG_GUARD * 2, read)
        .await
        .expect("the aioquic client finishes");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "client exit {status}: {out:?}");
    out
}

fn of(out: &[Value], t: &str) -> Vec<Value> {
    out.iter().filter(|v| v["t"] == t).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_client_gets_events_heartbeats_and_pongs() {
    let s = TestServer::start_with(|a| a.heartbeat = Some("200ms".parse().unwrap())).await;
    let token = s.token(&["acme"]);
    let url = s.wt_url(&format!("access_token={token}&orgs=acme"));
    let flags = ["--ping", "hello", "--heartbeat"];
    let out = run_client(&url, &s.cert_hash().await, 100, &flags, || async {
        for batch in 0..10 {
            let events: Vec<Value> = (0..10).map(|i| json!({"i": batch * 10 + i})).collect();
            s.api.publish(&token, "acme", &json!(events)).await.unwrap();
        }
    })
    .await;
    assert_eq!(of(&out, "connected")[0]["status"], "200");
    let sub = &of(&out, "subscribed")[0];
    assert_eq!(
        (sub["org"].as_str(), sub["resume"].as_u64()),
        (Some("acme"), Some(0))
    );
    let events = of(&out, "event");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    for (n, e) in events.iter().enumerate() {
        assert_eq!(e["payload"], json!({"i": n}), "payload byte for byte");
    }
    assert!(
        of(&out, "heartbeat")
            .iter()
            .any(|h| h["heads"]["acme"].as_u64().is_some()),
        "heartbeat datagrams name the org's head: {out:?}"
    );
    assert_eq!(of(&out, "pong")[0]["body"], "hello");
    assert_eq!(of(&out, "done").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_client_resumes_exactly_and_is_refused_a_bad_token() {
    let s = TestServer::start().await;
    let token = s.token(&["acme"]);
    let r = s.publish_numbered(&token, "acme", 0..20).await;
    let epoch = r["epoch"].as_str().unwrap().to_string();
    let url = s.wt_url(&format!(
        "access_token={token}&orgs=acme&since=acme:{epoch}:5"
    ));
    let out = run_client(&url, &s.cert_hash().await, 15, &[], || async {}).await;
    let sub = &of(&out, "subscribed")[0];
    assert_eq!(sub["resume"], 1, "recovered: {sub}");
    let seqs: Vec<u64> = of(&out, "event")
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (6..=20).collect::<Vec<_>>());

    let url = s.wt_url("access_token=not-a-token&orgs=acme");
    let out = run_client(&url, &s.cert_hash().await, 1, &[], || async {}).await;
    assert!(
        of(&out, "subscribed").is_empty() && of(&out, "event").is_empty(),
        "{out:?}"
    );
    assert_eq!(
        of(&out, "closed").len(),
        1,
        "the session is closed: {out:?}"
    );
}
