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

    /// Prometheus text exposition format.
    pub fn render_prometheus(&self, log: LogUsage, draining: bool) -> String {
        let mut s = String::with_capacity(2048);
        let mut family = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(
                s,
                "# HELP edgestream_{name} {help}\n# TYPE edgestream_{name} {kind}"
            );
        };
        family("sessions", "gauge", "Open client sessions.");
        family(
            "sessions_opened_total",
            "counter",
            "Client sessions accepted.",
        );
        family(
            "events_delivered_total",
            "counter",
            "Events sent to clients (live and replayed).",
        );
        family(
            "events_replayed_total",
            "counter",
            "Events sent from the replay log.",
        );
        family("heartbeats_sent_total", "counter", "Heartbeat frames sent.");
        family(
            "orgs_subscribed",
            "gauge",
            "Upstream subscriptions held: one per org with subscribers.",
        );
        family(
            "events_published_total",
            "counter",
            "Events appended through the publish API.",
        );
        family(
            "publish_requests_total",
            "counter",
            "Publish requests received.",
        );
        family(
            "publish_duplicates_total",
            "counter",
            "Publish requests answered from an Idempotency-Key.",
        );
        family(
            "publish_rejected_total",
            "counter",
            "Publish requests refused (4xx/5xx).",
        );
        family(
            "sessions_closed_total",
            "counter",
            "Sessions closed by the server, by close code.",
        );
        family("log_orgs", "gauge", "Orgs in the replay log.");
        family("log_events", "gauge", "Events retained in the replay log.");
        family("log_bytes", "gauge", "Bytes retained in the replay log.");
        family("draining", "gauge", "1 while the node drains for shutdown.");
        for t in Transport::ALL {
            let m = self.transport(t);
            let l = t.label();
            let _ = writeln!(
                s,
                "edgestream_sessions{{transport=\"{l}\"}} {}",
                m.sessions.get()
            );
            let _ = writeln!(
                s,
                "edgestream_sessions_opened_total{{transport=\"{l}\"}} {}",
                m.sessions_opened.get()
            );
            let _ = writeln!(
                s,
                "edgestream_events_delivered_total{{transport=\"{l}\"}} {}",
                m.events_delivered.get()
            );
            let _ = writeln!(
                s,
                "edgestream_events_replayed_total{{transport=\"{l}\"}} {}",
                m.events_replayed.get()
            );
            let _ = writeln!(
                s,
                "edgestream_heartbeats_sent_total{{transport=\"{l}\"}} {}",
                m.heartbeats_sent.get()
            );
        }
        let _ = writeln!(
            s,
            "edgestream_orgs_subscribed {}",
            self.orgs_subscribed.get()
        );
        let _ = writeln!(
            s,
            "edgestream_events_published_total {}",
            self.events_published.get()
        );
        let _ = writeln!(
            s,
            "edgestream_publish_requests_total {}",
            self.publish_requests.get()
        );
        let _ = writeln!(
            s,
            "edgestream_publish_duplicates_total {}",
            self.publish_duplicates.get()
        );
        let _ = writeln!(
            s,
            "edgestream_publish_rejected_total {}",
            self.publish_rejected.get()
        );
        for (code, n) in self.closes() {
            let _ = writeln!(s, "edgestream_sessions_closed_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(s, "edgestream_log_orgs {}", log.orgs);
        let _ = writeln!(s, "edgestream_log_events {}", log.events);
        let _ = writeln!(s, "edgestream_log_bytes {}", log.bytes);
        let _ = writeln!(s, "edgestream_draining {}", u8::from(draining));
        s
    }

    /// The same figures as JSON.
    pub fn to_json(&self, log: LogUsage, draining: bool) -> Value {
        let per = |f: fn(&TransportMetrics) -> u64| {
            let mut m = serde_json::Map::new();
            for t in Transport::ALL {
                m.insert(t.label().into(), json!(f(self.transport(t))));
            }
            Value::Object(m)
        };
        json!({
            "sessions": per(|m| m.sessions.get()),
            "sessions_opened": per(|m| m.sessions_opened.get()),
            "events_delivered": per(|m| m.events_delivered.get()),
            "events_replayed": per(|m| m.events_replayed.get()),
            "heartbeats_sent": per(|m| m.heartbeats_sent.get()),
            "orgs_subscribed": self.orgs_subscribed.get(),
            "events_published": self.events_published.get(),
            "publish_requests": self.publish_requests.get(),
            "publish_duplicates": self.publish_duplicates.get(),
            "publish_rejected": self.publish_rejected.get(),
            "sessions_closed": self.closes().into_iter().map(|(c, n)| (c.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "log": {"orgs": log.orgs, "events": log.events, "bytes": log.bytes},
            "draining": draining,
        })
    }
}
