//! The durable embedded log (`--data-dir`): kill -9 mid-stream loses nothing acknowledged,
//! torn and corrupt segments are cut and reported without stopping the start, idempotency
//! keys survive a restart, and retention keeps the disk bounded.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use edgestream::log::durable::{DurableConfig, DurableLog, Fsync};
use edgestream::log::{EventLog, ReadOutcome, Retention};
use edgestream::model::{OrgId, Position};
use edgestream_codec::{Frame, Resume};
use edgestream_testkit::ws::{Msg, WsClient};
use serde_json::{json, Value};
use support::node::Node;

/// Every retained event of `org` as (seq, payload "i"), read page by page over HTTP.
async fn all_events(api: &edgestream_testkit::http::Api, org: &str) -> (String, Vec<(u64, u64)>) {
    let tok = support::token(&[org]);
    let mut out = Vec::new();
    let mut epoch = String::new();
    loop {
        let since = match (&epoch, out.last()) {
            (e, Some((seq, _))) if !e.is_empty() => format!("&since={e}:{seq}"),
            _ => String::new(),
        };
        let (status, h) = api
            .get(
                &format!("/v1/orgs/{org}/events?limit=1000{since}"),
                Some(&tok),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{h}");
        epoch = h["epoch"].as_str().unwrap().to_string();
        let page: Vec<(u64, u64)> = h["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["seq"].as_u64().unwrap(), e["data"]["i"].as_u64().unwrap()))
            .collect();
        if page.is_empty() {
            return (epoch, out);
        }
        out.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let tok = support::token(&["acme"]);
    // Acknowledged publishes over all rounds: i -> (epoch, seq).
    let mut acked: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    let mut next_i = 0u64;
    let mut resume_from: Option<(String, u64)> = None;
    for round in 0..3 {
        let mut node = Node::spawn(&["--data-dir", &data, "--fsync", "batch"]).await;
        // After a restart: the epoch and every acknowledged event are there, in order, once.
        let (epoch, events) = all_events(&node.api, "acme").await;
        let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "round {round}: gap-free"
        );
        let mut seen = HashSet::new();
        for (_, i) in &events {
            assert!(seen.insert(*i), "round {round}: publish {i} stored twice");
        }
        let by_i: BTreeMap<u64, u64> = events.iter().map(|(s, i)| (*i, *s)).collect();
        for (i, (e, seq)) in &acked {
            assert_eq!(e, &epoch, "round {round}: the epoch survives");
            assert_eq!(
                by_i.get(i),
                Some(seq),
                "round {round}: acknowledged {i} kept"
            );
        }
        // A client that resumes with its position gets exactly the rest.
        if let Some((e, seq)) = resume_from.take() {
            let head = seqs.len() as u64;
            let url = format!(
                "ws://{}/v1/stream?access_token={tok}&orgs=acme&since=acme:{e}:{seq}",
                node.http
            );
            let mut c = WsClient::connect(&url).await.unwrap();
            match c.next_non_heartbeat().await.unwrap() {
                Msg::Frame(Frame::Subscribed { resume, .. }) => {
                    assert_eq!(resume, Resume::Recovered)
                }
                other => panic!("{other:?}"),
            }
            let rest = c.events((head - seq) as usize).await.unwrap();
            assert_eq!(
                rest.iter().map(|e| e.seq).collect::<Vec<_>>(),
                (seq + 1..=head).collect::<Vec<_>>()
            );
        }
        resume_from = events.last().map(|(s, _)| (epoch.clone(), *s));
        // Two publishers mid-stream; the node is killed while they run.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for p in 0..2u64 {
            let (api, tok, tx) = (node.api.clone(), tok.clone(), tx.clone());
            let base = next_i + p * 100_000;
            tasks.push(tokio::spawn(async move {
                for n in 0..10_000u64 {
                    let batch: Vec<Value> =
                        (0..5).map(|k| json!({"i": base + n * 5 + k})).collect();
                    let body = serde_json::to_vec(&batch).unwrap();
                    match api.publish_raw(&tok, "acme", body, None).await {
                        Ok((201, r)) => {
                            let _ = tx.send((base + n * 5, r));
                        }
                        _ => return, // the node is gone
                    }
                }
            }));
        }
        drop(tx);
        let mut got = 0;
        while got < 100 {
            let (i0, r) = rx.recv().await.expect("publishers run");
            let (e, first) = (
                r["epoch"].as_str().unwrap().to_string(),
                r["first_seq"].as_u64().unwrap(),
            );
            for k in 0..5 {
                acked.insert(i0 + k, (e.clone(), first + k));
            }
            got += 1;
        }
        node.kill().await;
        for t in tasks {
            let _ = t.await;
        }
        while let Some((i0, r)) = rx.recv().await {
            let (e, first) = (
                r["epoch"].as_str().unwrap().to_string(),
                r["first_seq"].as_u64().unwrap(),
            );
            for k in 0..5 {
                acked.insert(i0 + k, (e.clone(), first + k));
            }
        }
        next_i += 1_000_000;
    }
    assert!(acked.len() >= 1500, "{} acknowledged", acked.len());
}

fn config(dir: &Path, segment_bytes: u64) -> DurableConfig {
    DurableConfig {
        dir: dir.to_path_buf(),
        fsync: Fsync::Always,
        segment_bytes,
    }
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

async fn fill(log: &DurableLog, org: &OrgId, n: u64) -> String {
    let mut epoch = String::new();
    for i in 0..n {
        let r = log
            .append(org, vec![Bytes::from(format!(r#"{{"i":{i}}}"#))], None)
            .await
            .unwrap();
        epoch = r.epoch.to_string();
    }
    epoch
}

async fn seqs(log: &DurableLog, org: &OrgId) -> Vec<u64> {
    let s = log.state(org).await.unwrap();
    let from = Position {
        epoch: s.epoch.clone(),
        seq: s.first - 1,
    };
    match log.read(org, &from, 10_000).await.unwrap() {
        ReadOutcome::Events { events, .. } => events.iter().map(|e| e.seq).collect(),
        ReadOutcome::Unusable { .. } => panic!("unusable"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_or_bit_flipped_tail_is_cut_at_the_last_whole_record() {
    let dir = tempfile::tempdir().unwrap();
    let org = OrgId::parse("acme").unwrap();
    let epoch = {
        let log = DurableLog::open(config(dir.path(), 1 << 20), Retention::default()).unwrap();
        fill(&log, &org, 20).await
    };
    // A crash in the middle of writing the last record.
    let last = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    {
        let log = DurableLog::open(config(dir.path(), 1 << 20), Retention::default()).unwrap();
        assert!(log.recovery().torn_bytes > 0);
        assert_eq!(log.state(&org).await.unwrap().epoch.as_str(), epoch);
        assert_eq!(seqs(&log, &org).await, (1..=19).collect::<Vec<_>>());
        assert_eq!(log.usage().recovered_torn_bytes, log.recovery().torn_bytes);
        // Appends continue from the last whole record.
        let r = log
            .append(&org, vec![Bytes::from_static(b"{}")], None)
            .await
            .unwrap();
        assert_eq!(r.first_seq, 20);
    }
    // A flipped bit in the newest record: the checksum catches it, the record is cut.
    let newest = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x10;
    std::fs::write(&newest, bytes).unwrap();
    let log = DurableLog::open(config(dir.path(), 1 << 20), Retention::default()).unwrap();
    assert!(log.recovery().torn_bytes > 0);
    assert_eq!(seqs(&log, &org).await, (1..=19).collect::<Vec<_>>());
    assert_eq!(log.state(&org).await.unwrap().epoch.as_str(), epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_inside_the_log_gives_the_org_a_new_epoch_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let (acme, other) = (
        OrgId::parse("acme").unwrap(),
        OrgId::parse("other").unwrap(),
    );
    let epoch = {
        // Small segments: the 30 events of acme span several files.
        let log = DurableLog::open(config(dir.path(), 4096), Retention::default()).unwrap();
        let e = fill(&log, &acme, 200).await;
        fill(&log, &other, 5).await;
        e
    };
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    // Flip a byte in the middle of an early segment.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&segs[0], bytes).unwrap();
    let log = DurableLog::open(config(dir.path(), 4096), Retention::default()).unwrap();
    let rec = log.recovery().clone();
    assert_eq!(rec.corrupt_segments, 1);
    assert_eq!(rec.reset_orgs, vec!["acme".to_string()]);
    let s = log.state(&acme).await.unwrap();
    assert_ne!(s.epoch.as_str(), epoch, "a new epoch: clients get reset");
    assert_eq!(s.head, 0);
    // The other org, written after the corruption, is untouched.
    assert_eq!(seqs(&log, &other).await, (1..=5).collect::<Vec<_>>());
    assert_eq!(log.usage().recovered_reset_orgs, 1);
    // The new epoch is remembered across the next restart, and appends continue in it.
    let r = log
        .append(&acme, vec![Bytes::from_static(b"{}")], None)
        .await
        .unwrap();
    assert_eq!((r.epoch.clone(), r.first_seq), (s.epoch.clone(), 1));
    drop(log);
    let log = DurableLog::open(config(dir.path(), 4096), Retention::default()).unwrap();
    let again = log.state(&acme).await.unwrap();
    assert_eq!((again.epoch, again.head), (s.epoch, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_epochs_and_heads_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let tok = support::token(&["acme"]);
    let body = serde_json::to_vec(&json!([{"i": 1}, {"i": 2}])).unwrap();
    let first = {
        let node = Node::spawn(&["--data-dir", &data, "--fsync", "always"]).await;
        let (s, r) = node
            .api
            .publish_raw(&tok, "acme", body.clone(), Some("k-1"))
            .await
            .unwrap();
        assert_eq!(s, 201);
        r
        // dropped: killed
    };
    let node = Node::spawn(&["--data-dir", &data, "--fsync", "never"]).await;
    let (s, r) = node
        .api
        .publish_raw(&tok, "acme", body, Some("k-1"))
        .await
        .unwrap();
    assert_eq!(s, 200, "a repeat after the restart is recognised: {r}");
    assert_eq!(
        (&r["epoch"], &r["first_seq"], &r["last_seq"]),
        (&first["epoch"], &first["first_seq"], &first["last_seq"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_segments_so_disk_use_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let s = support::TestServer::start_with(move |a| {
        a.data_dir = Some(data);
        a.data_segment_bytes = Some(8192);
        a.replay_window = Some("1s".parse().unwrap());
    })
    .await;
    let tok = s.token(&["acme"]);
    let payload = "x".repeat(400);
    let mut written = 0usize;
    // About 3 s of steady publishing, bounded in count.
    for n in 0..60 {
        let batch: Vec<Value> = (0..5)
            .map(|k| json!({"n": n * 5 + k, "p": payload}))
            .collect();
        s.api
            .publish(&tok, "acme", &Value::Array(batch))
            .await
            .unwrap();
        written += 5 * 430;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    support::eventually("the disk use falls under 40,000 bytes", || async {
        let disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        (disk < 40_000).then_some(())
    })
    .await;
    assert!(written > 100_000, "the run wrote more than what stays");
    let m = s.metrics().await;
    assert!(
        m["log_disk_bytes"].as_u64().unwrap() < 40_000 + 8192 * 2,
        "{m}"
    );
    // The head outlives the deleted segments (it is in the checkpoint).
    let (_, h) = s
        .api
        .get("/v1/orgs/acme/events?limit=1", Some(&tok))
        .await
        .unwrap();
    assert_eq!(h["head"], 300, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_cap_also_frees_disk_and_heads_survive_in_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let org = OrgId::parse("acme").unwrap();
    let retention = Retention {
        max_events: 50,
        ..Retention::default()
    };
    let epoch = {
        let log = DurableLog::open(config(dir.path(), 4096), retention).unwrap();
        let e = fill(&log, &org, 500).await;
        let before = segments(dir.path()).len();
        log.sweep(edgestream::time::unix_ms());
        let after = segments(dir.path()).len();
        assert!(before >= 6, "{before} segments written");
        assert!(after <= 3, "{after} segments kept for the last 50 events");
        e
    };
    let log = DurableLog::open(config(dir.path(), 4096), retention).unwrap();
    let s = log.state(&org).await.unwrap();
    assert_eq!(
        (s.epoch.as_str(), s.head, s.first),
        (epoch.as_str(), 500, 451)
    );
    assert_eq!(seqs(&log, &org).await, (451..=500).collect::<Vec<_>>());
    drop(log);
    // An unreadable checkpoint does not stop the start: the org, whose early history is gone,
    // restarts in a new epoch, reported.
    std::fs::write(dir.path().join("checkpoint.json"), b"{not json").unwrap();
    let log = DurableLog::open(config(dir.path(), 4096), retention).unwrap();
    assert_eq!(log.recovery().reset_orgs, vec!["acme".to_string()]);
    assert_ne!(log.state(&org).await.unwrap().epoch.as_str(), epoch);
}

/// Idle orgs leave memory on the durable log too, and their epochs and heads survive a restart
/// through the checkpoint (so a caught-up client still resumes `recovered`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_orgs_leave_memory_and_their_heads_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        window_ms: 1000,
        ..Retention::default()
    };
    let orgs: Vec<OrgId> = (0..50)
        .map(|i| OrgId::parse(&format!("org{i}")).unwrap())
        .collect();
    let mut epochs = Vec::new();
    {
        let log = DurableLog::open(config(dir.path(), 4096), retention).unwrap();
        for org in &orgs {
            epochs.push(fill(&log, org, 10).await);
        }
        assert_eq!(log.usage().orgs, 50);
        // Past the window: every org is idle; it leaves memory and its old segments go, after
        // a checkpoint that names it.
        log.sweep(edgestream::time::unix_ms() + 5_000);
        let u = log.usage();
        assert_eq!((u.orgs, u.idle_orgs, u.events), (0, 50, 0));
        assert!(segments(dir.path()).len() <= 2, "old segments deleted");
        // Revived in memory with its epoch and head.
        let s = log.state(&orgs[0]).await.unwrap();
        assert_eq!((s.epoch.as_str(), s.head), (epochs[0].as_str(), 10));
    }
    let log = DurableLog::open(config(dir.path(), 4096), retention).unwrap();
    for (org, epoch) in orgs.iter().zip(&epochs) {
        let s = log.state(org).await.unwrap();
        assert_eq!((s.epoch.as_str(), s.head), (epoch.as_str(), 10), "{org}");
        let at = Position {
            epoch: s.epoch.clone(),
            seq: 10,
        };
        assert_eq!(s.resume(Some(&at)), Resume::Recovered, "{org}");
    }
    assert_eq!(log.recovery().reset_orgs, Vec::<String>::new());
}
