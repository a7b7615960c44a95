//! End to end over HTTP: publishing with Idempotency-Key, history reads, health, info,
//! metrics, development mode, and the `edgestream` binary's CLI and signal handling.

mod support;

use std::process::Stdio;

use edgestream_codec::Frame;
use edgestream_testkit::http::Api;
use edgestream_testkit::ws::{Msg, WsClient};
use serde_json::json;
use support::{TestServer, HANG_GUARD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_repeat_appends_nothing() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    let (st, first) = s
        .api
        .publish_raw(&tok, "acme", r#"[{"a":1},{"a":2}]"#, Some("order-17"))
        .await
        .unwrap();
    assert_eq!(st, 201);
    let (st, again) = s
        .api
        .publish_raw(&tok, "acme", r#"[{"a":1},{"a":2}]"#, Some("order-17"))
        .await
        .unwrap();
    assert_eq!(
        (st, &again),
        (200, &first),
        "a repeat answers the original result"
    );
    // The key is per org: the same key elsewhere appends.
    let tok2 = s.token(&["acme", "beta"]);
    assert_eq!(
        s.api
            .publish_raw(&tok2, "beta", r#"{"a":1}"#, Some("order-17"))
            .await
            .unwrap()
            .0,
        201
    );
    let (st, other) = s
        .api
        .publish_raw(&tok, "acme", r#"{"a":3}"#, Some("order-18"))
        .await
        .unwrap();
    assert_eq!(
        (st, other["first_seq"].as_u64()),
        (201, Some(3)),
        "nothing was appended by the repeat"
    );
    let (_, h) = s.api.get("/v1/orgs/acme/events", Some(&tok)).await.unwrap();
    assert_eq!(h["head"], 3);
    assert_eq!(h["events"].as_array().unwrap().len(), 3);
    assert_eq!(
        s.api
            .publish_raw(&tok, "acme", "{}", Some(&"k".repeat(300)))
            .await
            .unwrap()
            .0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_by_position() {
    let s = TestServer::start_with(|a| a.replay_max_events = Some(10)).await;
    let tok = s.token(&["acme"]);
    let r = s.publish_numbered(&tok, "acme", 1..=15).await;
    let epoch = r["epoch"].as_str().unwrap();
    let (st, h) = s
        .api
        .get(
            &format!("/v1/orgs/acme/events?since={epoch}:8&limit=3"),
            Some(&tok),
        )
        .await
        .unwrap();
    assert_eq!(st, 200);
    assert_eq!(
        (
            h["org"].as_str(),
            h["epoch"].as_str(),
            h["head"].as_u64(),
            h["reset"].as_bool()
        ),
        (Some("acme"), Some(epoch), Some(15), Some(false))
    );
    assert_eq!(
        h["events"],
        json!([
            {"seq": 9, "ts": h["events"][0]["ts"], "data": {"i": 9}},
            {"seq": 10, "ts": h["events"][1]["ts"], "data": {"i": 10}},
            {"seq": 11, "ts": h["events"][2]["ts"], "data": {"i": 11}},
        ])
    );
    // Evicted position: reset, and the retained events from the oldest (6..).
    let (_, h) = s
        .api
        .get(
            &format!("/v1/orgs/acme/events?since={epoch}:2&limit=2"),
            Some(&tok),
        )
        .await
        .unwrap();
    assert_eq!(
        (h["reset"].as_bool(), h["events"][0]["seq"].as_u64()),
        (Some(true), Some(6))
    );
    // The access_token query parameter works for reads too (browsers).
    let (st, _) = s
        .api
        .get(&format!("/v1/orgs/acme/events?access_token={tok}"), None)
        .await
        .unwrap();
    assert_eq!(st, 200);
    assert_eq!(
        s.api.get("/v1/orgs/acme/events", None).await.unwrap().0,
        401
    );
    assert_eq!(
        s.api
            .get("/v1/orgs/acme/events?since=garbage", Some(&tok))
            .await
            .unwrap()
            .0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_info_metrics_and_unknown_routes() {
    let s = TestServer::start().await;
    assert_eq!(
        s.api.get("/healthz", None).await.unwrap(),
        (200, json!({"status": "ok"}))
    );
    assert_eq!(
        s.api.get("/readyz", None).await.unwrap(),
        (200, json!({"status": "ready"}))
    );
    let (_, info) = s.api.get("/v1/info", None).await.unwrap();
    assert_eq!(
        info["websocket"],
        format!("ws://127.0.0.1:{}/v1/stream", s.addr.port())
    );
    assert_eq!(info["heartbeat_ms"], 5000);
    let tok = s.token(&["acme"]);
    s.api.publish(&tok, "acme", &json!({"a": 1})).await.unwrap();
    let (st, text) = s.api.get("/metrics", None).await.unwrap();
    let text = text.as_str().unwrap().to_string();
    assert_eq!(st, 200);
    assert!(
        text.contains("edgestream_events_published_total 1"),
        "{text}"
    );
    assert!(
        text.contains("edgestream_sessions{transport=\"websocket\"} 0"),
        "{text}"
    );
    assert!(!text.contains(&tok), "no token in metrics");
    let (st, v) = s.api.get("/no/such/route", None).await.unwrap();
    assert_eq!((st, v["error"].is_string()), (404, true));
    assert_eq!(
        s.api.get("/v1/dev/token", None).await.unwrap().0,
        404,
        "no dev route with a key configured"
    );
    assert_eq!(
        s.api.get("/v1/stream", None).await.unwrap().0,
        400,
        "not an upgrade"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_serves_tokens_to_loopback_clients() {
    let s = TestServer::start_with(|a| {
        a.jwt_secret = None;
        a.dev = true;
    })
    .await;
    let (st, v) = s
        .api
        .get(
            "/v1/dev/token?sub=alice&orgs=acme,beta&scope=subscribe%20publish",
            None,
        )
        .await
        .unwrap();
    assert_eq!(st, 200);
    let tok = v["token"].as_str().unwrap().to_string();
    s.api
        .publish(&tok, "beta", &json!({"dev": true}))
        .await
        .unwrap();
    let mut c =
        WsClient::connect(&s.ws_url(&format!("access_token={tok}&orgs=beta&since=beta:x:0")))
            .await
            .unwrap();
    assert!(matches!(
        c.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Subscribed { head: 1, .. })
    ));
    assert_eq!(
        s.api
            .get("/v1/dev/token?orgs=bad%20org", None)
            .await
            .unwrap()
            .0,
        400
    );
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_edgestream")
}

/// Starts `cmd` (an `edgestream serve`) with the JWT secret and log filter, its stderr piped
/// for [`stderr_lines`], killed when dropped.
fn spawn_logged(
    cmd: &mut tokio::process::Command,
    secret: &str,
    log: &str,
) -> tokio::process::Child {
    cmd.env("EDGESTREAM_JWT_SECRET", secret)
        .env("EDGESTREAM_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn edgestream")
}

/// The HTTP port a node reports in its start line (`http=127.0.0.1:PORT`): a node started on
/// port 0 says where it listens, so no test guesses a free port for it.
fn serving_port(start_line: &str) -> u16 {
    start_line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("http=")?.rsplit_once(':')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no http= in {start_line}"))
}

type StderrLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// A child's (piped) stderr, line by line.
fn stderr_lines(child: &mut tokio::process::Child) -> StderrLines {
    let stderr = child.stderr.take().expect("stderr piped");
    tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr))
}

/// The next line that contains `needle`.
async fn line_with(lines: &mut StderrLines, needle: &str) -> String {
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            match lines.next_line().await.unwrap() {
                Some(line) if line.contains(needle) => return line,
                Some(_) => {}
                None => panic!("stderr ended without {needle:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} on stderr"))
}

/// The first line of a child's stderr that contains `needle`.
async fn stderr_line_with(child: &mut tokio::process::Child, needle: &str) -> String {
    line_with(&mut stderr_lines(child), needle).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_with_env_config_file_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = dir.path().join("edgestream.toml");
    std::fs::write(
        &cfg,
        format!("http-listen = \"127.0.0.1:{port}\"\nheartbeat = \"1s\"\n"),
    )
    .unwrap();
    let secret = "binary-test-secret-0123456789";
    let mut child = spawn_logged(
        tokio::process::Command::new(binary()).args([
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--quic-listen",
            "127.0.0.1:0",
            "--drain-delay",
            "300ms",
        ]),
        secret,
        "debug",
    );
    let api = Api::new(format!("http://127.0.0.1:{port}"));
    support::eventually("the server starts", || async {
        api.get("/healthz", None).await.ok().map(drop)
    })
    .await;
    // A token from the `token` command works against it.
    let out = tokio::process::Command::new(binary())
        .args([
            "token",
            "--sub",
            "alice",
            "--org",
            "acme",
            "--scope",
            "subscribe publish",
            "--ttl",
            "10m",
        ])
        .env("EDGESTREAM_JWT_SECRET", secret)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    api.publish(&tok, "acme", &json!({"from": "binary"}))
        .await
        .unwrap();
    let (_, info) = api.get("/v1/info", None).await.unwrap();
    assert_eq!(info["heartbeat_ms"], 1000, "the config file was read");
    assert_eq!(
        api.get("/v1/dev/token", None).await.unwrap().0,
        404,
        "the env secret was read"
    );

    let mut c = WsClient::connect(&format!(
        "ws://127.0.0.1:{port}/v1/stream?access_token={tok}"
    ))
    .await
    .unwrap();
    assert!(matches!(
        c.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Subscribed { head: 1, .. })
    ));
    // WebTransport too: /v1/info names the UDP port, /v1/cert-hash the certificate.
    let wt_url = info["webtransport"].as_str().unwrap().to_string();
    let (_, hash) = api.get("/v1/cert-hash", None).await.unwrap();
    let mut wt = edgestream_testkit::wt::connect(
        &format!("{wt_url}?access_token={tok}"),
        hash["value"].as_str().unwrap(),
    )
    .await
    .unwrap();
    assert!(matches!(
        wt.next_frame().await.unwrap(),
        Frame::Subscribed { head: 1, .. }
    ));
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(c.expect_close().await.unwrap().0, 4503);
    assert_eq!(wt.closed().await.unwrap().0, 4503);
    let status = tokio::time::timeout(HANG_GUARD, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exits cleanly after draining: {status}");
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(
        !stderr.contains(&tok),
        "the token never appears in the logs"
    );
    assert!(stderr.contains("draining"), "{stderr}");

    // A bad config is refused with a message, not a panic.
    let out = tokio::process::Command::new(binary())
        .args(["serve", "--replay-window", "soon"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));
}

/// Sends the head of a request now and the rest later, over a raw connection.
async fn split_request(addr: std::net::SocketAddr, first: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(first.as_bytes()).await.unwrap();
    tcp
}

async fn finish_request(mut tcp: tokio::net::TcpStream, rest: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(rest.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(HANG_GUARD, tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// `--drain-delay`: after the stop signal, /readyz answers 503 (and the metrics say
/// `draining`) while the node still serves: open sessions keep receiving, a new session is
/// accepted, a publish is stored, and HTTP answers carry `Connection: close` so keep-alive
/// publishers reconnect (through the balancer) elsewhere. The drain comes after the delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delay_serves_with_readyz_503_before_the_drain() {
    // A delay far longer than the checks below, so that they all run inside it.
    let mut s = TestServer::start_with(|a| a.drain_delay = Some("1h".parse().unwrap())).await;
    let tok = s.token(&["acme"]);
    let mut watcher = s.client(&["acme"], "").await;
    assert!(matches!(
        watcher.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Subscribed { .. })
    ));
    assert_eq!(s.api.get("/readyz", None).await.unwrap().0, 200);
    s.begin_stop();
    let v = support::eventually("readyz turns 503", || async {
        let (st, v) = s.api.get("/readyz", None).await.unwrap();
        (st == 503).then_some(v)
    })
    .await;
    assert_eq!(v["status"], "draining", "{v}");
    let (_, m) = s.api.get("/v1/metrics", None).await.unwrap();
    assert_eq!(m["draining"], true, "{m}");
    // Still serving: a publish is stored, with Connection: close.
    let res = s
        .api
        .client
        .post(format!("{}/v1/orgs/acme/events", s.api.base))
        .bearer_auth(&tok)
        .header("content-type", "application/json")
        .body(r#"{"during":"delay"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    // The open session gets it; a new session is accepted.
    let ev = watcher.events(1).await.unwrap();
    assert_eq!(ev[0].seq, 1);
    let mut late = s.client(&["acme"], "").await;
    match late.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Subscribed { head, .. }) => assert_eq!(head, 1),
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    }
}

/// After a short `--drain-delay`, the drain: sessions close with 4503 and `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_drain_delay_sessions_close_with_4503() {
    let mut s = TestServer::start_with(|a| a.drain_delay = Some("200ms".parse().unwrap())).await;
    let mut watcher = s.client(&["acme"], "").await;
    assert!(matches!(
        watcher.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Subscribed { .. })
    ));
    s.begin_stop();
    assert_eq!(watcher.expect_close().await.unwrap().0, 4503);
    s.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_publishes_in_flight_and_readyz_turns_503() {
    let mut s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    let mut watcher = s.client(&["acme"], "").await;
    assert!(matches!(
        watcher.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Subscribed { .. })
    ));
    let body = r#"{"in":"flight"}"#;
    let publish = split_request(
        s.addr,
        &format!(
            "POST /v1/orgs/acme/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            &body[..5]
        ),
    )
    .await;
    let ready = split_request(s.addr, "GET /readyz HTTP/1.1\r\nHost: x\r\n").await;
    // Let the server read both request heads before the drain starts.
    s.wait_metrics("the publish in flight", |m| m["publish_requests"] == 1)
        .await;
    s.begin_stop();
    assert_eq!(
        watcher.expect_close().await.unwrap().0,
        4503,
        "sessions close first"
    );
    let answer = finish_request(publish, &body[5..]).await;
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "the publish in flight completes: {answer}"
    );
    let answer = finish_request(ready, "Connection: close\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "readyz reports draining: {answer}"
    );
    assert!(answer.contains("draining"));
    s.join().await.unwrap();
}

/// `--http-tls`: the HTTP listener serves TLS with the QUIC certificate (`--cert`/`--key`).
/// A rustls client that trusts only that certificate reads `/v1/info` (which now advertises
/// `wss://`), publishes, and opens a WebSocket session over TLS that receives the event; curl
/// (OpenSSL) reads `/readyz` with the same trust; a client speaking plain HTTP to the TLS port
/// gets no HTTP answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tls_serves_https_and_wss_with_the_configured_certificate() {
    use futures_util::{SinkExt, StreamExt};
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = support::node::cert_files(dir.path());
    let s = {
        let (cert, key) = (cert.clone(), key.clone());
        TestServer::start_with(move |a| {
            a.http_tls = true;
            a.cert = Some(cert);
            a.key = Some(key);
        })
        .await
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&cert).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .expect("TLS handshake with the configured certificate")
    };
    // One request per connection (Connection: close), the whole answer read.
    let request = |req: String| async move {
        let mut tls = connect().await;
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await.ok();
        answer
    };
    let info =
        request("GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".into())
            .await;
    assert!(info.starts_with("HTTP/1.1 200"), "{info}");
    assert!(info.contains("\"websocket\":\"wss://127.0.0.1:"), "{info}");

    let tok = s.token(&["acme"]);
    let ws = tokio_tungstenite::client_async(
        format!(
            "wss://127.0.0.1:{}/v1/stream?access_token={tok}&orgs=acme&format=json",
            s.addr.port()
        ),
        connect().await,
    )
    .await
    .expect("WebSocket over TLS")
    .0;
    let (mut tx, mut rx) = ws.split();
    let mut next_json = async move || loop {
        match rx.next().await.unwrap().unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["t"] != "heartbeat" && v["t"] != "presence" {
                    return v;
                }
            }
            _ => continue,
        }
    };
    assert_eq!(next_json().await["t"], "subscribed");
    let body = r#"{"over":"tls"}"#;
    let answer = request(format!(
        "POST /v1/orgs/acme/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tok}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let ev = next_json().await;
    assert_eq!(ev["t"], "event", "{ev}");
    assert_eq!(ev["data"], json!({"over": "tls"}), "{ev}");
    tx.close().await.ok();

    // curl (OpenSSL) with the same trust.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--cacert", cert.to_str().unwrap()])
        .arg(format!("https://127.0.0.1:{}/readyz", s.addr.port()))
        .output()
        .await
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));

    // Plain HTTP on the TLS port: no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, plain.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(b"HTTP/1.1"),
        "plain HTTP answered on the TLS port"
    );
}

/// Issue 16, logs: stderr that is not a terminal gets no ANSI colour codes; the start line
/// names the version, commit and effective configuration (no secret); with
/// `--log-format json` a fatal error is a JSON line too; `--version` names the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_plain_or_json_and_the_start_line_names_the_configuration() {
    let secret = "logs-test-secret-0123456789abcdef";
    let mut child = spawn_logged(
        tokio::process::Command::new(binary())
            .args([
                "serve",
                "--http-listen",
                "127.0.0.1:0",
                "--quic-listen",
                "127.0.0.1:0",
            ])
            .args(["--drain-delay", "0s"]),
        secret,
        "info",
    );
    let start = stderr_line_with(&mut child, "edgestream serving").await;
    assert!(!start.contains('\u{1b}'), "ANSI codes on a pipe: {start:?}");
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    for field in [
        version.as_str(),
        "commit=",
        "auth=HS256",
        "log_target=memory",
        "drain_delay=",
    ] {
        assert!(start.contains(field), "{field} missing: {start}");
    }
    assert!(!start.contains(secret), "the secret is logged: {start}");
    child.kill().await.unwrap();

    let out = tokio::process::Command::new(binary())
        .args(["serve", "--log-format", "json", "--jwt-secret", "short"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    // Only the error: the key is checked before any socket is bound (a bound QUIC socket warned
    // first when the kernel capped its buffers).
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["level"], "ERROR", "{v}");
        assert!(
            v["fields"]["error"].as_str().unwrap().contains("16 bytes"),
            "{v}"
        );
    }

    let out = tokio::process::Command::new(binary())
        .arg("--version")
        .output()
        .await
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.contains("commit ") && v.contains("built "), "{v}");
}

/// Issue 16, start-up checks: a certificate or key that cannot work is refused at start with
/// a message that names the file and what to do (before: the node logged "serving" and every
/// handshake failed silently, or the message said "no items found").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_cannot_work_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = support::node::cert_files(dir.path());
    let other = tempfile::tempdir().unwrap();
    let (_, other_key, _) = support::node::cert_files(other.path());
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // An expired certificate (and its key), made with rcgen.
    let expired_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = params.self_signed(&expired_key).unwrap();
    let expired_cert = write("expired.pem", &expired.pem());
    let expired_key = write("expired-key.pem", &expired_key.serialize_pem());
    // An encrypted key, made by openssl.
    let encrypted = dir.path().join("encrypted.pem");
    let status = std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-passout", "pass:secret", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&encrypted)
        .status()
        .expect("openssl");
    assert!(status.success());
    let garbage = write("garbage.pem", "this is not a key\n");
    let cases: [(&std::path::Path, &std::path::Path, &[&str]); 4] = [
        (
            &cert,
            &other_key,
            &["does not belong to the certificate", "other"],
        ),
        (&expired_cert, &expired_key, &["expired on", "renew"]),
        (&cert, &encrypted, &["encrypted", "openssl pkey"]),
        (&cert, &garbage, &["no private key found", "garbage.pem"]),
    ];
    for (c, k, wants) in cases {
        let out = tokio::process::Command::new(binary())
            .args([
                "serve",
                "--http-listen",
                "127.0.0.1:0",
                "--quic-listen",
                "127.0.0.1:0",
            ])
            .arg("--cert")
            .arg(c)
            .arg("--key")
            .arg(k)
            .env("EDGESTREAM_JWT_SECRET", "startup-check-secret-0123456789")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(HANG_GUARD, out)
            .await
            .unwrap_or_else(|_| panic!("started and kept running with {c:?} {k:?}"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {c:?} {k:?}: {stderr}");
        assert!(!stderr.contains("serving"), "{stderr}");
        for want in wants {
            let want = if *want == "other" {
                other_key.to_str().unwrap()
            } else {
                want
            };
            assert!(stderr.contains(want), "{want:?} missing: {stderr}");
        }
    }
}

/// Issue 16, admin surface: with `--admin-listen`, metrics are served there and no longer on
/// the public listener (health stays on both); the demo page is off outside development mode
/// unless `--demo` asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_takes_the_metrics_and_the_demo_page_is_opt_in() {
    let s = TestServer::start_with(|a| {
        a.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = Api::new(format!("http://{}", s.admin.expect("an admin listener")));
    for path in ["/metrics", "/v1/metrics"] {
        let (st, v) = s.api.get(path, None).await.unwrap();
        assert_eq!(st, 404, "public {path}: {v}");
        let (st, _) = admin.get(path, None).await.unwrap();
        assert_eq!(st, 200, "admin {path}");
    }
    let (_, text) = admin.get("/metrics", None).await.unwrap();
    assert!(
        text.as_str().unwrap().contains("edgestream_build_info{"),
        "{text}"
    );
    for path in ["/healthz", "/readyz"] {
        assert_eq!(s.api.get(path, None).await.unwrap().0, 200, "public {path}");
        assert_eq!(admin.get(path, None).await.unwrap().0, 200, "admin {path}");
    }
    let (st, v) = admin.get("/v1/info", None).await.unwrap();
    assert_eq!(st, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("/metrics"), "{v}");
    // No demo page on a keyed node...
    let (st, v) = s.api.get("/", None).await.unwrap();
    assert_eq!(st, 404, "{v}");
    // ...unless asked for; the client library is served either way.
    let demo = TestServer::start_with(|a| a.demo = true).await;
    let (st, page) = demo.api.get("/", None).await.unwrap();
    assert_eq!(st, 200);
    assert!(page.as_str().unwrap().contains("<html"), "{page}");
    assert_eq!(s.api.get("/edgestream.js", None).await.unwrap().0, 200);
}

/// A configured certificate close to its end starts, with a warning at start and its days
/// left in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_end_is_warned_about_and_counted_down() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(3 * 24 + 12);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let mut child = spawn_logged(
        tokio::process::Command::new(binary())
            .args(["serve", "--http-listen", "127.0.0.1:0"])
            .args(["--quic-listen", "127.0.0.1:0", "--drain-delay", "0s"])
            .arg("--cert")
            .arg(&cert_path)
            .arg("--key")
            .arg(&key_path),
        "near-expiry-secret-0123456789",
        "info",
    );
    // The warning and the start line, in either order.
    let mut lines = stderr_lines(&mut child);
    let (mut warning, mut port) = (None, None);
    while warning.is_none() || port.is_none() {
        let line = line_with(&mut lines, "").await;
        if line.contains("expires soon") {
            warning = Some(line);
        } else if line.contains("edgestream serving") {
            port = Some(serving_port(&line));
        }
    }
    let (warning, port) = (warning.unwrap(), port.unwrap());
    assert!(warning.contains("days_left=3"), "{warning}");
    let api = Api::new(format!("http://127.0.0.1:{port}"));
    let (_, m) = api.get("/v1/metrics", None).await.unwrap();
    assert_eq!(m["certificate_days_left"], 3, "{m}");
    child.kill().await.unwrap();
}

/// Issue 17: every log line of a session is written in one span naming its id, transport and
/// `sub`, so an operator can follow one session through the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_log_lines_carry_its_span() {
    let secret = "span-test-secret-0123456789abcdef";
    let mut child = spawn_logged(
        tokio::process::Command::new(binary())
            .args(["serve", "--http-listen", "127.0.0.1:0"])
            .args(["--quic-listen", "127.0.0.1:0", "--drain-delay", "0s"]),
        secret,
        "edgestream=debug",
    );
    let mut lines = stderr_lines(&mut child);
    let port = serving_port(&line_with(&mut lines, "edgestream serving").await);
    let tok = edgestream_testkit::token::hs256(
        secret.as_bytes(),
        &edgestream_testkit::token::claims("alice", &["acme"], "subscribe"),
    );
    let c = WsClient::connect(&format!(
        "ws://127.0.0.1:{port}/v1/stream?access_token={tok}&orgs=acme"
    ))
    .await
    .unwrap();
    c.close().await;
    let line = line_with(&mut lines, "websocket session ended").await;
    assert!(
        line.contains("session{id=")
            && line.contains("transport=\"websocket\"")
            && line.contains("sub=\"alice\""),
        "{line}"
    );
    assert!(!line.contains(&tok), "{line}");
    child.kill().await.unwrap();
}

async fn head(s: &TestServer, org: &str) -> u64 {
    let tok = s.token(&[org]);
    let (_, h) = s
        .api
        .get(&format!("/v1/orgs/{org}/events?limit=1"), Some(&tok))
        .await
        .unwrap();
    h["head"].as_u64().unwrap()
}

/// One request publishes to several orgs: each org's events get its own consecutive seqs and
/// reach its subscribers in order; the answer lists every org's seqs in the request's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_publishes_to_many_orgs() {
    let s = TestServer::start().await;
    s.api
        .publish(&s.token(&["beta"]), "beta", &json!({"before": 1}))
        .await
        .unwrap();
    let mut acme = s.client(&["acme"], "").await;
    let mut beta = s.client(&["beta"], "").await;
    for c in [&mut acme, &mut beta] {
        assert!(matches!(
            c.next().await.unwrap(),
            Msg::Frame(Frame::Subscribed { .. })
        ));
    }
    let tok = s.token(&["acme", "beta", "gamma"]);
    let body = r#"[{"org":"acme","events":[{"a":1},{"a":2}]},
                   {"org":"beta","events":{"b":1}},
                   {"org":"gamma","events":[{"g":1}]}]"#;
    let (st, v) = s.publish_many(&tok, body.to_string(), None).await;
    assert_eq!(st, 201, "{v}");
    let r = &v["results"];
    assert_eq!(r.as_array().unwrap().len(), 3, "{v}");
    assert_eq!(
        (&r[0]["org"], &r[0]["first_seq"], &r[0]["last_seq"]),
        (&json!("acme"), &json!(1), &json!(2))
    );
    assert_eq!(
        (&r[1]["org"], &r[1]["first_seq"], &r[1]["last_seq"]),
        (&json!("beta"), &json!(2), &json!(2))
    );
    assert_eq!(
        (&r[2]["org"], &r[2]["first_seq"]),
        (&json!("gamma"), &json!(1))
    );
    let got = acme.events(2).await.unwrap();
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(&got[1].payload[..], br#"{"a":2}"#, "payloads verbatim");
    let got = beta.events(1).await.unwrap();
    assert_eq!((got[0].seq, &got[0].payload[..]), (2, &br#"{"b":1}"#[..]));
    assert_eq!(head(&s, "gamma").await, 1);
}

/// Anything wrong in any part refuses the whole request with a JSON reason, and nothing is
/// stored in any org: an org the token may not publish to, a bad org name, an org named
/// twice, a bad event, too many orgs, a body of another shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_org_publish_is_refused_whole() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme", "beta"]);
    let cases: Vec<(String, u16)> = vec![
        (
            r#"[{"org":"acme","events":{"a":1}},{"org":"gamma","events":{"g":1}}]"#.into(),
            403,
        ),
        (
            r#"[{"org":"acme","events":{"a":1}},{"org":"no/slash","events":{"g":1}}]"#.into(),
            400,
        ),
        (
            r#"[{"org":"acme","events":{"a":1}},{"org":"acme","events":{"a":2}}]"#.into(),
            400,
        ),
        (
            r#"[{"org":"acme","events":{"a":1}},{"org":"beta","events":[1]}]"#.into(),
            400,
        ),
        (
            r#"[{"org":"acme","events":{"a":1}},{"org":"beta","events":[]}]"#.into(),
            400,
        ),
        (
            r#"[{"org":"acme","events":{"a":1}},{"org":"beta"}]"#.into(),
            400,
        ),
        (
            r#"[{"org":"acme","events":{"a":1},"extra":true}]"#.into(),
            400,
        ),
        (r#"{"org":"acme","events":{"a":1}}"#.into(), 400),
        ("[]".into(), 400),
        ("not json".into(), 400),
        (
            format!(
                "[{}]",
                (0..1001)
                    .map(|i| format!(r#"{{"org":"o{i}","events":{{"a":1}}}}"#))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            400,
        ),
    ];
    for (body, want) in &cases {
        let wide = if *want == 400 && body.len() > 10_000 {
            s.token(&["*"])
        } else {
            tok.clone()
        };
        let (st, v) = s.publish_many(&wide, body.to_string(), None).await;
        assert_eq!(st, *want, "{body:.120}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // A subscribe-only token may not publish anywhere.
    let reader = s.token_for("r", &["acme"], "subscribe");
    let (st, _) = s
        .publish_many(&reader, r#"[{"org":"acme","events":{"a":1}}]"#, None)
        .await;
    assert_eq!(st, 403);
    assert_eq!(
        (head(&s, "acme").await, head(&s, "beta").await),
        (0, 0),
        "nothing stored"
    );
}

/// A repeat with the same Idempotency-Key appends nothing: every org answers its first result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_org_publish_repeat_appends_nothing() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme", "beta"]);
    let body = r#"[{"org":"acme","events":[{"a":1},{"a":2}]},{"org":"beta","events":{"b":1}}]"#;
    let (st, first) = s
        .publish_many(&tok, body.to_string(), Some("batch-9"))
        .await;
    assert_eq!(st, 201, "{first}");
    let (st, again) = s
        .publish_many(&tok, body.to_string(), Some("batch-9"))
        .await;
    assert_eq!(st, 200, "{again}");
    for i in 0..2 {
        assert_eq!(
            again["results"][i]["first_seq"],
            first["results"][i]["first_seq"]
        );
        assert_eq!(again["results"][i]["duplicate"], true, "{again}");
    }
    assert_eq!((head(&s, "acme").await, head(&s, "beta").await), (2, 1));
}
