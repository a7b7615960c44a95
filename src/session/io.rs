//! The I/O a session core asks for ([`Request`], [`Read`]), made the same way for both
//! transports: subscriptions through the hub, appends and reads on the log, presence, uploads.
//! Nothing here decides anything about the protocol; it makes the call and hands the answer
//! back.

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use super::core::{Read, Request, Response, SessionCore, StreamId};
use super::SessionEnv;
use crate::hub::{Overflow, Sink};
use crate::log::{LogError, ReadOutcome};

/// What a session's I/O needs: the environment and the session's sink (where the hub pushes
/// its live items).
pub struct SessionIo {
    env: Arc<SessionEnv>,
    sink: Sink,
}

impl SessionIo {
    /// The session's I/O and its queue: `queue` live items at most, then `overflow` is raised.
    pub fn new(env: Arc<SessionEnv>) -> (Self, crate::hub::Queue, Arc<Overflow>) {
        let (sink, rx, overflow) = Sink::bounded(env.limits.queue);
        (SessionIo { env, sink }, rx, overflow)
    }

    /// Makes every request the core has, in order, handing each answer back.
    pub async fn drive(&self, core: &mut SessionCore) {
        while let Some(req) = core.poll_request() {
            // Boxed: the request futures (a subscribe, a Redis append, a presence join) are
            // large, and inline they made every session's task that much larger for its whole
            // life, though a session makes requests only now and then.
            let resp = Box::pin(self.perform(req)).await;
            core.handle_response(resp, Instant::now());
        }
    }

    /// Makes one request.
    pub async fn perform(&self, req: Request) -> Response {
        let env = &self.env;
        match req {
            Request::Subscribe {
                org,
                since,
                initial,
                enter,
            } => {
                let result = env.hub.subscribe(&org, since.as_ref(), &self.sink).await;
                // Present (and listening) once subscribed: a snapshot finds the org's sub.
                let member = match (&result, enter) {
                    (Ok(_), Some(e)) => {
                        let listen = e.listen.then_some(&self.sink);
                        Some(env.presence.enter(&org, &e.user, listen))
                    }
                    _ => None,
                };
                Response::Subscribed {
                    org,
                    initial,
                    result,
                    member,
                }
            }
            Request::Chat {
                org,
                room,
                id,
                payload,
                key,
            } => {
                let result = env.hub.append(&org, vec![payload], Some(&key)).await;
                Response::Chatted {
                    org,
                    room,
                    id,
                    result,
                }
            }
            Request::Join { org, room, user } => {
                let member = env.presence.join(&org, &room, &user, &self.sink).await;
                Response::Joined { member }
            }
            Request::UploadBegin {
                org,
                name,
                size,
                from,
                id,
                offset,
            } => {
                let Some(uploads) = env.uploads.as_ref() else {
                    let e = crate::upload::UploadError::Invalid("uploads are not enabled".into());
                    return Response::UploadBegun(Err(e));
                };
                Response::UploadBegun(
                    uploads
                        .begin(&org, &name, size, &from, id.as_deref(), offset)
                        .await
                        .map(Box::new),
                )
            }
            Request::UploadWrite {
                mut writer,
                bytes,
                finish,
            } => {
                let upload_id = writer.id().to_string();
                if let Err(e) = writer.write(&bytes).await {
                    return Response::UploadWritten {
                        upload_id,
                        writer: None,
                        done: None,
                        result: Err(super::upload_refusal(e)),
                    };
                }
                if !finish || writer.received() < writer.size() {
                    return Response::UploadWritten {
                        upload_id,
                        writer: Some(writer),
                        done: None,
                        result: Ok(()),
                    };
                }
                let result = async {
                    let view = (*writer).finish().await.map_err(super::upload_refusal)?;
                    super::upload_completed(env, &view).await?;
                    Ok(view)
                }
                .await;
                match result {
                    Ok(view) => Response::UploadWritten {
                        upload_id,
                        writer: None,
                        done: Some(Box::new(view)),
                        result: Ok(()),
                    },
                    Err(r) => Response::UploadWritten {
                        upload_id,
                        writer: None,
                        done: None,
                        result: Err(r),
                    },
                }
            }
        }
    }

    /// A catch-up read as a future of its own (it borrows nothing), so that a driver can go on
    /// with other work while the log answers.
    pub fn read(
        &self,
        r: Read,
    ) -> impl Future<Output = (StreamId, Result<ReadOutcome, LogError>)> + Send + 'static {
        let log = self.env.hub.log().clone();
        async move { (r.stream, log.read(&r.org, &r.after, r.limit).await) }
    }
}
