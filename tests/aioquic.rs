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

fn settings_of(out: &[Value]) -> std::collections::HashMap<u64, u64> {
    of(out, "settings")[0]["settings"]
        .as_object()
        .expect("settings printed")
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
        .collect()
}

/// Safari 26.4 refuses a WebTransport server whose HTTP/3 SETTINGS lack `WT_MAX_SESSIONS`
/// (0x14e9cd29, drafts 13/14) and, with more than one session, the initial flow-control
/// windows; Chromium needs draft-02's pair, Firefox drafts 07+'s. Read off the wire by
/// aioquic (not the server's own encoder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_carry_what_safari_chromium_and_firefox_need() {
    let s = TestServer::start().await;
    let token = s.token(&["acme"]);
    let url = s.wt_url(&format!("access_token={token}&orgs=acme"));
    let out = run_client(&url, &s.cert_hash().await, 0, &[], || async {}).await;
    let got = settings_of(&out);
    let at_least = |id: u64, min: u64, what: &str| {
        let v = got.get(&id).copied();
        assert!(
            v.is_some_and(|v| v >= min),
            "{what} ({id:#x}) = {v:?}: {got:?}"
        );
    };
    at_least(0x14e9cd29, 1, "WT_MAX_SESSIONS (drafts 13/14, Safari)");
    at_least(0x2b61, 64 * 1024, "WT_INITIAL_MAX_DATA");
    at_least(0x2b64, 1, "WT_INITIAL_MAX_STREAMS_UNI");
    at_least(
        0x2b65,
        2,
        "WT_INITIAL_MAX_STREAMS_BIDI (control stream and an upload)",
    );
    at_least(0x2b603742, 1, "ENABLE_WEBTRANSPORT (draft-02, Chromium)");
    at_least(0xc671706a, 1, "WEBTRANSPORT_MAX_SESSIONS (drafts 07-12)");
    at_least(0x33, 1, "H3_DATAGRAM");
    at_least(0x08, 1, "ENABLE_CONNECT_PROTOCOL");
}

/// A client with session-level flow control (drafts 13/14, as Safari): the server sends no
/// more stream bytes than the client's `WT_INITIAL_MAX_DATA`, says it is blocked
/// (`WT_DATA_BLOCKED`), and goes on, in order and complete, once a `WT_MAX_DATA` capsule
/// raises the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_window_is_honoured_and_refilled_by_wt_max_data() {
    const WINDOW: u64 = 2_000;
    let s = TestServer::start().await;
    let token = s.token(&["acme"]);
    let url = s.wt_url(&format!("access_token={token}&orgs=acme"));
    let flags = ["--max-data", "2000"];
    let out = run_client(&url, &s.cert_hash().await, 50, &flags, || async {
        let events: Vec<Value> = (0..50)
            .map(|i| json!({"i": i, "pad": "x".repeat(100)}))
            .collect();
        s.api.publish(&token, "acme", &json!(events)).await.unwrap();
    })
    .await;
    let stalled = of(&out, "stalled");
    assert_eq!(
        stalled.len(),
        1,
        "the server stopped at the window: {out:?}"
    );
    let bytes = stalled[0]["bytes"].as_u64().unwrap();
    assert!(
        bytes <= WINDOW && bytes > WINDOW / 2,
        "stream bytes before the refill: {bytes} (window {WINDOW})"
    );
    assert!(stalled[0]["events"].as_u64().unwrap() < 50);
    assert!(
        of(&out, "capsule").iter().any(|c| c["type"] == 0x190b4d41),
        "WT_DATA_BLOCKED was sent: {out:?}"
    );
    let seqs: Vec<u64> = of(&out, "event")
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=50).collect::<Vec<_>>(),
        "all, in order, after the refill"
    );
}
