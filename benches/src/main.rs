//! `edgestream-bench`: measures edgestream against bare-library baselines in one invocation,
//! on one machine, and checks order and gap-freedom on every subscriber while it does.
//!
//! Each server (edgestream, the WebSocket baseline, the WebTransport baseline) runs as its own
//! process, so its CPU time is read from /proc alone; the load (subscribers and publishers)
//! runs in this process. Ratios against the baselines are what count: these machines are
//! shared and noisy, absolute numbers are context.

mod baseline;
mod load;
mod presence;
mod redis;
mod report;
mod scale;
mod storage;

use redis::{many_orgs, redis_ingest, redis_latency};
use report::{latency_svg, markdown};

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use edgestream_codec::Frame;
use edgestream_testkit::{http::Api, token, ws::Msg, ws::WsClient, wt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SECRET: &str = "bench-secret-0123456789abcdefgh";

#[derive(Parser)]
#[command(about = "edgestream load tool: figures against bare-library baselines")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// A short run (under a minute) for CI: small counts, same code paths.
    #[arg(long)]
    quick: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write a Markdown summary here.
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// Write the latency CDF per transport as SVG here.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    /// The edgestream binary [default: next to this one].
    #[arg(long)]
    server_bin: Option<std::path::PathBuf>,
    /// Users of the presence storm on WebSocket [default: 10000, quick: 500]; WebTransport
    /// runs a tenth (at least 100).
    #[arg(long)]
    storm_users: Option<usize>,
    /// Subscribers per fan-out run [default: 1000, quick: 50].
    #[arg(long)]
    subscribers: Option<usize>,
    /// Events per fan-out run [default: 5000, quick: 1000].
    #[arg(long)]
    events: Option<u64>,
    /// Pin servers to this CPU list (taskset -c), e.g. 0.
    #[arg(long)]
    server_cpus: Option<String>,
    /// Pin this process (the load: subscribers and publishers) to this CPU list, e.g. 1.
    #[arg(long)]
    load_cpus: Option<String>,
    /// Run each fan-out pair (edgestream, baseline) this many times and report the median
    /// ratio [default: 3, quick: 1].
    #[arg(long)]
    repeat: Option<usize>,
    /// Load worker processes (each on its own 127.0.0.x; at least one per 20,000 clients) for
    /// the fan-out and the figures at scale; 0 runs the fan-out's subscribers in this process
    /// (as before issue 19) [default: 4].
    #[arg(long, default_value_t = 4)]
    load_procs: usize,
    /// Only these figures (comma-separated): ws_fanout, wt_fanout, replay, ingest,
    /// redis_ingest, redis_latency and redis_orgs (need redis-server; only when named), wire_bytes,
    /// idle_memory, presence_storm, fixed_latency, handshakes, reconnect_storm (its Redis run
    /// only when named), many_orgs, org_memory, idle_scale [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

impl Cli {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the bare tokio-tungstenite broadcaster (used by the bench itself).
    BaselineWs {
        subscribers: usize,
        events: u64,
        payload_bytes: usize,
        /// Events per second on a fixed schedule, each stamped (0: every event at once).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// Measures the durable log's storage choice: redb against edgestream's segment files,
    /// appends per second with a sync per acknowledgement (see ARCHITECTURE.md).
    StorageChoice {
        #[arg(default_value_t = 20_000)]
        records: u64,
    },
    /// A load worker (used by the bench itself; see load.rs).
    #[command(hide = true)]
    Load { job: String },
    /// Runs the bare web-transport-quinn broadcaster (used by the bench itself).
    BaselineWt {
        subscribers: usize,
        events: u64,
        payload_bytes: usize,
        /// Events per second on a fixed schedule, each stamped (0: every event at once).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
}

const PAYLOAD_BYTES: usize = 128;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_open_files();
    // Library warnings (e.g. a WebTransport client's session teardown) go to stderr;
    // EDGESTREAM_BENCH_LOG takes a tracing filter.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGESTREAM_BENCH_LOG").unwrap_or_else(
                |_| {
                    // web-transport-quinn warns on every normal session close.
                    tracing_subscriber::EnvFilter::new("warn,web_transport_quinn=error")
                },
            ),
        )
        .with_writer(std::io::stderr)
        .init();
    if let (None, Some(cpus)) = (&cli.cmd, &cli.load_cpus) {
        // Before the runtime starts its threads: they inherit the main thread's affinity.
        let ok = std::process::Command::new("taskset")
            .args(["-p", "-c", cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            bail!("taskset -c {cpus} failed for the load process");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Some(Cmd::BaselineWs {
                subscribers,
                events,
                payload_bytes,
                rate,
            }) => baseline::websocket(subscribers, events, payload_bytes, rate).await,
            Some(Cmd::BaselineWt {
                subscribers,
                events,
                payload_bytes,
                rate,
            }) => baseline::webtransport(subscribers, events, payload_bytes, rate).await,
            Some(Cmd::StorageChoice { records }) => storage::run(records).await,
            Some(Cmd::Load { job }) => load::worker(job).await,
            None => run(cli).await,
        }
    })
}

/// Polls the server's metrics until it counts `n` open sessions of `key` (a transport).
async fn wait_sessions(api: &Api, key: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let (_, m) = api.get("/v1/metrics", None).await?;
        if m["sessions"][key].as_u64() == Some(n as u64) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{key}: {} of {n} sessions open", m["sessions"][key]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The figures at scale (scale.rs), with the load in worker processes.
async fn scale_figures(
    cli: &Cli,
    report: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    let q = cli.quick;
    let both = [
        ("websocket", Transport::Ws),
        ("webtransport", Transport::Wt),
    ];
    if cli.wants("fixed_latency") {
        let (subs, events) = if q { (100, 200) } else { (1000, 2000) };
        let mut out = serde_json::Map::new();
        for (name, t) in both {
            eprintln!("fixed_latency: {name}, 100 events/s to {subs} subscribers ...");
            let f = scale::fixed_latency(cli, t, subs, 100.0, events)
                .await
                .with_context(|| format!("fixed_latency {name}"))?;
            out.insert(name.into(), serde_json::to_value(f)?);
        }
        report.insert("fixed_latency".into(), Value::Object(out));
    }
    if cli.wants("handshakes") {
        let mut out = serde_json::Map::new();
        for (name, t) in both {
            let n = match (t, q) {
                (Transport::Ws, false) => 10_000,
                (Transport::Wt, false) => 2_000,
                (Transport::Ws, true) => 500,
                (Transport::Wt, true) => 200,
            };
            eprintln!("handshakes: {name}, {n} sessions at once ...");
            let h = scale::handshakes(cli, t, n)
                .await
                .with_context(|| format!("handshakes {name}"))?;
            out.insert(name.into(), serde_json::to_value(h)?);
        }
        report.insert("handshakes".into(), Value::Object(out));
    }
    if cli.wants("reconnect_storm") {
        let sessions = if q { 1_000 } else { 10_000 };
        let mut out = serde_json::Map::new();
        // Redis only when named: it needs redis-server on the machine.
        let redis = !cli.only.is_empty();
        for (name, on_redis) in [("memory", false), ("redis", true)] {
            if on_redis && !redis {
                continue;
            }
            eprintln!("reconnect_storm: {sessions} sessions, 100 orgs, {name} log ...");
            let s = scale::reconnect_storm(cli, sessions, 100, on_redis)
                .await
                .with_context(|| format!("reconnect_storm {name}"))?;
            out.insert(name.into(), serde_json::to_value(s)?);
        }
        report.insert("reconnect_storm".into(), Value::Object(out));
    }
    if cli.wants("many_orgs") {
        let n = if q { 500 } else { 10_000 };
        let mut runs = Vec::new();
        // The last run publishes 100 orgs per request (`POST /v1/events`).
        for (orgs, per_org, per_request) in [(1, n, 1), (n / 10, 10, 1), (n, 1, 1), (n, 1, 100)] {
            eprintln!(
                "many_orgs: {orgs} orgs x {per_org} subscribers, {per_request} orgs a request ..."
            );
            runs.push(
                scale::orgs_run(cli, orgs, orgs * per_org, 20, per_request)
                    .await
                    .with_context(|| format!("many_orgs {orgs}x{per_org}"))?,
            );
        }
        let rate = |r: &scale::OrgsRun| r.delivered_per_sec;
        let ratio = |i: usize| rate(&runs[i]) / rate(&runs[0]).max(f64::MIN_POSITIVE);
        let (one_request_per_org, many_orgs_per_request) = (ratio(2), ratio(3));
        report.insert(
            "many_orgs".into(),
            json!({
                "runs": runs,
                "ratio_many_to_one": one_request_per_org,
                "ratio_many_to_one_multi_org_requests": many_orgs_per_request,
            }),
        );
    }
    if cli.wants("org_memory") {
        let orgs = if q { 2_000 } else { 100_000 };
        eprintln!("org_memory: {orgs} orgs with one event, then emptied ...");
        let m = scale::org_memory(cli, orgs).await.context("org_memory")?;
        report.insert("org_memory".into(), serde_json::to_value(m)?);
    }
    if cli.wants("idle_scale") {
        let mut out = serde_json::Map::new();
        for (name, t) in both {
            let n = match (t, q) {
                (Transport::Ws, false) => 100_000,
                (Transport::Wt, false) => 20_000,
                (Transport::Ws, true) => 2_000,
                (Transport::Wt, true) => 500,
            };
            // A WebSocket session holds a descriptor on the server; where the hard limit is
            // fixed below the count (a container's), measure as many as it allows.
            let cap = open_files_limit().saturating_sub(1_000) as usize;
            let n = if t == Transport::Ws && n > cap {
                eprintln!(
                    "idle_scale: the open-file limit allows {cap} WebSocket sessions, not {n}"
                );
                cap
            } else {
                n
            };
            eprintln!("idle_scale: {name}, {n} idle sessions ...");
            let s = scale::idle_scale(cli, t, n, if q { 3 } else { 15 })
                .await
                .with_context(|| format!("idle_scale {name}"))?;
            out.insert(name.into(), serde_json::to_value(s)?);
        }
        report.insert("idle_scale".into(), Value::Object(out));
    }
    Ok(())
}

/// The hard open-file limit (what a spawned server can raise its own to).
fn open_files_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(_, hard)| hard)
}

/// Raises the open-file limit as far as the system allows (the hard limit too, when running as
/// root), before any process is spawned: servers and load workers inherit it. 100,000 sessions
/// need as many descriptors on each side.
fn raise_open_files() {
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    if rlimit::setrlimit(rlimit::Resource::NOFILE, most, most).is_err() {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    }
}

/// A server process with its CPU time readable from /proc.
struct Proc {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Proc {
    fn spawn(
        cpus: &Option<String>,
        program: &std::path::Path,
        args: &[String],
    ) -> anyhow::Result<Proc> {
        let mut cmd = match cpus {
            Some(c) => {
                let mut t = Command::new("taskset");
                t.args(["-c", c]).arg(program);
                t
            }
            None => Command::new(program),
        };
        let mut child = cmd
            .args(args)
            .env("EDGESTREAM_JWT_SECRET", SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Proc { child, lines })
    }

    /// CPU seconds (user + system) the process has used.
    fn cpu_seconds(&self) -> f64 {
        self.child.id().map_or(0.0, pid_cpu_seconds)
    }

    async fn ready_line(&mut self) -> anyhow::Result<Vec<String>> {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .context("baseline did not start")??
            .context("baseline exited")?;
        Ok(line.split_whitespace().map(String::from).collect())
    }
}

/// CPU seconds (user + system) process `pid` has used.
fn pid_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The edgestream server under test.
struct Edgestream {
    proc: Proc,
    api: Api,
    http: u16,
    wt_url: String,
    cert: String,
}

async fn start_edgestream(cli: &Cli, events: u64) -> anyhow::Result<Edgestream> {
    start_edgestream_with(cli, events, &[]).await
}

/// The server with extra flags (e.g. a data directory).
async fn start_edgestream_with(
    cli: &Cli,
    events: u64,
    extra: &[String],
) -> anyhow::Result<Edgestream> {
    let bin = match &cli.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("edgestream"),
    };
    let http = free_port();
    let args: Vec<String> = [
        "serve",
        "--http-listen",
        &format!("127.0.0.1:{http}"),
        "--quic-listen",
        "127.0.0.1:0",
        "--session-queue",
        "65536",
        "--replay-max-events",
        &(events.max(100_000) * 2).to_string(),
        "--replay-max-bytes",
        "1073741824",
        "--max-request-bytes",
        "16777216",
        "--max-sessions",
        "1000000",
        "--max-connections",
        "1000000",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(extra.iter().cloned())
    .collect();
    let proc = Proc::spawn(&cli.server_cpus, &bin, &args)?;
    let api = Api::new(format!("http://127.0.0.1:{http}"));
    let start = Instant::now();
    while api.get("/healthz", None).await.is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("edgestream did not start ({})", bin.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, info) = api.get("/v1/info", None).await?;
    let (_, hash) = api.get("/v1/cert-hash", None).await?;
    Ok(Edgestream {
        proc,
        api,
        http,
        wt_url: info["webtransport"].as_str().context("wt url")?.to_string(),
        cert: hash["value"].as_str().context("hash")?.to_string(),
    })
}

fn tok(orgs: &[&str]) -> String {
    token::hs256(
        SECRET.as_bytes(),
        &token::claims("bench", orgs, "subscribe publish"),
    )
}

/// What the subscribers saw in one fan-out run.
#[derive(Default)]
struct Seen {
    first_rx: AtomicU64,
    last_rx: AtomicU64,
    delivered: AtomicU64,
    errors: Errors,
    latencies_us: std::sync::Mutex<Vec<u64>>,
}

/// Order and delivery errors seen by subscribers; any one fails the run.
#[derive(Default)]
struct Errors(std::sync::Mutex<Vec<String>>);

impl Errors {
    fn push(&self, e: String) {
        self.0.lock().expect("not poisoned").push(e);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("not poisoned"))
    }
}

/// Micros since the bench started (one monotonic clock for publish and receive times).
fn now_us(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// The send time a bench payload carries: `t` (micros since the bench's epoch, in-process
/// subscribers) or `u` (unix micros, load workers). Read into this struct, not into a
/// `serde_json::Value`: a map and a string built per sampled event were most of what a
/// sampling subscriber did, so the load worked harder for edgestream (sampled) than for the
/// baselines (not sampled).
#[derive(Default, serde::Deserialize)]
struct Stamp {
    t: Option<u64>,
    u: Option<u64>,
}

impl Stamp {
    fn of(payload: &[u8]) -> Stamp {
        serde_json::from_slice(payload).unwrap_or_default()
    }
}

/// Checks one subscriber's event: in order, no gap; records times.
fn on_event(
    seen: &Seen,
    epoch: Instant,
    expected: &mut u64,
    seq: u64,
    payload: &[u8],
    sample: bool,
) {
    let t = now_us(epoch);
    if seq != *expected {
        seen.errors
            .push(format!("expected seq {expected}, got {seq}"));
    }
    *expected = seq + 1;
    seen.first_rx.fetch_min(t, Ordering::Relaxed);
    seen.last_rx.fetch_max(t, Ordering::Relaxed);
    seen.delivered.fetch_add(1, Ordering::Relaxed);
    if sample {
        if let Some(sent) = Stamp::of(payload).t {
            if sent > 0 {
                seen.latencies_us
                    .lock()
                    .expect("not poisoned")
                    .push(t.saturating_sub(sent));
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Ws,
    Wt,
}

impl Transport {
    /// The name in the server's metrics.
    fn key(self) -> &'static str {
        match self {
            Transport::Ws => "websocket",
            Transport::Wt => "webtransport",
        }
    }

    /// The subcommand of its bare-library baseline.
    fn baseline(self) -> &'static str {
        match self {
            Transport::Ws => "baseline-ws",
            Transport::Wt => "baseline-wt",
        }
    }
}

/// Where and how the subscribers of one run connect.
struct Target<'a> {
    transport: Transport,
    n: usize,
    ws_url: &'a str,
    wt_url: &'a str,
    cert: &'a str,
    events: u64,
}

/// Connects `n` subscribers and spawns their readers (each checks order and counts events).
async fn subscribers(
    target: Target<'_>,
    seen: Arc<Seen>,
    epoch: Instant,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let Target {
        transport,
        n,
        ws_url,
        wt_url,
        cert,
        events,
    } = target;
    let mut handles = Vec::new();
    let connectors: Vec<wt::Connector> = match transport {
        Transport::Wt => (0..8)
            .map(|_| wt::Connector::new(cert))
            .collect::<Result<_, _>>()?,
        Transport::Ws => Vec::new(),
    };
    for i in 0..n {
        let seen = seen.clone();
        let sample = i < 10;
        match transport {
            Transport::Ws => {
                let mut c = WsClient::connect(ws_url).await?;
                handles.push(tokio::spawn(async move {
                    let mut expected = 1;
                    let mut got = 0;
                    while got < events {
                        match c.next().await {
                            Ok(Msg::Frame(Frame::Event { seq, payload, .. })) => {
                                on_event(&seen, epoch, &mut expected, seq, &payload, sample);
                                got += 1;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                seen.errors.push(format!("ws subscriber: {e}"));
                                return;
                            }
                        }
                    }
                }));
                if i % 100 == 99 {
                    tokio::task::yield_now().await;
                }
            }
            Transport::Wt => {
                let mut c = connectors[i % connectors.len()].connect(wt_url).await?;
                handles.push(tokio::spawn(async move {
                    let mut expected = 1;
                    let mut got = 0;
                    while got < events {
                        match c.next_frame().await {
                            Ok(Frame::Event { seq, payload, .. }) => {
                                on_event(&seen, epoch, &mut expected, seq, &payload, sample);
                                got += 1;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                seen.errors.push(format!("wt subscriber: {e}"));
                                return;
                            }
                        }
                    }
                    c.close(0);
                }));
            }
        }
    }
    Ok(handles)
}

/// The figures of one fan-out run (edgestream or a baseline).
#[derive(Debug, Clone, serde::Serialize)]
struct Fanout {
    subscribers: usize,
    events: u64,
    delivered: u64,
    seconds: f64,
    delivered_per_sec: f64,
    server_cpu_seconds: f64,
    server_cpu_us_per_delivered: f64,
    /// CPU the load workers used, in cores over the run (`--load-procs` above 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    load_cores: Option<f64>,
    /// Publish-to-receive latency (edgestream runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_us: Option<Percentiles>,
    /// The latency CDF, one value per percent (edgestream runs only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    latency_cdf_us: Vec<u64>,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    samples: usize,
    p50: u64,
    p99: u64,
    p999: u64,
}

/// A fan-out figure: the median run of edgestream and its baseline, every ratio, and the
/// latency at half the peak rate.
#[derive(Debug, serde::Serialize)]
struct FanoutFigure {
    edgestream: Fanout,
    baseline: Fanout,
    ratio: f64,
    ratios: Vec<f64>,
    latency_at_half_peak: LatencyAt,
}

#[derive(Debug, serde::Serialize)]
struct LatencyAt {
    events_per_sec: f64,
    subscribers: usize,
    us: Option<Percentiles>,
    cdf_us: Vec<u64>,
}

/// A catch-up figure: `events` replayed to one client in `seconds`.
#[derive(Debug, serde::Serialize)]
struct Replay {
    events: u64,
    seconds: f64,
    events_per_sec: f64,
}

/// An ingest figure: `events` published in requests of `batch` by 4 publishers.
#[derive(Debug, serde::Serialize)]
pub struct Ingest {
    batch: u64,
    events: u64,
    seconds: f64,
    events_per_sec: f64,
}

/// RSS at two session counts, and the growth per session between them.
#[derive(Debug, Clone, serde::Serialize)]
struct IdleRss {
    low: usize,
    high: usize,
    rss_low: u64,
    rss_high: u64,
    bytes_per_session: f64,
}

/// Idle memory per session, edgestream against the bare-library baseline.
#[derive(Debug, serde::Serialize)]
struct IdleMemory {
    low: usize,
    high: usize,
    rss_low: u64,
    rss_high: u64,
    bytes_per_session: f64,
    baseline_bytes_per_session: f64,
    ratio: f64,
}

fn payload(epoch: Instant) -> Value {
    json!({"t": now_us(epoch), "p": "x".repeat(PAYLOAD_BYTES - 30)})
}

/// One fan-out figure for edgestream: publish `events` to `n` subscribers, as fast as the
/// server takes them, or paced at `rate` events/s (for latency).
async fn fanout_edgestream(
    cli: &Cli,
    transport: Transport,
    n: usize,
    events: u64,
    rate: Option<f64>,
) -> anyhow::Result<Fanout> {
    if cli.load_procs > 0 {
        return scale::fanout_with_load(cli, transport, n, events, rate).await;
    }
    let mut es = start_edgestream(cli, events).await?;
    let epoch = Instant::now();
    let seen = Arc::new(Seen {
        first_rx: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let t = tok(&["bench"]);
    let ws_url = format!("ws://127.0.0.1:{}/v1/stream?access_token={t}", es.http);
    let wt_url = format!("{}?access_token={t}", es.wt_url);
    let target = Target {
        transport,
        n,
        ws_url: &ws_url,
        wt_url: &wt_url,
        cert: &es.cert,
        events,
    };
    let handles = subscribers(target, seen.clone(), epoch).await?;
    // Every subscriber is connected; wait until the server counts them all.
    wait_sessions(&es.api, transport.key(), n, Duration::from_secs(60)).await?;
    let cpu0 = es.proc.cpu_seconds();
    let start = now_us(epoch);
    let mut published = 0;
    // Paced: batches of 10 on a fixed schedule, so queues stay short and the latency is the
    // server's, not a backlog's.
    let step = rate.map(|r| Duration::from_secs_f64(10.0 / r));
    let paced_start = Instant::now();
    while published < events {
        if let Some(step) = step {
            let due = paced_start + step * (published / 10) as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        let batch = (events - published).min(if step.is_some() { 10 } else { 100 });
        let body: Vec<Value> = (0..batch).map(|_| payload(epoch)).collect();
        es.api.publish(&t, "bench", &Value::Array(body)).await?;
        published += batch;
    }
    if let Err(e) = wait_all(handles, &seen, n as u64 * events).await {
        let (_, m) = es.api.get("/v1/metrics", None).await.unwrap_or_default();
        bail!("{e:#}; server closes by code: {}", m["sessions_closed"]);
    }
    let cpu = es.proc.cpu_seconds() - cpu0;
    let _ = es.proc.child.start_kill();
    let _ = start;
    // The delivery window, from the first event received to the last: measured the same way
    // as the baselines.
    let secs =
        (seen.last_rx.load(Ordering::Relaxed) - seen.first_rx.load(Ordering::Relaxed)) as f64 / 1e6;
    let delivered = seen.delivered.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *seen.latencies_us.lock().expect("not poisoned"));
    lat.sort_unstable();
    Ok(Fanout {
        subscribers: n,
        events,
        delivered,
        seconds: secs,
        delivered_per_sec: delivered as f64 / secs,
        server_cpu_seconds: cpu,
        server_cpu_us_per_delivered: cpu * 1e6 / delivered as f64,
        load_cores: None,
        latency_us: Some(percentiles(&lat)),
        latency_cdf_us: cdf(&lat),
    })
}

/// One value per percent of `sorted` (0th to 100th percentile).
fn cdf(sorted: &[u64]) -> Vec<u64> {
    (0..=100)
        .map(|i| {
            sorted
                .get(((sorted.len().max(1) - 1) * i) / 100)
                .copied()
                .unwrap_or(0)
        })
        .collect()
}

/// A baseline server process of `transport` with `subscribers` and `events`, started and
/// ready: its process, port and certificate hash (WebTransport).
struct Baseline {
    proc: Proc,
    port: String,
    cert: String,
}

/// `rate`: events/s on a fixed schedule, stamped (none: every event at once).
async fn spawn_baseline(
    cli: &Cli,
    transport: Transport,
    subscribers: usize,
    events: u64,
    rate: Option<f64>,
) -> anyhow::Result<Baseline> {
    let args = vec![
        transport.baseline().to_string(),
        subscribers.to_string(),
        events.to_string(),
        PAYLOAD_BYTES.to_string(),
        format!("--rate={}", rate.unwrap_or(0.0)),
    ];
    let mut proc = Proc::spawn(&cli.server_cpus, &std::env::current_exe()?, &args)?;
    let ready = proc.ready_line().await?;
    Ok(Baseline {
        port: ready.get(1).context("port")?.clone(),
        cert: ready.get(2).cloned().unwrap_or_default(),
        proc,
    })
}

/// The same fan-out through a bare-library baseline process.
async fn fanout_baseline(
    cli: &Cli,
    transport: Transport,
    n: usize,
    events: u64,
) -> anyhow::Result<Fanout> {
    if cli.load_procs > 0 {
        return scale::baseline_with_load(cli, transport, n, events).await;
    }
    let Baseline {
        proc: mut p,
        port,
        cert,
    } = spawn_baseline(cli, transport, n, events, None).await?;
    let epoch = Instant::now();
    let seen = Arc::new(Seen {
        first_rx: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let url_ws = format!("ws://127.0.0.1:{port}/");
    let url_wt = format!("https://127.0.0.1:{port}/");
    let cpu0 = p.cpu_seconds();
    let target = Target {
        transport,
        n,
        ws_url: &url_ws,
        wt_url: &url_wt,
        cert: &cert,
        events,
    };
    let handles = subscribers(target, seen.clone(), epoch).await?;
    wait_all(handles, &seen, n as u64 * events).await?;
    let cpu = p.cpu_seconds() - cpu0;
    let _ = p.child.start_kill();
    let secs =
        (seen.last_rx.load(Ordering::Relaxed) - seen.first_rx.load(Ordering::Relaxed)) as f64 / 1e6;
    let delivered = seen.delivered.load(Ordering::Relaxed);
    Ok(Fanout {
        subscribers: n,
        events,
        delivered,
        seconds: secs,
        delivered_per_sec: delivered as f64 / secs,
        server_cpu_seconds: cpu,
        server_cpu_us_per_delivered: cpu * 1e6 / delivered as f64,
        load_cores: None,
        latency_us: None,
        latency_cdf_us: Vec::new(),
    })
}

async fn wait_all(
    handles: Vec<tokio::task::JoinHandle<()>>,
    seen: &Seen,
    want: u64,
) -> anyhow::Result<()> {
    for h in handles {
        tokio::time::timeout(Duration::from_secs(300), h)
            .await
            .context("subscriber hung")??;
    }
    let errors = seen.errors.take();
    if !errors.is_empty() {
        bail!(
            "order or delivery broken: {} errors, first: {}",
            errors.len(),
            errors[0]
        );
    }
    let got = seen.delivered.load(Ordering::Relaxed);
    if got != want {
        bail!("delivered {got} of {want}");
    }
    Ok(())
}

fn percentiles(sorted: &[u64]) -> Percentiles {
    let p = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    Percentiles {
        samples: sorted.len(),
        p50: p(0.5),
        p99: p(0.99),
        p999: p(0.999),
    }
}

/// Catch-up rate of one client reconnecting `behind` events behind.
async fn replay(cli: &Cli, behind: u64) -> anyhow::Result<Replay> {
    let es = start_edgestream(cli, behind).await?;
    let t = tok(&["replay"]);
    let mut epoch_name = String::new();
    let mut left = behind;
    while left > 0 {
        let batch = left.min(1000);
        let body: Vec<Value> = (0..batch)
            .map(|i| json!({"i": i, "p": "x".repeat(90)}))
            .collect();
        let r = es.api.publish(&t, "replay", &Value::Array(body)).await?;
        epoch_name = r["epoch"].as_str().unwrap_or_default().to_string();
        left -= batch;
    }
    let url = format!(
        "ws://127.0.0.1:{}/v1/stream?access_token={t}&since=replay:{epoch_name}:0",
        es.http
    );
    let start = Instant::now();
    let mut c = WsClient::connect(&url).await?;
    let mut expected = 1;
    while expected <= behind {
        match c.next().await? {
            Msg::Frame(Frame::Event { seq, .. }) => {
                if seq != expected {
                    bail!("replay out of order: expected {expected}, got {seq}");
                }
                expected += 1;
            }
            Msg::Frame(Frame::Subscribed { resume, .. })
                if resume != edgestream_codec::Resume::Recovered =>
            {
                bail!("replay did not recover: {resume:?}");
            }
            _ => {}
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Replay {
        events: behind,
        seconds: secs,
        events_per_sec: behind as f64 / secs,
    })
}

/// Publish rate over HTTP with `batch` events per request, from 4 concurrent publishers.
async fn ingest(cli: &Cli, events: u64, batch: u64, fsync: Option<&str>) -> anyhow::Result<Ingest> {
    // The durable log in a fresh directory, removed after the run.
    let dir = std::env::temp_dir().join(format!("edgestream-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let extra: Vec<String> = match fsync {
        Some(p) => vec![
            "--data-dir".into(),
            dir.display().to_string(),
            "--fsync".into(),
            p.into(),
        ],
        None => Vec::new(),
    };
    let result = ingest_into(cli, events, batch, &extra).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn ingest_into(
    cli: &Cli,
    events: u64,
    batch: u64,
    extra: &[String],
) -> anyhow::Result<Ingest> {
    let es = start_edgestream_with(cli, events, extra).await?;
    let t = tok(&["ingest"]);
    let start = Instant::now();
    let per = events / 4;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (api, t) = (es.api.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per {
                let n = batch.min(per - sent);
                let body: Vec<Value> = (0..n)
                    .map(|i| json!({"i": i, "p": "x".repeat(100)}))
                    .collect();
                api.publish(&t, "ingest", &Value::Array(body)).await?;
                sent += n;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let (_, h) = es
        .api
        .get("/v1/orgs/ingest/events?limit=1", Some(&t))
        .await?;
    if h["head"].as_u64() != Some(per * 4) {
        bail!("ingest head {} != {}", h["head"], per * 4);
    }
    Ok(Ingest {
        batch,
        events: per * 4,
        seconds: secs,
        events_per_sec: (per * 4) as f64 / secs,
    })
}

/// Resident set size of a process, in bytes.
fn rss_bytes(proc: &Proc) -> u64 {
    let Some(pid) = proc.child.id() else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Server RSS growth per idle session between `low` and `high` open sessions, for edgestream
/// and for the bare-library baseline of the same transport (its floor).
async fn idle_memory(
    cli: &Cli,
    transport: Transport,
    low: usize,
    high: usize,
) -> anyhow::Result<IdleMemory> {
    let key = transport.key();
    let es = start_edgestream(cli, 1000).await?;
    let t = tok(&["idle"]);
    let target = IdleTarget {
        proc: &es.proc,
        ws_url: format!("ws://127.0.0.1:{}/v1/stream?access_token={t}", es.http),
        wt_url: format!("{}?access_token={t}", es.wt_url),
        cert: es.cert.clone(),
        api: Some(&es.api),
    };
    let ours = idle_rss(&target, transport, key, low, high).await?;
    // The baseline accepts `high` sessions, sends nothing (0 events) and keeps them open.
    let b = spawn_baseline(cli, transport, high, 0, None).await?;
    let target = IdleTarget {
        proc: &b.proc,
        ws_url: format!("ws://127.0.0.1:{}/", b.port),
        wt_url: format!("https://127.0.0.1:{}/", b.port),
        cert: b.cert.clone(),
        api: None,
    };
    let base = idle_rss(&target, transport, key, low, high).await?;
    Ok(IdleMemory {
        low,
        high,
        rss_low: ours.rss_low,
        rss_high: ours.rss_high,
        bytes_per_session: ours.bytes_per_session,
        baseline_bytes_per_session: base.bytes_per_session,
        ratio: ours.bytes_per_session / base.bytes_per_session.max(1.0),
    })
}

/// A server whose RSS is read while idle sessions are opened.
struct IdleTarget<'a> {
    proc: &'a Proc,
    ws_url: String,
    wt_url: String,
    cert: String,
    /// Where to read the open-session count (edgestream); `None`: trust the connects.
    api: Option<&'a Api>,
}

async fn idle_rss(
    target: &IdleTarget<'_>,
    transport: Transport,
    key: &str,
    low: usize,
    high: usize,
) -> anyhow::Result<IdleRss> {
    let connectors: Vec<wt::Connector> = match transport {
        Transport::Wt => (0..16)
            .map(|_| wt::Connector::new(&target.cert))
            .collect::<Result<_, _>>()?,
        Transport::Ws => Vec::new(),
    };
    let mut ws_clients = Vec::new();
    let mut wt_clients = Vec::new();
    let mut rss = Vec::new();
    for n in [low, high] {
        while ws_clients.len() + wt_clients.len() < n {
            match transport {
                Transport::Ws => ws_clients.push(WsClient::connect(&target.ws_url).await?),
                Transport::Wt => {
                    let i = wt_clients.len();
                    wt_clients.push(
                        connectors[i % connectors.len()]
                            .connect(&target.wt_url)
                            .await?,
                    );
                }
            }
        }
        if let Some(api) = target.api {
            wait_sessions(api, key, n, Duration::from_secs(120)).await?;
        }
        // Let allocations settle (handshake buffers freed) before reading RSS.
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(rss_bytes(target.proc));
    }
    Ok(IdleRss {
        low,
        high,
        rss_low: rss[0],
        rss_high: rss[1],
        bytes_per_session: (rss[1] as f64 - rss[0] as f64) / (high - low) as f64,
    })
}

/// Bytes on the WebSocket per delivered event (WebSocket frame headers included, TCP/IP
/// headers not), for each format and payload size.
async fn wire_bytes(cli: &Cli) -> anyhow::Result<Value> {
    let es = start_edgestream(cli, 1000).await?;
    let t = tok(&["wire"]);
    let small = json!({"t": 1, "p": "x".repeat(PAYLOAD_BYTES - 20)});
    // A realistic 4 KiB JSON object: repeated keys, varied values.
    let rows: Vec<Value> = (0..62).map(|i| json!({"id": i, "name": format!("item-{i}"), "price": i * 7 % 100, "tags": ["a", "b"], "ok": i % 2 == 0})).collect();
    let large = json!({"rows": rows});
    let mut out = serde_json::Map::new();
    for (label, body) in [("128B", &small), ("4KiB", &large)] {
        let size = serde_json::to_vec(body)?.len();
        let variants = [
            ("binary", "format=bin"),
            ("binary_brotli", "format=bin&enc=br"),
            ("json", "format=json"),
        ];
        let mut clients = Vec::new();
        for (_, q) in variants {
            let url = format!("ws://127.0.0.1:{}/v1/stream?access_token={t}&{q}", es.http);
            clients.push(tokio_tungstenite::connect_async(url).await?.0);
        }
        // Drain the SUBSCRIBED message of each.
        for c in clients.iter_mut() {
            use futures_util::StreamExt;
            c.next().await;
        }
        let n = 50u64;
        es.api
            .publish(&t, "wire", &Value::Array(vec![body.clone(); n as usize]))
            .await?;
        let mut per = serde_json::Map::new();
        for ((name, _), c) in variants.iter().zip(clients.iter_mut()) {
            use futures_util::StreamExt;
            let mut bytes = 0u64;
            let mut events = 0;
            while events < n {
                let m = tokio::time::timeout(Duration::from_secs(20), c.next())
                    .await?
                    .context("closed")??;
                let len = m.len() as u64;
                let is_event = match &m {
                    tokio_tungstenite::tungstenite::Message::Binary(b) => b.first() == Some(&2),
                    tokio_tungstenite::tungstenite::Message::Text(t) => {
                        t.as_str().starts_with("{\"t\":\"event\"")
                    }
                    _ => false,
                };
                if is_event {
                    bytes += len
                        + if len < 126 {
                            2
                        } else if len < 65536 {
                            4
                        } else {
                            10
                        };
                    events += 1;
                }
            }
            per.insert(name.to_string(), json!(bytes as f64 / n as f64));
        }
        let j = per["json"].as_f64().unwrap_or(1.0);
        per.insert("payload_bytes".into(), json!(size));
        per.insert(
            "binary_vs_json".into(),
            json!(per["binary"].as_f64().unwrap_or(0.0) / j),
        );
        per.insert(
            "binary_brotli_vs_json".into(),
            json!(per["binary_brotli"].as_f64().unwrap_or(0.0) / j),
        );
        out.insert(label.to_string(), Value::Object(per));
    }
    Ok(Value::Object(out))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let started = Instant::now();
    let n = cli.subscribers.unwrap_or(if cli.quick { 50 } else { 1000 });
    let events = cli.events.unwrap_or(if cli.quick { 1000 } else { 5_000 });
    let mut report = serde_json::Map::new();
    let repeat = cli.repeat.unwrap_or(if cli.quick { 1 } else { 3 }).max(1);
    for (name, transport) in [("ws_fanout", Transport::Ws), ("wt_fanout", Transport::Wt)] {
        if !cli.wants(name) {
            continue;
        }
        // Each repetition runs edgestream then its baseline, back to back, so both see the
        // same machine; the report keeps every run and the median ratio.
        let mut runs = Vec::new();
        for i in 0..repeat {
            eprintln!(
                "{name} [{}/{repeat}]: edgestream, {n} subscribers x {events} events ...",
                i + 1
            );
            let ours = fanout_edgestream(&cli, transport, n, events, None)
                .await
                .with_context(|| format!("{name} edgestream"))?;
            eprintln!("{name} [{}/{repeat}]: baseline ...", i + 1);
            let base = fanout_baseline(&cli, transport, n, events)
                .await
                .with_context(|| format!("{name} baseline"))?;
            let ratio = ours.delivered_per_sec / base.delivered_per_sec.max(f64::MIN_POSITIVE);
            eprintln!(
                "{name}: {:.0}/s vs baseline {:.0}/s: {ratio:.2}x",
                ours.delivered_per_sec, base.delivered_per_sec
            );
            runs.push((ratio, ours, base));
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let ratios: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let (ratio, ours, base) = runs.swap_remove(runs.len() / 2);
        // Latency at half the peak rate measured above, with the same fan-out.
        let peak = ours.delivered_per_sec / n as f64;
        let paced_events = if cli.quick { 200 } else { 3000 };
        eprintln!(
            "{name}: latency at {:.0} events/s (half the peak) ...",
            peak / 2.0
        );
        let paced = fanout_edgestream(&cli, transport, n, paced_events, Some(peak / 2.0))
            .await
            .with_context(|| format!("{name} paced"))?;
        let figure = FanoutFigure {
            edgestream: ours,
            baseline: base,
            ratio,
            ratios,
            latency_at_half_peak: LatencyAt {
                events_per_sec: peak / 2.0,
                subscribers: n,
                us: paced.latency_us,
                cdf_us: paced.latency_cdf_us,
            },
        };
        report.insert(name.into(), serde_json::to_value(figure)?);
    }
    let behind = if cli.quick { 10_000 } else { 100_000 };
    if cli.wants("replay") {
        eprintln!("replay: {behind} events behind ...");
        report.insert(
            "replay".into(),
            serde_json::to_value(replay(&cli, behind).await.context("replay")?)?,
        );
    }
    let ingest_events = if cli.quick { 2_000 } else { 200_000 };
    let mut ing = serde_json::Map::new();
    // In memory, then the durable log with each fsync policy.
    for fsync in [None, Some("always"), Some("batch"), Some("never")] {
        if !cli.wants("ingest") {
            break;
        }
        for batch in [1, 100] {
            let mut count = if batch == 1 {
                ingest_events / 10
            } else {
                ingest_events
            };
            if fsync == Some("always") {
                // One fdatasync per request: keep the run short.
                count = count.min(if batch == 1 { 4_000 } else { 40_000 });
            }
            let label = fsync.unwrap_or("memory");
            eprintln!("ingest: {label}, batches of {batch} ...");
            let key = match fsync {
                None => format!("batch_{batch}"),
                Some(p) => format!("fsync_{p}_batch_{batch}"),
            };
            ing.insert(
                key,
                serde_json::to_value(
                    ingest(&cli, count, batch, fsync)
                        .await
                        .with_context(|| format!("ingest {label}"))?,
                )?,
            );
        }
    }
    if !ing.is_empty() {
        report.insert("ingest".into(), Value::Object(ing));
    }
    if cli.wants("redis_ingest") && !cli.only.is_empty() {
        // Only when asked for: it needs redis-server and redis-cli on the machine.
        let mut ri = serde_json::Map::new();
        for min_replicas in [false, true] {
            for batch in [1, 100] {
                let count = if batch == 1 {
                    ingest_events / 10
                } else {
                    ingest_events
                };
                let key = format!(
                    "{}batch_{batch}",
                    if min_replicas { "min_replicas_1_" } else { "" }
                );
                eprintln!("redis_ingest: {key} ...");
                ri.insert(
                    key.clone(),
                    serde_json::to_value(
                        redis_ingest(&cli, count, batch, min_replicas)
                            .await
                            .with_context(|| format!("redis_ingest {key}"))?,
                    )?,
                );
            }
        }
        report.insert("redis_ingest".into(), Value::Object(ri));
    }
    if cli.wants("redis_latency") && !cli.only.is_empty() {
        eprintln!("redis_latency ...");
        let events = if cli.quick { 200 } else { 2_000 };
        report.insert(
            "redis_latency".into(),
            redis_latency(&cli, events, 200)
                .await
                .context("redis_latency")?,
        );
    }
    if cli.wants("redis_orgs") && !cli.only.is_empty() {
        let orgs = if cli.quick { 500 } else { 10_000 };
        let idle = if cli.quick { 3 } else { 20 };
        let mut ro = serde_json::Map::new();
        for (key, on_redis) in [("redis", true), ("embedded", false)] {
            eprintln!("redis_orgs: {orgs} orgs x 1 subscriber, {key} ...");
            ro.insert(
                key.into(),
                many_orgs(&cli, orgs, idle, on_redis)
                    .await
                    .with_context(|| format!("redis_orgs {key}"))?,
            );
        }
        report.insert("redis_orgs".into(), Value::Object(ro));
    }
    if cli.wants("wire_bytes") {
        eprintln!("wire_bytes ...");
        report.insert(
            "wire_bytes".into(),
            wire_bytes(&cli).await.context("wire_bytes")?,
        );
    }
    if cli.wants("presence_storm") {
        let ws_users = cli
            .storm_users
            .unwrap_or(if cli.quick { 500 } else { 10_000 });
        let mut ps = serde_json::Map::new();
        for (name, transport, users) in [
            ("websocket", Transport::Ws, ws_users),
            ("webtransport", Transport::Wt, (ws_users / 10).max(100)),
        ] {
            eprintln!("presence_storm: {name}, {users} users on one org ...");
            ps.insert(
                name.into(),
                serde_json::to_value(
                    presence::presence_storm(&cli, transport, users)
                        .await
                        .with_context(|| format!("presence_storm {name}"))?,
                )?,
            );
        }
        report.insert("presence_storm".into(), Value::Object(ps));
    }
    scale_figures(&cli, &mut report).await?;
    let (low, high) = if cli.quick {
        (100, 500)
    } else {
        (2_000, 10_000)
    };
    let mut idle = serde_json::Map::new();
    for (name, transport) in [
        ("websocket", Transport::Ws),
        ("webtransport", Transport::Wt),
    ] {
        if !cli.wants("idle_memory") {
            break;
        }
        eprintln!("idle_memory: {name}, {low} -> {high} sessions ...");
        idle.insert(
            name.into(),
            serde_json::to_value(
                idle_memory(&cli, transport, low, high)
                    .await
                    .context("idle_memory")?,
            )?,
        );
    }
    if !idle.is_empty() {
        report.insert("idle_memory".into(), Value::Object(idle));
    }
    report.insert(
        "meta".into(),
        json!({
            "quick": cli.quick, "duration_seconds": started.elapsed().as_secs_f64(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "server_cpus": cli.server_cpus, "load_cpus": cli.load_cpus, "repeat": repeat,
            "payload_bytes": PAYLOAD_BYTES,
        }),
    );
    let report = Value::Object(report);
    if let Some(p) = &cli.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(p) = &cli.svg {
        std::fs::write(p, latency_svg(&report))?;
    }
    let md = markdown(&report);
    if let Some(p) = &cli.markdown {
        std::fs::write(p, &md)?;
    }
    println!("{md}");
    Ok(())
}
