//! Streamed uploads over HTTP (PROTOCOL.md section 9): a 50 MiB upload with its SHA-256 in
//! bounded memory, progress reads, resume from the offset after an interruption, limits.

mod support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::TestServer;

const CHUNK: usize = 64 * 1024;

/// Deterministic content: byte i of the upload.
fn chunk(at: u64, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| ((at + i as u64) % 251) as u8)
            .collect::<Vec<_>>(),
    )
}

fn sha_of(size: u64) -> String {
    let mut h = Sha256::new();
    let mut at = 0;
    while at < size {
        let n = CHUNK.min((size - at) as usize);
        h.update(chunk(at, n));
        at += n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A streamed body of bytes `from..to`, failing after `fail_at` bytes when given.
fn body(from: u64, to: u64, fail_at: Option<u64>) -> reqwest::Body {
    let stream = futures_util::stream::unfold(from, move |at| async move {
        if at >= to {
            return None;
        }
        if fail_at.is_some_and(|f| at >= f) {
            return Some((Err(std::io::Error::other("client gone")), to));
        }
        let n = CHUNK.min((to - at) as usize);
        Some((Ok::<_, std::io::Error>(chunk(at, n)), at + n as u64))
    });
    reqwest::Body::wrap_stream(stream)
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

async fn server(dir: &std::path::Path, max: Option<u64>) -> TestServer {
    let dir = dir.to_path_buf();
    TestServer::start_with(move |a| {
        a.upload_dir = Some(dir);
        a.max_upload_bytes = max;
    })
    .await
}

fn put(s: &TestServer, token: &str, name: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .put(format!(
            "http://{}/v1/orgs/acme/uploads?name={name}",
            s.addr
        ))
        .bearer_auth(token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_upload_completes_with_its_sha256_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), None).await;
    let tok = s.token_for("ann", &["acme"], "subscribe upload");
    let size: u64 = 50 << 20;
    let before = rss();
    let r = put(&s, &tok, "big.bin")
        .header("content-length", size)
        .header("upload-id", "big-1")
        .body(body(0, size, None))
        .send()
        .await
        .unwrap();
    let grown = rss().saturating_sub(before);
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["sha256"], sha_of(size), "{v}");
    assert_eq!(
        (v["size"].as_u64(), v["state"].as_str()),
        (Some(size), Some("done"))
    );
    assert!(
        grown < 8 << 20,
        "RSS grew by {grown} bytes for a 50 MiB upload"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("done").join("big-1"))
            .unwrap()
            .len(),
        size
    );
    // Progress reads and the completion event.
    let (_, st) = s.api.get("/v1/uploads/big-1", Some(&tok)).await.unwrap();
    assert_eq!(
        (st["received"].as_u64(), st["state"].as_str()),
        (Some(size), Some("done"))
    );
    let (_, h) = s
        .api
        .get("/v1/orgs/acme/events?limit=10", Some(&tok))
        .await
        .unwrap();
    let e = &h["events"][0]["data"];
    assert_eq!(e["type"], "upload.completed");
    assert_eq!(
        (e["id"].as_str(), e["name"].as_str(), e["from"].as_str()),
        (Some("big-1"), Some("big.bin"), Some("ann"))
    );
    assert_eq!(e["sha256"], sha_of(size));
}

/// Sends the rest of upload `doc-1` from `received`; it completes with the whole file's hash.
async fn resume_doc_1(put: reqwest::RequestBuilder, received: u64, size: u64) {
    let r = put
        .header("upload-id", "doc-1")
        .header("upload-offset", received)
        .header("content-length", size - received)
        .body(body(received, size, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["sha256"], sha_of(size), "the resumed file is whole: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_upload_resumes_from_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), None).await;
    let tok = s.token_for("ann", &["acme"], "upload subscribe");
    let size: u64 = 4 << 20;
    let r = put(&s, &tok, "doc.pdf")
        .header("content-length", size)
        .header("upload-id", "doc-1")
        .body(body(0, size, Some(size / 2)))
        .send()
        .await;
    assert!(
        r.is_err() || r.unwrap().status() != 201,
        "the first try breaks off"
    );
    // The server saw the break: the upload is resumable at what it counted.
    support::eventually("the server counts the bytes received", || async {
        let (status, st) = s.api.get("/v1/uploads/doc-1", Some(&tok)).await.unwrap();
        assert_eq!(status, 200, "{st}");
        assert_eq!(st["state"], "receiving");
        st["received"].as_u64().filter(|got| *got > 0)
    })
    .await;
    // A wrong offset is refused with the right one named (409 "being written" until the server
    // has seen the first request break off).
    let v = support::eventually("the first request is wound down", || async {
        let r = put(&s, &tok, "doc.pdf")
            .header("upload-id", "doc-1")
            .header("upload-offset", size)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);
        let v: Value = r.json().await.unwrap();
        let busy = v["error"].as_str().unwrap().contains("being written");
        (!busy).then_some(v)
    })
    .await;
    let (_, st) = s.api.get("/v1/uploads/doc-1", Some(&tok)).await.unwrap();
    let received = st["received"].as_u64().unwrap();
    assert!(received > 0 && received <= size / 2, "{received}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("offset {received}")),
        "{v}"
    );
    resume_doc_1(put(&s, &tok, "doc.pdf"), received, size).await;
    assert_eq!(
        std::fs::metadata(dir.path().join("done").join("doc-1"))
            .unwrap()
            .len(),
        size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_is_refused_with_413_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), Some(100_000)).await;
    let tok = s.token_for("ann", &["acme"], "upload");
    let r = put(&s, &tok, "big.bin")
        .header("content-length", 200_000)
        .body(body(0, 200_000, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("limit"), "{v}");
    for sub in ["partial", "done", "meta"] {
        assert_eq!(
            std::fs::read_dir(dir.path().join(sub)).unwrap().count(),
            0,
            "no file in {sub}"
        );
    }
    // Scope and org are checked; uploads off is a 503.
    let reader = s.token_for("eve", &["acme"], "subscribe");
    let r = put(&s, &reader, "x")
        .header("content-length", 1)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let off = TestServer::start().await;
    let r = reqwest::Client::new()
        .put(format!("http://{}/v1/orgs/acme/uploads?name=x", off.addr))
        .bearer_auth(off.token_for("ann", &["acme"], "upload"))
        .header("content-length", 1)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// The control stream is the client's first bidirectional stream; uploads come after it.
async fn open_control(c: &mut edgestream_testkit::wt::WtClient) {
    use edgestream_codec::Frame;
    c.send_control(&Frame::Ping(Bytes::from_static(b"x")))
        .await
        .unwrap();
    assert!(matches!(c.next_control().await.unwrap(), Frame::Pong(_)));
}

/// Sends UPLOAD_BEGIN and bytes `from..to` on a new bidirectional stream; returns the frames
/// the server answered (stopping early, with a reset, after `stop_at` bytes when given).
async fn wt_upload(
    c: &edgestream_testkit::wt::WtClient,
    begin: edgestream_codec::Frame,
    from: u64,
    to: u64,
    stop_at: Option<u64>,
) -> Vec<edgestream_codec::Frame> {
    let (mut send, mut recv) = c.session.open_bi().await.unwrap();
    send.write_all(&begin.to_bytes()).await.unwrap();
    let reader = tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        let mut frames = Vec::new();
        loop {
            while let Ok(Some(f)) = edgestream_codec::Frame::decode(&mut buf, 1 << 20) {
                frames.push(f);
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                _ => return frames,
            }
        }
    });
    let mut at = from;
    while at < to {
        if stop_at.is_some_and(|s| at >= s) {
            send.reset(0u32).ok();
            break;
        }
        let n = CHUNK.min((to - at) as usize);
        send.write_all(&chunk(at, n)).await.unwrap();
        at += n as u64;
    }
    if stop_at.is_none() {
        send.finish().unwrap();
    }
    tokio::time::timeout(support::HANG_GUARD * 3, reader)
        .await
        .expect("the server answers")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_upload_over_webtransport_in_bounded_server_memory() {
    use edgestream_codec::Frame;
    let dir = tempfile::tempdir().unwrap();
    let node = support::node::Node::spawn(&["--upload-dir", dir.path().to_str().unwrap()]).await;
    let tok = support::token_for("ann", &["acme"], "subscribe upload");
    let url = format!(
        "https://{}/v1/stream?access_token={tok}&orgs=acme",
        node.quic
    );
    let mut c = edgestream_testkit::wt::connect(&url, &node.cert_hash().await)
        .await
        .unwrap();
    open_control(&mut c).await;
    let size: u64 = 50 << 20;
    let before = rss_of(node.pid());
    let begin = Frame::UploadBegin {
        org: "acme".into(),
        name: "big.bin".into(),
        size,
        content_type: "application/octet-stream".into(),
        upload_id: String::new(),
        offset: 0,
    };
    let frames = wt_upload(&c, begin, 0, size, None).await;
    let grown = rss_of(node.pid()).saturating_sub(before);
    let progress: Vec<u64> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::UploadProgress { received, .. } => Some(*received),
            _ => None,
        })
        .collect();
    assert!(
        progress.len() >= 10,
        "progress as the bytes land: {progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[0] <= w[1]));
    match frames.last() {
        Some(Frame::UploadDone {
            size: s, sha256, ..
        }) => {
            assert_eq!((*s, sha256.as_str()), (size, sha_of(size).as_str()));
        }
        other => panic!("expected UPLOAD_DONE, got {other:?}"),
    }
    assert!(
        grown < 8 << 20,
        "server RSS grew by {grown} bytes for a 50 MiB upload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_webtransport_interrupted_at_half_resumes() {
    use edgestream_codec::Frame;
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), None).await;
    let tok = s.token_for("ann", &["acme"], "subscribe upload");
    let mut c = edgestream_testkit::wt::connect(
        &s.wt_url(&format!("access_token={tok}&orgs=acme")),
        &s.cert_hash().await,
    )
    .await
    .unwrap();
    open_control(&mut c).await;
    let size: u64 = 4 << 20;
    let begin = |upload_id: &str, offset: u64| Frame::UploadBegin {
        org: "acme".into(),
        name: "doc.pdf".into(),
        size,
        content_type: "application/pdf".into(),
        upload_id: upload_id.into(),
        offset,
    };
    let frames = wt_upload(&c, begin("", 0), 0, size, Some(size / 2)).await;
    let id = frames
        .iter()
        .find_map(|f| match f {
            Frame::UploadProgress { upload_id, .. } => Some(upload_id.clone()),
            _ => None,
        })
        .expect("a progress frame names the upload");
    // Where to continue: the progress read over HTTP, once the server saw the reset.
    let received = support::eventually("the upload becomes resumable", || async {
        let (_, st) = s
            .api
            .get(&format!("/v1/uploads/{id}"), Some(&tok))
            .await
            .unwrap();
        let got = st["received"].as_u64().unwrap_or(0);
        let r = put(&s, &tok, "doc.pdf")
            .header("upload-id", id.as_str())
            .header("upload-offset", size)
            .body("x")
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        let busy = v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("being written");
        (!busy && got > 0).then_some(got)
    })
    .await;
    assert!(
        received > 0 && received <= size / 2 + CHUNK as u64,
        "{received}"
    );
    let frames = wt_upload(&c, begin(&id, received), received, size, None).await;
    match frames.last() {
        Some(Frame::UploadDone { sha256, .. }) => assert_eq!(sha256, &sha_of(size)),
        other => panic!("expected UPLOAD_DONE, got {other:?}"),
    }
    // Over the limit on WebTransport: ERROR 4413.
    let over = Frame::UploadBegin {
        org: "acme".into(),
        name: "huge".into(),
        size: 200 << 20,
        content_type: String::new(),
        upload_id: String::new(),
        offset: 0,
    };
    let frames = wt_upload(&c, over, 0, 0, None).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error { code: 4413, .. })),
        "{frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upload_in_chunks_resumes_after_a_dropped_socket() {
    use edgestream_codec::Frame;
    use edgestream_testkit::ws::{Msg, WsClient};
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), None).await;
    let tok = s.token_for("ann", &["acme"], "subscribe upload");
    let url = s.ws_url(&format!("access_token={tok}&orgs=acme"));
    let size: u64 = 8 << 20;
    // The next upload frame, skipping events.
    async fn answer(c: &mut WsClient) -> Frame {
        loop {
            match c.next_non_heartbeat().await.unwrap() {
                Msg::Frame(Frame::Subscribed { .. } | Frame::Event { .. }) => {}
                Msg::Frame(f) => return f,
                other => panic!("{other:?}"),
            }
        }
    }
    let mut c = WsClient::connect(&url).await.unwrap();
    c.send_frame(&Frame::UploadBegin {
        org: "acme".into(),
        name: "v.mp4".into(),
        size,
        content_type: "video/mp4".into(),
        upload_id: String::new(),
        offset: 0,
    })
    .await
    .unwrap();
    let id = match answer(&mut c).await {
        Frame::UploadProgress {
            upload_id,
            received: 0,
            size: s,
        } if s == size => upload_id,
        other => panic!("{other:?}"),
    };
    let mut at = 0;
    while at < size / 2 {
        c.send_frame(&Frame::UploadChunk {
            upload_id: id.clone(),
            offset: at,
            bytes: chunk(at, CHUNK),
        })
        .await
        .unwrap();
        at += CHUNK as u64;
    }
    c.close().await;
    // Resume on a new socket from the offset the server counted.
    let deadline = std::time::Instant::now() + support::HANG_GUARD;
    let mut c = WsClient::connect(&url).await.unwrap();
    let received = loop {
        c.send_frame(&Frame::UploadBegin {
            org: "acme".into(),
            name: "v.mp4".into(),
            size,
            content_type: "video/mp4".into(),
            upload_id: id.clone(),
            offset: size, // wrong on purpose: the ERROR names the offset
        })
        .await
        .unwrap();
        match answer(&mut c).await {
            Frame::Error { message, .. } if message.contains("being written") => {
                assert!(std::time::Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Frame::Error { message, .. } => {
                let n: u64 = message
                    .split("at offset ")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{message}"));
                break n;
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(received > 0 && received <= size / 2, "{received}");
    c.send_frame(&Frame::UploadBegin {
        org: "acme".into(),
        name: "v.mp4".into(),
        size,
        content_type: "video/mp4".into(),
        upload_id: id.clone(),
        offset: received,
    })
    .await
    .unwrap();
    assert!(
        matches!(answer(&mut c).await, Frame::UploadProgress { received: r, .. } if r == received)
    );
    let mut at = received;
    while at < size {
        let n = CHUNK.min((size - at) as usize);
        c.send_frame(&Frame::UploadChunk {
            upload_id: id.clone(),
            offset: at,
            bytes: chunk(at, n),
        })
        .await
        .unwrap();
        at += n as u64;
    }
    loop {
        match answer(&mut c).await {
            Frame::UploadProgress { .. } => {}
            Frame::UploadDone {
                sha256, size: s, ..
            } => {
                assert_eq!((s, sha256), (size, sha_of(size)));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A node killed in the middle of an upload: the next process on the same directory knows
/// it, resumes it from the bytes on disk, and still knows it once complete; the per-org count
/// limit holds across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_survives_a_restart_of_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let flags = ["--upload-dir", &d, "--max-uploads-per-org", "2"];
    let mut node = support::node::Node::spawn(&flags).await;
    let tok = support::token_for("ann", &["acme"], "upload");
    let put = |node: &support::node::Node| {
        reqwest::Client::new()
            .put(format!(
                "http://{}/v1/orgs/acme/uploads?name=doc.pdf",
                node.http
            ))
            .bearer_auth(&tok)
    };
    let size: u64 = 4 << 20;
    let _ = put(&node)
        .header("content-length", size)
        .header("upload-id", "doc-1")
        .body(body(0, size, Some(size / 2)))
        .send()
        .await;
    support::eventually("bytes arrive", || async {
        let (_, st) = node.api.get("/v1/uploads/doc-1", Some(&tok)).await.unwrap();
        st["received"].as_u64().filter(|got| *got > 0)
    })
    .await;
    node.kill().await;

    let mut node = support::node::Node::spawn(&flags).await;
    let (status, st) = node.api.get("/v1/uploads/doc-1", Some(&tok)).await.unwrap();
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["state"], "receiving", "{st}");
    let received = st["received"].as_u64().unwrap();
    assert!(received > 0 && received <= size / 2, "{st}");
    resume_doc_1(put(&node), received, size).await;
    node.kill().await;

    let node = support::node::Node::spawn(&flags).await;
    let (_, st) = node.api.get("/v1/uploads/doc-1", Some(&tok)).await.unwrap();
    assert_eq!(
        (st["state"].as_str(), st["sha256"].as_str()),
        (Some("done"), Some(sha_of(size).as_str())),
        "{st}"
    );
    // doc-1 counts: one more upload fits, the next is over the org's limit of 2.
    for (id, status) in [("a", 201), ("b", 413)] {
        let r = put(&node)
            .header("upload-id", id)
            .header("content-length", 1)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{id}");
    }
}
