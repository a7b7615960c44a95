//! # edgestream
//!
//! An edge streaming server: publishers POST events for an org, the server sequences them,
//! keeps them in a replay log and pushes them in order to every connected client, over
//! WebTransport or WebSocket. See ARCHITECTURE.md for the data path.
//!
//! # Layout
//! - [`model`]: org ids, epochs, positions (validated once at the edge).
//! - [`event`]: a sequenced event and its wire encodings, computed once and shared.
//! - [`log`]: the sequencer and replay log behind the [`log::EventLog`] trait; in-memory backbone.
//! - [`hub`]: one upstream subscription per org, fan-out to session queues, per-org cursors.
//! - [`auth`]: JWT verification and org grants.
//! - [`session`]: the `/v1/stream` query, and the sessions of each transport.
//! - [`close`]: close codes and the one mapping from errors to codes and HTTP statuses.
//! - [`metrics`]: counters and gauges, Prometheus and JSON.
//! - [`time`]: the wall clock, read only at the edges.
//! - [`tls`]: the self-signed development certificate for QUIC and its hash.
//! - [`heap`]: freed heap memory handed back to the OS when much of it is free.
//! - [`config`], [`server`], [`http`]: configuration, wiring and the HTTP API.

pub mod app;
pub mod auth;

/// What was built: the crate version, the git commit and the build date (build.rs).
pub mod build {
    pub const VERSION: &str = env!("CARGO_PKG_VERSION");
    pub const COMMIT: &str = env!("BUILD_INFO_GIT_COMMIT");
    pub const DATE: &str = env!("BUILD_INFO_DATE");
    /// `0.1.0 (commit 1a2b3c4d5e6f, built 2026-11-30)`.
    pub const LONG_VERSION: &str = concat!(
        env!("CARGO_PKG_VERSION"),
        " (commit ",
        env!("BUILD_INFO_GIT_COMMIT"),
        ", built ",
        env!("BUILD_INFO_DATE"),
        ")"
    );
}
pub mod close;
pub mod config;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod http;
pub mod hub;
pub mod log;
pub mod metrics;
pub mod model;
pub mod note;
pub mod peers;
pub mod presence;
pub mod server;
pub mod session;
pub mod time;
pub mod tls;
pub mod upload;
pub mod webtransport;
