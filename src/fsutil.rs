//! Small filesystem helpers shared by the store and the backends: crash-safe writes, directory
//! fsync, tree walks that never follow symlinks, mount table lookups.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{IoContext, Result};

/// Fsyncs a directory so that a rename or create inside it survives power loss.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).ctx("opening directory for fsync", dir)?;
    f.sync_all().ctx("fsyncing directory", dir)
}

/// Writes `data` to `path` atomically: temp file in the same dir, fsync, rename, fsync dir.
/// A crash leaves either the old or the new content, never a mix; an error removes the temp file
/// (only a crash can leave one, for startup recovery to remove).
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    // Unique per call, so two writers of one path in this process never share a temp file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    let write = || -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true) // a crashed run with our pid (pid 1 in a container) may have left it
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .ctx("creating temp file", &tmp)?;
        f.write_all(data).ctx("writing temp file", &tmp)?;
        crate::failpoint!("atomic_write::before_fsync");
        f.sync_all().ctx("fsyncing temp file", &tmp)?;
        drop(f);
        crate::failpoint!("atomic_write::before_rename");
        fs::rename(&tmp, path).ctx("renaming temp file into place", path)
    };
    if let Err(e) = write() {
        // A full disk or an injected error must not leave the half-written temp file behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dir)
}

/// Creates a directory and its parents (each new one 0700: store dirs are root-only, see
/// [`crate::perms`]), fsyncing each new directory's parent.
pub fn create_dir_all_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all_durable(parent)?;
    }
    match fs::DirBuilder::new()
        .mode(crate::perms::PRIVATE_DIR_MODE)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(crate::error::Error::io("creating directory", dir, e)),
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Flushes the whole filesystem holding `path` (the container's writes to an upper dir are not
/// fsynced by anyone else; this makes them durable before the commit names them).
pub fn syncfs(path: &Path) -> Result<()> {
    let f = File::open(path).ctx("opening for syncfs", path)?;
    nix::unistd::syncfs(&f).ctx("syncfs", path)
}

/// True when `dir` has no entries.
pub fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(fs::read_dir(dir)
        .ctx("reading directory", dir)?
        .next()
        .is_none())
}

/// Removes a file or tree if it exists, never following symlinks below `path`, with O(1)
/// descriptors and no recursion whatever the depth, and never descending into another mount
/// (see `cachedriver_common::tree`).
pub fn remove_tree(path: &Path) -> Result<()> {
    cachedriver_common::tree::remove_tree(path).ctx("removing tree", path)
}

/// Sums the allocated size and entry count of a tree, without following symlinks or crossing
/// into other mounts; iterative with O(1) descriptors (`cachedriver_common::tree::walk`).
pub fn tree_usage(path: &Path) -> (u64, u64) {
    let u = cachedriver_common::tree::tree_usage(path);
    (u.bytes, u.entries)
}

/// True when this process runs in a user namespace (one home: `cachedriver_common::userns`).
pub use cachedriver_common::userns::in_user_namespace;

/// The filesystem type mounted at exactly `path`, if it is a mount point in our namespace (the
/// topmost of stacked mounts; one home: `cachedriver_common::mounts`).
pub use cachedriver_common::mounts::mount_fstype;

/// Current time as RFC 3339 UTC (`2026-11-25T02:16:34Z`), for state files and `docker volume inspect`.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn root_is_mounted() {
        assert!(mount_fstype(Path::new("/")).is_some());
    }
}
