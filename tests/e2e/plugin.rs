//! The plugin under test, run as a legacy Docker plugin: `cachedriver serve` with its socket at
//! `/run/docker/plugins/<NAME>.sock`, where dockerd discovers it by name (`--volume-driver NAME`).
//!
//! Every instance gets a unique NAME (`cdt<harness pid><tag>`) so it can never clash with a real
//! install or with another run of the suite.

use super::daemon::http_over_unix;
use super::util::{self, CmdOut};
use anyhow::{bail, Context, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where dockerd looks for legacy plugin sockets (fixed in moby, independent of `--exec-root`).
pub const PLUGIN_SOCKET_DIR: &str = "/run/docker/plugins";
/// How long the plugin may take to answer `/Plugin.Activate`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which union filesystem the plugin uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Fuse,
}

impl Backend {
    /// The `--backend` value (also what `docker volume inspect` should report).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Fuse => "fuse",
        }
    }
}

/// A driver-wide `commit` default, and how it reaches the plugin: `--commit` or
/// `CACHEDRIVER_COMMIT` (how `docker plugin set` passes settings to a managed plugin).
#[derive(Debug, Clone)]
pub enum CommitDefault {
    Flag(String),
    Env(String),
}

/// The plugin binary built by cargo for this test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_cachedriver")
}

/// A running `cachedriver serve`.
pub struct Plugin {
    /// Docker's name for the driver (`--volume-driver`).
    pub name: String,
    /// `--root`.
    pub root: PathBuf,
    /// Its unix socket.
    pub sock: PathBuf,
    pub backend: Backend,
    /// Driver-wide commit default, if any.
    pub commit: Option<CommitDefault>,
    /// stdout+stderr of every start of this instance (appended).
    pub log: PathBuf,
    child: Option<Child>,
    pidfile: PathBuf,
    /// Set for a Docker managed plugin: the daemon runs it, we enable and disable it.
    managed: Option<Managed>,
    /// Further `serve` arguments (e.g. `--engine-socket`).
    pub extra_args: Vec<String>,
    /// Extra environment for the next (re)start, e.g. a short `CACHEDRIVER_SWEEP_INTERVAL`.
    pub env: Vec<(String, String)>,
}

/// A managed plugin: `docker plugin create`d from plugin/build.sh, run by dockerd itself.
struct Managed {
    /// A `docker` command aimed at the harness's dockerd.
    docker: Box<dyn Fn() -> Command>,
}

impl Managed {
    fn docker(&self, args: &[&str]) -> Result<CmdOut> {
        util::run((self.docker)().args(args), Duration::from_secs(120))
    }
}

impl Plugin {
    /// Starts `cachedriver serve` named `name`, with its root and log below `dir`.
    pub fn start(
        dir: &Path,
        name: &str,
        backend: Backend,
        commit: Option<CommitDefault>,
    ) -> Result<Plugin> {
        fs::create_dir_all(dir)?;
        fs::create_dir_all(PLUGIN_SOCKET_DIR)
            .with_context(|| format!("creating {PLUGIN_SOCKET_DIR}"))?;
        let mut p = Plugin {
            name: name.to_string(),
            root: dir.join("root"),
            sock: Path::new(PLUGIN_SOCKET_DIR).join(format!("{name}.sock")),
            backend,
            commit,
            log: dir.join("plugin.log"),
            child: None,
            pidfile: dir.join("plugin.pid"),
            managed: None,
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        p.spawn()?;
        Ok(p)
    }

    /// Builds the managed plugin `name` with `plugin/build.sh` (from the binary under test) on the
    /// dockerd that `docker` aims at, enables it, and returns it; its root is the host side of
    /// its propagated mount. `enable_secs` receives how long `docker plugin enable` took.
    pub fn managed(
        dir: &Path,
        name: &str,
        backend: Backend,
        docker: impl Fn() -> Command + 'static,
        data_root: &Path,
    ) -> Result<(Plugin, f64)> {
        fs::create_dir_all(dir)?;
        let log = dir.join("build.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin/build.sh");
        let probe = docker();
        let host = probe
            .get_args()
            .skip_while(|a| *a != "-H")
            .nth(1)
            .map(|a| a.to_string_lossy().into_owned())
            .context("docker command has no -H")?;
        let mut cmd = Command::new("bash");
        for (k, v) in probe.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.arg(&script)
            .arg(name)
            .env("CACHEDRIVER_BIN", binary())
            .env("DOCKER_HOST", &host);
        let out = util::run(&mut cmd, Duration::from_secs(300))?;
        fs::write(&log, format!("{}\n{}", out.stdout, out.stderr))?;
        out.check().context("plugin/build.sh failed")?;
        let m = Managed {
            docker: Box::new(docker),
        };
        // the engine socket the plugin follows for commit-on=success: this daemon's
        m.docker(&[
            "plugin",
            "set",
            name,
            &format!("engine.source={}", host.trim_start_matches("unix://")),
        ])?
        .check()?;
        if backend != Backend::Kernel {
            m.docker(&[
                "plugin",
                "set",
                name,
                &format!("CACHEDRIVER_BACKEND={}", backend.as_str()),
            ])?
            .check()?;
        }
        let id = m
            .docker(&["plugin", "inspect", "--format", "{{.Id}}", name])?
            .check()?
            .stdout
            .trim()
            .to_string();
        let mut p = Plugin {
            name: name.to_string(),
            root: data_root.join("plugins").join(&id).join("propagated-mount"),
            sock: PathBuf::new(),
            backend,
            commit: None,
            log,
            child: None,
            pidfile: dir.join("unused.pid"),
            managed: Some(m),
            extra_args: Vec::new(),
            env: Vec::new(),
        };
        let t = Instant::now();
        p.spawn()?;
        Ok((p, t.elapsed().as_secs_f64()))
    }

    /// `docker plugin set NAME KEY=VALUE` (managed plugins only; the plugin must be disabled).
    pub fn set(&mut self, kv: &str) -> Result<()> {
        let m = self
            .managed
            .as_ref()
            .context("only a managed plugin has settings")?;
        m.docker(&["plugin", "set", &self.name, kv])?.check()?;
        if let Some(b) = kv.strip_prefix("CACHEDRIVER_BACKEND=") {
            self.backend = if b == "fuse" {
                Backend::Fuse
            } else {
                Backend::Kernel
            };
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        if let Some(m) = &self.managed {
            let out = m.docker(&["plugin", "enable", &self.name])?;
            if !out.success() {
                bail!("docker plugin enable {}: {}", self.name, out.describe());
            }
            return Ok(());
        }
        let _ = fs::remove_file(&self.sock);
        let mut logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--root")
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.sock)
            .arg("--backend")
            .arg(self.backend.as_str())
            .args(&self.extra_args);
        for var in [
            "CACHEDRIVER_ROOT",
            "CACHEDRIVER_SOCKET",
            "CACHEDRIVER_BACKEND",
            "CACHEDRIVER_COMMIT",
            "CACHEDRIVER_COMMIT_ON",
            "CACHEDRIVER_ENGINE_SOCKET",
        ] {
            cmd.env_remove(var);
        }
        match &self.commit {
            Some(CommitDefault::Flag(c)) => {
                cmd.arg("--commit").arg(c);
            }
            Some(CommitDefault::Env(c)) => {
                cmd.env("CACHEDRIVER_COMMIT", c);
            }
            None => {}
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env(
            "RUST_LOG",
            std::env::var("CACHEDRIVER_E2E_RUST_LOG").unwrap_or_else(|_| "debug".into()),
        )
        .env("RUST_BACKTRACE", "1");
        writeln!(
            logf,
            "===== e2e: starting {} =====",
            util::describe_command(&cmd)
        )?;
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", binary()))?;
        fs::write(&self.pidfile, child.id().to_string())?;
        self.child = Some(child);
        if let Err(e) = self.wait_ready() {
            let t = self.log_tail(30);
            self.stop();
            bail!(
                "plugin {} did not become ready: {e:#}\n--- plugin log tail ({}) ---\n{t}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        let mut last;
        loop {
            util::check_interrupted();
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    bail!("cachedriver serve exited during startup with {st}");
                }
            }
            if self.sock.exists() {
                match http_over_unix(&self.sock, "POST", "/Plugin.Activate", "{}") {
                    Ok(resp) if resp.contains("VolumeDriver") => return Ok(()),
                    Ok(resp) => last = format!("unexpected /Plugin.Activate answer: {resp}"),
                    Err(e) => last = format!("connecting: {e}"),
                }
            } else {
                last = format!("no socket at {}", self.sock.display());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("not ready within {READY_TIMEOUT:?}: {last}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process (SIGTERM, then SIGKILL after 20 s) and removes its socket.
    pub fn stop(&mut self) {
        if let Some(m) = &self.managed {
            // -f: dockerd refuses to disable a volume plugin that still has volumes otherwise
            let _ = m.docker(&["plugin", "disable", "-f", &self.name]);
            return;
        }
        if let Some(mut child) = self.child.take() {
            if let Some(st) = util::terminate_child(&mut child, Duration::from_secs(20)) {
                if !st.success() {
                    let _ = OpenOptions::new()
                        .append(true)
                        .open(&self.log)
                        .and_then(|mut f| writeln!(f, "===== e2e: plugin exited with {st} ====="));
                }
            }
        }
        let _ = fs::remove_file(&self.sock);
        let _ = fs::remove_file(&self.pidfile);
    }

    /// Restarts the instance with `args` added to `serve`'s command line.
    pub fn restart_with(&mut self, args: &[&str]) -> Result<()> {
        self.extra_args = args.iter().map(|a| a.to_string()).collect();
        self.restart()
    }

    /// Stops and starts the same instance (same name, root, socket and options).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        if let Some(m) = &self.managed {
            return m
                .docker(&["plugin", "inspect", "--format", "{{.Enabled}}", &self.name])
                .is_ok_and(|o| o.stdout.trim() == "true");
        }
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The last lines of the plugin's log.
    pub fn log_tail(&self, n: usize) -> String {
        util::tail(&self.log, n)
    }

    /// `cachedriver ls --root ROOT`.
    pub fn ls(&self) -> Result<CmdOut> {
        util::run(
            Command::new(binary())
                .arg("ls")
                .arg("--root")
                .arg(&self.root),
            Duration::from_secs(30),
        )
    }

    /// `lower/<cache>/cache-state.json`, parsed.
    pub fn cache_state(&self, cache: &str) -> Result<serde_json::Value> {
        let p = self.root.join("lower").join(cache).join("cache-state.json");
        let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}: {text}", p.display()))
    }

    /// `state.latest` of a cache.
    pub fn latest(&self, cache: &str) -> Result<String> {
        let st = self.cache_state(cache)?;
        st.pointer("/state/latest")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .with_context(|| format!("no string state.latest in cache-state.json of {cache}: {st}"))
    }

    /// Polls `state.latest` of `cache` (up to 15 s) until `pred` holds, and returns it; on
    /// timeout returns the last value seen, for the caller's assertion to report. (Docker has
    /// normally waited for our Unmount answer, i.e. the commit, before `docker rm`/`run --rm`
    /// return; polling makes the checks independent of that.)
    pub fn wait_latest(&self, cache: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
        let start = Instant::now();
        loop {
            let cur = self.latest(cache);
            match &cur {
                Ok(v) if pred(v) => return cur,
                _ if start.elapsed() > Duration::from_secs(15) => return cur,
                _ => util::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `merged/<cache>/<id>`: a session's mountpoint.
    pub fn merged(&self, cache: &str, id: &str) -> PathBuf {
        self.root.join("merged").join(cache).join(id)
    }

    /// Waits until the session's merged view is no longer mounted (its last Unmount was handled).
    pub fn wait_session_ended(&self, cache: &str, id: &str) -> Result<()> {
        let m = self.merged(cache, id);
        util::wait_for(
            Duration::from_secs(20),
            &format!("{} to be unmounted", m.display()),
            || (!util::is_mountpoint(&m)).then_some(()),
        )
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop();
        if let Some(m) = &self.managed {
            let _ = m.docker(&["plugin", "rm", "-f", &self.name]);
        }
    }
}
