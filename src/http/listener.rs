//! The TCP side of the HTTP listener: the accept loop, the connection cap and the timeouts a
//! slow or idle client meets (axum's own `serve` has none of them).
//!
//! - `--max-connections`: a permit per TCP connection, taken at accept. An upgraded WebSocket
//!   keeps its connection's permit for the session's life. When every permit is taken, a few
//!   reserve connections are still accepted (one request each, short deadlines): the health
//!   and metrics routes answer there, anything else gets 503 with a JSON reason. Past the
//!   reserve a connection is closed at once.
//! - header timeout (hyper's): a request head must arrive within it, counted from when the
//!   connection became ready for the request.
//! - idle timeout: a connection with no request in flight and no byte either way for this long
//!   is closed.
//! - body timeout ([`timed_body`]): a request body must arrive within it (uploads: no pause
//!   longer than it).
//! - accept errors (out of file descriptors, say) back off from 10 ms to 1 s and are logged
//!   at most once a second.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use super::ApiError;
use crate::metrics::Metrics;

/// Connections accepted beyond the cap, for the health routes.
const RESERVE: usize = 8;
/// Deadlines of a reserve connection (one request).
const RESERVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Routes served on reserve connections.
const HEALTH_ROUTES: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/v1/metrics"];

/// Limits of HTTP connections.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 100_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection's permit, handed to the request so an upgraded WebSocket can keep it.
#[derive(Clone, Default)]
pub struct ConnectionPermit(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl ConnectionPermit {
    /// Takes the permit (an upgraded connection holds it until its session ends).
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().take()
    }
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets every connection finish
/// its request in flight and returns when all have closed (upgraded WebSockets are not waited
/// for: their sessions are tracked by the caller).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let reserve = Arc::new(Semaphore::new(RESERVE));
    let conns = TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    let mut last_report: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                metrics.http_accept_errors.inc();
                if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    last_report = Some(Instant::now());
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (permit, spare) = match permits.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) => (p, true),
                Err(_) => {
                    metrics.http_connections_refused.inc();
                    drop(tcp);
                    continue;
                }
            },
        };
        if spare {
            metrics.http_connections_refused.inc();
        }
        if let Err(e) = tcp.set_nodelay(true) {
            // Events are small writes that must leave at once: no Nagle delay.
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let router = router.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            metrics.http_connections.inc();
            let c = Connection {
                peer,
                router,
                limits,
                spare,
                permit: ConnectionPermit(Arc::new(Mutex::new(Some(permit)))),
            };
            match tls {
                None => c.run(tcp, stop).await,
                // The handshake must finish within the header deadline (a client that opens
                // a connection and stalls holds a permit no longer than one that sends no
                // request).
                Some(tls) => {
                    let deadline = if spare {
                        RESERVE_TIMEOUT
                    } else {
                        limits.header_timeout
                    };
                    match tokio::time::timeout(deadline, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => c.run(stream, stop).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            metrics.http_connections.dec();
        });
    }
    conns.close();
    conns.wait().await;
}

/// Errors of one connection that never arrived, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

struct Connection {
    peer: SocketAddr,
    router: Router,
    limits: HttpLimits,
    /// A reserve connection: one request, health routes only.
    spare: bool,
    permit: ConnectionPermit,
}

impl Connection {
    /// Serves HTTP/1.1 on `stream` (TCP, or TLS over it).
    async fn run<S>(self, stream: S, stop: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let inflight = Arc::new(AtomicUsize::new(0));
        let io = TokioIo::new(TrackedIo {
            inner: stream,
            activity: activity.clone(),
        });
        let (spare, peer, permit, router) = (self.spare, self.peer, self.permit, self.router);
        let service = {
            let inflight = inflight.clone();
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let router = router.clone();
                let inflight = InFlight::enter(inflight.clone());
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req.extensions_mut().insert(permit.clone());
                async move {
                    let _inflight = inflight;
                    let req = req.map(Body::new);
                    if spare && !HEALTH_ROUTES.contains(&req.uri().path()) {
                        return Ok::<_, std::convert::Infallible>(too_many_connections());
                    }
                    router.oneshot(req).await
                }
            })
        };
        let (header_timeout, idle) = if spare {
            (RESERVE_TIMEOUT, RESERVE_TIMEOUT)
        } else {
            (self.limits.header_timeout, self.limits.idle_timeout)
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(!spare)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        // One timer per connection, armed for when it would fall idle and re-armed from the
        // last activity when it fires (not a periodic tick: 100,000 keep-alive connections
        // would otherwise wake 100,000 timers a second).
        let idle_check = tokio::time::sleep(idle);
        tokio::pin!(idle_check);
        let mut closing = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended with an error");
                    }
                    return;
                }
                _ = stop.cancelled(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = &mut idle_check, if !closing => {
                    let quiet = activity.idle_for();
                    if inflight.load(Ordering::Acquire) == 0 && quiet >= idle {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    } else {
                        // Busy (a request in flight) or active since: check again when it
                        // could next be idle.
                        let next = if quiet >= idle { idle } else { idle - quiet };
                        idle_check.as_mut().reset(Instant::now() + next);
                    }
                }
            }
        }
    }
}

fn too_many_connections() -> Response {
    let mut res = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many connections on this node; retry later",
    )
    .into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// Counts a request in flight on its connection while alive.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A socket that records when it last read or wrote a byte.
struct TrackedIo<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for TrackedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TrackedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
pub struct BodyTimeout(Duration);

/// Whether an error reading a request body (or its cause) was [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A request body that fails with [`BodyTimeout`] unless it arrives whole within `limit`
/// (with `pause_only`, unless no frame is more than `limit` after the previous one: uploads
/// may take long, but not stall).
pub fn timed_body(body: Body, limit: Duration, pause_only: bool) -> Body {
    Body::new(TimedBody {
        inner: body,
        sleep: Box::pin(tokio::time::sleep(limit)),
        limit,
        pause_only,
    })
}

struct TimedBody {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
    limit: Duration,
    pause_only: bool,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_frame(cx) {
            if self.pause_only && matches!(r, Some(Ok(_))) {
                let at = Instant::now() + self.limit;
                self.sleep.as_mut().reset(at);
            }
            return Poll::Ready(r.map(|f| f.map_err(Into::into)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(self.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
