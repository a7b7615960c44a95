//! Real headless browsers against a real server, each test on both engines
//! (`chromium::NAME`, `firefox::NAME`): Debian's Chromium driven by playwright-core, and
//! Debian's firefox-esr (153 ESR) driven by puppeteer-core over WebDriver BiDi
//! (tests/browser/engine.mjs). Raw WebTransport from a page (frames, heartbeats, close codes
//! 4001, 4003 and 4503), the browser client `/edgestream.js` (transport choice and fallback,
//! resume after a dropped connection and after a server restart, no retry loop on 4001, token
//! refresh on 4009, chat and presence) and the demo page (publish, chat, upload; a screenshot
//! per engine is kept in `test-artifacts/`). `scripts/test-all` installs both browsers and the
//! npm packages; these tests fail, never skip, when they are missing.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use support::TestServer;
use tokio::io::{AsyncBufReadExt, BufReader};

const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");

/// Runs a node script; `on_line` sees every JSON line; returns the `result` line.
/// `engine`: `chromium` or `firefox` (tests/browser/engine.mjs).
async fn run_node(
    engine: &str,
    script: &str,
    args: &[String],
    on_line: impl FnMut(&Value),
) -> Value {
    run_node_with(engine, script, args, &[], on_line).await
}

/// [`run_node`] with more environment for node and the browser (e.g. `HOME`).
async fn run_node_with(
    engine: &str,
    script: &str,
    args: &[String],
    env: &[(&str, &str)],
    mut on_line: impl FnMut(&Value),
) -> Value {
    for package in ["playwright-core", "puppeteer-core"] {
        assert!(
            std::path::Path::new(&format!("{BROWSER_DIR}/node_modules/{package}")).exists(),
            "run scripts/test-all (or npm ci in tests/browser) to install {package}"
        );
    }
    let mut node = tokio::process::Command::new("node")
        .arg(format!("{BROWSER_DIR}/{script}"))
        .args(args)
        .env("ENGINE", engine)
        .envs(env.iter().copied())
        .env(
            "ARTIFACTS",
            concat!(env!("CARGO_MANIFEST_DIR"), "/test-artifacts"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut result: Option<Value> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    while let Some(line) = tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .expect("browser run timed out")
        .unwrap()
    {
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::String(line.clone()));
        if v["step"] == "result" {
            result = Some(v.clone());
        }
        if v["step"] != "console" {
            eprintln!("{engine}: {line}");
        }
        on_line(&v);
    }
    let status = node.wait().await.unwrap();
    assert!(status.success(), "node exited with {status}");
    result.expect("a result line")
}

/// A development-mode server (any origin, tokens from /v1/dev/token) with 1 s heartbeats.
async fn dev_server() -> TestServer {
    TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
        a.heartbeat = Some("1s".parse().unwrap());
    })
    .await
}

fn base(s: &TestServer) -> String {
    format!("http://127.0.0.1:{}", s.addr.port())
}

async fn raw_webtransport_events_heartbeats_and_close_codes(engine: &str) {
    // Development mode: the page's origin is allowed and tokens come from /v1/dev/token.
    let s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
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
    let stopper = std::sync::Mutex::new(Some(s));
    let args = [
        base(stopper.lock().unwrap().as_ref().unwrap()),
        token,
        bad,
        "1000".into(),
    ];
    let r = run_node(engine, "wt_e2e.mjs", &args, |v| {
        if v["step"] == "ready-for-shutdown" {
            if let Some(s) = stopper.lock().unwrap().as_mut() {
                s.begin_stop();
            }
        }
    })
    .await;
    assert_eq!(r["first"]["t"], "subscribed", "{r}");
    assert_eq!(r["first"]["org"], "acme");
    assert_eq!(r["received"], 1000);
    assert_eq!(r["inOrder"], true);
    assert_eq!(r["payloadsOk"], true);
    assert!(r["heartbeats"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["lastHeartbeat"]["heads"]["acme"], 1000, "{r}");
    assert_eq!(r["badClose"]["closeCode"], 4001, "{r}");
    assert_eq!(r["forbiddenClose"]["closeCode"], 4003, "{r}");
    assert_eq!(r["finalClose"]["closeCode"], 4503, "{r}");
    let mut s = stopper.lock().unwrap().take().unwrap();
    s.join().await.unwrap();
}

fn assert_thousand_in_order(r: &Value, transport: &str) {
    assert_eq!(r["transport"], transport, "{r}");
    assert_eq!(r["count"], 1000, "{r}");
    assert_eq!(r["first"], 1, "{r}");
    assert_eq!(r["inOrder"], true, "{r}");
    assert_eq!(r["dataOk"], true, "{r}");
    assert_eq!(
        r["bigOk"], true,
        "a payload over the brotli threshold decodes: {r}"
    );
}

async fn client_auto_mode_picks_webtransport(engine: &str) {
    let s = dev_server().await;
    let r = run_node(engine, "client_e2e.mjs", &["auto".into(), base(&s)], |_| {}).await;
    assert_thousand_in_order(&r, "webtransport");
    // Counted by the engine the CONNECT's User-Agent names: Firefox sends one on the
    // WebTransport CONNECT, Chromium 156 does not (its WebTransport sessions are `unknown`).
    let label = if engine == "firefox" {
        "gecko"
    } else {
        "unknown"
    };
    assert_counted(&s, "webtransport", "none", label).await;
}

/// `/metrics` has counted a session of `transport` with this fallback reason and engine.
async fn assert_counted(s: &TestServer, transport: &str, fallback: &str, engine: &str) {
    let (_, text) = s.api.get("/metrics", None).await.unwrap();
    let series = format!(
        "sessions_by_client_total{{transport=\"{transport}\",fallback=\"{fallback}\",engine=\"{engine}\"}}"
    );
    assert!(text.as_str().unwrap().contains(&series), "{series}: {text}");
}

async fn client_falls_back_to_websocket_without_webtransport(engine: &str) {
    let s = dev_server().await;
    let r = run_node(
        engine,
        "client_e2e.mjs",
        &["no-webtransport".into(), base(&s)],
        |_| {},
    )
    .await;
    assert_thousand_in_order(&r, "websocket");
    let reason = r["statuses"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("WebTransport"),
        "the reason is reported: {r}"
    );
}

/// `--webtransport-share 0`: the client in auto mode does not try WebTransport, connects over
/// WebSocket with `fallback=share`, and `/metrics` counts it by reason and by the engine its
/// User-Agent names.
async fn client_honours_the_webtransport_share(engine: &str) {
    let s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
        a.heartbeat = Some("1s".parse().unwrap());
        a.webtransport_share = Some(0);
    })
    .await;
    let (_, info) = s.api.get("/v1/info", None).await.unwrap();
    assert_eq!(info["webtransport_share"], 0);
    let r = run_node(engine, "client_e2e.mjs", &["auto".into(), base(&s)], |_| {}).await;
    assert_thousand_in_order(&r, "websocket");
    let reason = r["statuses"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("share"), "{r}");
    // WebSocket upgrades carry the User-Agent on both engines.
    let label = if engine == "firefox" {
        "gecko"
    } else {
        "chromium"
    };
    assert_counted(&s, "websocket", "share", label).await;
}

/// Debian's Chromium 156 still opens WebTransport with `--disable-quic` (the flag turns off QUIC
/// for ordinary HTTP only), so the client keeps using it; this checks the events arrive either
/// way. The network-level fallback is `client_falls_back_when_the_quic_address_is_unreachable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_quic_disabled_still_gets_every_event() {
    let s = dev_server().await;
    let r = run_node(
        "chromium",
        "client_e2e.mjs",
        &["disable-quic".into(), base(&s)],
        |_| {},
    )
    .await;
    let transport = r["transport"].as_str().unwrap().to_string();
    assert!(
        transport == "webtransport" || transport == "websocket",
        "{r}"
    );
    assert_thousand_in_order(&r, &transport);
}

async fn client_falls_back_when_the_quic_address_is_unreachable(engine: &str) {
    // /v1/info names a UDP port where a socket swallows every packet: WebTransport never opens.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "https://127.0.0.1:{}/v1/stream",
        silent.local_addr().unwrap().port()
    );
    let s = TestServer::start_with(move |a| {
        a.jwt_secret = None;
        a.dev = true;
        a.heartbeat = Some("1s".parse().unwrap());
        a.public_webtransport_url = Some(url);
    })
    .await;
    let r = run_node(
        engine,
        "client_e2e.mjs",
        &["unreachable-quic".into(), base(&s)],
        |_| {},
    )
    .await;
    assert_thousand_in_order(&r, "websocket");
    let reason = r["statuses"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("WebTransport failed"), "{r}");
    assert_eq!(r["second"]["transport"], "websocket", "{r}");
    let reason = r["second"]["statuses"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("failed recently"),
        "the failure is remembered: {r}"
    );
    drop(silent);
}

async fn client_resumes_exactly_after_a_dropped_connection(engine: &str) {
    let s = dev_server().await;
    let r = run_node(engine, "client_e2e.mjs", &["drop".into(), base(&s)], |_| {}).await;
    assert_eq!(r["count"], 500, "every event once: {r}");
    assert_eq!(r["first"], 1);
    assert_eq!(r["inOrder"], true, "{r}");
    assert_eq!(r["dataOk"], true, "{r}");
    assert!(r["reconnects"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["resets"], 0, "{r}");
}

async fn client_does_not_retry_a_4001(engine: &str) {
    let s = dev_server().await;
    let r = run_node(
        engine,
        "client_e2e.mjs",
        &["bad-token".into(), base(&s)],
        |_| {},
    )
    .await;
    assert_eq!(r["connects"], 1, "one attempt, no reconnect loop: {r}");
    assert!(r["failed"].as_str().unwrap().contains("4001"), "{r}");
    let last = r["statuses"].as_array().unwrap().last().cloned().unwrap();
    assert_eq!(last["state"], "failed", "{r}");
}

async fn client_refreshes_its_token_on_4009_and_resumes(engine: &str) {
    let s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
        a.jwt_leeway = Some("0s".parse().unwrap());
        a.heartbeat = Some("1s".parse().unwrap());
    })
    .await;
    let r = run_node(
        engine,
        "client_e2e.mjs",
        &["refresh".into(), base(&s)],
        |_| {},
    )
    .await;
    assert!(r["hookCalls"].as_u64().unwrap() >= 1, "{r}");
    let seqs: Vec<u64> = r["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<_>>(),
        "no gap, no duplicate across the 4009: {r}"
    );
    assert_eq!(r["resets"], 0, "{r}");
    assert!(r["reasons"].to_string().contains("4009"), "{r}");
    assert_eq!(s.metrics().await["sessions_closed"]["4009"], 1);
}

async fn demo_page_shows_live_events_and_is_screenshotted(engine: &str) {
    let s = dev_server().await;
    let r = run_node(engine, "client_e2e.mjs", &["demo".into(), base(&s)], |_| {}).await;
    assert_eq!(r["transport"], "webtransport", "{r}");
    // 5 published events, the chat message (an org event too) and the upload's event.
    assert_eq!(r["count"], 7, "{r}");
    assert_eq!(r["rows"], 7, "{r}");
    assert_eq!(r["online"], "demo", "{r}");
    assert_eq!(r["orgOnline"], "demo", "{r}");
    assert!(
        r["chat"][0]
            .as_str()
            .unwrap()
            .contains("demo in lobby: hello from the demo"),
        "{r}"
    );
    let sha: String = {
        use sha2::Digest as _;
        sha2::Sha256::digest(vec![b'a'; 300 * 1024])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    assert_eq!(
        r["upload"].as_str().unwrap(),
        format!("307200 bytes, sha256 {sha}"),
        "uploaded over WebTransport from the page: {r}"
    );
    assert_eq!(r["progress"], 1.0, "{r}");
    let shot = std::fs::metadata(r["screenshot"].as_str().unwrap()).unwrap();
    assert!(shot.len() > 1000, "a real PNG was written");
    // The client module and its types are served.
    let (st, js) = s.api.get("/edgestream.js", None).await.unwrap();
    assert_eq!(st, 200);
    assert!(js
        .as_str()
        .unwrap()
        .contains("export class EdgeStreamClient"));
    assert_eq!(s.api.get("/edgestream.d.ts", None).await.unwrap().0, 200);
}

fn spawn_node_binary(http: u16, quic: u16, secret: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args([
            "serve",
            "--http-listen",
            &format!("127.0.0.1:{http}"),
            "--quic-listen",
            &format!("127.0.0.1:{quic}"),
        ])
        .args([
            "--heartbeat",
            "1s",
            "--allowed-origins",
            &format!("http://127.0.0.1:{http}"),
        ])
        .env("EDGESTREAM_JWT_SECRET", secret)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn edgestream")
}

async fn wait_healthy(http: u16) {
    let api = edgestream_testkit::http::Api::new(format!("http://127.0.0.1:{http}"));
    support::eventually("the server answers /healthz", || async {
        api.get("/healthz", None).await.ok().map(|_| ())
    })
    .await;
}

async fn client_reconnects_after_a_server_restart_and_gets_reset(engine: &str) {
    let secret = "restart-test-secret-0123456789";
    let (http, quic) = (support::free_tcp_port(), support::free_udp_port());
    let mut server = spawn_node_binary(http, quic, secret);
    wait_healthy(http).await;
    let token = edgestream_testkit::token::hs256(
        secret.as_bytes(),
        &edgestream_testkit::token::claims("alice", &["acme"], "subscribe publish"),
    );
    let restarted = std::sync::Mutex::new(None);
    let args = ["restart".into(), format!("http://127.0.0.1:{http}"), token];
    let r = {
        let server = &mut server;
        run_node(engine, "client_e2e.mjs", &args, |v| {
            if v["step"] == "kill" {
                // SIGKILL: no drain, no close code. The in-memory log is gone with the process.
                let _ = server.start_kill();
                // Wait (bounded) until the old process is gone and its ports are free.
                for _ in 0..500 {
                    if matches!(server.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut next = spawn_node_binary(http, quic, secret);
                // Bounded wait until it listens; a start that lost the port race is retried once.
                for attempt in 0..2 {
                    let mut up = false;
                    for _ in 0..500 {
                        if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() {
                            up = true;
                            break;
                        }
                        if matches!(next.try_wait(), Ok(Some(_))) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if up || attempt == 1 {
                        break;
                    }
                    next = spawn_node_binary(http, quic, secret);
                }
                *restarted.lock().unwrap() = Some(next);
            }
        })
        .await
    };
    assert_eq!(r["transport"], "webtransport", "{r}");
    let resets = r["resets"].as_array().unwrap();
    assert_eq!(resets.len(), 1, "{r}");
    assert_ne!(
        r["before"]["epoch"], r["after"]["epoch"],
        "a new epoch after the restart: {r}"
    );
    assert_eq!(resets[0]["epoch"], r["after"]["epoch"]);
    let seqs: Vec<u64> = r["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=10).chain(1..=5).collect::<Vec<_>>(), "{r}");
    assert!(r["reconnects"].as_u64().unwrap() >= 1);
    drop(restarted);
}

async fn two_browser_clients_chat_in_a_room_over_both_transports(engine: &str) {
    let s = dev_server().await;
    let r = run_node(engine, "client_e2e.mjs", &["chat".into(), base(&s)], |_| {}).await;
    assert_eq!(r["transports"], json!(["webtransport", "websocket"]), "{r}");
    assert_eq!(r["acks"], json!([1, 2]), "{r}");
    for who in ["ann", "bob"] {
        let got: Vec<(u64, String, String)> = r[who]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["from"].as_str().unwrap().to_string(),
                    e["body"]["text"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, "ann".to_string(), "hi bob".to_string()),
                (2, "bob".to_string(), "hi ann".to_string())
            ],
            "{who} sees one order: {r}"
        );
    }
    // Presence through the client's members map: ann (presence: true) hears the org and the
    // room, bob (no presence option) only the room he joined.
    let members = |v: &serde_json::Value| v["members"].clone();
    assert_eq!(
        members(&r["before"]["annLobby"]),
        json!(["ann", "bob"]),
        "{r}"
    );
    assert_eq!(
        members(&r["before"]["annOrg"]),
        json!(["ann", "bob"]),
        "{r}"
    );
    assert_eq!(
        members(&r["before"]["bobLobby"]),
        json!(["ann", "bob"]),
        "{r}"
    );
    assert_eq!(r["before"]["annOrg"]["online"], 2, "{r}");
    assert_eq!(members(&r["after"]["annLobby"]), json!(["ann"]), "{r}");
    assert_eq!(members(&r["after"]["annOrg"]), json!(["ann"]), "{r}");
    assert_eq!(
        r["bobOrg"],
        serde_json::Value::Null,
        "bob did not ask for the org: {r}"
    );
    let bob_rooms: Vec<&str> = r["bobPresence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["room"].as_str().unwrap())
        .collect();
    assert!(bob_rooms.iter().all(|room| *room == "lobby"), "{r}");
    let first = &r["annPresence"][0];
    assert_eq!(
        first["snapshot"], true,
        "the first frame is a snapshot: {r}"
    );
}

/// Every test above, on each engine: `chromium::NAME` and `firefox::NAME`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod chromium {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("chromium").await
                }
            )*
        }
        mod firefox {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name("firefox").await
                }
            )*
        }
    };
}

on_both_engines!(
    client_honours_the_webtransport_share,
    raw_webtransport_events_heartbeats_and_close_codes,
    client_auto_mode_picks_webtransport,
    client_falls_back_to_websocket_without_webtransport,
    client_falls_back_when_the_quic_address_is_unreachable,
    client_resumes_exactly_after_a_dropped_connection,
    client_does_not_retry_a_4001,
    client_refreshes_its_token_on_4009_and_resumes,
    demo_page_shows_live_events_and_is_screenshotted,
    client_reconnects_after_a_server_restart_and_gets_reset,
    two_browser_clients_chat_in_a_room_over_both_transports,
);

/// A private CA, a certificate it issued for 127.0.0.1 (ECDSA P-256, the chain in
/// `cert.pem`), and an NSS database under `home` that trusts the CA, as Chromium reads it.
fn operator_certificate(dir: &std::path::Path, home: &std::path::Path) -> (String, String) {
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("openssl and certutil (libnss3-tools)");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(std::process::Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "3"])
        .args(["-subj", "/CN=edgestream test CA"]));
    run(std::process::Command::new("openssl")
        .arg("req")
        .args(ec)
        .args(["-keyout", &p("key.pem"), "-out", &p("leaf.csr")])
        .args(["-subj", "/CN=127.0.0.1"]));
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(std::process::Command::new("openssl")
        .args(["x509", "-req", "-in", &p("leaf.csr"), "-CA", &p("ca.pem")])
        .args(["-CAkey", &p("ca.key"), "-CAcreateserial", "-days", "3"])
        .args(["-extfile", &p("ext.cnf"), "-out", &p("leaf.pem")]));
    let chain = std::fs::read_to_string(dir.join("leaf.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    std::fs::write(dir.join("cert.pem"), chain).unwrap();
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db = format!("sql:{}", db.display());
    run(std::process::Command::new("certutil").args(["-d", &db, "-N", "--empty-password"]));
    run(std::process::Command::new("certutil")
        .args(["-d", &db, "-A", "-t", "C,,", "-n", "edgestream-test-ca"])
        .args(["-i", &p("ca.pem")]));
    (p("cert.pem"), p("key.pem"))
}

/// Issue 20, fast failover: Chromium behind nginx (the documented configuration, UDP and TCP)
/// on two nodes sharing Redis and one operator certificate, heartbeat 1 s. The node holding
/// the page's WebTransport session is SIGKILLed while events flow (one every 50 ms, published
/// on the other node): every event arrives once, in order, without a reset, and the time from
/// the kill to the first event from the surviving node is printed (the bench of this figure;
/// no threshold here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_fails_over_through_nginx_after_a_sigkill() {
    const TOTAL: u64 = 60;
    const BEFORE_KILL: u64 = 20;
    let redis = support::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (cert, key) = operator_certificate(dir.path(), home.path());
    let (udp, tcp) = support::nginx::Nginx::free_addresses();
    let url = redis.url();
    let args = |id: &str| -> Vec<String> {
        let wt = format!("https://127.0.0.1:{}/v1/stream", udp.port());
        let ws = format!("ws://{tcp}/v1/stream");
        let origin = format!("http://{tcp}");
        [
            "--redis",
            &url,
            "--cert",
            &cert,
            "--key",
            &key,
            "--server-id",
            id,
            "--reset-key",
            "failover-test-reset-key-0123456789abcdef",
            "--heartbeat",
            "1s",
            "--quic-idle-timeout",
            "5s",
            "--public-webtransport-url",
            &wt,
            "--public-websocket-url",
            &ws,
            "--allowed-origins",
            &origin,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (args_a, args_b) = (args("01"), args("02"));
    let a =
        support::node::Node::spawn(&args_a.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let b =
        support::node::Node::spawn(&args_b.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let _nginx = support::nginx::Nginx::start_at(&[a.quic, b.quic], &[a.http, b.http], (udp, tcp));
    let token = support::token(&["acme"]);

    // On "connected": find the node holding the session, publish on the other, kill the holder.
    let (go, mut connected) = tokio::sync::mpsc::unbounded_channel::<()>();
    let publisher = tokio::spawn({
        let token = token.clone();
        async move {
            let mut nodes = [a, b];
            connected.recv().await.expect("the page connected");
            let sessions = |m: &Value| m["sessions"]["webtransport"].as_u64().unwrap_or(0);
            let mut holder = None;
            for _ in 0..250 {
                for (i, n) in nodes.iter().enumerate() {
                    if sessions(&n.api.get("/v1/metrics", None).await.unwrap().1) == 1 {
                        holder = Some(i);
                    }
                }
                if holder.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let holder = holder.expect("one node holds the WebTransport session");
            let mut killed_at = 0;
            for n in 0..TOTAL {
                nodes[1 - holder]
                    .api
                    .publish(&token, "acme", &json!([{ "n": n }]))
                    .await
                    .unwrap();
                if n + 1 == BEFORE_KILL {
                    nodes[holder].kill().await;
                    killed_at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (killed_at, nodes)
        }
    });
    let mut arrivals: Vec<(u64, u64)> = Vec::new();
    let args = [format!("http://{tcp}"), token, TOTAL.to_string()];
    let r = {
        let env = [("HOME", home.path().to_str().unwrap())];
        run_node_with("chromium", "failover_e2e.mjs", &args, &env, |v| {
            match v["step"].as_str() {
                Some("connected") => {
                    let _ = go.send(());
                }
                Some("event") => {
                    arrivals.push((v["seq"].as_u64().unwrap(), v["at"].as_u64().unwrap()))
                }
                _ => {}
            }
        })
        .await
    };
    let (killed_at, _nodes) = publisher.await.unwrap();
    let seqs: Vec<u64> = r["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=TOTAL).collect::<Vec<_>>(),
        "every event once, in order: {r}"
    );
    assert_eq!(r["resets"], 0, "{r}");
    assert!(r["reconnects"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["transports"][0], "webtransport", "{r}");
    let first_after = arrivals
        .iter()
        .find(|(seq, at)| *seq > BEFORE_KILL && *at >= killed_at)
        .expect("events after the kill");
    eprintln!(
        "failover: first event from the surviving node {} ms after the SIGKILL (seq {}); transports {}",
        first_after.1 - killed_at,
        first_after.0,
        r["transports"]
    );
}
