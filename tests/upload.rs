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
    let deadline = std::time::Instant::now() + support::HANG_GUARD;
    let received = loop {
        let (status, st) = s.api.get("/v1/uploads/doc-1", Some(&tok)).await.unwrap();
        assert_eq!(status, 200, "{st}");
        assert_eq!(st["state"], "receiving");
        let got = st["received"].as_u64().unwrap();
        if got > 0 || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(received > 0, "{received}");
    // A wrong offset is refused with the right one named (409 "being written" until the server
    // has seen the first request break off).
    let deadline = std::time::Instant::now() + support::HANG_GUARD;
    let v = loop {
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
        if !busy || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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
    let r = put(&s, &tok, "doc.pdf")
        .header("upload-id", "doc-1")
        .header("upload-offset", received)
        .header("content-length", size - received)
        .body(body(received, size, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["sha256"], sha_of(size), "the resumed file is whole");
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
    for sub in ["partial", "done"] {
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
