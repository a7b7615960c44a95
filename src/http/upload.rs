//! `PUT /v1/orgs/{org}/uploads?name=N` (streamed body; `Upload-Id` + `Upload-Offset` to resume,
//! or `Upload-Id` alone to name a new upload so its progress can be read while it runs) and
//! `GET /v1/uploads/{id}` (PROTOCOL.md section 9).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::{authenticate, org_param, ApiError};
use crate::app::App;
use crate::close::Refusal;
use crate::model::OrgId;
use crate::upload::{UploadError, UploadRequest, Uploads};

#[derive(Deserialize)]
pub(super) struct UploadQuery {
    name: Option<String>,
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        let status = match &e {
            UploadError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            UploadError::Offset { .. } | UploadError::Busy(_) => StatusCode::CONFLICT,
            UploadError::NotFound => StatusCode::NOT_FOUND,
            UploadError::Incomplete { .. } | UploadError::Invalid(_) => StatusCode::BAD_REQUEST,
            UploadError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

fn uploads(app: &App) -> Result<&Arc<Uploads>, ApiError> {
    app.env.uploads.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "uploads are not enabled on this node (--upload-dir)",
        )
    })
}

pub(super) async fn put(
    State(app): State<Arc<App>>,
    Path(org): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let org = org_param(&org)?;
    let grant = authenticate(&app, &headers, uri.query())?;
    grant.check_upload(&org).map_err(Refusal::from)?;
    let uploads = uploads(&app)?;
    let header = |name: &str| headers.get(name).map(|v| v.as_bytes());
    let req = UploadRequest::parse(
        q.name.as_deref(),
        header("upload-id"),
        header("upload-offset"),
        header("content-length"),
    )?;
    let (id, offset, length, name) = (req.id.as_deref(), req.offset, req.length, &req.name);
    // A new upload's size is its Content-Length; a resumed one's is known already.
    let size = if offset == 0 { length } else { None };
    if offset == 0 && size.is_none() {
        return Err(ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "a new upload needs Content-Length",
        ));
    }
    let mut writer = uploads
        .begin(&org, name, size, &grant.sub, id, offset)
        .await?;
    if let Some(len) = length {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > writer.size())
        {
            return Err(UploadError::TooLarge(format!(
                "{} bytes from offset {offset} exceed the upload's {}",
                len,
                writer.size()
            ))
            .into());
        }
    }
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| super::body_error("upload interrupted", &e))?;
        writer.write(&chunk).await?;
    }
    let view = writer.finish().await?;
    crate::session::upload_completed(&app.env, &view)
        .await
        .map_err(ApiError::from)?;
    Ok((StatusCode::CREATED, Json(json!(view))).into_response())
}

pub(super) async fn status(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = authenticate(&app, &headers, uri.query())?;
    // An upload of an org the token does not name reads as missing: ids are not an oracle.
    let view = uploads(&app)?
        .status(&id)
        .filter(|v| OrgId::parse(&v.org).is_ok_and(|org| grant.check_upload_record(&org).is_ok()))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such upload"))?;
    Ok(Json(json!(view)))
}
