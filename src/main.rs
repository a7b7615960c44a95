//! The `edgestream` command: `serve` runs a node, `token` mints an HS256 token.
//! Holds no protocol code: it parses flags and hands them to the library.

use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use edgestream::auth::{mint_hs256, Claims};
use edgestream::config::{with_env, Config, HumanDuration, LogFormat, ServeArgs};
use edgestream::server::Server;

#[derive(Parser)]
#[command(
    name = "edgestream",
    version = edgestream::build::LONG_VERSION,
    about = "Edge streaming server: ordered per-org events over WebTransport and WebSocket"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (embedded in-memory log unless configured otherwise).
    Serve(Box<ServeArgs>),
    /// Print an HS256 token for testing and scripts.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The HS256 secret the server uses (--jwt-secret).
    #[arg(long, env = "EDGESTREAM_JWT_SECRET")]
    secret: String,
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// An org to grant; repeat for more; `*` grants every org for publishing.
    #[arg(long = "org", required = true)]
    orgs: Vec<String>,
    /// Space-separated scopes: subscribe, publish.
    #[arg(long, default_value = "subscribe")]
    scope: String,
    /// Lifetime.
    #[arg(long, default_value = "1h")]
    ttl: HumanDuration,
    /// `iss` claim.
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim.
    #[arg(long)]
    audience: Option<String>,
}

/// The heap profiler's allocator, only in a `--features dhat-heap` build.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::new_heap();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<std::process::ExitCode> {
    let mut cmd = Cli::command();
    cmd = cmd.mut_subcommand("serve", with_env);
    // Every variable `serve` reads, so a misspelt one (EDGESTREAM_JWT_SECERT) is reported.
    let known: Vec<String> = cmd
        .find_subcommand("serve")
        .into_iter()
        .flat_map(|c| c.get_arguments())
        .filter_map(|a| a.get_env()?.to_str().map(str::to_owned))
        .chain(["EDGESTREAM_LOG".to_owned()])
        .collect();
    let cli = Cli::from_arg_matches(&cmd.get_matches())?;
    match cli.command {
        Command::Serve(args) => Ok(serve(*args, &known)),
        Command::Token(t) => {
            if t.secret.len() < edgestream::auth::MIN_SECRET_BYTES {
                eprintln!(
                    "warning: the secret has {} bytes; the server refuses secrets shorter than {}",
                    t.secret.len(),
                    edgestream::auth::MIN_SECRET_BYTES
                );
            }
            if !t.scope.split(' ').any(|s| s == "publish") {
                eprintln!("note: a token without the publish scope cannot publish (--scope \"subscribe publish\")");
            }
            let exp = edgestream::time::unix_secs() + t.ttl.0.as_secs();
            let claims = Claims {
                sub: t.sub,
                exp,
                nbf: None,
                orgs: t.orgs,
                scope: Some(t.scope),
                iss: t.issuer,
                aud: t.audience.map(edgestream::auth::Audience::One),
            };
            println!("{}", mint_hs256(t.secret.as_bytes(), &claims));
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// Runs a node; every error that stops it is logged in the configured format (JSON lines with
/// `--log-format json`), then the exit code is 1.
fn serve(args: ServeArgs, known_env: &[String]) -> std::process::ExitCode {
    // The format from the flag or variable, for errors before the configuration is complete.
    let early_format = args.log_format.unwrap_or_default();
    match serve_inner(args, known_env) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err((logging, e)) => {
            if !logging {
                init_logging(early_format);
            }
            tracing::error!(error = %format!("{e:#}"), "edgestream cannot run");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error, and whether logging was set up when it happened.
fn serve_inner(args: ServeArgs, known_env: &[String]) -> Result<(), (bool, anyhow::Error)> {
    let unknown: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("EDGESTREAM_") && !known_env.contains(k))
        .collect();
    // Every connection is a file descriptor: take the hard limit (as Go's runtime and nginx's
    // worker_rlimit_nofile do); --max-connections defaults below it.
    let nofile = rlimit::increase_nofile_limit(u64::MAX);
    let config = Config::load(args).map_err(|e| {
        let e = match unknown.is_empty() {
            true => anyhow::Error::msg(e),
            false => anyhow::anyhow!("{e} (unknown variables ignored: {})", unknown.join(", ")),
        };
        (false, e)
    })?;
    init_logging(config.log_format);
    if let Err(e) = nofile {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    for var in unknown {
        tracing::warn!(%var, "unknown EDGESTREAM_ variable ignored (misspelt? `edgestream serve --help` lists every flag and its variable)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| (true, e.into()))?;
    runtime
        .block_on(async move {
            let server = Server::bind(config).await?;
            server.run(shutdown_signal()).await
        })
        .map_err(|e| (true, e))?;
    // Tasks left after the drain timeout must not hold the process.
    runtime.shutdown_timeout(Duration::from_millis(500));
    Ok(())
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGESTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Libraries that write secrets when asked for detail are capped, whatever the filter
    // (a second filter: an event passes only if both let it through, so a cap never raises
    // a level): web-transport-quinn logs CONNECT URLs (access_token included) at debug,
    // tungstenite dumps every frame's payload (REFRESH tokens included) at trace.
    // tests/secrets.rs checks a trace-level run for tokens, and a default run for these crates.
    //
    // The caps' default is the filter's own most detailed level, not TRACE: the combined
    // filter's level hint sets the `log` crate's max level (tungstenite logs through `log`),
    // and with TRACE every frame's `log::trace!` reached the filters: about 20% of the
    // server's CPU in a WebSocket fan-out (perf, before this change).
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let caps = Targets::new()
        .with_default(most)
        .with_target("web_transport_quinn", most.min(LevelFilter::INFO))
        .with_target("tungstenite", most.min(LevelFilter::DEBUG))
        .with_target("tokio_tungstenite", most.min(LevelFilter::DEBUG));
    let registry = tracing_subscriber::registry().with(filter).with(caps);
    // Colours only on a terminal: journald and files get plain text.
    use std::io::IsTerminal as _;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c().await.context("ctrl-c handler").ok();
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
