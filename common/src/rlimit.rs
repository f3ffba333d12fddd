//! RLIMIT_NOFILE: a root process that walks container-written trees and serves many mounts
//! should not stop at the default soft limit of 1024 descriptors.

use std::io;

/// How far the hard limit is raised when we may (containerd's and systemd's usual ceiling).
pub const NOFILE_TARGET: u64 = 1 << 20;

/// The limit before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit at entry.
    pub soft_before: u64,
    /// Hard limit at entry.
    pub hard_before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit now.
    pub hard: u64,
}

fn get() -> io::Result<libc::rlimit> {
    // SAFETY: rlimit is plain old data; the pointer is valid for the call.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rl)
}

fn set(soft: u64, hard: u64) -> io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: valid pointer to a local rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's ceiling for any process's descriptor limit (`/proc/sys/fs/nr_open`).
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NOFILE_TARGET)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and, where we may (CAP_SYS_RESOURCE, as
/// root), the hard limit first toward `min(nr_open, 1 << 20)`. Never lowers anything. Returns
/// what it found and what it set, for the caller to log.
pub fn raise_nofile() -> io::Result<NofileLimit> {
    let rl = get()?;
    let (soft_before, hard_before) = (rl.rlim_cur, rl.rlim_max);
    let target = NOFILE_TARGET.min(nr_open());
    let mut hard = hard_before;
    // An EPERM here only means we may not raise the hard limit: keep the one we have.
    if hard < target && set(target, target).is_ok() {
        hard = target;
    }
    if soft_before < hard {
        set(hard, hard)?;
    }
    let now = get()?;
    Ok(NofileLimit {
        soft_before,
        hard_before,
        soft: now.rlim_cur,
        hard: now.rlim_max,
    })
}

/// The current soft RLIMIT_NOFILE (1024 if it cannot be read).
pub fn nofile_soft() -> u64 {
    get().map(|r| r.rlim_cur).unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn raise_never_lowers() {
        let before = super::get().unwrap();
        let l = super::raise_nofile().unwrap();
        assert_eq!(l.soft_before, before.rlim_cur);
        assert!(l.soft >= l.soft_before && l.hard >= l.hard_before);
        assert_eq!(l.soft, l.hard, "soft raised to hard");
    }
}
