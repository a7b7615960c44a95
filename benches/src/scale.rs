//! Figures at scale, with the load in worker processes ([`crate::load`]): latency at a fixed
//! realistic load, idle sessions by the ten thousand, connection storms, many orgs, and memory
//! per org. Each figure reports the load's CPU beside the server's.

use super::load::{self, timed_payload, Load, Spec};
use super::*;
use std::io::Write as _;
use tokio::io::AsyncWriteExt as _;

/// CPU used by the server and by the load over a window, in cores.
#[derive(Debug, serde::Serialize)]
pub struct Cpu {
    seconds: f64,
    server_cores: f64,
    load_cores: f64,
    load_procs: usize,
    /// This process: the publishers (HTTP requests) and the bench's own bookkeeping.
    publisher_cores: f64,
}

fn own_cpu_seconds() -> f64 {
    pid_cpu_seconds(std::process::id())
}

struct CpuWindow {
    t0: Instant,
    server0: f64,
    load0: f64,
    own0: f64,
}

impl CpuWindow {
    fn start(es: &Edgestream, load: &Load) -> Self {
        CpuWindow {
            t0: Instant::now(),
            server0: es.proc.cpu_seconds(),
            load0: load.cpu_seconds(),
            own0: own_cpu_seconds(),
        }
    }

    fn end(&self, es: &Edgestream, load: &Load, procs: usize) -> Cpu {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-6);
        Cpu {
            seconds: secs,
            server_cores: (es.proc.cpu_seconds() - self.server0) / secs,
            load_cores: (load.cpu_seconds() - self.load0) / secs,
            load_procs: procs,
            publisher_cores: (own_cpu_seconds() - self.own0) / secs,
        }
    }
}

/// The URL template a worker fills in per client.
fn stream_url(es: &Edgestream, transport: Transport) -> String {
    match transport {
        Transport::Ws => format!(
            "ws://127.0.0.1:{}/v1/stream?access_token={{token}}&orgs={{org}}",
            es.http
        ),
        Transport::Wt => format!("{}?access_token={{token}}&orgs={{org}}", es.wt_url),
    }
}

/// Publishes `per_org` events to each of `orgs` orgs (one request per org).
async fn publish_to_orgs(es: &Edgestream, orgs: usize, per_org: u64) -> anyhow::Result<()> {
    publish_to_org_range(es, 0..orgs, per_org, 1).await
}

/// Keep-alive connections the publishers use.
const PUBLISH_CONNECTIONS: usize = 32;

/// `per_org` timed events to each of the orgs `o{i}`, `i` in `range`, over
/// [`PUBLISH_CONNECTIONS`] keep-alive HTTP/1.1 connections: one request per org
/// (`orgs_per_request` 1, `POST /v1/orgs/{org}/events`) or per `orgs_per_request` orgs
/// (`POST /v1/events`). The requests are written by hand (one write each, the answer read by
/// its Content-Length) with one token for every org: the publishers share the machine with
/// the server, and through reqwest, with a token signed and a JSON value built per request,
/// they took 0.64 cores at 10,000 orgs, a third of the machine.
async fn publish_to_org_range(
    es: &Edgestream,
    range: std::ops::Range<usize>,
    per_org: u64,
    orgs_per_request: usize,
) -> anyhow::Result<()> {
    let token = tok(&["*"]);
    let orgs: Vec<usize> = range.collect();
    let requests: Vec<&[usize]> = orgs.chunks(orgs_per_request.max(1)).collect();
    let per_conn = requests.len().div_ceil(PUBLISH_CONNECTIONS).max(1);
    let filler = "x".repeat(PAYLOAD_BYTES - 40);
    futures_util::future::try_join_all(requests.chunks(per_conn).map(|share| {
        let (token, filler) = (&token, &filler);
        async move {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", es.http)).await?;
            conn.set_nodelay(true)?;
            let (mut req, mut body, mut answer) = (Vec::new(), Vec::new(), Vec::new());
            for group in share {
                body.clear();
                let events = |body: &mut Vec<u8>| -> std::io::Result<()> {
                    body.push(b'[');
                    for n in 0..per_org {
                        if n > 0 {
                            body.push(b',');
                        }
                        // What `load::timed_payload` builds, without a `Value` per event.
                        write!(body, r#"{{"u":{},"p":"{filler}"}}"#, load::unix_us())?;
                    }
                    body.push(b']');
                    Ok(())
                };
                let path = if let [i] = group {
                    events(&mut body)?;
                    format!("/v1/orgs/o{i}/events")
                } else {
                    body.push(b'[');
                    for (k, i) in group.iter().enumerate() {
                        if k > 0 {
                            body.push(b',');
                        }
                        write!(body, r#"{{"org":"o{i}","events":"#)?;
                        events(&mut body)?;
                        body.push(b'}');
                    }
                    body.push(b']');
                    "/v1/events".to_string()
                };
                req.clear();
                write!(
                    req,
                    "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\
                     authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\n\r\n",
                    body.len()
                )?;
                req.extend_from_slice(&body);
                conn.write_all(&req).await?;
                let status = read_answer(&mut conn, &mut answer).await?;
                anyhow::ensure!(
                    status == 201,
                    "{path} answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    Ok(())
}

/// Reads one HTTP/1.1 answer with a Content-Length into `buf` (head and body); its status.
async fn read_answer(conn: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    use tokio::io::AsyncReadExt as _;
    buf.clear();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?;
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("no status line")?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .context("an answer without Content-Length")?;
            while buf.len() < end + 4 + length {
                anyhow::ensure!(
                    conn.read_buf(buf).await? > 0,
                    "connection closed mid-answer"
                );
            }
            anyhow::ensure!(buf.len() == end + 4 + length, "bytes after the answer");
            return Ok(status);
        }
        anyhow::ensure!(
            conn.read_buf(buf).await? > 0,
            "connection closed before an answer"
        );
    }
}

/// The kernel's count of UDP datagrams dropped at a full socket receive buffer, machine-wide
/// (`RcvbufErrors` in /proc/net/snmp).
fn udp_receive_buffer_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

fn procs(cli: &Cli, clients: usize) -> usize {
    // One source address holds about 28,000 ephemeral ports: at least one worker per 20,000.
    cli.load_procs.max(clients.div_ceil(20_000)).max(1)
}

/// A server and `subscribers` in load workers on its org `o0` (every `sample_every`-th timed);
/// the number of workers.
async fn one_org(
    cli: &Cli,
    transport: Transport,
    subscribers: usize,
    events: u64,
    sample_every: usize,
) -> anyhow::Result<(Edgestream, Load, usize)> {
    let es = start_edgestream(cli, events).await?;
    let url = stream_url(&es, transport);
    let n = procs(cli, subscribers);
    let load = Load::start(
        Spec {
            transport,
            url: &url,
            cert: &es.cert,
            clients: subscribers,
            orgs: 1,
            procs: n,
            sample_every,
            concurrency: 64,
            bare: false,
        },
        &cli.load_cpus,
    )
    .await?;
    Ok((es, load, n))
}

#[derive(Debug, serde::Serialize)]
pub struct FixedLatency {
    events_per_sec: f64,
    subscribers: usize,
    events: u64,
    delivered: u64,
    us: Percentiles,
    cpu: Cpu,
    /// The bare library's broadcaster at the same load, same machine, same load workers: the
    /// floor this machine puts under the figure.
    baseline: BareLatency,
}

#[derive(Debug, serde::Serialize)]
pub struct BareLatency {
    delivered: u64,
    us: Percentiles,
    cpu: Cpu,
}

/// `rate` events/s of 128 B to `subscribers` on one org for `events` events: publish-to-receive
/// latency per delivery (every subscriber timed).
pub async fn fixed_latency(
    cli: &Cli,
    transport: Transport,
    subscribers: usize,
    rate: f64,
    events: u64,
) -> anyhow::Result<FixedLatency> {
    let (es, mut load, n) = one_org(cli, transport, subscribers, events, 1).await?;
    let cpu = CpuWindow::start(&es, &load);
    let t = tok(&["o0"]);
    let step = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    for i in 0..events {
        tokio::time::sleep_until(start + step * i as u32).await;
        es.api
            .publish(&t, "o0", &Value::Array(vec![timed_payload()]))
            .await?;
    }
    load.ask(&format!("until {events}"), "reached").await?;
    let cpu = cpu.end(&es, &load, n);
    let done = load.finish().await?;
    drop(es);
    let (mut bare, bare_done) = bare_run(cli, transport, subscribers, events, Some(rate)).await?;
    let _ = bare.proc.child.start_kill();
    Ok(FixedLatency {
        events_per_sec: rate,
        subscribers,
        events,
        delivered: done.delivered,
        us: percentiles(&done.latencies_us),
        cpu,
        baseline: BareLatency {
            delivered: bare_done.delivered,
            us: percentiles(&bare_done.latencies_us),
            cpu: bare.cpu,
        },
    })
}

#[derive(Debug, serde::Serialize)]
pub struct Storm {
    log: &'static str,
    sessions: usize,
    orgs: usize,
    /// Time for every session's first connect (and SUBSCRIBED), and the rate.
    connect_seconds: f64,
    handshakes_per_sec: f64,
    /// From the reconnect to each session holding every event it missed (per worker, then the
    /// largest).
    recovered_p50_us: u64,
    recovered_p99_us: u64,
    recovered_max_us: u64,
    reconnect_seconds: f64,
    cpu: Cpu,
}

/// `sessions` WebSocket sessions over `orgs` orgs get 10 events each, drop at once, miss 10
/// more, and reconnect at once with `since`: the time until all have caught up.
pub async fn reconnect_storm(
    cli: &Cli,
    sessions: usize,
    orgs: usize,
    on_redis: bool,
) -> anyhow::Result<Storm> {
    let redis = if on_redis {
        Some(redis::RedisProc::start(None)?)
    } else {
        None
    };
    let extra = match &redis {
        Some(r) => vec!["--redis".to_string(), format!("redis://127.0.0.1:{}/", r.1)],
        None => Vec::new(),
    };
    let es = start_edgestream_with(cli, 1000, &extra).await?;
    let url = stream_url(&es, Transport::Ws);
    let n = procs(cli, sessions);
    let mut load = Load::start(
        Spec {
            transport: Transport::Ws,
            url: &url,
            cert: &es.cert,
            clients: sessions,
            orgs,
            procs: n,
            sample_every: 0,
            bare: false,
            concurrency: 256,
        },
        &cli.load_cpus,
    )
    .await?;
    let connect_seconds = load.connect_seconds;
    publish_to_orgs(&es, orgs, 10).await?;
    load.ask("until 10", "reached").await?;
    load.ask("drop", "dropped").await?;
    publish_to_orgs(&es, orgs, 10).await?;
    let cpu = CpuWindow::start(&es, &load);
    let t1 = Instant::now();
    let reached = load.ask("resume 20", "reached").await?;
    let reconnect_seconds = t1.elapsed().as_secs_f64();
    let cpu = cpu.end(&es, &load, n);
    let field = |k: &str| {
        reached
            .iter()
            .filter_map(|v| v["recovered_us"][k].as_u64())
            .max()
            .unwrap_or(0)
    };
    let storm = Storm {
        log: if on_redis { "redis" } else { "memory" },
        sessions,
        orgs,
        connect_seconds,
        handshakes_per_sec: sessions as f64 / connect_seconds,
        recovered_p50_us: field("p50"),
        recovered_p99_us: field("p99"),
        recovered_max_us: reached
            .iter()
            .filter_map(|v| v["max_us"].as_u64())
            .max()
            .unwrap_or(0),
        reconnect_seconds,
        cpu,
    };
    load.finish().await?;
    Ok(storm)
}

#[derive(Debug, serde::Serialize)]
pub struct Handshakes {
    sessions: usize,
    seconds: f64,
    per_sec: f64,
    /// Datagrams the kernel dropped at full UDP receive buffers during the storm (the whole
    /// machine's `RcvbufErrors`; `None` off Linux): what limits a QUIC storm before CPU does.
    pub udp_dropped: Option<u64>,
    cpu: Cpu,
}

/// `sessions` connect at once (256 at a time per worker) and SUBSCRIBE: handshakes per second
/// (WebSocket: TCP, upgrade, JWT; WebTransport: QUIC, TLS 1.3, CONNECT, JWT).
pub async fn handshakes(
    cli: &Cli,
    transport: Transport,
    sessions: usize,
) -> anyhow::Result<Handshakes> {
    let es = start_edgestream(cli, 1000).await?;
    let url = stream_url(&es, transport);
    let n = procs(cli, sessions);
    let server0 = es.proc.cpu_seconds();
    let own0 = own_cpu_seconds();
    let dropped0 = udp_receive_buffer_errors();
    let t0 = Instant::now();
    let load = Load::start(
        Spec {
            transport,
            url: &url,
            cert: &es.cert,
            clients: sessions,
            orgs: 100,
            procs: n,
            sample_every: 0,
            bare: false,
            // WebTransport: a storm, every handshake at once. WebSocket: 256 in flight per
            // worker; 2,500 at once per worker overflowed the kernel's accept queue
            // (net.core.somaxconn 4,096) and some clients saw their connection end.
            concurrency: match transport {
                Transport::Ws => 256,
                Transport::Wt => sessions,
            },
        },
        &cli.load_cpus,
    )
    .await?;
    // The workers' own connect time (their process start excluded); CPU over the whole window.
    let window = t0.elapsed().as_secs_f64();
    let seconds = load.connect_seconds;
    let cpu = Cpu {
        seconds: window,
        server_cores: (es.proc.cpu_seconds() - server0) / window,
        // The workers did nothing but start and connect.
        load_cores: load.cpu_seconds() / window,
        load_procs: n,
        publisher_cores: (own_cpu_seconds() - own0) / window,
    };
    let udp_dropped = udp_receive_buffer_errors()
        .zip(dropped0)
        .map(|(b, a)| b - a);
    load.finish().await?;
    Ok(Handshakes {
        sessions,
        seconds,
        per_sec: sessions as f64 / seconds,
        udp_dropped,
        cpu,
    })
}

#[derive(Debug, serde::Serialize)]
pub struct OrgsRun {
    orgs: usize,
    subscribers_per_org: usize,
    /// Orgs per publish request: 1 is `POST /v1/orgs/{org}/events`, more is `POST /v1/events`.
    orgs_per_request: usize,
    events_per_org: u64,
    delivered: u64,
    pub delivered_per_sec: f64,
    us: Percentiles,
    cpu: Cpu,
}

/// `subscribers` WebSocket sessions spread over `orgs` orgs; `events_per_org` events per org,
/// `orgs_per_request` orgs per publish request.
pub async fn orgs_run(
    cli: &Cli,
    orgs: usize,
    subscribers: usize,
    events_per_org: u64,
    orgs_per_request: usize,
) -> anyhow::Result<OrgsRun> {
    let es = start_edgestream(cli, events_per_org).await?;
    let url = stream_url(&es, Transport::Ws);
    let n = procs(cli, subscribers);
    let mut load = Load::start(
        Spec {
            transport: Transport::Ws,
            url: &url,
            cert: &es.cert,
            clients: subscribers,
            orgs,
            procs: n,
            sample_every: 10,
            bare: false,
            concurrency: 256,
        },
        &cli.load_cpus,
    )
    .await?;
    let cpu = CpuWindow::start(&es, &load);
    publish_to_org_range(&es, 0..orgs, events_per_org, orgs_per_request).await?;
    load.ask(&format!("until {events_per_org}"), "reached")
        .await?;
    let cpu = cpu.end(&es, &load, n);
    let done = load.finish().await?;
    Ok(OrgsRun {
        orgs,
        subscribers_per_org: subscribers / orgs,
        orgs_per_request,
        events_per_org,
        delivered: done.delivered,
        delivered_per_sec: done.delivered as f64 / done.seconds().max(1e-6),
        us: percentiles(&done.latencies_us),
        cpu,
    })
}

#[derive(Debug, serde::Serialize)]
pub struct OrgMemory {
    orgs: usize,
    rss_before: u64,
    rss_one_event: u64,
    bytes_per_org_one_event: f64,
    rss_emptied: u64,
    bytes_per_org_emptied: f64,
    log_orgs_emptied: u64,
    log_idle_orgs_emptied: u64,
    /// After `orgs` other orgs got one event each and were emptied too: whether the first
    /// round's memory was reused (the tombstone cap, 100,000, then holds the second round).
    rss_second_round_emptied: u64,
    bytes_per_org_second_round: f64,
}

/// One event published to each of `orgs` orgs (nobody subscribed): RSS per org while each
/// retains its event, after retention has emptied them (`--replay-window 2s`), and after as
/// many other orgs did the same.
pub async fn org_memory(cli: &Cli, orgs: usize) -> anyhow::Result<OrgMemory> {
    let extra = ["--replay-window", "2s"].map(String::from);
    let es = start_edgestream_with(cli, 1000, &extra).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_bytes(&es.proc);
    publish_to_orgs(&es, orgs, 1).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let one = rss_bytes(&es.proc);
    let m = until_emptied(&es).await?;
    let emptied = rss_bytes(&es.proc);
    publish_to_org_range(&es, orgs..2 * orgs, 1, 1).await?;
    until_emptied(&es).await?;
    let second = rss_bytes(&es.proc);
    let per_org = |rss: u64| (rss as f64 - before as f64) / orgs as f64;
    Ok(OrgMemory {
        orgs,
        rss_before: before,
        rss_one_event: one,
        bytes_per_org_one_event: per_org(one),
        rss_emptied: emptied,
        bytes_per_org_emptied: per_org(emptied),
        log_orgs_emptied: m["log_orgs"].as_u64().unwrap_or(0),
        log_idle_orgs_emptied: m["log_idle_orgs"].as_u64().unwrap_or(0),
        rss_second_round_emptied: second,
        bytes_per_org_second_round: per_org(second),
    })
}

/// Waits until retention has emptied every org and the sweep has retired them (2 s more);
/// returns `/v1/metrics`.
async fn until_emptied(es: &Edgestream) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let m = loop {
        let (_, m) = es.api.get("/v1/metrics", None).await?;
        if m["log_events"].as_u64() == Some(0) {
            break m;
        }
        if Instant::now() > deadline {
            bail!("retention never emptied the orgs: {}", m["log_events"]);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(m)
}

#[derive(Debug, serde::Serialize)]
pub struct IdleScale {
    sessions: usize,
    rss_before: u64,
    rss_open: u64,
    bytes_per_session: f64,
    /// After every session closed (and a heap check of the server's): what was not returned.
    rss_closed: u64,
    bytes_per_session_kept: f64,
    idle: Cpu,
    heartbeats_sent: u64,
    server_cpu_us_per_heartbeat: f64,
}

/// `sessions` idle sessions (100 per org) on one node: RSS per session, and the CPU of an idle
/// window, which is heartbeats (and WebSocket pings) only.
pub async fn idle_scale(
    cli: &Cli,
    transport: Transport,
    sessions: usize,
    idle_secs: u64,
) -> anyhow::Result<IdleScale> {
    // The node's defaults: at ~1,150 connects a second `--quic-retry auto` retries nearly every
    // WebTransport handshake (the run that found the Retry CID collisions, docs/PERFORMANCE.md).
    let es = start_edgestream(cli, 1000).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_bytes(&es.proc);
    let url = stream_url(&es, transport);
    let n = procs(cli, sessions);
    let load = Load::start(
        Spec {
            transport,
            url: &url,
            cert: &es.cert,
            clients: sessions,
            orgs: sessions.div_ceil(100),
            procs: n,
            sample_every: 0,
            bare: false,
            // Not a storm: 256 per worker at 100,000 left connects unanswered for 20 s.
            concurrency: 32,
        },
        &cli.load_cpus,
    )
    .await?;
    let key = transport.key();
    wait_sessions(&es.api, key, sessions, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = rss_bytes(&es.proc);
    let hb = |m: &Value| m["heartbeats_sent"][key].as_u64().unwrap_or(0);
    let (_, m0) = es.api.get("/v1/metrics", None).await?;
    let cpu = CpuWindow::start(&es, &load);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle = cpu.end(&es, &load, n);
    let (_, m1) = es.api.get("/v1/metrics", None).await?;
    let heartbeats = hb(&m1) - hb(&m0);
    load.finish().await?;
    // Every session gone, then one heap check of the server (src/heap.rs) and a margin.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, m) = es.api.get("/v1/metrics", None).await?;
        if m["sessions"][key].as_u64() == Some(0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(edgestream::heap::CHECK_EVERY + Duration::from_secs(2)).await;
    let rss_closed = rss_bytes(&es.proc);
    Ok(IdleScale {
        sessions,
        rss_before,
        rss_open,
        bytes_per_session: (rss_open as f64 - rss_before as f64) / sessions as f64,
        rss_closed,
        bytes_per_session_kept: (rss_closed as f64 - rss_before as f64) / sessions as f64,
        server_cpu_us_per_heartbeat: idle.server_cores * idle.seconds * 1e6
            / heartbeats.max(1) as f64,
        heartbeats_sent: heartbeats,
        idle,
    })
}

/// The fan-out figure with the subscribers in load workers: `events` published to one org
/// with `n` subscribers, as fast as the server takes them (batches of 100) or paced at `rate`
/// events/s (batches of 10).
pub async fn fanout_with_load(
    cli: &Cli,
    transport: Transport,
    n: usize,
    events: u64,
    rate: Option<f64>,
) -> anyhow::Result<Fanout> {
    let (es, mut load, procs) = one_org(cli, transport, n, events, 10).await?;
    let cpu = CpuWindow::start(&es, &load);
    let t = tok(&["o0"]);
    let per = if rate.is_some() { 10 } else { 100 };
    let step = rate.map(|r| Duration::from_secs_f64(per as f64 / r));
    let start = tokio::time::Instant::now();
    let mut published = 0;
    while published < events {
        if let Some(step) = step {
            tokio::time::sleep_until(start + step * (published / per) as u32).await;
        }
        let batch = (events - published).min(per);
        let body: Vec<Value> = (0..batch).map(|_| timed_payload()).collect();
        es.api.publish(&t, "o0", &Value::Array(body)).await?;
        published += batch;
    }
    load.ask(&format!("until {events}"), "reached").await?;
    let cpu = cpu.end(&es, &load, procs);
    let done = load.finish().await?;
    Ok(fanout_figure(n, events, &done, &cpu, true))
}

/// The same fan-out through a bare-library baseline process, subscribers in load workers.
pub async fn baseline_with_load(
    cli: &Cli,
    transport: Transport,
    n: usize,
    events: u64,
) -> anyhow::Result<Fanout> {
    let (mut bare, done) = bare_run(cli, transport, n, events, None).await?;
    let _ = bare.proc.child.start_kill();
    Ok(fanout_figure(n, events, &done, &bare.cpu, false))
}

/// A bare-library baseline process that ran `events` to `n` subscribers in load workers
/// (every subscriber timed when `rate` paces the events), and the CPU of both sides from the
/// first connect to the last event.
struct BareRun {
    proc: Proc,
    cpu: Cpu,
}

async fn bare_run(
    cli: &Cli,
    transport: Transport,
    n: usize,
    events: u64,
    rate: Option<f64>,
) -> anyhow::Result<(BareRun, load::Done)> {
    let Baseline {
        proc: p,
        port,
        cert,
    } = spawn_baseline(cli, transport, n, events, rate).await?;
    let url = match transport {
        Transport::Ws => format!("ws://127.0.0.1:{port}/"),
        Transport::Wt => format!("https://127.0.0.1:{port}/"),
    };
    let procs = procs(cli, n);
    // All at once: the broadcast starts as the last client is accepted, so the window opens
    // before the connects; paced, it opens once every client is connected.
    let (mut server0, mut t0) = (p.cpu_seconds(), Instant::now());
    let mut load = Load::start(
        Spec {
            transport,
            url: &url,
            cert: &cert,
            clients: n,
            orgs: 1,
            procs,
            sample_every: usize::from(rate.is_some()),
            concurrency: 64,
            bare: true,
        },
        &cli.load_cpus,
    )
    .await?;
    let load0 = if rate.is_some() {
        (server0, t0) = (p.cpu_seconds(), Instant::now());
        load.cpu_seconds()
    } else {
        0.0
    };
    load.ask(&format!("until {events}"), "reached").await?;
    let window = t0.elapsed().as_secs_f64();
    let cpu = Cpu {
        seconds: window,
        server_cores: (p.cpu_seconds() - server0) / window,
        load_cores: (load.cpu_seconds() - load0) / window,
        load_procs: procs,
        publisher_cores: 0.0,
    };
    // The workers stop reading before the baseline goes away (a reset is an error to them).
    let done = load.finish().await?;
    Ok((BareRun { proc: p, cpu }, done))
}

fn fanout_figure(n: usize, events: u64, done: &load::Done, cpu: &Cpu, latency: bool) -> Fanout {
    let secs = done.seconds().max(1e-6);
    let server_cpu = cpu.server_cores * cpu.seconds;
    let lat = &done.latencies_us;
    Fanout {
        subscribers: n,
        events,
        delivered: done.delivered,
        seconds: secs,
        delivered_per_sec: done.delivered as f64 / secs,
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_delivered: server_cpu * 1e6 / done.delivered.max(1) as f64,
        load_cores: Some(cpu.load_cores),
        latency_us: latency.then(|| percentiles(lat)),
        latency_cdf_us: if latency { cdf(lat) } else { Vec::new() },
    }
}
