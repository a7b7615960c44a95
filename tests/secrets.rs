//! Tokens never reach the logs or the metrics: a node logging at trace level (its own spans
//! and every library's) is handed canary tokens every way a client can (query string on
//! both transports, bearer header, REFRESH frame, bad and good tokens, the dev-token route
//! refused), and neither its output nor `/metrics` nor `/v1/metrics` contains them.

mod support;

use edgestream_codec::Frame;
use edgestream_testkit::token;
use edgestream_testkit::ws::WsClient;
use support::node::Node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_tokens_never_appear_in_trace_logs_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let mut node = Node::spawn_logging(&[], "trace", Some(&log)).await;
    // A valid token (its signature is the secret part) and an invalid one.
    let mut claims = token::claims("canary-user", &["acme"], "subscribe publish");
    claims["canary"] = serde_json::json!("x");
    let good = token::hs256(support::SECRET.as_bytes(), &claims);
    let bad = format!("canarybad.{}", "Q".repeat(40));
    let signature = good.rsplit('.').next().unwrap().to_string();

    for tok in [&good, &bad] {
        // WebSocket: query string, then a REFRESH.
        let url = format!("ws://{}/v1/stream?access_token={tok}&orgs=acme", node.http);
        if let Ok(mut c) = WsClient::connect(&url).await {
            let _ = c.next_non_heartbeat().await;
            let _ = c
                .send_frame(&Frame::Refresh {
                    token: tok.to_string(),
                })
                .await;
            // A good refresh is not answered: a PING's PONG shows it was processed.
            let _ = c
                .send_frame(&Frame::Ping(bytes::Bytes::from_static(b"p")))
                .await;
            let _ = c.next_non_heartbeat().await;
        }
        // WebTransport: query string.
        let url = format!(
            "https://{}/v1/stream?access_token={tok}&orgs=acme",
            node.quic
        );
        if let Ok(mut c) = edgestream_testkit::wt::connect(&url, &node.cert_hash().await).await {
            let _ = c.next_frame().await;
            let refresh = Frame::Refresh {
                token: tok.to_string(),
            };
            if c.send_control(&refresh).await.is_ok() {
                let _ = c
                    .send_control(&Frame::Ping(bytes::Bytes::from_static(b"p")))
                    .await;
                let _ = tokio::time::timeout(support::HANG_GUARD, c.next_control()).await;
            }
            c.close(0);
        }
        // HTTP: bearer header, query string.
        let _ = node.api.publish_raw(tok, "acme", r#"{"a":1}"#, None).await;
        let _ = node
            .api
            .get(&format!("/v1/orgs/acme/presence?access_token={tok}"), None)
            .await;
        let _ = node.api.get("/v1/orgs/acme/events", Some(tok)).await;
    }
    let (_, metrics_json) = node.api.get("/v1/metrics", None).await.unwrap();
    let metrics_text = reqwest::get(format!("http://{}/metrics", node.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    node.kill().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    if let Ok(keep) = std::env::var("EDGESTREAM_TEST_KEEP_LOG") {
        std::fs::copy(&log, keep).unwrap();
    }
    assert!(
        logged.lines().count() > 100,
        "trace logging is on: {} lines",
        logged.lines().count()
    );
    for (what, text) in [
        ("the log", logged.as_str()),
        ("/metrics", metrics_text.as_str()),
        ("/v1/metrics", &metrics_json.to_string()),
    ] {
        // As text, and as the hex dumps of frame payloads libraries write at trace level.
        let hex = |t: &str| t.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        let forms = [
            ("good token", good.clone()),
            ("its signature", signature.clone()),
            ("bad token", bad.clone()),
            ("good token in hex", hex(&good)),
            ("its signature in hex", hex(&signature)),
            ("bad token in hex", hex(&bad)),
        ];
        for (name, secret) in &forms {
            if let Some(at) = text.find(secret.as_str()) {
                let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line = &text[from..(at + 200).min(text.len())];
                panic!("the {name} appears in {what}: {line}");
            }
        }
    }
}

/// At the default level (info), the capped libraries write nothing: a cap lowers a level,
/// never raises it (it used to turn tungstenite's debug output on for every run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_level_keeps_websocket_libraries_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let mut node = Node::spawn_logging(&[], "info", Some(&log)).await;
    let t = token::hs256(
        support::SECRET.as_bytes(),
        &token::claims("u", &["acme"], "subscribe publish"),
    );
    let url = format!("ws://{}/v1/stream?access_token={t}&orgs=acme", node.http);
    let mut c = WsClient::connect(&url).await.unwrap();
    let _ = c.next_non_heartbeat().await;
    node.api
        .publish(&t, "acme", &serde_json::json!({"a": 1}))
        .await
        .unwrap();
    let _ = c.next_non_heartbeat().await;
    c.close().await;
    node.kill().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("edgestream serving"),
        "info is on: {logged}"
    );
    for lib in ["tungstenite", "web_transport_quinn"] {
        assert!(
            !logged.contains(lib),
            "{lib} logged at the default level:\n{logged}"
        );
    }
}
