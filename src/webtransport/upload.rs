//! An upload stream (PROTOCOL.md section 9): a bidirectional stream that starts with
//! UPLOAD_BEGIN, then carries the file's raw bytes to its end; the server answers with
//! UPLOAD_PROGRESS as they land, then UPLOAD_DONE, or ERROR. The stream's flow control is the
//! backpressure: bytes are read only once the previous ones are on disk. The checks and the
//! progress cadence are the session core's ([`crate::session::core`]), as for uploads over a
//! WebSocket.

use std::sync::Arc;

use bytes::BytesMut;
use edgestream_codec::Frame;
use quinn::{RecvStream, SendStream};
use tokio::time::Instant;

use crate::close::{CloseCode, Refusal};
use crate::session::core::{progress, upload_checks, PROGRESS_BYTES, PROGRESS_EVERY};
use crate::session::{upload_completed, upload_refusal, SessionEnv};

/// Serves one upload stream to its end; a refusal is written as ERROR before the stream ends.
/// `on_read(n)`: `n` more bytes were read (the session's flow-control window).
pub async fn serve(
    env: Arc<SessionEnv>,
    grant: crate::auth::Grant,
    mut send: SendStream,
    mut recv: RecvStream,
    on_read: impl Fn(usize) + Sync,
) {
    if let Err(r) = upload(&env, &grant, &mut send, &mut recv, &on_read).await {
        let err = Frame::Error {
            code: r.code.code().into(),
            message: r.reason,
        };
        let _ = send.write_all(&err.to_bytes()).await;
    }
    let _ = send.finish();
}

fn closed() -> Refusal {
    Refusal::new(CloseCode::Protocol, "upload stream closed")
}

async fn upload(
    env: &SessionEnv,
    grant: &crate::auth::Grant,
    send: &mut SendStream,
    recv: &mut RecvStream,
    on_read: &(dyn Fn(usize) + Sync),
) -> Result<(), Refusal> {
    let mut buf = BytesMut::with_capacity(1024);
    let begin = loop {
        if let Some(f) = Frame::decode(&mut buf, env.limits.max_control_frame)? {
            break f;
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => {
                on_read(c.bytes.len());
                buf.extend_from_slice(&c.bytes)
            }
            _ => {
                return Err(Refusal::new(
                    CloseCode::Protocol,
                    "the stream ended before UPLOAD_BEGIN",
                ))
            }
        }
    };
    let Frame::UploadBegin {
        org,
        name,
        size,
        upload_id,
        offset,
        ..
    } = begin
    else {
        return Err(Refusal::new(
            CloseCode::Protocol,
            "an upload stream starts with UPLOAD_BEGIN",
        ));
    };
    // The stream count was checked when the stream arrived.
    let org = upload_checks(env, grant, &org, 0)?;
    let uploads = env.uploads.as_ref().expect("checked: uploads are enabled");
    let id = (!upload_id.is_empty()).then_some(upload_id.as_str());
    let size = (offset == 0).then_some(size);
    let mut w = uploads
        .begin(&org, &name, size, &grant.sub, id, offset)
        .await
        .map_err(upload_refusal)?;
    let (mut told_at, mut told_bytes) = (Instant::now(), w.received());
    let mut data = buf.split().freeze();
    loop {
        if !data.is_empty() {
            w.write(&data).await.map_err(upload_refusal)?;
        }
        let now = Instant::now();
        if w.received() - told_bytes >= PROGRESS_BYTES || now >= told_at + PROGRESS_EVERY {
            (told_at, told_bytes) = (now, w.received());
            let p = progress(w.id(), w.received(), w.size());
            send.write_all(&p).await.map_err(|_| closed())?;
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => {
                on_read(c.bytes.len());
                data = c.bytes
            }
            Ok(None) => break,
            // Reset or the session ended: the upload stays resumable at its offset.
            Err(_) => return Ok(()),
        }
    }
    let view = w.finish().await.map_err(upload_refusal)?;
    upload_completed(env, &view).await?;
    let _ = send
        .write_all(&progress(&view.id, view.size, view.size))
        .await;
    let done = Frame::UploadDone {
        upload_id: view.id.clone(),
        size: view.size,
        sha256: view.sha256.clone().unwrap_or_default(),
    };
    send.write_all(&done.to_bytes())
        .await
        .map_err(|_| closed())?;
    Ok(())
}
