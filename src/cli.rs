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
        /// Seconds after a Mount during which a view no container has yet still counts as used
        /// (the engine mounts it into the container after our reply).
        #[arg(long, env = "CACHEDRIVER_ORPHAN_GRACE", default_value_t = crate::driver::DEFAULT_ORPHAN_GRACE.as_secs())]
        orphan_grace: u64,
        /// Seconds between sweeps that end sessions nobody uses (0: no sweep).
        #[arg(long, env = "CACHEDRIVER_SWEEP_INTERVAL", default_value_t = 60)]
        sweep_interval: u64,
    },
    /// List live sessions with who uses them (namespaces, containers, pids), from the kernel.
    Sessions {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End one volume's session now (unmount and commit per its mode); refused while a container
    /// or process still uses it.
    End {
        /// The volume.
        volume: String,
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Throw the session's writes away instead of committing them.
        #[arg(long)]
        discard: bool,
        /// Commit mode for volumes that do not set `-o commit=` (as the server's `--commit`).
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
            orphan_grace,
            sweep_interval,
        } => {
            let exe = own_exe()?;
            let store =
                Store::open(&root).with_context(|| format!("opening store {}", root.display()))?;
            let kind =
                crate::probe::resolve(backend, store.root(), &exe).map_err(|e| anyhow!(e))?;
            let driver = Arc::new(
                Driver::open(
                    store,
                    Config {
                        backend: kind,
                        commit,
                        exe,
                    },
                )
                .with_orphan_grace(std::time::Duration::from_secs(orphan_grace)),
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async move {
                let listener = crate::server::bind(&socket)?;
                tracing::info!(socket = %socket.display(), root = %root.display(), backend = kind.as_str(),
                    commit = commit.as_str(), "serving");
                // Recovery after binding (the engine's calls wait on the per-cache locks, never on
                // a slow recovery of another cache), then the sweep.
                crate::server::spawn_maintenance(
                    driver.clone(),
                    std::time::Duration::from_secs(sweep_interval),
                );
                crate::server::serve(listener, &socket, driver, shutdown_signal()).await
            })
        }
        Command::Sessions { root, json } => {
            let d = offline_driver(&root, CommitMode::Replace)?;
            let list = d.sessions().map_err(|e| anyhow!(e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.is_empty() {
                println!("no sessions");
            }
            for s in list {
                let state = if s.users.in_use() {
                    format!("used by {}", s.users.describe())
                } else if s.users.mounted {
                    "unused (ended by the next sweep, Mount or Remove)".into()
                } else {
                    "view not mounted (ended at startup or next Mount)".into()
                };
                println!(
                    "{}\tcache={}\tbackend={}\tmounts={:?}\tstarted={}{}\t{}",
                    s.volume,
                    s.cache,
                    s.backend,
                    s.mounts,
                    s.started_at,
                    s.committing
                        .map(|c| format!("\tcommitting={c}"))
                        .unwrap_or_default(),
                    state
                );
            }
            Ok(())
        }
        Command::End {
            volume,
            root,
            discard,
            commit,
        } => {
            let d = offline_driver(&root, commit)?;
            match d.end(&volume, discard).map_err(|e| anyhow!(e))? {
                None => println!("{volume}: no session"),
                Some(o) => println!("{volume}: session ended: {o:?}"),
            }
            Ok(())
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

/// A driver for a one-shot command next to (or instead of) a server: no recovery, no probe
/// (ending a session uses the backend that mounted it).
fn offline_driver(root: &std::path::Path, commit: CommitMode) -> anyhow::Result<Driver> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    Ok(Driver::open(
        store,
        Config {
            backend: crate::backend::BackendKind::Kernel,
            commit,
            exe: own_exe()?,
        },
    ))
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
