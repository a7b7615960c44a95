//! The Redis figures: a `redis-server` of the bench's own, ingest through it (with and without
//! `--redis-min-replicas`), publish-to-deliver latency between two nodes, and many small orgs
//! on one node against the embedded log.

use super::*;

/// A `redis-server` of the bench's own (loopback, free port, no persistence, its files in a
/// temporary directory, kept for as long as the server runs), killed on drop.
pub(crate) struct RedisProc(
    pub(crate) std::process::Child,
    pub(crate) u16,
    #[allow(dead_code)] tempfile::TempDir,
);

impl RedisProc {
    pub(crate) fn start(replica_of: Option<u16>) -> anyhow::Result<Self> {
        let port = free_port();
        let dir = tempfile::tempdir()?;
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            // A replica's first sync writes an RDB file: there, not in the working directory.
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null());
        if let Some(p) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
        }
        let r = RedisProc(cmd.spawn().context("redis-server")?, port, dir);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = r.cli(&["INFO", "replication"]);
            let up = if replica_of.is_some() {
                info.contains("master_link_status:up")
            } else {
                info.contains("role:master")
            };
            if up {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("redis-server on {port} did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        std::process::Command::new("redis-cli")
            .args(["-p", &self.1.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Ingest through a Redis primary with one replica, acknowledged by the primary and, with
/// `min_replicas`, only once the replica has each request (`--redis-min-replicas 1`).
pub(crate) async fn redis_ingest(
    cli: &Cli,
    events: u64,
    batch: u64,
    min_replicas: bool,
) -> anyhow::Result<crate::Ingest> {
    let primary = RedisProc::start(None)?;
    let _replica = RedisProc::start(Some(primary.1))?;
    let mut extra = vec![
        "--redis".to_string(),
        format!("redis://127.0.0.1:{}/", primary.1),
    ];
    if min_replicas {
        extra.extend(["--redis-min-replicas".to_string(), "1".to_string()]);
    }
    ingest_into(cli, events, batch, &extra).await
}

/// Publish-to-deliver latency through Redis: two nodes on one `redis-server`, one WebSocket
/// subscriber on node B, one publisher on node A at `rate` events/s (light load); every
/// event's latency from before its POST to its arrival, in order, no gap.
pub(crate) async fn redis_latency(cli: &Cli, events: u64, rate: u64) -> anyhow::Result<Value> {
    let redis = RedisProc::start(None)?;
    let extra = vec![
        "--redis".to_string(),
        format!("redis://127.0.0.1:{}/", redis.1),
    ];
    let a = start_edgestream_with(cli, events, &extra).await?;
    let b = start_edgestream_with(cli, events, &extra).await?;
    let t = tok(&["lat"]);
    let mut sub = WsClient::connect(&format!(
        "ws://127.0.0.1:{}/v1/stream?access_token={t}&orgs=lat",
        b.http
    ))
    .await?;
    match sub.next().await? {
        Msg::Frame(Frame::Subscribed { .. }) => {}
        other => bail!("expected SUBSCRIBED, got {other:?}"),
    }
    let epoch = Instant::now();
    let publisher = {
        let (api, t) = (a.api.clone(), t.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            for _ in 0..events {
                tick.tick().await;
                api.publish(&t, "lat", &json!({"t": now_us(epoch)})).await?;
            }
            anyhow::Ok(())
        })
    };
    let mut lat = Vec::with_capacity(events as usize);
    let mut expected = 1;
    while expected <= events {
        if let Msg::Frame(Frame::Event { seq, payload, .. }) = sub.next().await? {
            if seq != expected {
                bail!("seq {seq}, expected {expected}");
            }
            expected += 1;
            let sent: Value = serde_json::from_slice(&payload)?;
            lat.push(now_us(epoch).saturating_sub(sent["t"].as_u64().unwrap_or(0)));
        }
    }
    publisher.await??;
    lat.sort_unstable();
    Ok(json!({"events": events, "rate": rate, "latency_us": percentiles(&lat)}))
}

/// Many small orgs on one node: `orgs` WebSocket sessions, one org each, over one
/// `redis-server` (`on_redis`) or on the embedded log (the baseline: what the sessions cost
/// without Redis). Reports the Redis connections the node holds, node and Redis CPU (% of a
/// core) over an idle window, and the time from the first publish to the last delivery of
/// one event to every org (16 concurrent publishers, one POST per org).
pub(crate) async fn many_orgs(
    cli: &Cli,
    orgs: usize,
    idle_secs: u64,
    on_redis: bool,
) -> anyhow::Result<Value> {
    let redis = if on_redis {
        Some(RedisProc::start(None)?)
    } else {
        None
    };
    let redis_pid = redis.as_ref().map(|r| r.0.id());
    let extra = match &redis {
        Some(r) => vec!["--redis".to_string(), format!("redis://127.0.0.1:{}/", r.1)],
        None => Vec::new(),
    };
    let redis_clients = || {
        redis.as_ref().map_or(0, |r| {
            info_field(&r.cli(&["INFO", "clients"]), "connected_clients")
        })
    };
    // Before the node connects (this count includes the INFO's own connection).
    let clients_before = redis_clients();
    let es = start_edgestream_with(cli, 1000, &extra).await?;
    let seen = Arc::new(Seen::default());
    let epoch = Instant::now();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(orgs);
    let connect_start = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(orgs);
    for i in 0..orgs {
        let org = format!("o{i}");
        let url = format!(
            "ws://127.0.0.1:{}/v1/stream?access_token={}&orgs={org}",
            es.http,
            tok(&[&org])
        );
        let (seen, ready, gate) = (seen.clone(), ready_tx.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = {
                let _permit = gate.acquire().await?;
                let mut c = WsClient::connect(&url).await?;
                match c.next().await? {
                    Msg::Frame(Frame::Subscribed { .. }) => {}
                    other => bail!("expected SUBSCRIBED, got {other:?}"),
                }
                c
            };
            ready.send(()).await.ok();
            loop {
                if let Msg::Frame(Frame::Event { seq, .. }) = c.next().await? {
                    if seq != 1 {
                        bail!("seq {seq}, expected 1");
                    }
                    seen.last_rx.fetch_max(now_us(epoch), Ordering::Relaxed);
                    seen.delivered.fetch_add(1, Ordering::Relaxed);
                    return Ok(c);
                }
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..orgs {
        tokio::time::timeout(Duration::from_secs(120), ready_rx.recv())
            .await
            .context("sessions did not connect")?
            .context("a session failed")?;
    }
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    // Let the sessions' presence joins and the follower start-ups settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connections = redis_clients().saturating_sub(clients_before);
    let cpu = |pid: Option<u32>| pid.map_or(0.0, pid_cpu_seconds);
    let (node0, redis0, t0) = (es.proc.cpu_seconds(), cpu(redis_pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle = t0.elapsed().as_secs_f64();
    let node_idle = (es.proc.cpu_seconds() - node0) / idle * 100.0;
    let redis_idle = (cpu(redis_pid) - redis0) / idle * 100.0;
    // One event to every org.
    let t = tok(&["*"]);
    let start_us = now_us(epoch);
    let publish_start = Instant::now();
    let mut publishers = Vec::new();
    for w in 0..16 {
        let (api, t) = (es.api.clone(), t.clone());
        publishers.push(tokio::spawn(async move {
            for i in (w..orgs).step_by(16) {
                api.publish(&t, &format!("o{i}"), &json!({"i": i})).await?;
            }
            anyhow::Ok(())
        }));
    }
    for p in publishers {
        p.await??;
    }
    let publish_seconds = publish_start.elapsed().as_secs_f64();
    let mut clients = Vec::with_capacity(orgs);
    for t in tasks {
        clients.push(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .context("an event was not delivered")???,
        );
    }
    let deliver_seconds = (seen
        .last_rx
        .load(Ordering::Relaxed)
        .saturating_sub(start_us)) as f64
        / 1e6;
    drop(clients);
    Ok(json!({
        "orgs": orgs, "connect_seconds": connect_seconds,
        "redis_connections": connections,
        "idle_seconds": idle, "node_idle_cpu_percent": node_idle, "redis_idle_cpu_percent": redis_idle,
        "publish_seconds": publish_seconds, "deliver_all_seconds": deliver_seconds,
        "delivered": seen.delivered.load(Ordering::Relaxed),
    }))
}

/// A numeric field of an `INFO` reply.
fn info_field(info: &str, field: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
