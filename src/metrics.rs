//! Counters and gauges, rendered as Prometheus text (`/metrics`) and JSON (`/v1/metrics`).
//!
//! Lock-free atomics on every hot path; the only lock guards the rarely-touched close-code
//! table. Never holds a label value that comes from a client (no org names, no tokens).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde_json::{json, Value};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

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
#[derive(Debug, Default)]
pub struct TransportMetrics {
    pub sessions: Gauge,
    pub sessions_opened: Counter,
    pub events_delivered: Counter,
    pub events_replayed: Counter,
    pub heartbeats_sent: Counter,
}

pub use crate::log::LogUsage;

/// Every figure the server exports.
#[derive(Debug, Default)]
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
    closes: Mutex<BTreeMap<u16, u64>>,
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

    /// Every figure once: Prometheus name, type, help, JSON key, and samples (with the label
    /// value, if the family has a label). Both renderings are made from this list.
    fn families(&self, log: LogUsage, draining: bool) -> Vec<Family> {
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
        vec![
            Family::new(
                "sessions",
                "gauge",
                "Open client sessions.",
                "transport",
                per_transport(|m| m.sessions.get()),
            ),
            Family::new(
                "sessions_opened_total",
                "counter",
                "Client sessions accepted.",
                "transport",
                per_transport(|m| m.sessions_opened.get()),
            ),
            Family::new(
                "events_delivered_total",
                "counter",
                "Events sent to clients (live and replayed).",
                "transport",
                per_transport(|m| m.events_delivered.get()),
            ),
            Family::new(
                "events_replayed_total",
                "counter",
                "Events sent from the replay log.",
                "transport",
                per_transport(|m| m.events_replayed.get()),
            ),
            Family::new(
                "heartbeats_sent_total",
                "counter",
                "Heartbeat frames sent.",
                "transport",
                per_transport(|m| m.heartbeats_sent.get()),
            ),
            Family::new(
                "orgs_subscribed",
                "gauge",
                "Upstream subscriptions held: one per org with subscribers.",
                "",
                one(self.orgs_subscribed.get()),
            ),
            Family::new(
                "events_published_total",
                "counter",
                "Events appended through the publish API.",
                "",
                one(self.events_published.get()),
            ),
            Family::new(
                "publish_requests_total",
                "counter",
                "Publish requests received.",
                "",
                one(self.publish_requests.get()),
            ),
            Family::new(
                "publish_duplicates_total",
                "counter",
                "Publish requests answered from an Idempotency-Key.",
                "",
                one(self.publish_duplicates.get()),
            ),
            Family::new(
                "publish_rejected_total",
                "counter",
                "Publish requests refused (4xx/5xx).",
                "",
                one(self.publish_rejected.get()),
            ),
            Family::new(
                "certificate_days_left",
                "gauge",
                "Whole days before the certificate served on QUIC (and with --http-tls, HTTPS) expires.",
                "",
                one(self.certificate_days_left.get()),
            ),
            Family::new(
                "http_connections",
                "gauge",
                "HTTP connections open (an upgraded WebSocket leaves this count).",
                "",
                one(self.http_connections.get()),
            ),
            Family::new(
                "http_connections_refused_total",
                "counter",
                "HTTP connections over --max-connections (answered 503 or closed).",
                "",
                one(self.http_connections_refused.get()),
            ),
            Family::new(
                "http_accept_errors_total",
                "counter",
                "Failed accepts on the HTTP listener (each followed by a back-off).",
                "",
                one(self.http_accept_errors.get()),
            ),
            Family::new(
                "sessions_closed_total",
                "counter",
                "Sessions closed by the server, by close code.",
                "code",
                closes,
            ),
            Family::new(
                "log_orgs",
                "gauge",
                "Orgs held in memory by the replay log (with Redis: orgs this node has touched; Redis holds the rest).",
                "",
                one(log.orgs),
            ),
            Family::new(
                "log_up",
                "gauge",
                "1 while the log answers; 0 from a failed command (Redis unreachable) until one succeeds.",
                "",
                one(u64::from(!log.down)),
            ),
            Family::new(
                "log_errors_total",
                "counter",
                "Failed log commands by kind: unavailable (nothing stored: 503), indeterminate (outcome unknown: 504), internal.",
                "kind",
                ["unavailable", "indeterminate", "internal"]
                    .iter()
                    .zip(log.errors)
                    .map(|(k, n)| (Some(k.to_string()), n))
                    .collect(),
            ),
            Family::new(
                "log_idle_orgs",
                "gauge",
                "Idle orgs an embedded log remembers by epoch and head only (--max-idle-orgs).",
                "",
                one(log.idle_orgs),
            ),
            Family::new(
                "log_events",
                "gauge",
                "Events retained in the replay log (embedded logs; 0 with Redis, whose streams hold them).",
                "",
                one(log.events),
            ),
            Family::new(
                "log_bytes",
                "gauge",
                "Bytes retained in the replay log (embedded logs; 0 with Redis).",
                "",
                one(log.bytes),
            ),
            Family::new(
                "log_disk_bytes",
                "gauge",
                "Bytes of the durable log on disk (0 without --data-dir).",
                "",
                one(log.disk_bytes),
            ),
            Family::new(
                "log_recovered_torn_bytes",
                "gauge",
                "Bytes of a torn last record cut from the durable log at start.",
                "",
                one(log.recovered_torn_bytes),
            ),
            Family::new(
                "log_recovered_corrupt_segments",
                "gauge",
                "Durable log segments whose scan stopped at a corrupt record at start.",
                "",
                one(log.recovered_corrupt_segments),
            ),
            Family::new(
                "log_recovered_reset_orgs",
                "gauge",
                "Orgs given a new epoch at start because their stored history had a hole.",
                "",
                one(log.recovered_reset_orgs),
            ),
            Family::new(
                "draining",
                "gauge",
                "1 while the node drains for shutdown.",
                "",
                one(u64::from(draining)),
            ),
        ]
    }

    /// Prometheus text exposition format.
    pub fn render_prometheus(&self, log: LogUsage, draining: bool) -> String {
        let mut s = String::with_capacity(4096);
        let _ = writeln!(
            s,
            "# HELP edgestream_build_info What this node runs: version, git commit, build date.\n\
             # TYPE edgestream_build_info gauge\n\
             edgestream_build_info{{version=\"{}\",commit=\"{}\",build_date=\"{}\"}} 1",
            crate::build::VERSION,
            crate::build::COMMIT,
            crate::build::DATE
        );
        for f in self.families(log, draining) {
            let _ = writeln!(
                s,
                "# HELP edgestream_{} {}\n# TYPE edgestream_{} {}",
                f.name, f.help, f.name, f.kind
            );
            for (label, v) in &f.samples {
                match label {
                    Some(l) => {
                        let _ = writeln!(s, "edgestream_{}{{{}=\"{l}\"}} {v}", f.name, f.label);
                    }
                    None => {
                        let _ = writeln!(s, "edgestream_{} {v}", f.name);
                    }
                }
            }
        }
        s
    }

    /// The same figures as JSON: keys without the `_total` suffix; labelled families become
    /// objects keyed by the label value.
    pub fn to_json(&self, log: LogUsage, draining: bool) -> Value {
        let mut out = serde_json::Map::new();
        out.insert(
            "build".into(),
            json!({"version": crate::build::VERSION, "commit": crate::build::COMMIT, "build_date": crate::build::DATE}),
        );
        for f in self.families(log, draining) {
            let key = f.name.strip_suffix("_total").unwrap_or(f.name);
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
            out.insert(key.to_string(), v);
        }
        out.insert("draining".into(), json!(draining));
        out.insert(
            "log".into(),
            json!({"orgs": log.orgs, "events": log.events, "bytes": log.bytes}),
        );
        Value::Object(out)
    }
}

/// One metric family, for rendering.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    label: &'static str,
    samples: Vec<(Option<String>, u64)>,
}

impl Family {
    fn new(
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        label: &'static str,
        samples: Vec<(Option<String>, u64)>,
    ) -> Self {
        Family {
            name,
            kind,
            help,
            label,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_renderings_carry_the_same_figures() {
        let m = Metrics::default();
        m.transport(Transport::WebSocket).sessions.set(3);
        m.events_published.add(7);
        m.record_close(4008);
        m.record_close(4008);
        let log = LogUsage {
            orgs: 1,
            events: 7,
            bytes: 700,
            ..Default::default()
        };
        let text = m.render_prometheus(log, false);
        assert!(
            text.contains("edgestream_sessions{transport=\"websocket\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("edgestream_events_published_total 7\n"));
        assert!(text.contains("edgestream_sessions_closed_total{code=\"4008\"} 2\n"));
        assert!(text.contains("# TYPE edgestream_log_bytes gauge\n"));
        let j = m.to_json(log, true);
        assert_eq!(j["sessions"]["websocket"], 3);
        assert_eq!(j["events_published"], 7);
        assert_eq!(j["sessions_closed"]["4008"], 2);
        assert_eq!(j["log"]["bytes"], 700);
        assert_eq!(j["draining"], true);
        let info = format!(
            "edgestream_build_info{{version=\"{}\",commit=\"{}\",build_date=\"{}\"}} 1\n",
            crate::build::VERSION,
            crate::build::COMMIT,
            crate::build::DATE
        );
        assert!(text.contains(&info), "{text}");
        assert_eq!(j["build"]["commit"], crate::build::COMMIT);
    }
}
