//! A private dockerd for the suite: its own data root, exec root, pid file and socket, no bridge and
//! no iptables (containers run with `--network none`), and the containerd it starts itself.
//!
//! Nothing here touches a system Docker: a real install keeps running (or not) undisturbed.

use super::util::{self, CmdOut};
use anyhow::{bail, Context, Result};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long dockerd may take to answer `/_ping` after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default timeout of a docker CLI call.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// A running dockerd. `stop` (also run by `Drop`) terminates it and its containerd.
pub struct Dockerd {
    /// Everything of this daemon lives below here.
    pub dir: PathBuf,
    /// API socket.
    pub sock: PathBuf,
    /// dockerd's stdout+stderr.
    pub log: PathBuf,
    /// The storage driver that worked.
    pub storage_driver: String,
    cli_config: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Dockerd {
    /// Starts dockerd below `dir` (created), trying `overlay2` then `vfs` unless
    /// `CACHEDRIVER_E2E_STORAGE_DRIVER` names one.
    pub fn start(dir: &Path) -> Result<Dockerd> {
        let drivers: Vec<String> = match std::env::var("CACHEDRIVER_E2E_STORAGE_DRIVER") {
            Ok(d) if !d.is_empty() => vec![d],
            _ => vec!["overlay2".into(), "vfs".into()],
        };
        let mut errors = Vec::new();
        for drv in &drivers {
            match Self::start_with(dir, drv) {
                Ok(d) => return Ok(d),
                Err(e) => {
                    eprintln!("e2e: dockerd with storage driver {drv} failed: {e:#}");
                    errors.push(format!("{drv}: {e:#}"));
                }
            }
        }
        bail!(
            "dockerd did not start with any storage driver:\n{}",
            errors.join("\n")
        )
    }

    fn start_with(dir: &Path, driver: &str) -> Result<Dockerd> {
        fs::create_dir_all(dir)?;
        let cli_config = dir.join("cli-config");
        fs::create_dir_all(&cli_config)?;
        fs::write(dir.join("daemon.json"), "{}\n")?;
        let d = Dockerd {
            dir: dir.to_path_buf(),
            sock: dir.join("docker.sock"),
            log: dir.join(format!("dockerd-{driver}.log")),
            storage_driver: driver.to_string(),
            cli_config,
            child: Mutex::new(None),
        };
        if let Err(e) = d.spawn() {
            let t = util::tail(&d.log, 30);
            d.stop();
            // leave nothing of this attempt behind for the next driver
            util::unmount_below(&d.dir.join("data"));
            util::unmount_below(&d.dir.join("exec"));
            let _ = fs::remove_dir_all(d.dir.join("data"));
            let _ = fs::remove_dir_all(d.dir.join("exec"));
            bail!("{e:#}\n--- dockerd log tail ({}) ---\n{t}", d.log.display());
        }
        let info = d.cli(&["info", "--format", "{{.Driver}}"])?;
        if !info.success() || info.stdout.trim() != driver {
            let t = util::tail(&d.log, 30);
            d.stop();
            bail!(
                "dockerd runs but reports storage driver {:?}: {}\n{t}",
                info.stdout.trim(),
                info.describe()
            );
        }
        Ok(d)
    }

    /// Starts the dockerd process (log appended) and waits until it answers.
    fn spawn(&self) -> Result<()> {
        let logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(self.host())
            .args([
                "--bridge",
                "none",
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=false",
                "--shutdown-timeout",
                "5",
                "--debug",
                "--storage-driver",
                &self.storage_driver,
            ])
            .env_remove("DOCKER_HOST")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            // own process group: a terminal Ctrl-C reaches only the harness, whose teardown
            // then stops containers, dockerd and the plugin in the right order
            .process_group(0);
        let child = cmd.spawn().context("spawning dockerd")?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            util::check_interrupted();
            if let Some(child) = self
                .child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                if let Some(st) = child.try_wait()? {
                    bail!("dockerd exited during startup with {st}");
                }
            }
            if ping(&self.sock).is_ok() {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("dockerd did not answer /_ping within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops dockerd (SIGTERM: it stops its containers as on a host shutdown) and starts it
    /// again on the same data.
    pub fn restart(&self) -> Result<()> {
        self.stop_process();
        self.spawn()
    }

    /// Kills dockerd with SIGKILL, as a crash or the OOM killer would: no container is stopped
    /// and no volume unmounted. Its own containerd is killed too (it logs through a pipe to
    /// dockerd and hangs once nobody reads it); the containers' shims live on. Then starts
    /// dockerd again on the same data.
    pub fn kill_and_restart(&self) -> Result<()> {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let ctrd_pid = self.dir.join("exec/containerd/containerd.pid");
        if let Some(pid) = util::read_pidfile(&ctrd_pid) {
            if util::pid_matches(pid, &self.dir.to_string_lossy()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = util::wait_for(Duration::from_secs(10), "containerd to die", || {
                    (!util::pid_alive(pid)).then_some(())
                });
            }
        }
        // Its zombie may outlive it (our pid 1 need not reap promptly), and dockerd would
        // take the pid file's process for a live containerd and wait for it forever.
        let _ = fs::remove_file(&ctrd_pid);
        self.spawn()
    }

    /// `-H unix://...` value for the CLI.
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// A `docker` CLI command aimed at this daemon, isolated from the user's CLI config.
    pub fn command(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H")
            .arg(self.host())
            .env("DOCKER_CONFIG", &self.cli_config)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .env("DOCKER_CLI_HINTS", "false");
        c
    }

    /// A factory of [`Dockerd::command`]s that owns what it needs (for long-lived holders).
    pub fn command_factory(&self) -> impl Fn() -> Command + 'static {
        let (host, cfg) = (self.host(), self.cli_config.clone());
        move || {
            let mut c = Command::new("docker");
            c.arg("-H")
                .arg(&host)
                .env("DOCKER_CONFIG", &cfg)
                .env_remove("DOCKER_HOST")
                .env_remove("DOCKER_CONTEXT")
                .env_remove("DOCKER_TLS_VERIFY")
                .env("DOCKER_CLI_HINTS", "false");
            c
        }
    }

    /// Runs `docker ARGS` with the default timeout; a non-zero exit is not an error here.
    pub fn cli(&self, args: &[&str]) -> Result<CmdOut> {
        util::run(self.command().args(args), CLI_TIMEOUT)
    }

    /// dockerd's warnings, errors and volume-related lines between byte offsets `range`, the
    /// last `n`.
    pub fn log_tail(&self, range: (u64, Option<u64>), n: usize) -> String {
        util::tail_window_matching(
            &self.log,
            range,
            n,
            &[
                "level=error",
                "level=warning",
                "level=fatal",
                "olume",
                "lugin",
            ],
            &[
                "msg=\"Calling ",
                "form data:",
                "cleanup warnings",
                "cleaning up after shim",
                "loading plugin",
                "snapshotter",
            ],
        )
    }

    /// Removes every container (with the plugin still up, so their volumes get their Unmount),
    /// then stops dockerd (SIGTERM, wait, SIGKILL) and any containerd it leaves behind.
    pub fn stop(&self) {
        let running = matches!(
            self.child
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .map(|c| c.try_wait()),
            Some(Ok(None))
        );
        if running {
            if let Ok(ids) = self.cli(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    if let Ok(o) = util::run(self.command().args(&args), Duration::from_secs(60)) {
                        if !o.success() {
                            eprintln!("e2e: teardown: {}", o.describe());
                        }
                    }
                }
            }
        }
        self.stop_process();
    }

    /// SIGTERM, wait, SIGKILL dockerd; then its containerd if that outlived it.
    fn stop_process(&self) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut child) = child else {
            return;
        };
        util::terminate_child(&mut child, Duration::from_secs(20));
        // dockerd normally stops its containerd; after a SIGKILL it cannot
        let ctrd_pid = self.dir.join("exec/containerd/containerd.pid");
        if let Some(pid) = util::read_pidfile(&ctrd_pid) {
            if util::pid_matches(pid, &self.dir.to_string_lossy()) {
                util::terminate_pid(pid, Duration::from_secs(10));
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET /_ping` on a docker API socket.
fn ping(sock: &Path) -> Result<()> {
    let resp = http_over_unix(sock, "GET", "/_ping", "")?;
    if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        bail!("unexpected /_ping answer: {resp}")
    }
}

/// One HTTP/1.1 request (`Connection: close`) over a unix socket; returns the raw response.
pub fn http_over_unix(sock: &Path, method: &str, path: &str, body: &str) -> Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp)
}
