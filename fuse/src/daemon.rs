//! Process plumbing: daemonising so that the command returns only once the mount is ready,
//! the readiness pipe, the pid file, mountpoint checks and signal-driven unmount. (The mount
//! table reader is `cachedriver_common::mounts`.)

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use cachedriver_common::mounts::mount_table;

/// Reports the outcome of mounting to the waiting parent (if any): once, one line.
pub struct Ready {
    pipe: Option<std::fs::File>,
}

impl Ready {
    /// A reporter for the foreground case (prints errors itself).
    pub fn foreground() -> Ready {
        Ready { pipe: None }
    }

    /// Tells the parent the mount is ready.
    pub fn ok(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"OK\n");
        }
    }

    /// Tells the parent (or stderr) why mounting failed.
    pub fn fail(&mut self, msg: &str) {
        let line = msg.replace('\n', " ");
        match self.pipe.take() {
            Some(mut p) => {
                let _ = p.write_all(format!("ERR {line}\n").as_bytes());
            }
            None => eprintln!("cachedriver-fuse: {line}"),
        }
    }
}

/// Forks. The parent waits for the child's report and returns the exit code to use; the
/// child returns `Err(Ready)` to go on mounting. Must run before any thread exists.
pub fn daemonize() -> Result<i32, Ready> {
    let mut fds = [0i32; 2];
    // SAFETY: valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!(
            "cachedriver-fuse: pipe: {}",
            std::io::Error::last_os_error()
        );
        return Ok(1);
    }
    // SAFETY: fresh fds owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded at this point (documented precondition).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!(
            "cachedriver-fuse: fork: {}",
            std::io::Error::last_os_error()
        );
        return Ok(1);
    }
    if pid > 0 {
        drop(wr);
        let mut msg = String::new();
        let _ = std::fs::File::from(rd).read_to_string(&mut msg);
        let line = msg.lines().next().unwrap_or("");
        if line == "OK" {
            return Ok(0);
        }
        match line.strip_prefix("ERR ") {
            Some(e) => eprintln!("cachedriver-fuse: {e}"),
            None => {
                eprintln!("cachedriver-fuse: the mount process exited before the mount was ready")
            }
        }
        return Ok(1);
    }
    drop(rd);
    // SAFETY: plain syscalls in the child. chdir("/"): a daemon must not pin whatever
    // filesystem its caller's working directory is on.
    unsafe {
        libc::setsid();
        libc::chdir(c"/".as_ptr());
    }
    Err(Ready {
        pipe: Some(std::fs::File::from(wr)),
    })
}

/// Points stdin/stdout/stderr at /dev/null once the parent has gone.
pub fn detach_stdio() {
    // SAFETY: plain syscalls with valid arguments.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

/// Writes our pid to `path` atomically.
pub fn write_pidfile(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp-cdf");
    // 0600 whatever our umask (the server runs with umask 0); never through a planted link.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Removes the pid file if it still names us.
pub fn remove_pidfile(path: &Path) {
    if let Ok(s) = std::fs::read_to_string(path) {
        if s.trim() == std::process::id().to_string() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Checks the mountpoint: an existing directory, not already one of our mounts. Returns its
/// canonical path.
pub fn check_mountpoint(mp: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(mp).map_err(|e| format!("mountpoint {mp:?}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("mountpoint {mp:?} is not a directory"));
    }
    let canon = std::fs::canonicalize(mp).map_err(|e| format!("mountpoint {mp:?}: {e}"))?;
    if mount_table()
        .iter()
        .any(|(point, fstype)| *point == canon && fstype.starts_with("fuse.cachedriver"))
    {
        return Err(format!(
            "mountpoint {mp:?} is already a cachedriver-fuse mount"
        ));
    }
    Ok(canon)
}

/// Blocks the termination signals in this thread (and every thread created later), so that
/// the signal thread alone receives them.
pub fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    let _ = set.thread_block();
    set
}

/// Mounts a FUSE filesystem of type `fuse.cachedriver-fuse` on `mountpoint` and returns the
/// /dev/fuse fd. (fuser's own mount cannot set the subtype, which mount tables and our
/// "already mounted" check rely on.)
pub fn fuse_mount(mountpoint: &Path, source: &str, read_only: bool) -> std::io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| std::io::Error::new(e.kind(), format!("/dev/fuse: {e}")))?;
    let fd: OwnedFd = dev.into();
    // SAFETY: trivial syscalls.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions,allow_other",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    let src = CString::new(source).unwrap_or_else(|_| c"overlay".to_owned());
    let target = CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let data = CString::new(data).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            c"fuse.cachedriver-fuse".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Unmounts `mountpoint`; lazily when busy.
pub fn unmount(mountpoint: &Path) {
    let Ok(c) = CString::new(mountpoint.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        tracing::warn!(
            "unmount {mountpoint:?}: {}; detaching lazily",
            std::io::Error::last_os_error()
        );
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        std::process::exit(0);
    }
}

/// Waits for a termination signal, then unmounts (lazily if busy) and exits 0.
pub fn spawn_signal_thread(set: nix::sys::signal::SigSet, mountpoint: PathBuf) {
    let res = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!("{sig:?}: unmounting {mountpoint:?}");
            }
            unmount(&mountpoint);
            // The session loop now sees the unmount and returns; exit anyway if it lingers.
            std::thread::sleep(std::time::Duration::from_secs(5));
            std::process::exit(0);
        });
    if let Err(e) = res {
        tracing::warn!("cannot start the signal thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountpoint_must_be_a_dir() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"").unwrap();
        assert!(check_mountpoint(&f)
            .unwrap_err()
            .contains("not a directory"));
        assert!(check_mountpoint(&d.path().join("missing")).is_err());
        assert!(check_mountpoint(d.path()).is_ok());
    }
}
