//! cachedriver-fuse: a union filesystem in FUSE with kernel-overlayfs semantics and the kernel's
//! upper-dir format, used by cachedriver where kernel overlayfs is not available (rootless or
//! restricted hosts). Command line compatible with fuse-overlayfs.

mod copyup;
mod daemon;
mod fs;
mod handle;
mod inode;
mod layers;
mod name;
pub mod options;
mod prefetch;
mod sys;
mod union;
pub mod whiteout;

/// The mount table reader lives in `cachedriver_common::mounts`; re-exported for old callers.
pub use cachedriver_common::mounts::mount_table;

use std::ffi::OsString;

use fuser::{Config, Session, SessionACL};

use crate::options::Options;
use crate::whiteout::XattrNs;

/// stderr that never fails: a log reader going away (a closed pipe) must not take the mount
/// down with it.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logging(debug: bool) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::WARN
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(|| LossyStderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

/// Runs the fuse-overlayfs-compatible command line (`[SOURCE] MOUNTPOINT -o lowerdir=..,upperdir=..,workdir=..`).
/// `args` excludes the program name. Returns the process exit code.
pub fn cli_main(args: Vec<OsString>) -> i32 {
    let mut opts = match options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cachedriver-fuse: {e}");
            return 1;
        }
    };
    init_logging(opts.debug);
    for i in &opts.ignored {
        tracing::warn!("option {i:?} is accepted for fuse-overlayfs compatibility and ignored");
    }
    let mountpoint = match daemon::check_mountpoint(&opts.mountpoint) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cachedriver-fuse: {e}");
            return 1;
        }
    };
    let userns = cachedriver_common::userns::in_user_namespace();
    let ns = opts.xattr.unwrap_or(if userns {
        XattrNs::User
    } else {
        XattrNs::Trusted
    });
    let layers = match layers::Layers::open(&opts, ns) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cachedriver-fuse: {e}");
            return 1;
        }
    };
    // Open files and directories of every container using the mount are descriptors here.
    match cachedriver_common::rlimit::raise_nofile() {
        Ok(l) => tracing::info!(
            "RLIMIT_NOFILE soft {} -> {}, hard {} -> {}",
            l.soft_before,
            l.soft,
            l.hard_before,
            l.hard
        ),
        Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    // Modes from the kernel are already umasked; ours must not mask them again.
    // SAFETY: trivial syscall.
    unsafe { libc::umask(0) };
    // The daemon changes to "/": a relative pid file path must not change meaning.
    if let Some(p) = opts.pidfile.take() {
        opts.pidfile = Some(std::path::absolute(&p).unwrap_or(p));
    }
    let ready = if opts.foreground {
        daemon::Ready::foreground()
    } else {
        match daemon::daemonize() {
            Ok(code) => return code,
            Err(ready) => ready,
        }
    };
    serve(opts, mountpoint, layers, userns, ready)
}

fn serve(
    opts: Options,
    mountpoint: std::path::PathBuf,
    layers: layers::Layers,
    userns: bool,
    mut ready: daemon::Ready,
) -> i32 {
    let read_only = !layers.has_upper;
    let fs =
        fs::UnionFs::new(layers, opts.timeout, opts.passthrough, userns).with_no_open(opts.no_open);
    let mut cfg = Config::default();
    cfg.acl = SessionACL::All;
    let ncpu = std::thread::available_parallelism().map_or(2, |n| n.get());
    // One worker per CPU (at least two, so a slow disk read never stalls everything): more
    // threads than CPUs measured slower here on hot-cache metadata work.
    cfg.n_threads = Some(opts.threads.unwrap_or(ncpu.clamp(2, 16)));
    cfg.clone_fd = true;
    let sigs = daemon::block_signals();
    let dev = match daemon::fuse_mount(&mountpoint, &opts.source, read_only) {
        Ok(d) => d,
        Err(e) => {
            ready.fail(&format!("mounting on {mountpoint:?}: {e}"));
            return 1;
        }
    };
    let notifier_slot = fs.notifier_slot();
    let session = match Session::from_fd(fs, dev, SessionACL::All, cfg) {
        Ok(s) => s,
        Err(e) => {
            daemon::unmount(&mountpoint);
            ready.fail(&format!("mounting on {mountpoint:?}: {e}"));
            return 1;
        }
    };
    let _ = notifier_slot.set(session.notifier());
    if let Some(p) = &opts.pidfile {
        if let Err(e) = daemon::write_pidfile(p) {
            ready.fail(&format!("pidfile {p:?}: {e}"));
            daemon::unmount(&mountpoint);
            return 1;
        }
    }
    ready.ok();
    if !opts.foreground {
        daemon::detach_stdio();
    }
    daemon::spawn_signal_thread(sigs, mountpoint.clone());
    fs::spawn_readahead_tuning(mountpoint.clone());
    let code = match session.run() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("session on {mountpoint:?} ended: {e}");
            1
        }
    };
    // Every request has been answered and every worker has stopped: nothing can write the
    // upper any more. Removing the pid file says so even before our zombie is reaped.
    if let Some(p) = &opts.pidfile {
        daemon::remove_pidfile(p);
    }
    code
}
