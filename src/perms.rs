//! Store permissions: no host user may reach a file a container wrote (DESIGN §3; the pattern
//! of CVE-2021-41091, where a host user ran a setuid-root binary out of Docker's data dirs).
//!
//! Every directory of the store is created and kept at 0700, owner root (the plugin's user):
//!
//! | dir | mode | why |
//! |---|---|---|
//! | `<root>` | 0700 | nothing under it needs a non-root path walk |
//! | `lower/`, `lower/<cache>/` | 0700 | layers hold what containers committed (setuid binaries, secrets) |
//! | `upper/`, `upper/<cache>/` | 0700 | live sessions' writes |
//! | `work/`, `work/<cache>/`, `work/<cache>/<id>/` | 0700 | overlay scratch, pid files |
//! | `merged/`, `merged/<cache>/`, `merged/<cache>/<id>/` | 0700 | the views: reachable only through the container's bind mount |
//! | `volumes/` | 0700 | records (files 0600) |
//!
//! Nothing needs 0711: the engines bind-mount a view as root (runc opens mount sources before
//! it enters a user namespace), overlayfs reaches its layers with the mounter's credentials, and
//! the FUSE server (root, `allow_other`, `default_permissions`) holds its layers open; the
//! kernel checks permissions inside the view, never on our parents. The roots of a session's
//! upper and of each layer keep the cache root's owner and mode (what the container sees as
//! its volume root); they are unreachable behind their 0700 parents.
//!
//! A store made by an earlier version (0755 dirs) is tightened by [`secure_store`] at open.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// Mode of every directory the store makes for itself.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// The store's top-level directories.
pub const TOP_DIRS: [&str; 5] = ["lower", "upper", "work", "merged", "volumes"];

/// Sets `path`'s mode to `mode` unless it already has it. `follow` is for the root (the
/// administrator's path); below it a symlink is never followed (and never chmodded).
fn set_dir_mode(path: &Path, mode: u32, follow: bool) -> Result<()> {
    let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::BadRequest(format!("path {} holds a NUL byte", path.display())))?;
    // SAFETY: valid C string; the fd returned is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        // A symlink (ELOOP) or file (ENOTDIR) where a dir should be is not ours to change.
        if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
            tracing::warn!(path = %path.display(), "not a directory; left as it is");
            return Ok(());
        }
        return Err(Error::io("opening store directory", path, e));
    }
    // SAFETY: open returned a fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = fs::File::from(fd);
    let old = f.metadata().ctx("inspecting store directory", path)?.mode() & 0o7777;
    if old == mode {
        return Ok(());
    }
    // SAFETY: plain syscall on an fd we hold.
    if unsafe { libc::fchmod(f.as_raw_fd(), mode) } != 0 {
        return Err(Error::io(
            "restricting store directory",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    tracing::info!(path = %path.display(), old = format!("{old:o}"), new = format!("{mode:o}"),
        "restricted store directory to root");
    Ok(())
}

/// Makes the store's root, its top-level dirs and the per-cache dirs under `lower/`, `upper/`,
/// `work/` and `merged/` 0700 (the dirs below are then out of reach whatever their modes, and
/// the layer and upper roots must keep theirs). Cheap when nothing needs changing.
pub fn secure_store(root: &Path) -> Result<()> {
    set_dir_mode(root, PRIVATE_DIR_MODE, true)?;
    for top in TOP_DIRS {
        let dir = root.join(top);
        set_dir_mode(&dir, PRIVATE_DIR_MODE, false)?;
        if top == "volumes" {
            continue;
        }
        for e in fs::read_dir(&dir)
            .ctx("listing store directory", &dir)?
            .flatten()
        {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                set_dir_mode(&e.path(), PRIVATE_DIR_MODE, false)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tightens_an_old_store_but_not_layer_roots_or_links() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("store");
        for p in [
            "lower/c/0",
            "upper/c/s",
            "work/c/s",
            "merged/c/s",
            "volumes",
        ] {
            fs::create_dir_all(root.join(p)).unwrap();
        }
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("lower/link")).unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        for p in ["", "lower", "lower/c", "lower/c/0", "upper/c/s", "merged/c"] {
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(0o755)).unwrap();
        }
        secure_store(&root).unwrap();
        for p in [
            "", "lower", "lower/c", "upper", "upper/c", "work/c", "merged/c", "volumes",
        ] {
            assert_eq!(mode(&root.join(p)), 0o700, "{p}");
        }
        assert_eq!(
            mode(&root.join("lower/c/0")),
            0o755,
            "layer root keeps its mode"
        );
        assert_eq!(
            mode(&root.join("upper/c/s")),
            0o755,
            "upper root keeps its mode"
        );
        assert_eq!(mode(&outside), 0o755, "a symlink's target is never changed");
    }
}
