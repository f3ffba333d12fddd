//! The FUSE backend: one `cachedriver fuse` server process per session.
//!
//! The server daemonizes and the command returns once the mount is ready, so a mount costs one
//! process start (well inside Podman's 5-second limit). Each session has its own process, so a
//! plugin restart or one crashed mount harms no other; the server's pid is recorded in the
//! session so Unmount can wait for it to finish before the upper dir is committed.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{unmount_path, Backend, BackendKind, MountSpec, Mounted};
use crate::error::{Error, Result};

/// How long a FUSE server may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(4);
/// How long to wait for a server to exit after its unmount.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a mount may take to answer a `stat` before we call its server hung.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// cachedriver-fuse, run as `<exe> fuse -o ... MOUNTPOINT`.
#[derive(Debug)]
pub struct Fuse {
    exe: PathBuf,
}

impl Fuse {
    /// A FUSE backend serving mounts with `exe fuse ...`.
    pub fn new(exe: PathBuf) -> Self {
        Fuse { exe }
    }
}

fn check_path(p: &Path) -> Result<&str> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::Backend(format!("path {} is not UTF-8", p.display())))?;
    if s.contains([',', ':', '\\']) {
        return Err(Error::Backend(format!(
            "fuse mount: path {s} contains ',', ':' or '\\', which mount options cannot express; choose another --root"
        )));
    }
    Ok(s)
}

/// True while `pid` runs. A zombie counts as gone (and is reaped if it is ours, as when the
/// plugin is pid 1 of the managed plugin's container and inherits the orphaned servers).
fn alive(pid: i32) -> bool {
    let p = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(p, None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if state == Some('Z') {
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        return false;
    }
    true
}

/// True when `pid` is a `cachedriver fuse` server for `target` (its command line names it), so a
/// pid recorded before a reboot and reused since is never waited for or killed.
fn serves(pid: i32, target: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    use std::os::unix::ffi::OsStrExt;
    args.iter().any(|a| *a == b"fuse") && args.iter().any(|a| *a == target.as_os_str().as_bytes())
}

fn kill_and_wait(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True when `pid` is stopped (SIGSTOP, ptrace): it will not exit on its own.
fn stopped(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    matches!(
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next()),
        Some('T') | Some('t')
    )
}

/// Chooses the FUSE server's I/O mode for every session (`CACHEDRIVER_FUSE_IO`, read at mount):
/// - `noopen` (default): the kernel opens files without asking the server, so a warm read of a
///   small file costs no round trip (build caches are mostly small files read again and again);
///   files are copied up at their first write. Large sequential reads go through FUSE READs.
/// - `passthrough`: every open is a round trip, and large lower files and upper files are read
///   and written through FUSE passthrough at kernel speed (real root only); for caches of big
///   archives. The README's benchmark table has both columns.
pub const FUSE_IO_ENV: &str = "CACHEDRIVER_FUSE_IO";

fn io_mode_option() -> Result<&'static str> {
    match std::env::var(FUSE_IO_ENV).as_deref() {
        Err(_) | Ok("") | Ok("noopen") => Ok(""),
        Ok("passthrough") => Ok(",passthrough=on"),
        Ok(other) => Err(Error::Backend(format!(
            "{FUSE_IO_ENV}={other:?}: use noopen (the default: small files read without round trips) or passthrough (large files at kernel speed)"
        ))),
    }
}

impl Backend for Fuse {
    fn kind(&self) -> BackendKind {
        BackendKind::Fuse
    }

    fn mount(&self, spec: &MountSpec<'_>) -> Result<Mounted> {
        let lowers = spec
            .lowers
            .iter()
            .map(|l| check_path(l))
            .collect::<Result<Vec<_>>>()?
            .join(":");
        let opts = format!(
            "lowerdir={lowers},upperdir={},workdir={},xattr={},pidfile={}{}",
            check_path(spec.upper)?,
            check_path(spec.work)?,
            spec.xattr.as_str(),
            check_path(spec.pid_file)?,
            io_mode_option()?,
        );
        let _ = std::fs::remove_file(spec.pid_file);
        // stderr goes to an anonymous file, not a pipe: the daemon inherits it and would keep a
        // pipe open forever.
        let mut errf =
            tempfile::tempfile().map_err(|e| Error::io("creating temp file", "/tmp", e))?;
        let err_for_child = errf
            .try_clone()
            .map_err(|e| Error::io("duplicating fd", "/tmp", e))?;
        let mut child = Command::new(&self.exe)
            .arg("fuse")
            .arg("-o")
            .arg(&opts)
            .arg(spec.target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_for_child)
            .spawn()
            .map_err(|e| Error::io("starting the FUSE server", &self.exe, e))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = unmount_path(spec.target);
                    return Err(Error::Backend(format!(
                        "fuse mount at {}: the server did not come up within {:?}",
                        spec.target.display(),
                        START_TIMEOUT
                    )));
                }
                Err(e) => return Err(Error::io("waiting for the FUSE server", &self.exe, e)),
            }
        };
        if !status.success() {
            let mut msg = String::new();
            let _ = errf.rewind();
            let _ = errf.read_to_string(&mut msg);
            return Err(Error::Backend(format!(
                "fuse mount at {}: {}",
                spec.target.display(),
                msg.trim()
                    .lines()
                    .last()
                    .unwrap_or("the FUSE server failed")
            )));
        }
        let pid = std::fs::read_to_string(spec.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(Mounted {
            pid,
            how: "one cachedriver fuse server per session".into(),
        })
    }

    fn unmount(&self, target: &Path, pid: Option<i32>) -> Result<()> {
        if let Some(p) = pid.filter(|p| serves(*p, target)) {
            if stopped(p) || crate::sessions::probe_stuck(target) {
                // A hung server: requests stuck in it pin the mount (EBUSY) and it would never
                // exit. Killing it aborts the connection; the unmount then goes through.
                tracing::warn!(pid = p, target = %target.display(), "FUSE server does not answer: killing it before the unmount");
                kill_and_wait(p);
            }
        }
        if let Err(e) = unmount_path(target) {
            // Without CAP_SYS_ADMIN over this mount, fusermount3 may still be allowed.
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(target)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(e);
            }
        }
        if let Some(pid) = pid.filter(|p| serves(*p, target)) {
            // The server must have finished every request before the upper dir is renamed.
            let deadline = if stopped(pid) {
                Instant::now()
            } else {
                Instant::now() + EXIT_TIMEOUT
            };
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if alive(pid) {
                // A stopped or hung server never exits, and it still holds the upper dir's files:
                // kill it (only if it is the server of this mount, not a reused pid).
                if serves(pid, target) {
                    tracing::warn!(pid, "FUSE server did not exit after unmount: killing it");
                    kill_and_wait(pid);
                } else {
                    tracing::warn!(pid, "FUSE server still running after unmount");
                }
            }
        }
        Ok(())
    }

    /// A live FUSE mount. A mount whose server died answers ENOTCONN: it is detached here so
    /// the session can be mounted again over its intact upper dir.
    fn is_mounted(&self, target: &Path) -> bool {
        if !crate::fsutil::mount_fstype(target).is_some_and(|t| t.starts_with("fuse")) {
            return false;
        }
        // Never a plain stat: a hung server would hang the request (and startup) with it.
        match crate::sessions::stat_with_timeout(target, PROBE_TIMEOUT) {
            None => {
                tracing::warn!(target = %target.display(), "FUSE server of this mount does not answer; treating it as mounted");
                true
            }
            Some(Err(e)) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                tracing::warn!(target = %target.display(), "FUSE server of this mount is gone; detaching the dead mount");
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
                false
            }
            _ => true,
        }
    }
}
