//! The load in processes of its own (`--load-procs`), each on its own 127.0.0.x source address,
//! so that a figure says whether it measured the server or the load: every worker reports the
//! CPU it used, beside the server's.
//!
//! A worker (`edgestream-bench load '<job json>'`) connects its clients, then follows commands
//! on stdin and answers on stdout, one line each:
//! - it prints `connected {json}` once every client has SUBSCRIBED;
//! - `until N`: prints `reached {json}` once every client has received seq N of its org;
//! - `drop`: drops every connection at once (no close handshake), prints `dropped`;
//! - `resume N`: reconnects every client at once with `since` (its org, epoch, last seq),
//!   prints `reached {json}` once every client has received seq N (the recovery times);
//! - `close` (or end of input): prints `done {json}` (counts, latencies, CPU) and exits.
//!
//! Clients check order on every event: a gap, a duplicate or a RESET is an error, and any
//! error fails the run.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use super::*;

/// What one worker runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Job {
    /// `ws` or `wt`.
    pub transport: String,
    /// The stream URL; `{org}` and `{token}` are replaced per client (a token for its org).
    pub url: String,
    /// The server's certificate hash (WebTransport).
    pub cert: String,
    pub source: Ipv4Addr,
    pub clients: usize,
    /// Global index of the first client (clients are spread over orgs by index).
    pub first: usize,
    /// Client `i` subscribes to org `o{i % orgs}`.
    pub orgs: usize,
    /// Clients whose index is a multiple of this record latencies (0: none).
    pub sample_every: usize,
    /// Connections made at once.
    pub concurrency: usize,
    /// A bare-library baseline: no SUBSCRIBED, events from seq 1.
    pub bare: bool,
}

impl Job {
    fn url_for(&self, i: usize) -> (String, String) {
        let org = format!("o{}", i % self.orgs.max(1));
        let url = self
            .url
            .replace("{org}", &org)
            .replace("{token}", &tok(&[&org]));
        (org, url)
    }
}

/// One client's position, kept across a drop and a resume, and its latency samples (its own
/// lock: clients never wait for each other to record one).
#[derive(Default)]
struct Position {
    epoch: Mutex<String>,
    last: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

#[derive(Default)]
struct Shared {
    seen: Seen,
    target: AtomicU64,
    wake: Notify,
    /// Unix micros when each client reached the target of a resume (0: not yet).
    recovered_at: Mutex<Vec<u64>>,
}

pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The worker process.
pub async fn worker(job: String) -> anyhow::Result<()> {
    let job: Job = serde_json::from_str(&job)?;
    let shared = Arc::new(Shared {
        seen: Seen {
            first_rx: AtomicU64::new(u64::MAX),
            ..Default::default()
        },
        target: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let positions: Vec<Arc<Position>> = (0..job.clients).map(|_| Arc::default()).collect();
    let connectors: Vec<wt::Connector> = if job.transport == "wt" {
        (0..8)
            .map(|_| wt::Connector::bound(&job.cert, job.source))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let connectors = Arc::new(connectors);
    let mut stdout = tokio::io::stdout();
    let started = Instant::now();
    let mut tasks = connect_all(&job, &shared, &positions, &connectors, false).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    say(
        &mut stdout,
        "connected",
        json!({"clients": job.clients, "seconds": connect_secs}),
    )
    .await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|n| n.parse::<u64>().ok()),
        ) {
            (Some("until"), Some(n)) => {
                wait_reached(&shared, &positions, n).await;
                say(&mut stdout, "reached", json!({})).await?;
            }
            (Some("drop"), _) => {
                for t in tasks.drain(..) {
                    t.abort();
                }
                say(&mut stdout, "dropped", json!({})).await?;
            }
            (Some("resume"), Some(n)) => {
                let resume_started = unix_us();
                shared
                    .recovered_at
                    .lock()
                    .expect("not poisoned")
                    .resize(job.clients, 0);
                shared.target.store(n, Ordering::Relaxed);
                let t0 = Instant::now();
                tasks = connect_all(&job, &shared, &positions, &connectors, true).await?;
                let connect_secs = t0.elapsed().as_secs_f64();
                wait_reached(&shared, &positions, n).await;
                let mut rec: Vec<u64> = shared
                    .recovered_at
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .map(|t| t.saturating_sub(resume_started))
                    .collect();
                rec.sort_unstable();
                say(
                    &mut stdout,
                    "reached",
                    json!({"connect_seconds": connect_secs, "recovered_us": percentiles(&rec),
                           "max_us": rec.last().copied().unwrap_or(0)}),
                )
                .await?;
            }
            _ => break,
        }
    }
    for t in tasks.drain(..) {
        t.abort();
    }
    let seen = &shared.seen;
    let mut lat: Vec<u64> = positions
        .iter()
        .flat_map(|p| std::mem::take(&mut *p.latencies_us.lock().expect("not poisoned")))
        .collect();
    lat.sort_unstable();
    let errors = seen.errors.take();
    say(
        &mut stdout,
        "done",
        json!({
            "delivered": seen.delivered.load(Ordering::Relaxed),
            "first_rx_us": seen.first_rx.load(Ordering::Relaxed),
            "last_rx_us": seen.last_rx.load(Ordering::Relaxed),
            "errors": errors.len(),
            "first_error": errors.first(),
            "latencies_us": lat,
            "cpu_seconds": pid_cpu_seconds(std::process::id()),
        }),
    )
    .await?;
    Ok(())
}

async fn say(out: &mut tokio::io::Stdout, word: &str, v: Value) -> anyhow::Result<()> {
    out.write_all(format!("{word} {v}\n").as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// Waits until every client has seq `n` (counting those that already have it).
async fn wait_reached(shared: &Shared, positions: &[Arc<Position>], n: u64) {
    shared.target.store(n, Ordering::Relaxed);
    loop {
        let notified = shared.wake.notified();
        let done = positions
            .iter()
            .filter(|p| p.last.load(Ordering::Relaxed) >= n)
            .count();
        if done == positions.len() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    }
}

/// Connects every client (`resume`: with `since`), `concurrency` at a time; returns the readers.
async fn connect_all(
    job: &Job,
    shared: &Arc<Shared>,
    positions: &[Arc<Position>],
    connectors: &Arc<Vec<wt::Connector>>,
    resume: bool,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let connects = futures_util::stream::iter(0..job.clients)
        .map(|k| {
            let (org, mut url) = job.url_for(job.first + k);
            let pos = positions[k].clone();
            let connectors = connectors.clone();
            let transport = job.transport.clone();
            let source = job.source;
            let bare = job.bare;
            async move {
                if resume {
                    let epoch = pos.epoch.lock().expect("not poisoned").clone();
                    let last = pos.last.load(Ordering::Relaxed);
                    url.push_str(&format!("&since={org}:{epoch}:{last}"));
                }
                let client = if transport == "wt" {
                    Client::Wt(Box::new(
                        connectors[k % connectors.len()].connect(&url).await?,
                    ))
                } else {
                    let opts = edgestream_testkit::ws::Options {
                        bind: Some(source.into()),
                        ..Default::default()
                    };
                    Client::Ws(Box::new(
                        WsClient::connect_with(&url, &opts)
                            .await
                            .with_context(|| format!("client {k} from {source}: connect"))?,
                    ))
                };
                let mut client = client;
                if !bare {
                    let epoch = client
                        .subscribed()
                        .await
                        .with_context(|| format!("client {k}: SUBSCRIBED"))?;
                    *pos.epoch.lock().expect("not poisoned") = epoch;
                }
                anyhow::Ok((k, client))
            }
        })
        .buffer_unordered(job.concurrency.max(1));
    tokio::pin!(connects);
    let mut tasks = Vec::with_capacity(job.clients);
    while let Some(r) = connects.next().await {
        let (k, mut client) = r?;
        let (shared, pos) = (shared.clone(), positions[k].clone());
        let sample = job.sample_every > 0 && (job.first + k) % job.sample_every == 0;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = read(&mut client, &shared, &pos, k, sample).await {
                shared.seen.errors.push(format!("client {k}: {e:#}"));
            }
        }));
    }
    Ok(tasks)
}

enum Client {
    Ws(Box<WsClient>),
    Wt(Box<wt::WtClient>),
}

impl Client {
    /// The next frame that is not a heartbeat or presence.
    async fn next(&mut self) -> anyhow::Result<Frame> {
        loop {
            let f = match self {
                Client::Ws(c) => match c.next().await? {
                    Msg::Frame(f) => f,
                    other => bail!("unexpected {other:?}"),
                },
                Client::Wt(c) => c.next_frame_patient().await?,
            };
            match f {
                Frame::Heartbeat { .. } | Frame::Presence { .. } => {}
                f => return Ok(f),
            }
        }
    }

    async fn subscribed(&mut self) -> anyhow::Result<String> {
        match self.next().await? {
            Frame::Subscribed { epoch, resume, .. } => {
                if resume == edgestream_codec::Resume::Reset {
                    bail!("resume answered with reset");
                }
                Ok(epoch)
            }
            other => bail!("expected SUBSCRIBED, got {other:?}"),
        }
    }
}

async fn read(
    client: &mut Client,
    shared: &Shared,
    pos: &Position,
    k: usize,
    sample: bool,
) -> anyhow::Result<()> {
    loop {
        let (seq, payload) = match client.next().await? {
            Frame::Event { seq, payload, .. } => (seq, payload),
            other => bail!("unexpected {other:?}"),
        };
        let t = unix_us();
        let last = pos.last.load(Ordering::Relaxed);
        if seq != last + 1 {
            bail!("expected seq {}, got {seq}", last + 1);
        }
        pos.last.store(seq, Ordering::Relaxed);
        let seen = &shared.seen;
        seen.first_rx.fetch_min(t, Ordering::Relaxed);
        seen.last_rx.fetch_max(t, Ordering::Relaxed);
        seen.delivered.fetch_add(1, Ordering::Relaxed);
        if sample {
            if let Some(sent) = Stamp::of(&payload).u {
                pos.latencies_us
                    .lock()
                    .expect("not poisoned")
                    .push(t.saturating_sub(sent));
            }
        }
        if seq == shared.target.load(Ordering::Relaxed) {
            if let Some(slot) = shared.recovered_at.lock().expect("not poisoned").get_mut(k) {
                *slot = t;
            }
            shared.wake.notify_waiters();
        }
    }
}

/// A payload of `PAYLOAD_BYTES` carrying its publish time (unix micros) for the workers.
pub fn timed_payload() -> Value {
    json!({"u": unix_us(), "p": "x".repeat(PAYLOAD_BYTES - 40)})
}

/// The workers of one run, as the bench drives them.
pub struct Load {
    procs: Vec<Worker>,
    /// Seconds the slowest worker took to connect all its clients (process start excluded).
    pub connect_seconds: f64,
}

struct Worker {
    child: Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// How many workers and clients, and where they connect.
pub struct Spec<'a> {
    pub transport: Transport,
    pub url: &'a str,
    pub cert: &'a str,
    pub clients: usize,
    pub orgs: usize,
    pub procs: usize,
    pub sample_every: usize,
    pub concurrency: usize,
    pub bare: bool,
}

impl Load {
    /// Starts `procs` workers sharing `clients` (worker `p` on 127.0.0.`p+2`) and waits until
    /// every client has SUBSCRIBED.
    pub async fn start(spec: Spec<'_>, cpus: &Option<String>) -> anyhow::Result<Load> {
        let procs = spec.procs.max(1);
        let mut workers = Vec::with_capacity(procs);
        for p in 0..procs {
            let first = spec.clients * p / procs;
            let clients = spec.clients * (p + 1) / procs - first;
            let job = Job {
                transport: match spec.transport {
                    Transport::Ws => "ws".into(),
                    Transport::Wt => "wt".into(),
                },
                url: spec.url.to_string(),
                cert: spec.cert.to_string(),
                source: Ipv4Addr::new(127, 0, 0, 2 + p as u8),
                clients,
                first,
                orgs: spec.orgs,
                sample_every: spec.sample_every,
                concurrency: spec.concurrency,
                bare: spec.bare,
            };
            let exe = std::env::current_exe()?;
            let mut cmd = match cpus {
                Some(c) => {
                    let mut t = Command::new("taskset");
                    t.args(["-c", c]).arg(exe);
                    t
                }
                None => Command::new(exe),
            };
            let mut child = cmd
                .arg("load")
                .arg(serde_json::to_string(&job)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("spawn a load worker")?;
            let stdin = child.stdin.take().context("stdin")?;
            let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
            workers.push(Worker {
                child,
                stdin,
                lines,
            });
        }
        let mut load = Load {
            procs: workers,
            connect_seconds: 0.0,
        };
        let connected = load.expect("connected").await?;
        load.connect_seconds = connected
            .iter()
            .filter_map(|v| v["seconds"].as_f64())
            .fold(0.0, f64::max);
        Ok(load)
    }

    /// Sends `cmd` to every worker.
    pub async fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        for w in &mut self.procs {
            w.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
            w.stdin.flush().await?;
        }
        Ok(())
    }

    /// Every worker's next line, which must start with `word`: the JSON after it.
    pub async fn expect(&mut self, word: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::with_capacity(self.procs.len());
        for w in &mut self.procs {
            let line = tokio::time::timeout(Duration::from_secs(600), w.lines.next_line())
                .await
                .with_context(|| format!("a load worker never said {word}"))??
                .with_context(|| format!("a load worker exited before {word}"))?;
            let (w0, rest) = line.split_once(' ').unwrap_or((&line, "{}"));
            if w0 != word {
                bail!("a load worker said {line:?}, expected {word}");
            }
            out.push(serde_json::from_str(rest).unwrap_or(json!({})));
        }
        Ok(out)
    }

    /// Sends `cmd` and waits for `word` from every worker.
    pub async fn ask(&mut self, cmd: &str, word: &str) -> anyhow::Result<Vec<Value>> {
        self.send(cmd).await?;
        self.expect(word).await
    }

    /// CPU seconds the workers have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.procs
            .iter()
            .filter_map(|w| w.child.id())
            .map(pid_cpu_seconds)
            .sum()
    }

    /// Ends the workers; their merged figures.
    pub async fn finish(mut self) -> anyhow::Result<Done> {
        let done = self.ask("close", "done").await?;
        let mut d = Done {
            delivered: 0,
            first_rx_us: u64::MAX,
            last_rx_us: 0,
            latencies_us: Vec::new(),
            cpu_seconds: 0.0,
        };
        for v in done {
            if v["errors"].as_u64().unwrap_or(1) != 0 {
                bail!(
                    "order or delivery broken in a worker: {} errors, first: {}",
                    v["errors"],
                    v["first_error"]
                );
            }
            d.delivered += v["delivered"].as_u64().unwrap_or(0);
            d.first_rx_us = d
                .first_rx_us
                .min(v["first_rx_us"].as_u64().unwrap_or(u64::MAX));
            d.last_rx_us = d.last_rx_us.max(v["last_rx_us"].as_u64().unwrap_or(0));
            d.cpu_seconds += v["cpu_seconds"].as_f64().unwrap_or(0.0);
            if let Some(l) = v["latencies_us"].as_array() {
                d.latencies_us.extend(l.iter().filter_map(Value::as_u64));
            }
        }
        d.latencies_us.sort_unstable();
        for w in &mut self.procs {
            let _ = w.child.wait().await;
        }
        Ok(d)
    }
}

/// What the workers saw, merged.
pub struct Done {
    pub delivered: u64,
    pub first_rx_us: u64,
    pub last_rx_us: u64,
    /// Sorted.
    pub latencies_us: Vec<u64>,
    pub cpu_seconds: f64,
}

impl Done {
    pub fn seconds(&self) -> f64 {
        self.last_rx_us.saturating_sub(self.first_rx_us) as f64 / 1e6
    }
}
