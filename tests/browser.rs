//! Real headless Chromium (Debian's, driven by playwright-core) against a real server over
//! WebTransport: a page served by the server connects with `serverCertificateHashes`, gets
//! SUBSCRIBED, 1,000 events in order and heartbeat datagrams, and reads the close codes 4001
//! (bad token) and 4503 (server shutdown). `scripts/test-all` installs Chromium and the npm
//! package; this test fails, never skips, when they are missing.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::TestServer;
use tokio::io::{AsyncBufReadExt, BufReader};

const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_receives_events_heartbeats_and_close_codes_over_webtransport() {
    assert!(
        std::path::Path::new(&format!("{BROWSER_DIR}/node_modules/playwright-core")).exists(),
        "run scripts/test-all (or npm ci in tests/browser) to install playwright-core"
    );
    // Development mode: the page's origin is allowed and tokens come from /v1/dev/token.
    let mut s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.heartbeat = Some("200ms".parse().unwrap());
    })
    .await;
    let (_, v) = s
        .api
        .get("/v1/dev/token?sub=alice&orgs=acme", None)
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let bad = edgestream_testkit::token::tampered(&token);
    let mut node = tokio::process::Command::new("node")
        .arg(format!("{BROWSER_DIR}/wt_e2e.mjs"))
        .args([
            format!("http://127.0.0.1:{}", s.addr.port()),
            token,
            bad,
            "1000".into(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut result: Option<Value> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .expect("browser run timed out")
    {
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::String(line.clone()));
        match v["step"].as_str() {
            Some("ready-for-shutdown") => s.begin_stop(),
            Some("result") => result = Some(v),
            _ => eprintln!("browser: {line}"),
        }
    }
    let status = node.wait().await.unwrap();
    assert!(status.success(), "node exited with {status}");
    let r = result.expect("a result line");
    assert_eq!(r["first"]["t"], "subscribed", "{r}");
    assert_eq!(r["first"]["org"], "acme");
    assert_eq!(r["received"], 1000);
    assert_eq!(r["inOrder"], true);
    assert_eq!(r["payloadsOk"], true);
    assert!(r["heartbeats"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["lastHeartbeat"]["heads"]["acme"], 1000, "{r}");
    assert_eq!(r["badClose"]["closeCode"], 4001, "{r}");
    assert_eq!(r["finalClose"]["closeCode"], 4503, "{r}");
    s.join().await.unwrap();
}
