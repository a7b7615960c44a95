//! The browser client as a package (`client/`): its own Node tests (`client/test/`, run with
//! `node --test`) against a real development-mode server over WebSocket: order, exact resume
//! after `reconnect()`, reset, the fallback without WebTransport and after a stalled session,
//! counted by reason in `/metrics`.

mod support;

use support::TestServer;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_packages_node_tests_pass_against_a_real_server() {
    let s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
        a.heartbeat = Some("1s".parse().unwrap());
    })
    .await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/client");
    let mut child = tokio::process::Command::new("node")
        .args(["--experimental-websocket", "--test", "test/"])
        .current_dir(dir)
        .env(
            "EDGESTREAM_URL",
            format!("http://127.0.0.1:{}", s.addr.port()),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    // Printed as it comes, so a run cut by the guard still shows where it was.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut text = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            eprintln!("node: {line}");
            text.push_str(&line);
            text.push('\n');
        }
        child.wait().await.unwrap()
    };
    let status = tokio::time::timeout(support::HANG_GUARD * 4, read)
        .await
        .expect("the Node tests finish");
    assert!(status.success(), "node --test failed: {status}");
    assert!(text.contains("# pass 4"), "all four ran and passed");
}
