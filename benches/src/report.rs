//! The report: the Markdown table and the latency CDF (SVG) from the figures.

use super::*;

/// The publish-to-receive latency CDF of each transport (at half the peak rate) as SVG.
pub(crate) fn latency_svg(r: &Value) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let series: Vec<(&str, &str, Vec<f64>)> = [
        ("ws_fanout", "#1f6feb", "WebSocket"),
        ("wt_fanout", "#2da44e", "WebTransport"),
    ]
    .iter()
    .map(|(k, color, label)| {
        let pts = r[*k]["latency_at_half_peak"]["cdf_us"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_f64)
                    .map(|us| us / 1000.0)
                    .collect()
            })
            .unwrap_or_default();
        (*label, *color, pts)
    })
    .collect();
    let max_ms = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .fold(1.0_f64, f64::max);
    let x = |ms: f64| pad + (w - 2.0 * pad) * ms / max_ms;
    let y = |q: f64| h - pad - (h - 2.0 * pad) * q;
    let (y0, x1, yl) = (y(0.0), x(max_ms), y(0.0) + 16.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">publish-to-receive latency CDF at half the peak rate</text>\n\
         <line x1=\"{pad}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{y0}\" x2=\"{pad}\" y2=\"{pad}\" stroke=\"black\"/>\n\
         <text x=\"{x1}\" y=\"{yl}\" text-anchor=\"end\">{max_ms:.1} ms</text>\n\
         <text x=\"{pad}\" y=\"{yl}\">0 ms</text><text x=\"8\" y=\"{pad}\">1.0</text><text x=\"8\" y=\"{y0}\">0</text>\n"
    );
    for (i, (label, color, pts)) in series.iter().enumerate() {
        let n = pts.len().max(2) - 1;
        let line: Vec<String> = pts
            .iter()
            .enumerate()
            .map(|(j, ms)| format!("{:.1},{:.1}", x(*ms), y(j as f64 / n as f64)))
            .collect();
        let (lx, ly) = (w - pad - 100.0, y(0.3) - 16.0 * i as f64);
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{lx}\" y=\"{ly}\" fill=\"{color}\">{label}</text>\n",
            line.join(" ")
        );
    }
    s + "</svg>\n"
}

pub(crate) fn markdown(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut s = String::from("| figure | edgestream | baseline | ratio |\n|---|---|---|---|\n");
    for name in ["ws_fanout", "wt_fanout"] {
        let x = &r[name];
        if x.is_null() {
            continue;
        }
        let all: Vec<String> = x["ratios"]
            .as_array()
            .map(|a| a.iter().map(|v| format!("{:.2}", f(v))).collect())
            .unwrap_or_default();
        s += &format!(
            "| {name} delivered/s (median of {} runs; ratios {}) | {:.0} | {:.0} | {:.2}x |\n| {name} server CPU us/delivered | {:.2} | {:.2} | |\n",
            all.len(), all.join(", "),
            f(&x["edgestream"]["delivered_per_sec"]), f(&x["baseline"]["delivered_per_sec"]), f(&x["ratio"]),
            f(&x["edgestream"]["server_cpu_us_per_delivered"]), f(&x["baseline"]["server_cpu_us_per_delivered"]),
        );
        let l = &x["latency_at_half_peak"]["us"];
        s += &format!(
            "| {name} latency at half the peak rate ({:.0} events/s), p50/p99/p999 (us) | {}/{}/{} | | |\n",
            f(&x["latency_at_half_peak"]["events_per_sec"]),
            l["p50"],
            l["p99"],
            l["p999"]
        );
    }
    if !r["replay"].is_null() {
        s += &format!(
            "| replay events/s | {:.0} | | |\n",
            f(&r["replay"]["events_per_sec"])
        );
    }
    if !r["redis_latency"].is_null() {
        let l = &r["redis_latency"]["latency_us"];
        s.push_str(&format!(
            "| publish on node A to delivery on node B through Redis, 200 events/s, p50 / p99 (ms) | {:.2} / {:.2} | | |\n",
            f(&l["p50"]) / 1000.0,
            f(&l["p99"]) / 1000.0
        ));
    }
    if !r["redis_orgs"].is_null() {
        let (o, e) = (&r["redis_orgs"]["redis"], &r["redis_orgs"]["embedded"]);
        s.push_str(&format!(
            "| {} orgs x 1 WebSocket subscriber on one node over Redis: Redis connections; idle CPU node / Redis (% of a core); one event to every org, last delivery (s) | {} ; {:.2} / {:.2} ; {:.2} | embedded log: idle node {:.2} ; {:.2} | |\n",
            o["orgs"],
            o["redis_connections"],
            f(&o["node_idle_cpu_percent"]),
            f(&o["redis_idle_cpu_percent"]),
            f(&o["deliver_all_seconds"]),
            f(&e["node_idle_cpu_percent"]),
            f(&e["deliver_all_seconds"])
        ));
    }
    if !r["redis_ingest"].is_null() {
        let ri = &r["redis_ingest"];
        s.push_str(&format!(
            "| ingest events/s over Redis (primary + 1 replica), batch 1 / batch 100 | {:.0} / {:.0} | | |\n",
            f(&ri["batch_1"]["events_per_sec"]),
            f(&ri["batch_100"]["events_per_sec"])
        ));
        s.push_str(&format!(
            "| the same with --redis-min-replicas 1, batch 1 / batch 100 | {:.0} / {:.0} | | |\n",
            f(&ri["min_replicas_1_batch_1"]["events_per_sec"]),
            f(&ri["min_replicas_1_batch_100"]["events_per_sec"])
        ));
    }
    if !r["ingest"].is_null() {
        s += &format!(
            "| ingest events/s, batch 1 | {:.0} | | |\n",
            f(&r["ingest"]["batch_1"]["events_per_sec"])
        );
        s += &format!(
            "| ingest events/s, batch 100 | {:.0} | | |\n",
            f(&r["ingest"]["batch_100"]["events_per_sec"])
        );
        for p in ["always", "batch", "never"] {
            s += &format!(
                "| ingest events/s with --data-dir --fsync {p}, batch 1 / batch 100 | {:.0} / {:.0} | | |\n",
                f(&r["ingest"][format!("fsync_{p}_batch_1")]["events_per_sec"]),
                f(&r["ingest"][format!("fsync_{p}_batch_100")]["events_per_sec"])
            );
        }
    }
    for size in ["128B", "4KiB"] {
        let w = &r["wire_bytes"][size];
        if w.is_null() {
            continue;
        }
        s += &format!(
            "| wire bytes/event, {size} JSON payload: binary / binary+brotli / json | {:.0} / {:.0} / {:.0} | | bin {:.2}x, br {:.2}x of json |\n",
            f(&w["binary"]), f(&w["binary_brotli"]), f(&w["json"]), f(&w["binary_vs_json"]), f(&w["binary_brotli_vs_json"])
        );
    }
    for t in ["websocket", "webtransport"] {
        let m = &r["idle_memory"][t];
        if m.is_null() {
            continue;
        }
        s += &format!(
            "| idle memory per {t} session ({} -> {} sessions) | {:.0} bytes | {:.0} bytes | {:.2}x |\n",
            m["low"],
            m["high"],
            f(&m["bytes_per_session"]),
            f(&m["baseline_bytes_per_session"]),
            f(&m["ratio"])
        );
    }
    for t in ["websocket", "webtransport"] {
        let p = &r["presence_storm"][t];
        if p.is_null() {
            continue;
        }
        let (h, n) = (&p["half"], &p["nobody"]);
        s += &format!(
            "| presence storm, {t}: {} users on one org connect, half with presence=1 (vs nobody opted in) | {:.2} s | {:.2} s | {:.2}x |\n",
            h["users"], f(&h["connect_seconds"]), f(&n["connect_seconds"]), f(&p["connect_ratio"])
        );
        s += &format!(
            "| presence storm, {t}: PRESENCE frames per opted-in client, mean / max (bound: intervals + snapshot) | {:.1} / {} | bound {} | |\n",
            f(&h["frames_mean"]), h["frames_max"], h["frames_bound"]
        );
        s += &format!(
            "| presence storm, {t}: PRESENCE bytes per opted-in client, mean / max; 4008 closes; node RSS | {:.0} / {} B; {}; {:.0} MiB | | |\n",
            f(&h["bytes_mean"]), h["bytes_max"], h["closed_4008"], f(&h["rss_bytes"]) / 1048576.0
        );
    }
    s += &scale_rows(r);
    s += &format!(
        "\nRun took {:.1} s (quick: {}).\n",
        f(&r["meta"]["duration_seconds"]),
        r["meta"]["quick"]
    );
    s
}

/// The figures at scale (scale.rs): each with the CPU of the server, the load workers and the
/// publishers, in cores, so that a figure says which side ran out.
fn scale_rows(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let cpu = |c: &Value| {
        format!(
            "server {:.2} / load {:.2} ({} procs) / publishers {:.2} cores",
            f(&c["server_cores"]),
            f(&c["load_cores"]),
            c["load_procs"],
            f(&c["publisher_cores"])
        )
    };
    let mut s = String::new();
    for t in ["websocket", "webtransport"] {
        let x = &r["fixed_latency"][t];
        if !x.is_null() {
            let b = &x["baseline"];
            s += &format!(
                "| {t}: {:.0} events/s of 128 B to {} subscribers, latency p50/p99/p999 (us) | {}/{}/{} | {} | |\n",
                f(&x["events_per_sec"]), x["subscribers"], x["us"]["p50"], x["us"]["p99"], x["us"]["p999"], cpu(&x["cpu"])
            );
            s += &format!(
                "| {t}: the same load from the bare library's broadcaster, p50/p99/p999 (us) | {}/{}/{} | {} | p99 {:.2}x the bare library's |\n",
                b["us"]["p50"], b["us"]["p99"], b["us"]["p999"], cpu(&b["cpu"]),
                f(&x["us"]["p99"]) / f(&b["us"]["p99"]).max(1.0)
            );
        }
    }
    for t in ["websocket", "webtransport"] {
        let x = &r["handshakes"][t];
        if !x.is_null() {
            s += &format!(
                "| {t}: {} sessions connect at once, handshakes/s | {:.0} | {}; UDP datagrams dropped at full receive buffers {} | |\n",
                x["sessions"],
                f(&x["per_sec"]),
                cpu(&x["cpu"]),
                x["udp_dropped"]
            );
        }
    }
    for log in ["memory", "redis"] {
        let x = &r["reconnect_storm"][log];
        if !x.is_null() {
            s += &format!(
                "| reconnect storm, {log} log: {} WebSocket sessions on {} orgs drop and resume at once; recovered p50/p99/all (s) | {:.2}/{:.2}/{:.2} | {} | |\n",
                x["sessions"], x["orgs"], f(&x["recovered_p50_us"]) / 1e6, f(&x["recovered_p99_us"]) / 1e6, f(&x["recovered_max_us"]) / 1e6, cpu(&x["cpu"])
            );
        }
    }
    if let Some(runs) = r["many_orgs"]["runs"].as_array() {
        for x in runs {
            s += &format!(
                "| many orgs: {} orgs x {} WebSocket subscribers, {} orgs per publish request, delivered/s; p99 (us) | {:.0}; {} | {} | |\n",
                x["orgs"], x["subscribers_per_org"], x["orgs_per_request"], f(&x["delivered_per_sec"]), x["us"]["p99"], cpu(&x["cpu"])
            );
        }
        s += &format!(
            "| many orgs: delivered/s of the most orgs against one org: one request per org / 100 orgs per request | {:.2}x / {:.2}x | | |\n",
            f(&r["many_orgs"]["ratio_many_to_one"]),
            f(&r["many_orgs"]["ratio_many_to_one_multi_org_requests"])
        );
    }
    let m = &r["org_memory"];
    if !m.is_null() {
        s += &format!(
            "| memory per org at {} orgs: one retained event / emptied by retention / as many other orgs later, emptied too (RSS bytes) | {:.0} / {:.0} / {:.0} | | |\n",
            m["orgs"], f(&m["bytes_per_org_one_event"]), f(&m["bytes_per_org_emptied"]), f(&m["bytes_per_org_second_round"])
        );
    }
    for t in ["websocket", "webtransport"] {
        let x = &r["idle_scale"][t];
        if !x.is_null() {
            s += &format!(
                "| {} idle {t} sessions: RSS per session; idle CPU; server CPU per heartbeat; RSS per session kept after all closed | {:.0} B; {}; {:.0} us; {:.0} B | | |\n",
                x["sessions"], f(&x["bytes_per_session"]), cpu(&x["idle"]), f(&x["server_cpu_us_per_heartbeat"]), f(&x["bytes_per_session_kept"])
            );
        }
    }
    s
}
