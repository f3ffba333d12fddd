//! Backends bench plumbing: the backends compared (which binary, or why one is missing), fresh
//! mounts of each over the lower tree (`Instance`), the FUSE daemons' memory, and the registry that
//! unmounts everything and removes the scratch dir on exit, panic or signal.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Config;

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
// ---------------------------------------------------------------------------------------------------------
// Backends.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Native,
    Kernel,
    Fuse,
    /// Our FUSE filesystem with `passthrough=on` (OPEN round trips, passthrough for large files).
    FusePassthrough,
    FuseOverlayfs,
    FuseOverlayfs2,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Native,
        Kind::Kernel,
        Kind::Fuse,
        Kind::FusePassthrough,
        Kind::FuseOverlayfs,
        Kind::FuseOverlayfs2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Native => "native",
            Kind::Kernel => "kernel",
            Kind::Fuse => "fuse",
            Kind::FusePassthrough => "fuse-pt",
            Kind::FuseOverlayfs => "fuse-overlayfs",
            Kind::FuseOverlayfs2 => "fuse-overlayfs-2",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Native => "native dir",
            Kind::Kernel => "kernel overlay",
            Kind::Fuse => "cachedriver fuse",
            Kind::FusePassthrough => "cachedriver fuse, passthrough=on",
            Kind::FuseOverlayfs => "fuse-overlayfs 1.10 (C)",
            Kind::FuseOverlayfs2 => "fuse-overlayfs 2.0.0 (Rust)",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A backend that can be used, or why not.
pub struct Backend {
    pub kind: Kind,
    /// The FUSE daemon to run.
    pub bin: Option<PathBuf>,
    pub missing: Option<String>,
}

pub use crate::probe::which;

pub fn cachedriver_bin() -> Result<PathBuf, String> {
    // Cargo builds the package's binary for benches and tells us where it is.
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cachedriver"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} does not exist", p.display()))
    }
}

pub fn fo2_bin(cfg: &Config) -> Result<PathBuf, String> {
    let root = cfg.target.join("fo2");
    let bin = root.join("bin/fuse-overlayfs");
    if bin.is_file() {
        return Ok(bin);
    }
    if !cfg.install_fo2 {
        return Err(format!(
            "{} not installed and BENCH_NO_INSTALL=1",
            bin.display()
        ));
    }
    eprintln!(
        "bench: installing fuse-overlayfs 2.0.0 into {} (once) ...",
        root.display()
    );
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "install",
            "fuse-overlayfs",
            "--version",
            "2.0.0",
            "--locked",
            "--root",
        ])
        .arg(&root)
        .env("CARGO_TARGET_DIR", cfg.target.join("fo2-build"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cargo install: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!(
            "cargo install fuse-overlayfs --version 2.0.0 failed: {}",
            last.join(" / ")
        ));
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "cargo install succeeded but {} is missing",
            bin.display()
        ))
    }
}

pub fn resolve(kind: Kind, cfg: &Config) -> Backend {
    let mut b = Backend {
        kind,
        bin: None,
        missing: None,
    };
    let r: Result<Option<PathBuf>, String> = match kind {
        Kind::Native => Ok(None),
        Kind::Kernel => Ok(None),
        Kind::Fuse | Kind::FusePassthrough => cachedriver_bin().map(Some),
        Kind::FuseOverlayfs => which("fuse-overlayfs").map(Some).ok_or_else(|| {
            "fuse-overlayfs not on PATH (apt-get install fuse-overlayfs)".to_string()
        }),
        Kind::FuseOverlayfs2 => fo2_bin(cfg).map(Some),
    };
    match r {
        Ok(bin) => b.bin = bin,
        Err(e) => b.missing = Some(e),
    }
    if matches!(
        kind,
        Kind::Fuse | Kind::FusePassthrough | Kind::FuseOverlayfs | Kind::FuseOverlayfs2
    ) && !Path::new("/dev/fuse").exists()
    {
        b.missing = Some("/dev/fuse does not exist".into());
    }
    b
}

// ---------------------------------------------------------------------------------------------------------
// Cleanup: every mount and the scratch dir are registered here and torn down on exit, panic or signal.

pub struct Registry {
    pub mounts: Vec<PathBuf>,
    pub scratch: Option<PathBuf>,
    pub shutting_down: bool,
}

pub static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    mounts: Vec::new(),
    scratch: None,
    shutting_down: false,
});

pub fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a mount point before mounting; the returned guard holds the registry lock until the mount
/// exists, so [`cleanup_all`] (from the signal thread) either sees it mounted or prevents it.
pub fn register_mount(p: &Path) -> io::Result<std::sync::MutexGuard<'static, Registry>> {
    let mut r = registry();
    if r.shutting_down {
        return Err(io::Error::other("shutting down"));
    }
    r.mounts.push(p.to_path_buf());
    Ok(r)
}

/// Unmounts everything registered and removes the scratch dir, holding the registry lock throughout.
pub fn cleanup_locked(r: &mut Registry) {
    r.shutting_down = true;
    for m in std::mem::take(&mut r.mounts).iter().rev() {
        if nix::mount::umount2(m, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    if let Some(s) = r.scratch.take() {
        let _ = fs::remove_dir_all(&s);
    }
}

pub fn cleanup_all() {
    cleanup_locked(&mut registry());
}

/// Removes everything on drop (normal exit and panics that unwind through `main`).
pub struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup_all();
    }
}

/// SIGINT/SIGTERM/SIGHUP are blocked in every thread and taken by one thread that cleans up and exits.
pub fn install_signal_cleanup() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().expect("block signals");
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("\nbench: {sig:?}: unmounting and removing scratch ...");
            // Keep the lock until the process is gone: the main thread blocks at its next mount,
            // unmount or before writing results, instead of carrying on over a torn-down scratch dir.
            let mut r = registry();
            cleanup_locked(&mut r);
            eprintln!("bench: interrupted; nothing written");
            std::process::exit(130);
        }
    });
}

// ---------------------------------------------------------------------------------------------------------
// Mounting.

pub fn fs_type(p: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(p)
        .ok()
        .map(|s| s.filesystem_type().0)
}

/// One fresh view of the lower tree: a mount with an empty upper, or a native directory.
pub struct Instance {
    pub dir: PathBuf,
    pub view: PathBuf,
    pub mounted: bool,
    pub child: Option<Child>,
    pub pidfile: Option<PathBuf>,
}

impl Instance {
    pub fn new(
        b: &Backend,
        lower: &Path,
        scratch: &Path,
        seq: usize,
        cfg: &Config,
    ) -> io::Result<Instance> {
        let dir = scratch.join(format!("inst-{}-{seq}", b.kind.name()));
        fs::create_dir_all(&dir)?;
        let mut inst = Instance {
            view: dir.join("mnt"),
            dir: dir.clone(),
            mounted: false,
            child: None,
            pidfile: None,
        };
        fs::create_dir(&inst.view)?;
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        match b.kind {
            Kind::Native => {
                // Read-only parts are shared; the parts a workload modifies are fresh copies.
                std::os::unix::fs::symlink(lower.join("tree"), inst.view.join("tree"))?;
                std::os::unix::fs::symlink(lower.join("large"), inst.view.join("large"))?;
                for d in ["cu", "del"] {
                    copy_dir(&lower.join(d), &inst.view.join(d))?;
                }
                let _ = cfg;
                return Ok(inst);
            }
            Kind::Kernel => {
                fs::create_dir(&upper)?;
                fs::create_dir(&work)?;
                let kopts = format!("{opts},index=off,redirect_dir=off,metacopy=off");
                // Registered and mounted under the registry lock, so a signal's cleanup never misses it.
                let _reg = register_mount(&inst.view)?;
                inst.mounted = true;
                nix::mount::mount(
                    Some("overlay"),
                    &inst.view,
                    Some("overlay"),
                    nix::mount::MsFlags::empty(),
                    Some(kopts.as_str()),
                )
                .map_err(|e| io::Error::other(format!("mount -t overlay -o {kopts}: {e}")))?;
                if fs_type(&inst.view) != Some(OVERLAYFS_SUPER_MAGIC) {
                    return Err(io::Error::other("overlay mount did not appear"));
                }
            }
            Kind::Fuse | Kind::FusePassthrough | Kind::FuseOverlayfs | Kind::FuseOverlayfs2 => {
                fs::create_dir(&upper)?;
                fs::create_dir(&work)?;
                let bin = b.bin.as_ref().expect("resolved binary");
                let mut cmd = Command::new(bin);
                match b.kind {
                    Kind::Fuse | Kind::FusePassthrough => {
                        let pidfile = dir.join("pid");
                        let extra = if b.kind == Kind::FusePassthrough {
                            ",passthrough=on"
                        } else {
                            ""
                        };
                        cmd.arg("fuse")
                            .arg("-o")
                            .arg(format!("{opts}{extra},pidfile={}", pidfile.display()));
                        inst.pidfile = Some(pidfile);
                    }
                    // Both fuse-overlayfs daemonize by default; `-f` keeps the daemon our child to reap.
                    _ => {
                        cmd.arg("-f").arg("-o").arg(&opts);
                    }
                }
                // stderr goes to a file: a pipe we stop reading could block or kill a foreground daemon.
                let errlog = dir.join("stderr");
                cmd.arg(&inst.view)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(File::create(&errlog)?);
                let _reg = register_mount(&inst.view)?;
                inst.mounted = true;
                let mut child = cmd.spawn()?;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if fs_type(&inst.view) == Some(FUSE_SUPER_MAGIC) {
                        break;
                    }
                    if let Some(status) = child.try_wait()? {
                        if !status.success() || fs_type(&inst.view) != Some(FUSE_SUPER_MAGIC) {
                            let err = fs::read_to_string(&errlog).unwrap_or_default();
                            return Err(io::Error::other(format!(
                                "{} exited with {status} without mounting: {}",
                                bin.display(),
                                err.trim()
                            )));
                        }
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(io::Error::other(format!(
                            "{}: no mount within 30 s",
                            bin.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                inst.child = Some(child);
            }
        }
        Ok(inst)
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.view.join(rel)
    }

    /// The FUSE daemon's pid.
    pub fn daemon_pid(&self) -> Option<u32> {
        match &self.pidfile {
            Some(p) => fs::read_to_string(p).ok()?.trim().parse().ok(),
            None => self.child.as_ref().map(Child::id),
        }
    }
}

/// (idle or current VmRSS, VmHWM) of a FUSE daemon, in KiB.
pub type MemKib = (u64, u64);

/// (VmRSS, VmHWM) of a process in KiB, from /proc/PID/status.
pub fn proc_mem(pid: u32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.mounted {
            let mut ok = false;
            for _ in 0..100 {
                match nix::mount::umount2(&self.view, nix::mount::MntFlags::empty()) {
                    Ok(()) | Err(nix::errno::Errno::EINVAL) => {
                        ok = true;
                        break;
                    }
                    Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
            if !ok {
                let _ = nix::mount::umount2(&self.view, nix::mount::MntFlags::MNT_DETACH);
            }
            registry().mounts.retain(|m| m != &self.view);
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self
            .pidfile
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse().ok())
        {
            let pid = nix::unistd::Pid::from_raw(pid);
            let deadline = Instant::now() + Duration::from_secs(10);
            while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}
