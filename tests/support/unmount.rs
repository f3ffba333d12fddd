//! The drop guards' last step: lazily unmount whatever a test or bench left mounted below its
//! temp root, even on panic (`#[path = "support/unmount.rs"] mod unmount;`).

use std::path::{Path, PathBuf};

/// Lazily unmounts every mount at or below `dir` in our namespace, deepest first (errors
/// ignored). A point mounted twice is detached twice.
pub fn unmount_below(dir: &Path) {
    let mut points: Vec<PathBuf> = cachedriver_common::mounts::mount_table()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort();
    points.reverse();
    for m in points {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}
