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
    version,
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

fn main() -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    cmd = cmd.mut_subcommand("serve", with_env);
    let cli = Cli::from_arg_matches(&cmd.get_matches())?;
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(t) => {
            let exp = edgestream::time::unix_secs() + t.ttl.0.as_secs();
            let claims = Claims {
                sub: t.sub,
                exp,
                nbf: None,
                orgs: t.orgs,
                scope: Some(t.scope),
                iss: t.issuer,
                aud: t.audience,
            };
            println!("{}", mint_hs256(t.secret.as_bytes(), &claims));
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args).map_err(anyhow::Error::msg)?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let server = Server::bind(config).await?;
        server.run(shutdown_signal()).await
    })?;
    // Tasks left after the drain timeout must not hold the process.
    runtime.shutdown_timeout(Duration::from_millis(500));
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGESTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // Libraries that write secrets when asked for detail are capped, whatever the filter:
        // web-transport-quinn logs CONNECT URLs (access_token included) at debug, tungstenite
        // dumps every frame's payload (REFRESH tokens included) at trace. tests/secrets.rs
        // checks a trace-level run for tokens.
        .add_directive("web_transport_quinn=info".parse().expect("valid directive"))
        .add_directive("tungstenite=debug".parse().expect("valid directive"))
        .add_directive("tokio_tungstenite=debug".parse().expect("valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
