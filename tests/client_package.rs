//! The browser client as a package (`client/`): its own Node tests (`client/test/`, run with
//! `node --test`) against a real development-mode server over WebSocket: order, exact resume
//! after `reconnect()`, reset, the fallback without WebTransport and after a stalled session,
//! counted by reason in `/metrics`.

mod support;

use support::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_packages_node_tests_pass_against_a_real_server() {
    let s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
        a.heartbeat = Some("1s".parse().unwrap());
    })
    .await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/client");
    let run = tokio::process::Command::new("node")
        .args(["--experimental-websocket", "--test", "test/"])
        .current_dir(dir)
        .env(
            "EDGESTREAM_URL",
            format!("http://127.0.0.1:{}", s.addr.port()),
        )
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(support::HANG_GUARD * 4, run)
        .await
        .expect("the Node tests finish")
        .expect("node runs");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "node --test failed: {}", out.status);
    assert!(text.contains("# pass 4"), "all four ran and passed");
}
