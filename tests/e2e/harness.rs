//! The harness: preconditions (root, Debian's docker.io), one private dockerd and test image per
//! run, recovery of what an earlier, killed run left behind, and [`Scope`], the per-scenario guard
//! that owns a plugin instance and removes the scenario's containers and volumes however the
//! scenario ends.

use super::daemon::Dockerd;
use super::image;
use super::plugin::{Backend, CommitDefault, Plugin, PLUGIN_SOCKET_DIR};
use super::util::{self, CmdOut};
use anyhow::{bail, Context, Result};
use std::cell::{Cell, RefCell};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Parent of every run's directory (short: unix socket paths are limited to 108 bytes).
fn base_dir() -> PathBuf {
    std::env::var_os("CACHEDRIVER_E2E_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/cde2e"))
}

/// Whether the suite must run (CI): then every reason to skip is a failure.
pub fn required() -> bool {
    crate::probe::strict()
}

/// The outcome of checking preconditions.
pub enum Precondition {
    Ok,
    /// Cannot run here, and why.
    Missing(String),
}

fn find_in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn install_deps_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps.sh")
}

/// Checks for root and the docker tool chain, running `scripts/install-deps.sh` when tools are
/// missing (and we are root).
pub fn check_preconditions() -> Precondition {
    if !nix::unistd::geteuid().is_root() {
        return Precondition::Missing(
            "not running as root (dockerd, mounts and the plugin socket need root)".into(),
        );
    }
    // dockerd lives in /usr/sbin, which a non-login PATH may lack; children inherit this
    let path = std::env::var("PATH").unwrap_or_default();
    let mut extra = Vec::new();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !path.split(':').any(|p| p == d) {
            extra.push(d);
        }
    }
    if !extra.is_empty() {
        std::env::set_var("PATH", format!("{path}:{}", extra.join(":")));
    }
    let tools = ["dockerd", "docker", "containerd", "runc", "tar"];
    let missing = |tools: &[&str]| -> Vec<String> {
        tools
            .iter()
            .filter(|t| find_in_path(t).is_none())
            .map(|t| t.to_string())
            .collect()
    };
    let mut m = missing(&tools);
    if !m.is_empty() || !Path::new("/bin/busybox").exists() {
        let script = install_deps_script();
        eprintln!(
            "e2e: missing {m:?} (or /bin/busybox); running {}",
            script.display()
        );
        match util::run(Command::new("bash").arg(&script), Duration::from_secs(900)) {
            Ok(o) if o.success() => {}
            Ok(o) => eprintln!("e2e: {} failed: {}", script.display(), o.describe()),
            Err(e) => eprintln!("e2e: {} failed: {e:#}", script.display()),
        }
        m = missing(&tools);
        if !m.is_empty() || !Path::new("/bin/busybox").exists() {
            return Precondition::Missing(format!(
                "missing {m:?} or /bin/busybox even after running {} \
                 (install Debian's docker.io and busybox-static)",
                script.display()
            ));
        }
    }
    Precondition::Ok
}

/// Stops and removes what runs killed before their teardown left below the base dir.
fn recover_stale_runs() {
    let Ok(entries) = fs::read_dir(base_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if util::pid_matches(pid, "e2e_docker") && util::pid_alive(pid) {
            eprintln!(
                "e2e: run {pid} is still active; leaving {}",
                e.path().display()
            );
            continue;
        }
        let dir = e.path();
        let dir_s = dir.to_string_lossy().into_owned();
        eprintln!("e2e: recovering stale run {}", dir.display());
        // plugins first would strand dockerd's unmounts; dockerd first, it gets SIGTERM
        for pidfile in [
            dir.join("dockerd/dockerd.pid"),
            dir.join("dockerd/exec/containerd/containerd.pid"),
        ] {
            if let Some(p) = util::read_pidfile(&pidfile) {
                if util::pid_matches(p, &dir_s) {
                    util::terminate_pid(p, Duration::from_secs(20));
                }
            }
        }
        if let Ok(plugins) = fs::read_dir(dir.join("plugins")) {
            for p in plugins.flatten() {
                if let Some(ppid) = util::read_pidfile(&p.path().join("plugin.pid")) {
                    if util::pid_matches(ppid, &dir_s) {
                        util::terminate_pid(ppid, Duration::from_secs(10));
                    }
                }
            }
        }
        remove_sockets_of(pid as u32);
        util::remove_tree(&dir);
    }
}

/// Plugin names used by run `pid` start with this.
fn name_prefix(pid: u32) -> String {
    format!("cdt{pid}")
}

fn remove_sockets_of(pid: u32) {
    let prefix = name_prefix(pid);
    if let Ok(socks) = fs::read_dir(PLUGIN_SOCKET_DIR) {
        for s in socks.flatten() {
            let n = s.file_name().to_string_lossy().into_owned();
            // exact prefix plus a non-digit tag, so cdt12 never matches cdt123's sockets
            if let Some(rest) = n.strip_prefix(&prefix) {
                if rest.starts_with(|c: char| c.is_ascii_lowercase()) && n.ends_with(".sock") {
                    let _ = fs::remove_file(s.path());
                }
            }
        }
    }
}

/// Warns about sockets in the plugin directory that nobody serves (not ours to remove): dockerd
/// tries to activate every socket there on `docker volume ls`, and a dead one costs retries.
fn warn_dead_plugin_sockets() {
    let Ok(socks) = fs::read_dir(PLUGIN_SOCKET_DIR) else {
        return;
    };
    for s in socks.flatten() {
        let p = s.path();
        if p.extension().is_some_and(|e| e == "sock")
            && std::os::unix::net::UnixStream::connect(&p).is_err()
        {
            eprintln!(
                "e2e: WARNING: {} accepts no connections (a dead plugin's socket); dockerd will \
                 retry it on `docker volume ls`, slowing the suite down",
                p.display()
            );
        }
    }
}

/// One run: a private dockerd with the test image imported.
pub struct Harness {
    pub run_dir: PathBuf,
    pub dockerd: Dockerd,
    /// The imported test image.
    pub image: String,
    /// Its root filesystem as a tar (for `podman import`).
    pub image_tar: PathBuf,
    pid: u32,
    plugins_started: Cell<usize>,
    /// Plugins of finished scenarios, kept running until teardown: dockerd remembers every
    /// volume driver it has used and asks each one on `volume ls`, retrying a dead one for
    /// ~30 s, so stopping them early would slow later scenarios down.
    retired: RefCell<Vec<Plugin>>,
    /// Log lengths when the last scope began its cleanup, so failure reports show what led to
    /// the failure rather than the cleanup's chatter.
    pub log_marks: RefCell<Option<LogMarks>>,
    torn_down: bool,
}

/// Where the interesting part of the logs ends (see [`Harness::log_marks`]).
#[derive(Debug, Clone)]
pub struct LogMarks {
    pub dockerd_end: u64,
    /// The scope's plugin log and its length.
    pub plugin: Option<(PathBuf, u64)>,
}

impl Harness {
    /// Recovers stale runs, starts dockerd and imports the image.
    pub fn setup() -> Result<Harness> {
        recover_stale_runs();
        warn_dead_plugin_sockets();
        let pid = std::process::id();
        let run_dir = base_dir().join(format!("run-{pid}"));
        if run_dir.exists() {
            util::remove_tree(&run_dir);
        }
        fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let dockerd = match Dockerd::start(&run_dir.join("dockerd")) {
            Ok(d) => d,
            Err(e) => {
                util::remove_tree(&run_dir);
                return Err(e);
            }
        };
        let mut h = Harness {
            run_dir,
            dockerd,
            image: String::new(),
            image_tar: PathBuf::new(),
            pid,
            plugins_started: Cell::new(0),
            retired: RefCell::new(Vec::new()),
            log_marks: RefCell::new(None),
            torn_down: false,
        };
        // on error `h` drops here and tears everything down
        h.image = image::build(&h.dockerd, &h.run_dir, &format!("cdtest:{pid}"))?;
        h.image_tar = h.run_dir.join("image.tar");
        Ok(h)
    }

    /// `docker ARGS`; a non-zero exit is returned, not an error.
    pub fn docker(&self, args: &[&str]) -> Result<CmdOut> {
        self.dockerd.cli(args)
    }

    /// `docker ARGS`, which must succeed; returns stdout.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        Ok(self.dockerd.cli(args)?.check()?.stdout)
    }

    /// Starts a fresh plugin instance with a unique name, its own root and log.
    pub fn start_plugin(&self, backend: Backend, commit: Option<CommitDefault>) -> Result<Plugin> {
        let n = self.plugins_started.get() + 1;
        self.plugins_started.set(n);
        let tag = match backend {
            Backend::Kernel => 'k',
            Backend::Fuse => 'f',
        };
        let name = format!("{}{tag}{n}", name_prefix(self.pid));
        Plugin::start(
            &self.run_dir.join("plugins").join(&name),
            &name,
            backend,
            commit,
        )
    }

    /// Stops dockerd, unmounts and removes the run directory. Idempotent; also run by `Drop`.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // containers go first (their Unmounts need the plugins), then dockerd, then plugins
        self.dockerd.stop();
        for mut p in self.retired.borrow_mut().drain(..) {
            p.stop();
        }
        remove_sockets_of(self.pid);
        if std::env::var("CACHEDRIVER_E2E_KEEP").is_ok_and(|v| v == "1") {
            let left = util::unmount_below(&self.run_dir);
            eprintln!(
                "e2e: CACHEDRIVER_E2E_KEEP=1: keeping {} (still mounted: {left:?})",
                self.run_dir.display()
            );
        } else {
            util::remove_tree(&self.run_dir);
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A volume as a container sees it: a name and the driver that serves it.
#[derive(Debug, Clone)]
pub struct Vol {
    pub name: String,
    /// `local` or a plugin name.
    pub driver: String,
}

impl Vol {
    pub fn new(name: &str, driver: &str) -> Vol {
        Vol {
            name: name.to_string(),
            driver: driver.to_string(),
        }
    }

    /// `-v NAME:DST[:ro]` plus `--volume-driver`.
    pub fn args(&self, dst: &str, ro: bool) -> Vec<String> {
        vec![
            "--volume-driver".into(),
            self.driver.clone(),
            "-v".into(),
            format!("{}:{dst}{}", self.name, if ro { ":ro" } else { "" }),
        ]
    }
}

/// A script for `sh -c` in a long-running container that stops promptly on `docker stop`.
pub const SLEEPER: &str = "trap 'exit 0' TERM; sleep 600 & wait";

/// Per-scenario guard: labels the scenario's containers, remembers its volumes, and on drop
/// removes both (while its plugin still runs, so Docker's Unmount/Remove reach it), then stops
/// the plugin.
pub struct Scope<'h> {
    pub h: &'h Harness,
    pub plugin: Option<Plugin>,
    label: String,
    volumes: RefCell<Vec<String>>,
}

impl<'h> Scope<'h> {
    /// A scope named `tag`, without a plugin.
    pub fn new(h: &'h Harness, tag: &str) -> Scope<'h> {
        Scope {
            h,
            plugin: None,
            label: format!("cdtest.scope={tag}"),
            volumes: RefCell::new(Vec::new()),
        }
    }

    /// A scope with a freshly started plugin.
    pub fn with_plugin(
        h: &'h Harness,
        tag: &str,
        backend: Backend,
        commit: Option<CommitDefault>,
    ) -> Result<Scope<'h>> {
        let mut s = Scope::new(h, tag);
        s.plugin = Some(h.start_plugin(backend, commit)?);
        Ok(s)
    }

    /// The plugin (panics if the scope has none: a harness bug).
    pub fn plugin(&self) -> &Plugin {
        self.plugin.as_ref().expect("scope has a plugin")
    }

    /// The plugin, mutably (to restart it).
    pub fn plugin_mut(&mut self) -> &mut Plugin {
        self.plugin.as_mut().expect("scope has a plugin")
    }

    /// Fails if the scope's plugin process has exited (crashed) during the scenario.
    pub fn ensure_plugin_alive(&mut self) -> Result<()> {
        if let Some(p) = self.plugin.as_mut() {
            if !p.running() {
                bail!(
                    "plugin {} is no longer running (crashed?); see its log",
                    p.name
                );
            }
        }
        Ok(())
    }

    /// A volume `name` of this scope's plugin.
    pub fn vol(&self, name: &str) -> Vol {
        Vol::new(name, &self.plugin().name)
    }

    /// Records a volume to remove at the end of the scope.
    pub fn track(&self, v: &Vol) {
        let mut vs = self.volumes.borrow_mut();
        if !vs.contains(&v.name) {
            vs.push(v.name.clone());
        }
    }

    fn run_args<'a>(&'a self, extra: &'a [&'a str], mounts: &'a [String]) -> Vec<&'a str> {
        let mut a = vec!["--network", "none", "--label", self.label.as_str()];
        a.extend(extra.iter().copied());
        a.extend(mounts.iter().map(String::as_str));
        a
    }

    /// `docker run --rm [extra] [volume] IMAGE sh -c SCRIPT`; the exit status is in the result.
    pub fn sh(
        &self,
        vol: Option<(&Vol, &str, bool)>,
        extra: &[&str],
        script: &str,
    ) -> Result<CmdOut> {
        let mounts = match vol {
            Some((v, dst, ro)) => {
                self.track(v);
                v.args(dst, ro)
            }
            None => Vec::new(),
        };
        let mut args = vec!["run", "--rm"];
        args.extend(self.run_args(extra, &mounts));
        args.extend([self.h.image.as_str(), "sh", "-c", script]);
        self.h.docker(&args)
    }

    /// Starts a detached container `name` running [`SLEEPER`] with `vol` at `dst`.
    pub fn start(&self, name: &str, vol: &Vol, dst: &str, extra: &[&str]) -> Result<()> {
        self.track(vol);
        let mounts = vol.args(dst, false);
        self.start_with_mounts(name, &mounts, extra)
    }

    /// Starts a detached container `name` running [`SLEEPER`] with arbitrary mount arguments.
    pub fn start_with_mounts(&self, name: &str, mounts: &[String], extra: &[&str]) -> Result<()> {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend(self.run_args(extra, mounts));
        args.extend([self.h.image.as_str(), "sh", "-c", SLEEPER]);
        self.h.docker(&args)?.check()?;
        Ok(())
    }

    /// `docker exec NAME sh -c SCRIPT`; the exit status is in the result.
    pub fn exec(&self, name: &str, script: &str) -> Result<CmdOut> {
        self.h.docker(&["exec", name, "sh", "-c", script])
    }

    /// `docker exec`, which must succeed; returns stdout.
    pub fn exec_ok(&self, name: &str, script: &str) -> Result<String> {
        Ok(self.exec(name, script)?.check()?.stdout)
    }

    /// Stops and removes container `name`. Removal takes the container lock that Docker holds
    /// while it unmounts the container's volumes, so on return the Unmounts have been sent.
    pub fn stop(&self, name: &str) -> Result<()> {
        self.h.docker_ok(&["stop", "-t", "10", name])?;
        self.h.docker_ok(&["rm", name])?;
        Ok(())
    }

    /// `docker volume inspect NAME`'s `.Status`, as JSON.
    pub fn status(&self, name: &str) -> Result<serde_json::Value> {
        let out = self
            .h
            .docker_ok(&["volume", "inspect", "--format", "{{json .Status}}", name])?;
        serde_json::from_str(out.trim()).with_context(|| format!("volume {name} Status: {out}"))
    }

    fn cleanup(&mut self) {
        *self.h.log_marks.borrow_mut() = Some(LogMarks {
            dockerd_end: util::file_len(&self.h.dockerd.log),
            plugin: self
                .plugin
                .as_ref()
                .map(|p| (p.log.clone(), util::file_len(&p.log))),
        });
        if let Ok(o) = self
            .h
            .docker(&["ps", "-aq", "--filter", &format!("label={}", self.label)])
        {
            let ids: Vec<&str> = o.stdout.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                if let Ok(o) = self.h.docker(&args) {
                    if !o.success() {
                        eprintln!("e2e: scope cleanup: {}", o.describe());
                    }
                }
            }
        }
        let mut names = self.volumes.borrow().clone();
        if let Some(p) = &self.plugin {
            if let Ok(o) = self.h.docker(&[
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("driver={}", p.name),
            ]) {
                names.extend(o.stdout.split_whitespace().map(str::to_string));
            }
        }
        names.sort();
        names.dedup();
        for n in names {
            if let Ok(o) = self.h.docker(&["volume", "rm", "-f", &n]) {
                if !o.success() {
                    eprintln!("e2e: scope cleanup: {}", o.describe());
                }
            }
        }
        if let Some(mut p) = self.plugin.take() {
            if p.running() {
                self.h.retired.borrow_mut().push(p);
            } else {
                p.stop();
            }
        }
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A scenario that cannot run here, and why: reported as SKIPPED, or as a failure when the
/// suite is [`required`].
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot run here: {}", self.0)
    }
}

impl std::error::Error for Skip {}

/// Fails unless one of the (string or number) values anywhere in `status` equals `want`
/// (ignoring case): `docker volume inspect`'s Status is checked for what it must report without
/// assuming the plugin's key names.
pub fn expect_status_value(what: &str, status: &serde_json::Value, want: &str) -> Result<()> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.to_lowercase()),
            serde_json::Value::Number(n) => out.push(n.to_string()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut values = Vec::new();
    walk(status, &mut values);
    if values.iter().any(|v| *v == want.to_lowercase()) {
        Ok(())
    } else {
        bail!("{what}: no Status value equals {want:?}; Status is {status}")
    }
}

/// Fails unless `text` contains `needle`, quoting both.
pub fn expect_contains(what: &str, text: &str, needle: &str) -> Result<()> {
    if text.contains(needle) {
        Ok(())
    } else {
        bail!("{what}: expected to contain {needle:?}, got:\n{text}")
    }
}

/// Fails if `text` contains `needle`, quoting both.
pub fn expect_lacks(what: &str, text: &str, needle: &str) -> Result<()> {
    if text.contains(needle) {
        bail!("{what}: expected NOT to contain {needle:?}, got:\n{text}")
    } else {
        Ok(())
    }
}
