//! Counters, gauges and latency histograms, rendered by the Prometheus project's client
//! (`prometheus-client`) as OpenMetrics or Prometheus text (`/metrics`), and as JSON
//! (`/v1/metrics`).
//!
//! Lock-free atomics on every hot path. The histograms take a short lock per observation, so
//! the per-delivery one is sampled ([`DELIVERY_SAMPLE_EVERY`]). Never holds a label value that
//! comes from a client (no org names, no tokens).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde_json::{json, Value};

/// A monotonically increasing count (the Prometheus client's counter).
pub type Counter = prometheus_client::metrics::counter::Counter<u64, AtomicU64>;

/// A value that goes up and down (the Prometheus client's gauge, unsigned).
pub type Gauge = prometheus_client::metrics::gauge::Gauge<u64, AtomicU64>;

/// One delivery in this many, per session, is timed for `delivery_latency_seconds`.
pub const DELIVERY_SAMPLE_EVERY: u32 = 64;

/// The transports, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket = 0,
    WebTransport = 1,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::WebSocket, Transport::WebTransport];

    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::WebTransport => "webtransport",
        }
    }
}

/// Per-transport figures.
#[derive(Debug)]
pub struct TransportMetrics {
    pub sessions: Gauge,
    pub sessions_opened: Counter,
    pub events_delivered: Counter,
    pub events_replayed: Counter,
    pub heartbeats_sent: Counter,
    /// From the event's sequencing (its `ts`, unix milliseconds) to the session handing its
    /// frame to the socket; sampled.
    pub delivery_latency: Histogram,
    /// From the connection's first packet (QUIC) or the upgrade request (WebSocket) to the
    /// session admitted (token checked).
    pub handshake: Histogram,
    /// From SUBSCRIBED with `since` to the subscription caught up with the live events.
    pub catch_up: Histogram,
}

impl Default for TransportMetrics {
    fn default() -> Self {
        TransportMetrics {
            sessions: Gauge::default(),
            sessions_opened: Counter::default(),
            events_delivered: Counter::default(),
            events_replayed: Counter::default(),
            heartbeats_sent: Counter::default(),
            delivery_latency: Histogram::new(LATENCY_BUCKETS),
            handshake: Histogram::new(LATENCY_BUCKETS),
            catch_up: Histogram::new(CATCH_UP_BUCKETS),
        }
    }
}

impl TransportMetrics {
    /// Records one sampled delivery of an event sequenced at `ts_ms` (unix milliseconds). The
    /// event's time has millisecond resolution, so small latencies read up to 1 ms high; on a
    /// shared log the sequencing node's clock is another node's.
    pub fn observe_delivery(&self, ts_ms: u64) {
        let now_us = crate::time::unix_us();
        let latency_us = now_us.saturating_sub(ts_ms.saturating_mul(1000));
        self.delivery_latency.observe(latency_us as f64 / 1e6);
    }
}

/// Seconds: 0.5 ms to 10 s, roughly three buckets per decade.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds: 1 ms to 2 min (a catch-up of a long history).
const CATCH_UP_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];
/// Seconds: 50 us (memory) to 10 s (a slow fsync, a Redis failover).
const APPEND_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

type LogLabel = [(&'static str, &'static str); 1];
/// `transport`, `fallback`, `engine`.
type ClientLabels = [(&'static str, &'static str); 3];

/// Why a client that tried WebTransport connects over WebSocket: the `fallback` query
/// parameter of the browser client (PROTOCOL.md: "Fallback reasons").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No parameter: a WebTransport session, or a WebSocket client that did not try it.
    None,
    Timeout,
    Refused,
    Unsupported,
    Stalled,
    Remembered,
    /// Not in the `--webtransport-share`.
    Share,
    /// A reason this server does not know (counted, never refused).
    Other,
}

impl Fallback {
    pub fn parse(v: &str) -> Self {
        match v {
            "" => Fallback::None,
            "timeout" => Fallback::Timeout,
            "refused" => Fallback::Refused,
            "unsupported" => Fallback::Unsupported,
            "stalled" => Fallback::Stalled,
            "remembered" => Fallback::Remembered,
            "share" => Fallback::Share,
            _ => Fallback::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Fallback::None => "none",
            Fallback::Timeout => "timeout",
            Fallback::Refused => "refused",
            Fallback::Unsupported => "unsupported",
            Fallback::Stalled => "stalled",
            Fallback::Remembered => "remembered",
            Fallback::Share => "share",
            Fallback::Other => "other",
        }
    }
}

/// The browser engine a User-Agent names (a bounded label: never the raw string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Chromium,
    Gecko,
    WebKit,
    /// A User-Agent of something else (a server-side client, a tool).
    Other,
    /// No User-Agent.
    Unknown,
}

impl Engine {
    pub fn from_user_agent(ua: Option<&str>) -> Self {
        let Some(ua) = ua else {
            return Engine::Unknown;
        };
        // Order matters: Chromium's User-Agent also says Safari and AppleWebKit.
        if ua.contains("Firefox/") || ua.contains("Gecko/") {
            Engine::Gecko
        } else if ua.contains("Chrome/") || ua.contains("Chromium/") || ua.contains("CriOS/") {
            Engine::Chromium
        } else if ua.contains("AppleWebKit/") {
            Engine::WebKit
        } else {
            Engine::Other
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Engine::Chromium => "chromium",
            Engine::Gecko => "gecko",
            Engine::WebKit => "webkit",
            Engine::Other => "other",
            Engine::Unknown => "unknown",
        }
    }
}

fn append_histogram() -> Histogram {
    Histogram::new(APPEND_BUCKETS)
}

pub use crate::log::LogUsage;

/// Every figure the server exports.
#[derive(Debug)]
pub struct Metrics {
    pub transports: [TransportMetrics; 2],
    /// Upstream subscriptions held: one per org with subscribers on this node.
    pub orgs_subscribed: Gauge,
    pub events_published: Counter,
    pub publish_requests: Counter,
    pub publish_duplicates: Counter,
    pub publish_rejected: Counter,
    /// HTTP connections open (requests and keep-alive; upgraded WebSockets end here).
    pub http_connections: Gauge,
    /// Whole days before the served certificate expires (0: today or past).
    pub certificate_days_left: Gauge,
    /// Connections over `--max-connections` (served on the health reserve or closed).
    pub http_connections_refused: Counter,
    /// Failed accepts (e.g. out of file descriptors), each followed by a back-off.
    pub http_accept_errors: Counter,
    /// Append latency by log kind (`memory`, `durable`, `redis`), successful or not.
    append: Family<LogLabel, Histogram, fn() -> Histogram>,
    /// Sessions accepted by transport, fallback reason and browser engine.
    clients: Family<ClientLabels, Counter>,
    closes: Mutex<BTreeMap<u16, u64>>,
    /// The QUIC listener's socket (its inode), whose kernel drop count is read at each scrape.
    pub quic_socket: std::sync::OnceLock<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            transports: Default::default(),
            orgs_subscribed: Gauge::default(),
            events_published: Counter::default(),
            publish_requests: Counter::default(),
            publish_duplicates: Counter::default(),
            publish_rejected: Counter::default(),
            http_connections: Gauge::default(),
            certificate_days_left: Gauge::default(),
            http_connections_refused: Counter::default(),
            http_accept_errors: Counter::default(),
            append: Family::new_with_constructor(append_histogram),
            clients: Family::default(),
            closes: Mutex::default(),
            quic_socket: std::sync::OnceLock::new(),
        }
    }
}

/// The kernel's drop count of the UDP socket with this inode (the last column of
/// /proc/net/udp and udp6); `None` off Linux or when the socket is not listed.
pub fn udp_socket_drops(inode: u64) -> Option<u64> {
    ["/proc/net/udp", "/proc/net/udp6"].iter().find_map(|path| {
        let table = std::fs::read_to_string(path).ok()?;
        udp_table_drops(&table, inode)
    })
}

/// [`udp_socket_drops`] on the text of one table: `sl local rem st tx:rx tr:when retrnsmt uid
/// timeout inode ref pointer drops`.
fn udp_table_drops(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.nth(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        fields.last()?.parse().ok()
    })
}

/// The two text formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFormat {
    /// OpenMetrics 1.0 (what Prometheus asks for first).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (anything else: curl, older scrapers).
    Prometheus,
}

impl TextFormat {
    /// The format an `Accept` header asks for.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => TextFormat::OpenMetrics,
            _ => TextFormat::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            TextFormat::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            TextFormat::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

impl Metrics {
    pub fn transport(&self, t: Transport) -> &TransportMetrics {
        &self.transports[t as usize]
    }

    /// Counts a session closed by the server with `code`.
    pub fn record_close(&self, code: u16) {
        *self.closes.lock().entry(code).or_default() += 1;
    }

    pub fn closes(&self) -> BTreeMap<u16, u64> {
        self.closes.lock().clone()
    }

    /// Counts a session accepted: its transport, why it fell back (if it says), its engine.
    pub fn record_client(&self, transport: Transport, fallback: Fallback, engine: Engine) {
        self.clients
            .get_or_create(&[
                ("transport", transport.label()),
                ("fallback", fallback.label()),
                ("engine", engine.label()),
            ])
            .inc();
    }

    /// Records one append to the log of `kind`.
    pub fn observe_append(&self, kind: &'static str, took: Duration) {
        self.append
            .get_or_create(&[("log", kind)])
            .observe(took.as_secs_f64());
    }

    /// Every counter and gauge once: name, type, help, label, and samples (with the label
    /// value, if the family has a label). Both renderings are made from this list.
    fn families(&self, log: LogUsage, draining: bool) -> Vec<Figure> {
        use MetricType::{Counter as C, Gauge as G};
        let per_transport = |f: fn(&TransportMetrics) -> u64| {
            Transport::ALL
                .iter()
                .map(|t| (Some(t.label().to_string()), f(self.transport(*t))))
                .collect()
        };
        let one = |v: u64| vec![(None, v)];
        let closes = self
            .closes()
            .into_iter()
            .map(|(c, n)| (Some(c.to_string()), n))
            .collect();
        let f = Figure::new;
        vec![
            f("sessions", G, "Open client sessions", "transport", per_transport(|m| m.sessions.get())),
            f("sessions_opened", C, "Client sessions accepted", "transport", per_transport(|m| m.sessions_opened.get())),
            f("events_delivered", C, "Events sent to clients (live and replayed)", "transport", per_transport(|m| m.events_delivered.get())),
            f("events_replayed", C, "Events sent from the replay log", "transport", per_transport(|m| m.events_replayed.get())),
            f("heartbeats_sent", C, "Heartbeat frames sent", "transport", per_transport(|m| m.heartbeats_sent.get())),
            f("orgs_subscribed", G, "Upstream subscriptions held: one per org with subscribers", "", one(self.orgs_subscribed.get())),
            f("events_published", C, "Events appended through the publish API", "", one(self.events_published.get())),
            f("publish_requests", C, "Publish requests received", "", one(self.publish_requests.get())),
            f("publish_duplicates", C, "Publish requests answered from an Idempotency-Key", "", one(self.publish_duplicates.get())),
            f("publish_rejected", C, "Publish requests refused (4xx/5xx)", "", one(self.publish_rejected.get())),
            f("certificate_days_left", G, "Whole days before the certificate served on QUIC (and with --http-tls, HTTPS) expires", "", one(self.certificate_days_left.get())),
            f("http_connections", G, "HTTP connections open (an upgraded WebSocket leaves this count)", "", one(self.http_connections.get())),
            f("http_connections_refused", C, "HTTP connections over --max-connections (answered 503 or closed)", "", one(self.http_connections_refused.get())),
            f("http_accept_errors", C, "Failed accepts on the HTTP listener (each followed by a back-off)", "", one(self.http_accept_errors.get())),
            f("sessions_closed", C, "Sessions closed by the server, by close code", "code", closes),
            f("log_orgs", G, "Orgs held in memory by the replay log (with Redis: orgs this node has touched; Redis holds the rest)", "", one(log.orgs)),
            f("log_up", G, "1 while the log answers; 0 from a failed command (Redis unreachable) until one succeeds", "", one(u64::from(!log.down))),
            f(
                "log_errors",
                C,
                "Failed log commands by kind: unavailable (nothing stored: 503), indeterminate (outcome unknown: 504), internal",
                "kind",
                ["unavailable", "indeterminate", "internal"]
                    .iter()
                    .zip(log.errors)
                    .map(|(k, n)| (Some(k.to_string()), n))
                    .collect(),
            ),
            f("log_idle_orgs", G, "Idle orgs an embedded log remembers by epoch and head only (--max-idle-orgs)", "", one(log.idle_orgs)),
            f("log_events", G, "Events retained in the replay log (embedded logs; 0 with Redis, whose streams hold them)", "", one(log.events)),
            f("log_bytes", G, "Bytes retained in the replay log (embedded logs; 0 with Redis)", "", one(log.bytes)),
            f("log_disk_bytes", G, "Bytes of the durable log on disk (0 without --data-dir)", "", one(log.disk_bytes)),
            f("log_recovered_torn_bytes", G, "Bytes of a torn last record cut from the durable log at start", "", one(log.recovered_torn_bytes)),
            f("log_recovered_corrupt_segments", G, "Durable log segments whose scan stopped at a corrupt record at start", "", one(log.recovered_corrupt_segments)),
            f("log_recovered_reset_orgs", G, "Orgs given a new epoch at start because their stored history had a hole", "", one(log.recovered_reset_orgs)),
            f("draining", G, "1 while the node drains for shutdown", "", one(u64::from(draining))),
            f("quic_socket_receive_drops", C, "Datagrams the kernel dropped at the QUIC socket, mostly at a full receive buffer (a handshake storm, a fan-out burst): raise --quic-socket-buffer and net.core.rmem_max", "", one(self.quic_socket.get().and_then(|i| udp_socket_drops(*i)).unwrap_or(0))),
        ]
    }

    /// `/metrics`: every figure and histogram, encoded by `prometheus-client`.
    pub fn render_text(&self, log: LogUsage, draining: bool, format: TextFormat) -> String {
        let mut registry = Registry::with_prefix("edgestream");
        registry.register(
            "build",
            "What this node runs: version, git commit, build date",
            Info::new([
                ("version", crate::build::VERSION),
                ("commit", crate::build::COMMIT),
                ("build_date", crate::build::DATE),
            ]),
        );
        let per_transport = |f: fn(&TransportMetrics) -> &Histogram| {
            Transport::ALL
                .iter()
                .map(|t| (t.label(), f(self.transport(*t)).clone()))
                .collect()
        };
        registry.register_collector(Box::new(Scrape {
            figures: self.families(log, draining),
            histograms: vec![
                Histograms {
                    name: "delivery_latency",
                    help: "Event sequenced (its ts) to its frame handed to the socket, sampled one delivery in 64 per session; ms resolution",
                    by_transport: per_transport(|m| &m.delivery_latency),
                },
                Histograms {
                    name: "handshake_duration",
                    help: "Connection (QUIC first packet, or WebSocket upgrade request) to session admitted",
                    by_transport: per_transport(|m| &m.handshake),
                },
                Histograms {
                    name: "catch_up_duration",
                    help: "SUBSCRIBED with since to the subscription caught up with live events",
                    by_transport: per_transport(|m| &m.catch_up),
                },
            ],
            append: self.append.clone(),
            clients: self.clients.clone(),
        }));
        let mut s = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = match format {
            TextFormat::OpenMetrics => prometheus_client::encoding::text::encode(&mut s, &registry),
            TextFormat::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut s, &registry)
            }
        };
        s
    }

    /// The counters and gauges as JSON: labelled families become objects keyed by the label
    /// value. (Histograms are on `/metrics` only.)
    pub fn to_json(&self, log: LogUsage, draining: bool) -> Value {
        let mut out = serde_json::Map::new();
        out.insert(
            "build".into(),
            json!({"version": crate::build::VERSION, "commit": crate::build::COMMIT, "build_date": crate::build::DATE}),
        );
        for f in self.families(log, draining) {
            let v = if f.label.is_empty() {
                json!(f.samples.first().map_or(0, |(_, v)| *v))
            } else {
                Value::Object(
                    f.samples
                        .into_iter()
                        .map(|(l, v)| (l.unwrap_or_default(), json!(v)))
                        .collect(),
                )
            };
            out.insert(f.name.to_string(), v);
        }
        out.insert("draining".into(), json!(draining));
        out.insert(
            "log".into(),
            json!({"orgs": log.orgs, "events": log.events, "bytes": log.bytes}),
        );
        Value::Object(out)
    }
}

/// One counter or gauge family, read at a scrape.
#[derive(Debug)]
struct Figure {
    name: &'static str,
    kind: MetricType,
    help: &'static str,
    label: &'static str,
    samples: Vec<(Option<String>, u64)>,
}

impl Figure {
    fn new(
        name: &'static str,
        kind: MetricType,
        help: &'static str,
        label: &'static str,
        samples: Vec<(Option<String>, u64)>,
    ) -> Self {
        Figure {
            name,
            kind,
            help,
            label,
            samples,
        }
    }
}

/// A histogram per transport.
#[derive(Debug)]
struct Histograms {
    name: &'static str,
    help: &'static str,
    by_transport: Vec<(&'static str, Histogram)>,
}

/// What one scrape encodes: the figures read now, and the histograms (shared handles).
#[derive(Debug)]
struct Scrape {
    figures: Vec<Figure>,
    histograms: Vec<Histograms>,
    append: Family<LogLabel, Histogram, fn() -> Histogram>,
    clients: Family<ClientLabels, Counter>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.figures {
            let mut m = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            if f.label.is_empty() {
                let v = f.samples.first().map_or(0, |(_, v)| *v);
                encode_value(&f.kind, v, m)?;
                continue;
            }
            for (label, v) in &f.samples {
                let labels = [(f.label, label.as_deref().unwrap_or_default())];
                encode_value(&f.kind, *v, m.encode_family(&labels)?)?;
            }
        }
        for h in &self.histograms {
            let mut m = encoder.encode_descriptor(
                h.name,
                h.help,
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (transport, hist) in &h.by_transport {
                hist.encode(m.encode_family(&[("transport", *transport)])?)?;
            }
        }
        let m = encoder.encode_descriptor(
            "sessions_by_client",
            "Sessions accepted by transport, fallback reason (the browser client's fallback parameter after a WebTransport attempt; none otherwise) and browser engine (from the User-Agent)",
            None,
            MetricType::Counter,
        )?;
        self.clients.encode(m)?;
        let m = encoder.encode_descriptor(
            "append_duration",
            "Log append latency by log kind (successful or not)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        self.append.encode(m)
    }
}

fn encode_value(
    kind: &MetricType,
    v: u64,
    m: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    if matches!(kind, MetricType::Counter) {
        ConstCounter::new(v).encode(m)
    } else {
        ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_drops_are_read_by_inode() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   12: 0200007F:EA22 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2361808 2 00000000d15a7bbe 0
  217: 0100007F:D16E 00000000:0000 07 00000000:0009E800 00:00000000 00000000     0        0 2356581 2 0000000051e1b2a6 7347
";
        assert_eq!(udp_table_drops(table, 2356581), Some(7347));
        assert_eq!(udp_table_drops(table, 2361808), Some(0));
        assert_eq!(udp_table_drops(table, 1), None);
    }

    #[test]
    fn both_renderings_carry_the_same_figures() {
        let m = Metrics::default();
        m.transport(Transport::WebSocket).sessions.set(3);
        m.events_published.inc_by(7);
        m.record_close(4008);
        m.record_close(4008);
        m.observe_append("memory", Duration::from_micros(70));
        m.transport(Transport::WebTransport)
            .handshake
            .observe(0.003);
        let log = LogUsage {
            orgs: 1,
            events: 7,
            bytes: 700,
            ..Default::default()
        };
        for format in [TextFormat::OpenMetrics, TextFormat::Prometheus] {
            let text = m.render_text(log, false, format);
            for (name, labels, value) in [
                ("edgestream_sessions", vec![("transport", "websocket")], 3.0),
                ("edgestream_events_published_total", vec![], 7.0),
                (
                    "edgestream_sessions_closed_total",
                    vec![("code", "4008")],
                    2.0,
                ),
                ("edgestream_log_bytes", vec![], 700.0),
                (
                    "edgestream_append_duration_seconds_bucket",
                    vec![("log", "memory"), ("le", "0.0001")],
                    1.0,
                ),
                (
                    "edgestream_append_duration_seconds_count",
                    vec![("log", "memory")],
                    1.0,
                ),
                (
                    "edgestream_handshake_duration_seconds_bucket",
                    vec![("transport", "webtransport"), ("le", "0.0025")],
                    0.0,
                ),
                (
                    "edgestream_handshake_duration_seconds_bucket",
                    vec![("transport", "webtransport"), ("le", "0.005")],
                    1.0,
                ),
            ] {
                assert_eq!(
                    sample(&text, name, &labels),
                    Some(value),
                    "{format:?}: {name} {labels:?} in\n{text}"
                );
            }
            let info = format!(
                "edgestream_build_info{{version=\"{}\",commit=\"{}\",build_date=\"{}\"}} 1\n",
                crate::build::VERSION,
                crate::build::COMMIT,
                crate::build::DATE
            );
            assert!(text.contains(&info), "{text}");
            assert_eq!(
                text.ends_with("# EOF\n"),
                format == TextFormat::OpenMetrics,
                "{text}"
            );
        }
        let j = m.to_json(log, true);
        assert_eq!(j["sessions"]["websocket"], 3);
        assert_eq!(j["events_published"], 7);
        assert_eq!(j["sessions_closed"]["4008"], 2);
        assert_eq!(j["log"]["bytes"], 700);
        assert_eq!(j["draining"], true);
        assert_eq!(j["build"]["commit"], crate::build::COMMIT);
    }

    /// The value of the sample `name` with exactly `labels` (in any order).
    fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        text.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, mut got) = match series.split_once('{') {
                Some((n, rest)) => (
                    n,
                    rest.trim_end_matches('}')
                        .split(',')
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ),
                None => (series, Vec::new()),
            };
            got.sort();
            (n == name && got == want).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let om = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(TextFormat::negotiate(Some(om)), TextFormat::OpenMetrics);
        assert_eq!(TextFormat::negotiate(Some("*/*")), TextFormat::Prometheus);
        assert_eq!(TextFormat::negotiate(None), TextFormat::Prometheus);
    }

    #[test]
    fn engines_from_user_agents_and_fallback_reasons() {
        let chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36";
        let firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:153.0) Gecko/20100101 Firefox/153.0";
        let safari = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/26.4 Safari/605.1.15";
        let cases = [
            (Some(chrome), Engine::Chromium),
            (Some(firefox), Engine::Gecko),
            (Some(safari), Engine::WebKit),
            (Some("curl/8.5.0"), Engine::Other),
            (None, Engine::Unknown),
        ];
        for (ua, want) in cases {
            assert_eq!(Engine::from_user_agent(ua), want, "{ua:?}");
        }
        for r in [
            "timeout",
            "refused",
            "unsupported",
            "stalled",
            "remembered",
            "share",
        ] {
            assert_eq!(Fallback::parse(r).label(), r);
        }
        assert_eq!(Fallback::parse("from-the-future"), Fallback::Other);
        assert_eq!(Fallback::parse(""), Fallback::None);
        let m = Metrics::default();
        m.record_client(Transport::WebSocket, Fallback::Stalled, Engine::WebKit);
        let text = m.render_text(LogUsage::default(), false, TextFormat::Prometheus);
        assert!(
            text.contains(r#"edgestream_sessions_by_client_total{transport="websocket",fallback="stalled",engine="webkit"} 1"#),
            "{text}"
        );
    }
}
