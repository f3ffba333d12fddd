//! Backends make a session's merged view: kernel overlayfs, or our FUSE union filesystem.
//!
//! Both take the same inputs (lower layers newest first, an upper and a work dir) and leave the
//! upper dir in the kernel's format, so commit, GC and compaction never know which one ran.

mod fuse;
mod kernel;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use fuse::Fuse;
pub use kernel::Kernel;

use crate::error::{Error, Result};
use crate::state::XattrNs;

/// Which backend mounted a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Kernel overlayfs.
    Kernel,
    /// cachedriver-fuse, one process per session.
    Fuse,
}

impl BackendKind {
    /// `kernel` or `fuse`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Fuse => "fuse",
        }
    }
}

/// What `--backend` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Kernel overlayfs if a probe mount works, else FUSE.
    Auto,
    /// Kernel overlayfs only.
    Kernel,
    /// FUSE only.
    Fuse,
}

/// Everything a backend needs to mount one session.
#[derive(Debug)]
pub struct MountSpec<'a> {
    /// Lower layers, newest (topmost) first.
    pub lowers: Vec<PathBuf>,
    /// The session's upper dir.
    pub upper: &'a Path,
    /// The session's work dir (same filesystem as `upper`).
    pub work: &'a Path,
    /// Where the merged view goes.
    pub target: &'a Path,
    /// The xattr namespace for overlay markers.
    pub xattr: XattrNs,
    /// Where a FUSE server writes its pid.
    pub pid_file: &'a Path,
}

/// What a backend reports about a mount it made.
#[derive(Debug, Clone, Default)]
pub struct Mounted {
    /// The serving process, for FUSE.
    pub pid: Option<i32>,
    /// How the mount was made, in words (the kernel backend's mount path and why), for `probe`.
    pub how: String,
}

/// A way to make (and tear down) a merged view.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Mounts the merged view at `spec.target`.
    fn mount(&self, spec: &MountSpec<'_>) -> Result<Mounted>;
    /// Unmounts `target`; when it returns, nothing can write the upper dir any more.
    fn unmount(&self, target: &Path, pid: Option<i32>) -> Result<()>;
    /// True when a live mount of this backend is at `target`.
    fn is_mounted(&self, target: &Path) -> bool;
}

/// The backend for `kind`; `exe` is the binary whose `fuse` subcommand serves FUSE mounts.
pub fn for_kind(kind: BackendKind, exe: &Path) -> Box<dyn Backend> {
    match kind {
        BackendKind::Kernel => Box::new(Kernel::new()),
        BackendKind::Fuse => Box::new(Fuse::new(exe.to_path_buf())),
    }
}

/// Unmounts `target` (not lazily: a lazy unmount would let a busy writer keep changing an upper
/// dir that is about to become an immutable layer). Retries briefly while it is busy.
pub(crate) fn unmount_path(target: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match nix::mount::umount2(target, nix::mount::MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                // Not a mount point (already gone).
                return Ok(());
            }
            Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(Error::Backend(format!(
                    "unmounting {}: {e}{}",
                    target.display(),
                    if e == nix::errno::Errno::EBUSY {
                        " (a process still uses the volume)"
                    } else {
                        ""
                    }
                )))
            }
        }
    }
}
