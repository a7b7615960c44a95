//! `POST /v1/orgs/{org}/events`: one event (a JSON object) or a batch (an array of objects),
//! appended atomically with consecutive seqs; `Idempotency-Key` answers a repeat from the log.
//!
//! `POST /v1/events`: events for many orgs in one request (`[{"org": .., "events": ..}, ..]`),
//! each org's appended as `POST /v1/orgs/{org}/events` would; refused whole (nothing stored)
//! when any part is invalid or not allowed.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, value::RawValue};

use super::{authenticate, org_param, ApiError};
use crate::app::App;
use crate::close::Refusal;
use crate::log::{Appended, LogError};
use crate::model::OrgId;

/// Idempotency keys longer than this are refused.
const MAX_IDEMPOTENCY_KEY: usize = 256;

pub(super) async fn publish(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    req: Request,
) -> Response {
    app.env.metrics.publish_requests.inc();
    match publish_inner(&app, &org, req).await {
        Ok(r) => r,
        Err(e) => {
            app.env.metrics.publish_rejected.inc();
            e.into_response()
        }
    }
}

async fn publish_inner(app: &App, org: &str, req: Request) -> Result<Response, ApiError> {
    let org = org_param(org)?;
    let (parts, body) = req.into_parts();
    let grant = authenticate(app, &parts.headers, parts.uri.query())?;
    grant.check_publish(&org).map_err(Refusal::from)?;
    let key = idempotency_key(&parts.headers)?;
    let body = read_body(body, app.config.max_request_bytes).await?;
    let payloads = split_events(&body, app.config.max_event_bytes)?;
    let count = payloads.len() as u64;
    let appended = app
        .env
        .hub
        .append(&org, payloads, key)
        .await
        .map_err(|e| append_error(&org, e))?;
    let status = if count_appended(app, &appended, count) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(appended_body(&org, &appended))).into_response())
}

/// Counts one org's append in the metrics; whether it stored events (not a repeat answered
/// from its Idempotency-Key).
fn count_appended(app: &App, appended: &Appended, events: u64) -> bool {
    if appended.duplicate {
        app.env.metrics.publish_duplicates.inc();
    } else {
        app.env.metrics.events_published.inc_by(events);
    }
    !appended.duplicate
}

/// What a publish answers for one org.
fn appended_body(org: &OrgId, appended: &Appended) -> serde_json::Value {
    json!({
        "org": org.as_str(),
        "epoch": appended.epoch.as_str(),
        "first_seq": appended.first_seq,
        "last_seq": appended.last_seq,
    })
}

fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
            .map(Some)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key must be 1 to 256 visible ASCII chars",
                )
            }),
    }
}

fn append_error(org: &OrgId, e: LogError) -> ApiError {
    match e {
        LogError::Unavailable(m) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("log unavailable, not stored: {m}"),
        ),
        LogError::Indeterminate(m) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "outcome unknown: the log did not answer in time, the events may have been \
                 stored; retry with the same Idempotency-Key to store them exactly once ({m})"
            ),
        ),
        LogError::Internal(m) => {
            tracing::error!(org = %org, error = %m, "append failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

/// Orgs one `POST /v1/events` may name.
pub const MAX_BATCH_ORGS: usize = 1_000;

/// One entry of a multi-org publish: an org and its event or events, kept as raw bytes.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgEvents<'a> {
    #[serde(borrow)]
    org: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    events: &'a RawValue,
}

pub(super) async fn publish_batch(State(app): State<Arc<App>>, req: Request) -> Response {
    app.env.metrics.publish_requests.inc();
    match publish_batch_inner(&app, req).await {
        Ok(r) => r,
        Err(e) => {
            app.env.metrics.publish_rejected.inc();
            e.into_response()
        }
    }
}

/// Everything is checked (orgs, grant, every event) before anything is appended; then the
/// orgs are appended concurrently, each atomically. The answer lists every org's result in
/// the request's order: 201 when every org's events were stored (200 when every org answered
/// from its Idempotency-Key), else the status of the first org that failed, with the results
/// of the others, so a publisher knows what to retry.
async fn publish_batch_inner(app: &App, req: Request) -> Result<Response, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    let (parts, body) = req.into_parts();
    let grant = authenticate(app, &parts.headers, parts.uri.query())?;
    let key = idempotency_key(&parts.headers)?;
    let body = read_body(body, app.config.max_request_bytes).await?;
    let entries: Vec<OrgEvents<'_>> = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "expected [{{\"org\": ..., \"events\": ...}}, ...]: {e}"
        ))
    })?;
    if entries.is_empty() {
        return Err(bad("no orgs".into()));
    }
    if entries.len() > MAX_BATCH_ORGS {
        return Err(bad(format!(
            "{} orgs in one request, over the limit of {MAX_BATCH_ORGS}",
            entries.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    let mut batch = Vec::with_capacity(entries.len());
    for e in &entries {
        let org = org_param(&e.org)?;
        if !seen.insert(org.clone()) {
            return Err(bad(format!("org {org} is named twice")));
        }
        grant.check_publish(&org).map_err(Refusal::from)?;
        let payloads = split_events(e.events.get().as_bytes(), app.config.max_event_bytes)
            .map_err(|err| ApiError::new(err.status, format!("org {org}: {}", err.message)))?;
        batch.push((org, payloads));
    }
    drop(entries);
    let hub = &app.env.hub;
    let results = futures_util::future::join_all(batch.into_iter().map(|(org, payloads)| {
        let count = payloads.len() as u64;
        async move {
            let r = hub.append(&org, payloads, key).await;
            (org, count, r)
        }
    }))
    .await;
    let (mut failed, mut stored) = (None, false);
    let results: Vec<serde_json::Value> = results
        .into_iter()
        .map(|(org, count, r)| match r {
            Ok(a) => {
                stored |= count_appended(app, &a, count);
                let mut v = appended_body(&org, &a);
                v["duplicate"] = json!(a.duplicate);
                v
            }
            Err(e) => {
                let e = append_error(&org, e);
                failed.get_or_insert(e.status);
                json!({"org": org.as_str(), "status": e.status.as_u16(), "error": e.message})
            }
        })
        .collect();
    let status = match failed {
        Some(s) => {
            app.env.metrics.publish_rejected.inc();
            s
        }
        None if stored => StatusCode::CREATED,
        None => StatusCode::OK,
    };
    let mut body = json!({ "results": results });
    if failed.is_some() {
        body["error"] = json!("some orgs were not stored; see results");
    }
    Ok((status, Json(body)).into_response())
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {limit} bytes"),
            )
        } else {
            super::body_error("cannot read body", &e)
        }
    })
}

/// Splits a body into event payloads, each the exact bytes of one JSON object, each in an
/// allocation of its own.
///
/// Copied, not sliced: a slice of the body shares the body's buffer, which for a small
/// request is the HTTP connection's read buffer (8 KiB and more, holding the request's
/// headers, its token and its neighbours' bytes). The replay log keeps an event for minutes,
/// so each 100-byte event kept about 5 KiB alive, invisible to `--replay-max-bytes`
/// (`a_retained_event_costs_its_payload_not_its_request_buffer`). One copy per event on the
/// publish path buys memory that is what the log counts.
pub fn split_events(body: &[u8], max_event: usize) -> Result<Vec<Bytes>, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, m.to_string());
    let text = std::str::from_utf8(body).map_err(|_| bad("body is not UTF-8 JSON"))?;
    let trimmed = text.trim_start();
    let raws: Vec<&RawValue> = if trimmed.starts_with('[') {
        serde_json::from_str(text).map_err(|e| bad(&format!("not JSON: {e}")))?
    } else {
        vec![serde_json::from_str(text).map_err(|e| bad(&format!("not JSON: {e}")))?]
    };
    if raws.is_empty() {
        return Err(bad("empty batch"));
    }
    let mut out = Vec::with_capacity(raws.len());
    for raw in raws {
        let s = raw.get();
        if !s.starts_with('{') {
            return Err(bad("every event must be a JSON object"));
        }
        if s.len() > max_event {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("event of {} bytes over the limit of {max_event}", s.len()),
            ));
        }
        out.push(Bytes::copy_from_slice(s.as_bytes()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_objects_verbatim() {
        let body = Bytes::from_static(b" [ {\"a\": 1} ,{\"b\":[2, 3]}] ");
        let evs = split_events(&body, 100).unwrap();
        assert_eq!(
            evs,
            [
                Bytes::from_static(b"{\"a\": 1}"),
                Bytes::from_static(b"{\"b\":[2, 3]}")
            ]
        );
        let one = split_events(&Bytes::from_static(b"{\"x\" : \"y\"}\n"), 100).unwrap();
        assert_eq!(one, [Bytes::from_static(b"{\"x\" : \"y\"}")]);
    }

    #[test]
    fn refuses_non_objects_and_oversize() {
        for bad in [
            &b"[]"[..],
            b"[1]",
            b"\"s\"",
            b"{",
            b"nope",
            b"[{}, 2]",
            b"\xff",
        ] {
            assert_eq!(
                split_events(&Bytes::from(bad), 100).unwrap_err().status,
                StatusCode::BAD_REQUEST
            );
        }
        let big = Bytes::from(format!("{{\"a\":\"{}\"}}", "x".repeat(200)));
        assert_eq!(
            split_events(&big, 100).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
