//! The command line. Every flag can also come from the environment (`CACHEDRIVER_*`), which is
//! how `docker plugin set` passes settings to a managed plugin.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};

use crate::backend::BackendChoice;
use crate::driver::{Config, Driver};
use crate::names::CommitMode;
use crate::store::Store;

/// Default store root.
pub const DEFAULT_ROOT: &str = "/var/lib/cachedriver";
/// Default socket: where Docker finds legacy plugins.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/cachedriver.sock";

/// cachedriver: copy-on-write cache volumes for Docker and Podman.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Docker volume plugin protocol.
    Serve {
        /// Store root (layers, sessions, volume registry).
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Unix socket to listen on.
        #[arg(long, env = "CACHEDRIVER_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Backend for new sessions: auto probes kernel overlayfs, then FUSE.
        #[arg(long, env = "CACHEDRIVER_BACKEND", value_enum, default_value = "auto")]
        backend: BackendChoice,
        /// Commit mode for volumes that do not set `-o commit=`.
        #[arg(
            long,
            env = "CACHEDRIVER_COMMIT",
            value_enum,
            default_value = "replace"
        )]
        commit: CommitMode,
    },
    /// Try each backend here and say which one `auto` picks.
    Probe {
        /// Store root, where the probe mounts are made.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List caches (latest, layer chain, sizes) and volumes with their sessions.
    Ls {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHEDRIVER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Raises RLIMIT_NOFILE before serving: removing and walking container trees, and many
/// sessions at once, must not stop at the default 1024 descriptors.
fn raise_nofile_limit() {
    match cachedriver_common::rlimit::raise_nofile() {
        Ok(l) => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard_before = l.hard_before,
            hard = l.hard,
            "RLIMIT_NOFILE raised"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
}

fn own_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding our own binary (needed to start FUSE servers)")
}

/// Runs the command line; `args` includes the program name.
pub fn run(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let cli = Cli::parse_from(args);
    init_logging();
    let _failpoints = crate::failpoint::setup();
    match cli.command {
        Command::Serve {
            root,
            socket,
            backend,
            commit,
        } => {
            raise_nofile_limit();
            let exe = own_exe()?;
            let store =
                Store::open(&root).with_context(|| format!("opening store {}", root.display()))?;
            let kind =
                crate::probe::resolve(backend, store.root(), &exe).map_err(|e| anyhow!(e))?;
            let driver = Arc::new(Driver::new(
                store,
                Config {
                    backend: kind,
                    commit,
                    exe,
                },
            )?);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async move {
                let listener = crate::server::bind(&socket)?;
                tracing::info!(socket = %socket.display(), root = %root.display(), backend = kind.as_str(),
                    commit = commit.as_str(), "serving");
                crate::server::serve(listener, &socket, driver, shutdown_signal()).await
            })
        }
        Command::Probe { root, json } => {
            let report = crate::probe::probe(&root, &own_exe()?);
            if json {
                println!("{}", report.to_json());
                return Ok(());
            }
            print!("{report}");
            report
                .pick(BackendChoice::Auto)
                .map(|_| ())
                .map_err(|e| anyhow!(e))
        }
        Command::Ls { root } => {
            let store =
                Store::open(&root).with_context(|| format!("opening store {}", root.display()))?;
            print!("{}", crate::ls::render(&store)?);
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
