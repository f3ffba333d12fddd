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
        /// Commit policy for volumes that set no `-o commit-on=`: `success` commits a session
        /// only if every container that used it exited 0 (needs the engine's event stream).
        #[arg(
            long,
            env = "CACHEDRIVER_COMMIT_ON",
            value_enum,
            default_value = "always"
        )]
        commit_on: crate::policy::CommitOn,
        /// With commit-on=success: what to do when how the containers ended is not known
        /// within 2 s of the Unmount.
        #[arg(
            long,
            env = "CACHEDRIVER_COMMIT_ON_UNKNOWN",
            value_enum,
            default_value = "discard"
        )]
        commit_on_unknown: crate::policy::OnUnknown,
        /// The engine's API socket, whose event stream tells which containers used a session
        /// and how they exited (Docker's, or Podman's Docker-compatible socket).
        #[arg(
            long,
            env = "CACHEDRIVER_ENGINE_SOCKET",
            default_value = "/var/run/docker.sock"
        )]
        engine_socket: PathBuf,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9477); off by default.
        #[arg(long, env = "CACHEDRIVER_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        /// Compact a cache's latest chain in the background once it is deeper than this.
        #[arg(long, env = "CACHEDRIVER_COMPACT_DEPTH", default_value_t = crate::compact::DEFAULT_DEPTH as u64,
            value_parser = clap::value_parser!(u64).range(1..=(crate::state::MAX_CHAIN as u64 - 1)))]
        compact_depth: u64,
        /// Cap on the disk all layers take (each inode once), e.g. 40M, 10G; over it, whole
        /// caches are evicted least recently used first, never one in use. Off by default.
        #[arg(long, env = "CACHEDRIVER_MAX_SIZE", value_parser = crate::budget::parse_size)]
        max_size: Option<u64>,
        /// Evict caches not used (Mount or commit) for this long, e.g. 12h, 7d; also drops
        /// volume records idle that long. Off by default.
        #[arg(long, env = "CACHEDRIVER_MAX_IDLE", value_parser = crate::budget::parse_duration)]
        max_idle: Option<std::time::Duration>,
        /// Share caches through this OCI repository (`HOST[:PORT]/PATH`): a cache's first
        /// session here starts from the remote snapshot, and every commit is pushed in the
        /// background. Off by default.
        #[arg(long, env = "CACHEDRIVER_REMOTE")]
        remote: Option<String>,
        /// Registry credentials in Docker's config.json format (default: ~/.docker/config.json).
        #[arg(long, env = "CACHEDRIVER_REMOTE_AUTH_FILE")]
        remote_auth_file: Option<PathBuf>,
        /// Allow plain HTTP to a registry that is not on loopback.
        #[arg(long, env = "CACHEDRIVER_REMOTE_INSECURE")]
        remote_insecure: bool,
        /// How long a first session waits for the remote snapshot before starting empty.
        #[arg(long, env = "CACHEDRIVER_REMOTE_TIMEOUT", default_value = "60s",
            value_parser = crate::budget::parse_duration)]
        remote_timeout: std::time::Duration,
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
    /// Flatten caches' latest chains now (all caches when none is named), then collect garbage.
    Compact {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Caches to compact.
        caches: Vec<String>,
    },
    /// Delete layers that no snapshot and no live session needs, and leftovers of crashes.
    Gc {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Only say what would be deleted and the space it would free.
        #[arg(long)]
        dry_run: bool,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop one cache (its state and every layer), or with CACHE:SCOPE one scope of it;
    /// refused while a session uses it.
    Rm {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// The cache, or CACHE:SCOPE.
        cache: String,
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
    /// Upload a cache's latest snapshot to an OCI registry (only the layers it lacks).
    Push {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
        /// The cache (`CACHE` or `CACHE:default`).
        cache: String,
        /// The repository, `HOST[:PORT]/PATH[:TAG]` (tag default: `CACHE.default`).
        repo: String,
    },
    /// Download a snapshot from an OCI registry and make it the cache's latest (only the
    /// layers this host lacks travel).
    Pull {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        #[command(flatten)]
        remote: RemoteArgs,
        /// The repository, `HOST[:PORT]/PATH[:TAG]` (tag default: `CACHE.default`).
        repo: String,
        /// The cache (`CACHE` or `CACHE:default`).
        cache: String,
    },
    /// List caches (latest, layer chain, sizes) and volumes with their sessions.
    Ls {
        /// Store root.
        #[arg(long, env = "CACHEDRIVER_ROOT", default_value = DEFAULT_ROOT)]
        root: PathBuf,
        /// Print the listing as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How to reach a registry (push, pull).
#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// Registry credentials in Docker's config.json format (default: ~/.docker/config.json).
    #[arg(long, env = "CACHEDRIVER_REMOTE_AUTH_FILE")]
    remote_auth_file: Option<PathBuf>,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[arg(long, env = "CACHEDRIVER_REMOTE_INSECURE")]
    remote_insecure: bool,
    /// Blobs moved at once.
    #[arg(long, default_value_t = 4)]
    remote_jobs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl RemoteArgs {
    fn access(&self) -> crate::remote::Access {
        crate::remote::Access {
            auth_file: self.remote_auth_file.clone(),
            insecure: self.remote_insecure,
            concurrency: self.remote_jobs.max(1),
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHEDRIVER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // dockerd logs a managed plugin's stderr at level=error and its stdout at level=info.
    if std::env::var_os("CACHEDRIVER_MANAGED").is_some_and(|v| v == "1") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stdout)
            .with_ansi(false)
            .try_init();
        return;
    }
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
    // `docker plugin set NAME CACHEDRIVER_MAX_SIZE=` (and the managed plugin's declared
    // defaults) pass settings as empty strings: empty means unset, not an invalid value.
    // Still single-threaded here, so changing the environment is sound.
    for (k, v) in std::env::vars_os() {
        if v.is_empty() && k.to_string_lossy().starts_with("CACHEDRIVER_") {
            std::env::remove_var(&k);
        }
    }
    let cli = Cli::parse_from(args);
    init_logging();
    let _failpoints = crate::failpoint::setup();
    match cli.command {
        Command::Serve {
            root,
            socket,
            backend,
            commit,
            commit_on,
            commit_on_unknown,
            engine_socket,
            compact_depth,
            max_size,
            max_idle,
            metrics,
            orphan_grace,
            sweep_interval,
            remote,
            remote_auth_file,
            remote_insecure,
            remote_timeout,
        } => {
            if let Some(repo) = remote {
                crate::remote::auto::install(crate::remote::auto::Auto {
                    repo,
                    access: crate::remote::Access {
                        auth_file: remote_auth_file,
                        insecure: remote_insecure,
                        concurrency: 4,
                    },
                    pull_timeout: remote_timeout,
                });
            }
            crate::init::reap_as_pid1()?;
            crate::preflight::check(&root, &socket).map_err(|e| anyhow!(e))?;
            raise_nofile_limit();
            let exe = own_exe()?;
            let store =
                Store::open(&root).with_context(|| format!("opening store {}", root.display()))?;
            let kind =
                crate::probe::resolve(backend, store.root(), &exe).map_err(|e| anyhow!(e))?;
            let mut driver = Driver::open(
                store,
                Config {
                    backend: kind,
                    commit,
                    exe,
                },
            )
            .with_orphan_grace(std::time::Duration::from_secs(orphan_grace));
            let engine = crate::engine::Engine::new(engine_socket);
            driver.set_policy(crate::policy::Policy {
                commit_on,
                on_unknown: commit_on_unknown,
                engine: Some(engine.clone()),
            });
            let driver = Arc::new(driver);
            let worker = crate::maintenance::Worker::start(
                driver.store().clone(),
                crate::maintenance::Settings {
                    compact_depth: compact_depth as usize,
                    policy: crate::budget::Policy { max_size, max_idle },
                    interval: crate::maintenance::DEFAULT_INTERVAL,
                },
            )?;
            driver.set_maintenance(worker.notifier());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let served = rt.block_on(async move {
                tokio::spawn(engine.follow());
                if let Some(addr) = metrics {
                    crate::metrics::serve(addr).await?;
                }
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
            });
            worker.stop();
            served
        }
        Command::Compact { root, caches } => {
            crate::maint_cli::compact(&open_store(&root)?, &caches)
        }
        Command::Gc {
            root,
            dry_run,
            json,
        } => crate::maint_cli::gc(&open_store(&root)?, dry_run, json),
        Command::Rm { root, cache } => crate::maint_cli::rm(&open_store(&root)?, &cache),
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
        Command::Push {
            root,
            remote,
            cache,
            repo,
        } => {
            let r = crate::remote::push(&open_store(&root)?, &cache, &repo, &remote.access())?;
            if remote.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "pushed {cache} to {} ({}): {} layer(s), {} uploaded ({}), {} mounted, {} already there",
                    r.reference,
                    r.manifest_digest,
                    r.layers,
                    r.uploaded.len(),
                    crate::ls::human(r.bytes),
                    r.mounted.len(),
                    r.layers - r.uploaded.len() - r.mounted.len()
                );
            }
            Ok(())
        }
        Command::Pull {
            root,
            remote,
            repo,
            cache,
        } => {
            let r = crate::remote::pull(&open_store(&root)?, &repo, &cache, &remote.access())?;
            if remote.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "pulled {} into {cache}: {} layer(s), {} downloaded ({}), {} already here; latest {}",
                    r.reference,
                    r.layers,
                    r.downloaded.len(),
                    crate::ls::human(r.bytes),
                    r.reused.len(),
                    r.latest
                );
            }
            Ok(())
        }
        Command::Ls { root, json } => {
            let store = open_store(&root)?;
            if json {
                print!("{}", crate::ls::render_json(&store)?);
            } else {
                print!("{}", crate::ls::render(&store)?);
            }
            Ok(())
        }
    }
}

fn open_store(root: &std::path::Path) -> anyhow::Result<Store> {
    Store::open(root).with_context(|| format!("opening store {}", root.display()))
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
