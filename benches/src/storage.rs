//! `edgestream-bench storage-choice`: the measurement behind the durable log's design
//! (ARCHITECTURE.md): appends per second with a sync before each acknowledgement, for a
//! well-kept embedded store (redb, one write transaction per acknowledgement) and for
//! edgestream's segment files (`DurableLog`), alone and with 4 concurrent writers.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use edgestream::log::durable::{DurableConfig, DurableLog, Fsync};
use edgestream::log::{EventLog, Retention};
use edgestream::model::OrgId;
use redb::{Database, TableDefinition};
use serde_json::{json, Value};

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

fn payload() -> Vec<u8> {
    format!(r#"{{"p":"{}"}}"#, "x".repeat(120)).into_bytes()
}

/// Records per second into redb: `writers` threads, each committing `group` records per
/// durable (Immediate) transaction.
fn redb_rate(records: u64, group: u64, writers: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = Arc::new(Database::create(dir.path().join("events.redb"))?);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (db, next) = (db.clone(), next.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let p = payload();
                loop {
                    let first = next.fetch_add(group, std::sync::atomic::Ordering::Relaxed);
                    if first >= records {
                        return Ok(());
                    }
                    let txn = db.begin_write()?;
                    {
                        let mut t = txn.open_table(TABLE)?;
                        for seq in first..first + group {
                            t.insert(seq, p.as_slice())?;
                        }
                    }
                    txn.commit()?;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    Ok(records as f64 / start.elapsed().as_secs_f64())
}

/// Records per second into edgestream's segment log: `writers` tasks, each appending `group`
/// records per acknowledged append (fsync `always` alone, `batch` with concurrent writers).
async fn segments_rate(records: u64, group: u64, writers: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let fsync = if writers == 1 {
        Fsync::Always
    } else {
        Fsync::Batch
    };
    let log = Arc::new(DurableLog::open(
        DurableConfig {
            dir: dir.path().to_path_buf(),
            fsync,
            segment_bytes: 64 << 20,
        },
        Retention {
            max_events: records as usize,
            ..Retention::default()
        },
    )?);
    let org = OrgId::parse("bench")?;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (log, org, next) = (log.clone(), org.clone(), next.clone());
            tokio::spawn(async move {
                let p = Bytes::from(payload());
                loop {
                    let first = next.fetch_add(group, std::sync::atomic::Ordering::Relaxed);
                    if first >= records {
                        return anyhow::Ok(());
                    }
                    log.append(&org, vec![p.clone(); group as usize], None)
                        .await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(records as f64 / start.elapsed().as_secs_f64())
}

pub async fn run(records: u64) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (group, writers) in [(1, 1), (100, 1), (1, 4)] {
        let n = if group == 1 { records / 10 } else { records };
        let r = tokio::task::spawn_blocking(move || redb_rate(n, group, writers)).await??;
        let s = segments_rate(n, group, writers).await?;
        eprintln!(
            "{writers} writer(s), {group} record(s) per sync: redb {r:.0}/s, segments {s:.0}/s"
        );
        rows.push(json!({"writers": writers, "group": group, "records": n,
            "redb_per_sec": r, "segments_per_sec": s, "ratio": s / r}));
    }
    println!("{}", serde_json::to_string_pretty(&Value::Array(rows))?);
    Ok(())
}
