//! End to end over WebSocket and HTTP: authentication, tenant isolation, hostile input, slow
//! consumers, origins and token expiry.

mod support;

use std::time::Duration;

use edgestream_codec::{varint, CloseCode, Frame};
use edgestream_testkit::token;
use edgestream_testkit::ws::{Msg, Options, WsClient};
use serde_json::{json, Value};
use support::{TestServer, SECRET};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

/// Connects with a token and returns the close code the server answers with.
async fn close_code(s: &TestServer, token: &str) -> u16 {
    let mut c = WsClient::connect(&s.ws_url(&format!("access_token={token}")))
        .await
        .unwrap();
    c.expect_close().await.unwrap().0
}

async fn publish_status(s: &TestServer, token: &str) -> u16 {
    s.api
        .publish_raw(token, "acme", r#"{"a":1}"#, None)
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_pitfalls_are_refused_with_4001_and_401() {
    let s = TestServer::start_with(|a| {
        a.jwt_issuer = Some("https://issuer.test".into());
        a.jwt_audience = Some("edgestream".into());
    })
    .await;
    let base = || {
        let mut c = token::claims("alice", &["acme"], "subscribe publish");
        c["iss"] = json!("https://issuer.test");
        c["aud"] = json!("edgestream");
        c
    };
    let good = token::hs256(SECRET.as_bytes(), &base());
    assert_eq!(
        publish_status(&s, &good).await,
        201,
        "the baseline token works"
    );

    let mut cases: Vec<(String, &str)> = vec![
        (token::alg_none(&base()), "alg none"),
        (
            token::signed("RS256", &fixture("test-only-rs256-private.pem"), &base()),
            "wrong algorithm",
        ),
        (
            token::hs256(b"another-secret-of-enough-length", &base()),
            "bad signature",
        ),
        (token::tampered(&good), "tampered signature"),
    ];
    let mut c = base();
    c.as_object_mut().unwrap().remove("exp");
    cases.push((token::hs256(SECRET.as_bytes(), &c), "missing exp"));
    let mut c = base();
    c["exp"] = json!(token::now() - 120);
    cases.push((token::hs256(SECRET.as_bytes(), &c), "past exp"));
    let mut c = base();
    c["nbf"] = json!(token::now() + 600);
    cases.push((token::hs256(SECRET.as_bytes(), &c), "nbf in the future"));
    let mut c = base();
    c["iss"] = json!("https://evil.test");
    cases.push((token::hs256(SECRET.as_bytes(), &c), "wrong iss"));
    let mut c = base();
    c["aud"] = json!("someone-else");
    cases.push((token::hs256(SECRET.as_bytes(), &c), "wrong aud"));
    let mut c = base();
    c.as_object_mut().unwrap().remove("sub");
    cases.push((token::hs256(SECRET.as_bytes(), &c), "missing sub"));
    cases.push(("garbage".into(), "malformed"));
    cases.push((String::new(), "missing token"));
    cases.push(("a".repeat(9000), "over 8 KiB"));

    for (tok, why) in &cases {
        assert_eq!(close_code(&s, tok).await, 4001, "websocket: {why}");
        assert_eq!(publish_status(&s, tok).await, 401, "http: {why}");
    }
    // The server keeps serving.
    assert_eq!(publish_status(&s, &good).await, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_algorithms_verify_their_own_tokens_only() {
    for (alg, name) in [("RS256", "rs256"), ("ES256", "es256"), ("EdDSA", "eddsa")] {
        let public = format!("{FIXTURES}/test-only-{name}-public.pem");
        let s = TestServer::start_with(|a| {
            a.jwt_secret = None;
            a.jwt_public_key = Some(public.into());
            a.jwt_alg = Some(match alg {
                "RS256" => edgestream::auth::JwtAlg::RS256,
                "ES256" => edgestream::auth::JwtAlg::ES256,
                _ => edgestream::auth::JwtAlg::EdDSA,
            });
        })
        .await;
        let claims = token::claims("alice", &["acme"], "subscribe publish");
        let good = token::signed(
            alg,
            &fixture(&format!("test-only-{name}-private.pem")),
            &claims,
        );
        assert_eq!(publish_status(&s, &good).await, 201, "{alg}");
        let mut c = WsClient::connect(&s.ws_url(&format!("access_token={good}")))
            .await
            .unwrap();
        assert!(
            matches!(
                c.next_non_heartbeat().await.unwrap(),
                Msg::Frame(Frame::Subscribed { .. })
            ),
            "{alg}"
        );
        // HS/RS confusion: an HS256 token signed with the public key's bytes.
        let confused = token::hs256(&fixture(&format!("test-only-{name}-public.pem")), &claims);
        assert_eq!(
            close_code(&s, &confused).await,
            4001,
            "{alg}: HS256 with the public key"
        );
        assert_eq!(publish_status(&s, &confused).await, 401, "{alg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation() {
    let s = TestServer::start().await;
    let tok_a = s.token_for("alice", &["org-a"], "subscribe publish");
    let tok_b = s.token_for("bob", &["org-b"], "subscribe publish");
    let mut a = WsClient::connect(&s.ws_url(&format!("access_token={tok_a}")))
        .await
        .unwrap();
    assert!(
        matches!(a.next_non_heartbeat().await.unwrap(), Msg::Frame(Frame::Subscribed { ref org, .. }) if org == "org-a")
    );

    // Cannot subscribe to B: at connect (close 4003), dynamically (ERROR 4003), or via history.
    let mut x = WsClient::connect(&s.ws_url(&format!("access_token={tok_a}&orgs=org-a,org-b")))
        .await
        .unwrap();
    assert_eq!(x.expect_close_code().await.unwrap(), CloseCode::Forbidden);
    a.send_frame(&Frame::Subscribe {
        org: "org-b".into(),
        epoch: String::new(),
        seq: 0,
    })
    .await
    .unwrap();
    match a.next_non_heartbeat().await.unwrap() {
        Msg::Frame(Frame::Error { code, .. }) => assert_eq!(code, 4003),
        other => panic!("expected ERROR 4003, got {other:?}"),
    }
    assert_eq!(
        s.api
            .get("/v1/orgs/org-b/events", Some(&tok_a))
            .await
            .unwrap()
            .0,
        403
    );
    // Cannot publish to B.
    assert_eq!(
        s.api
            .publish_raw(&tok_a, "org-b", "{}", None)
            .await
            .unwrap()
            .0,
        403
    );
    // A `*` token publishes anywhere but subscribes nowhere.
    let star = s.token_for("ops", &["*"], "subscribe publish");
    assert_eq!(
        s.api
            .publish_raw(&star, "org-b", r#"{"canary":"B"}"#, None)
            .await
            .unwrap()
            .0,
        201
    );
    let mut st = WsClient::connect(&s.ws_url(&format!("access_token={star}&orgs=org-b")))
        .await
        .unwrap();
    assert_eq!(st.expect_close_code().await.unwrap(), CloseCode::Forbidden);

    // B's canaries never reach A; A's own event does.
    for i in 0..50 {
        s.api
            .publish(&tok_b, "org-b", &json!({"canary": "B", "i": i}))
            .await
            .unwrap();
    }
    s.api
        .publish(&tok_a, "org-a", &json!({"mine": true}))
        .await
        .unwrap();
    let evs = a.events(1).await.unwrap();
    assert_eq!(evs[0].org, "org-a");
    assert!(!String::from_utf8_lossy(&evs[0].payload).contains("canary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_input_is_refused_and_others_keep_being_served() {
    let s = TestServer::start().await;
    let tok = s.token(&["acme"]);
    let mut bystander = s.client(&["acme"], "format=json").await;
    bystander.next_non_heartbeat().await.unwrap();

    // A frame whose header declares more than the control limit.
    let mut huge = Vec::new();
    varint::write(&mut huge, 0x10);
    varint::write(&mut huge, 1 << 20);
    let cases: Vec<(&str, Vec<u8>, bool, u16)> = vec![
        ("truncated frame", vec![0x10, 0x05, 0x01], false, 4400),
        (
            "trailing bytes",
            [
                Frame::Unsubscribe { org: "acme".into() }
                    .to_bytes()
                    .to_vec(),
                vec![0],
            ]
            .concat(),
            false,
            4400,
        ),
        ("declared over limit", huge, false, 4413),
        (
            "server-only frame type",
            Frame::Unsubscribed { org: "x".into() }.to_bytes().to_vec(),
            false,
            4400,
        ),
        (
            "bad org id",
            Frame::Subscribe {
                org: "bad org".into(),
                epoch: String::new(),
                seq: 0,
            }
            .to_bytes()
            .to_vec(),
            false,
            4400,
        ),
        ("text on binary session", b"{}".to_vec(), true, 4400),
        (
            "message over the WebSocket limit",
            vec![0u8; 200 * 1024],
            false,
            4413,
        ),
    ];
    for (why, bytes, as_text, want) in cases {
        let mut c = s.client(&["acme"], "").await;
        c.next_non_heartbeat().await.unwrap();
        if as_text {
            c.send_text(std::str::from_utf8(&bytes).unwrap())
                .await
                .unwrap();
        } else {
            c.send_binary(bytes).await.unwrap();
        }
        assert_eq!(c.expect_close().await.unwrap().0, want, "{why}");
    }
    for (why, text) in [
        ("not JSON", "{nope"),
        ("missing org", r#"{"t":"subscribe"}"#),
        ("bad since", r#"{"t":"subscribe","org":"acme","since":"x"}"#),
    ] {
        let mut c = s.client(&["acme"], "format=json").await;
        c.next_non_heartbeat().await.unwrap();
        c.send_text(text).await.unwrap();
        assert_eq!(c.expect_close().await.unwrap().0, 4400, "{why}");
    }
    for (why, q) in [
        ("bad format", "format=xml"),
        ("bad since", "since=acme"),
        ("since not subscribed", "orgs=acme&since=beta:e:1"),
    ] {
        let mut c = WsClient::connect(&s.ws_url(&format!("access_token={tok}&{q}")))
            .await
            .unwrap();
        assert_eq!(c.expect_close().await.unwrap().0, 4400, "{why}");
    }

    // HTTP: 400 for not JSON / not objects, 413 over the limits.
    for (body, want) in [
        ("nope".to_string(), 400),
        ("[1,2]".to_string(), 400),
        ("[]".to_string(), 400),
        (format!(r#"{{"a":"{}"}}"#, "x".repeat(70 * 1024)), 413),
        (
            format!(
                "[{}]",
                vec![format!(r#"{{"a":"{}"}}"#, "x".repeat(60 * 1024)); 20].join(",")
            ),
            413,
        ),
    ] {
        let (st, v) = s.api.publish_raw(&tok, "acme", body, None).await.unwrap();
        assert_eq!(st, want, "{v}");
        assert!(v["error"].is_string(), "errors are JSON: {v}");
    }
    assert_eq!(
        s.api
            .publish_raw(&tok, "bad%20org", "{}", None)
            .await
            .unwrap()
            .0,
        400
    );

    // Nothing above was appended, and the bystander is still served.
    s.api
        .publish(&tok, "acme", &json!({"still": "here"}))
        .await
        .unwrap();
    assert_eq!(bystander.events(1).await.unwrap()[0].seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_4008_while_a_fast_one_keeps_up() {
    let s = TestServer::start_with(|a| a.session_queue = Some(64)).await;
    let tok = s.token(&["acme"]);
    let q = format!("access_token={tok}");
    let mut slow = WsClient::connect_with(
        &s.ws_url(&q),
        &Options {
            recv_buffer: Some(4096),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut fast = s.client(&["acme"], "").await;
    fast.next_non_heartbeat().await.unwrap();
    // The slow client reads nothing from here on.
    let payload = json!({"pad": "x".repeat(60_000)});
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            match fast.next_non_heartbeat().await.unwrap() {
                Msg::Frame(Frame::Event { seq, .. }) => {
                    n += 1;
                    assert_eq!(seq, n, "the fast consumer sees every event in order");
                }
                Msg::Close(code, _) => return (n, code),
                other => panic!("unexpected {other:?}"),
            }
            if n == u64::MAX {
                unreachable!()
            }
        }
    });
    let mut published = 0u64;
    for _ in 0..400 {
        s.api
            .publish(&tok, "acme", &Value::Array(vec![payload.clone(); 8]))
            .await
            .unwrap();
        published += 8;
        let m = s.metrics().await;
        if m["sessions_closed"]["4008"] == 1 {
            break;
        }
    }
    let m = s.metrics().await;
    assert_eq!(
        m["sessions_closed"]["4008"], 1,
        "the slow consumer was closed: {m}"
    );
    // The slow client, reading at last, finds the close after what was already buffered.
    assert_eq!(
        slow.expect_close_code().await.unwrap(),
        CloseCode::SlowConsumer
    );
    // The fast one got everything; stop it cleanly.
    s.wait_metrics("fast consumer caught up", |m| {
        m["events_delivered"]["websocket"].as_u64().unwrap() >= published
    })
    .await;
    drop(s);
    let (n, code) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((n, code), (published, Some(4503)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list_refuses_before_the_upgrade() {
    let s = TestServer::start_with(|a| {
        a.allowed_origins = Some("https://app.example.com".parse().unwrap())
    })
    .await;
    let tok = s.token(&["acme"]);
    let url = s.ws_url(&format!("access_token={tok}"));
    let with_origin = |o: &str| Options {
        headers: vec![("origin".into(), o.into())],
        ..Default::default()
    };
    let err = WsClient::connect_with(&url, &with_origin("https://evil.example.com"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("403"), "{err}");
    let mut ok = WsClient::connect_with(&url, &with_origin("https://app.example.com"))
        .await
        .unwrap();
    assert!(matches!(
        ok.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Subscribed { .. })
    ));
    let mut no_origin = WsClient::connect(&url).await.unwrap();
    assert!(matches!(
        no_origin.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Subscribed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_with_4009_unless_refreshed() {
    // Leeway 0 and tokens living two seconds: expiry comes during the test.
    let s = TestServer::start_with(|a| a.jwt_leeway = Some("0s".parse().unwrap())).await;
    let short = |sub: &str| {
        let mut c = token::claims(sub, &["acme"], "subscribe");
        c["exp"] = json!(token::now() + 2);
        token::hs256(SECRET.as_bytes(), &c)
    };
    let mut expiring = WsClient::connect(&s.ws_url(&format!("access_token={}", short("alice"))))
        .await
        .unwrap();
    let mut refreshed = WsClient::connect(&s.ws_url(&format!("access_token={}", short("alice"))))
        .await
        .unwrap();
    expiring.next_non_heartbeat().await.unwrap();
    refreshed.next_non_heartbeat().await.unwrap();
    // A refresh for another subject is refused, and so is a bad token; a good one is accepted.
    for bad in [
        s.token_for("mallory", &["acme"], "subscribe"),
        "garbage".to_string(),
    ] {
        refreshed
            .send_frame(&Frame::Refresh { token: bad })
            .await
            .unwrap();
        assert!(matches!(
            refreshed.next_non_heartbeat().await.unwrap(),
            Msg::Frame(Frame::Error { code: 4001, .. })
        ));
    }
    let good = s.token_for("alice", &["acme"], "subscribe");
    refreshed
        .send_frame(&Frame::Refresh { token: good })
        .await
        .unwrap();

    assert_eq!(
        expiring.expect_close_code().await.unwrap(),
        CloseCode::TokenExpired
    );
    // The refreshed session outlives the first token: a PING is still answered after it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    refreshed
        .send_frame(&Frame::Ping(b"still".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        refreshed.next_non_heartbeat().await.unwrap(),
        Msg::Frame(Frame::Pong(b"still".to_vec().into()))
    );
}

/// `kid`: with `--jwt-kid` a token naming another key id is refused (a token without one is
/// taken); without it the id is a label and the signature decides. Hostile ids (paths, huge
/// ones) are never looked up anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ids_are_checked_when_configured() {
    let claims = token::claims("alice", &["acme"], "subscribe publish");
    let with_kid = |kid: &str| token::hs256_with_kid(SECRET.as_bytes(), kid, &claims);
    let s = TestServer::start_with(|a| a.jwt_kid = Some("k1".into())).await;
    for (tok, want, why) in [
        (with_kid("k1"), 201, "the configured kid"),
        (token::hs256(SECRET.as_bytes(), &claims), 201, "no kid"),
        (with_kid("k2"), 401, "an unknown kid"),
        (with_kid("../../../etc/passwd"), 401, "a path as kid"),
        (with_kid(&"k".repeat(4000)), 401, "a 4 KB kid"),
    ] {
        assert_eq!(publish_status(&s, &tok).await, want, "http: {why}");
        if want == 401 {
            assert_eq!(close_code(&s, &tok).await, 4001, "websocket: {why}");
        }
    }
    let open = TestServer::start().await;
    assert_eq!(
        publish_status(&open, &with_kid("whatever")).await,
        201,
        "no --jwt-kid: the signature decides"
    );
    let forged = token::hs256_with_kid(b"another-secret-of-enough-length", "k1", &claims);
    assert_eq!(
        publish_status(&s, &forged).await,
        401,
        "the right kid, a bad signature"
    );
}

/// A token that expires during a WebTransport session closes it with 4009, as on WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_closes_a_webtransport_session_with_4009() {
    let s = TestServer::start_with(|a| a.jwt_leeway = Some("0s".parse().unwrap())).await;
    let mut c = token::claims("alice", &["acme"], "subscribe");
    c["exp"] = json!(token::now() + 2);
    let short = token::hs256(SECRET.as_bytes(), &c);
    let mut wt = edgestream_testkit::wt::connect(
        &s.wt_url(&format!("access_token={short}&orgs=acme")),
        &s.cert_hash().await,
    )
    .await
    .unwrap();
    assert!(matches!(
        wt.next_frame().await.unwrap(),
        Frame::Subscribed { .. }
    ));
    assert_eq!(wt.closed_code().await.unwrap(), CloseCode::TokenExpired);
    let m = s.metrics().await;
    assert_eq!(m["sessions_closed"]["4009"], 1, "{m}");
}
