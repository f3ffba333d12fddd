//! Startup checks for `serve`: what the plugin needs from its host, each refused with one line
//! that names the missing piece and the fix. That line is what an operator sees in
//! `docker plugin enable`'s error or the daemon log, so it must stand on its own.
//!
//! Checked before the socket is bound: mount rights (`CAP_SYS_ADMIN`), a store root that exists
//! or can be made, is writable and reports file types in directory entries (overlayfs needs
//! `d_type`), and a socket directory we can create the socket in. Whether a backend actually
//! mounts is then decided by the probe ([`crate::probe::resolve`]).

use std::path::Path;

use nix::unistd::{access, AccessFlags};

/// `CAP_SYS_ADMIN`'s bit in the capability sets.
const CAP_SYS_ADMIN: u32 = 21;

/// Runs every check; the first failure is the error.
pub fn check(root: &Path, socket: &Path) -> Result<(), String> {
    check_cap_sys_admin()?;
    check_root(root)?;
    check_socket_dir(socket)
}

/// The effective capability set from `/proc/self/status` (`CapEff`), if readable.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn check_cap_sys_admin() -> Result<(), String> {
    match effective_caps() {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) == 0 => Err(
            "missing CAP_SYS_ADMIN (needed to mount overlay and FUSE views): run cachedriver as root, \
             as the managed plugin (plugin/config.json grants it), or inside the rootless engine's \
             user namespace (`podman unshare`, rootlesskit)"
                .into(),
        ),
        _ => Ok(()),
    }
}

fn check_root(root: &Path) -> Result<(), String> {
    std::fs::create_dir_all(root).map_err(|e| {
        format!(
            "store root {} cannot be created ({e}): choose a writable --root / CACHEDRIVER_ROOT",
            root.display()
        )
    })?;
    if let Ok(st) = nix::sys::statvfs::statvfs(root) {
        if st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
            return Err(format!(
                "store root {} is on a read-only filesystem: mount it read-write or choose another --root / CACHEDRIVER_ROOT",
                root.display()
            ));
        }
    }
    access(root, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        format!(
            "store root {} is not writable ({e}): fix its owner/mode or choose another --root / CACHEDRIVER_ROOT",
            root.display()
        )
    })?;
    check_d_type(root)
}

/// overlayfs refuses (or misbehaves on) upper and lower dirs whose filesystem reports
/// `DT_UNKNOWN` for every entry (xfs formatted with `ftype=0`, some network filesystems).
fn check_d_type(root: &Path) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix(".dtype-")
        .tempdir_in(root)
        .map_err(|e| {
            format!(
                "store root {}: cannot create a directory in it: {e}",
                root.display()
            )
        })?;
    std::fs::create_dir(dir.path().join("d")).map_err(|e| {
        format!(
            "store root {}: cannot create a directory in it: {e}",
            root.display()
        )
    })?;
    let mut d = nix::dir::Dir::open(
        dir.path(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("store root {}: reading a directory: {e}", root.display()))?;
    let typed = d
        .iter()
        .flatten()
        .filter(|e| e.file_name().to_bytes() == b"d")
        .any(|e| e.file_type().is_some());
    if !typed {
        return Err(format!(
            "the filesystem of store root {} does not report file types in directory entries (d_type), \
             which overlayfs needs: put the root on ext4, or xfs formatted with ftype=1",
            root.display()
        ));
    }
    Ok(())
}

fn check_socket_dir(socket: &Path) -> Result<(), String> {
    let Some(dir) = socket.parent() else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        format!(
            "socket directory {} cannot be created ({e}): choose a writable --socket / CACHEDRIVER_SOCKET",
            dir.display()
        )
    })?;
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        format!(
            "socket directory {} is not writable ({e}): choose another --socket / CACHEDRIVER_SOCKET",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_temp_root_passes_and_a_file_root_fails() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check_root(d.path()), Ok(()));
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = check_root(&f.join("root")).unwrap_err();
        assert!(e.contains("cannot be created"), "{e}");
    }
}
