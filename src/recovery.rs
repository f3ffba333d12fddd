//! Ending sessions outside a normal last Unmount: startup recovery, the periodic sweep, and the
//! operator's `cachedriver sessions` / `cachedriver end`.
//!
//! Startup recovery (DESIGN §6), for every session record, under its cache's lock:
//! - a commit cut short (`session.committing` set) is finished first ([`crate::commit::finish`]);
//! - a view that some container still uses is kept (re-attached: its next Unmount commits it);
//! - a view mounted but unused, or gone (host reboot), is ended per the rule of
//!   [`crate::sessions`]: unmounted and committed per its mode.
//!
//! Then, per cache: stale temp files of [`crate::fsutil::atomic_write`] (`.NAME.tmp-PID` whose
//! process is gone) are removed, and `upper/<cache>/.orphan-*` dirs (an upper that a Mount found
//! without a session record, moved aside rather than lost) are resolved: an empty one is removed,
//! one holding files is committed as a merge layer on the cache's latest snapshot (its writes
//! survive, as they would on a `local` volume), both logged; `.discard-*` dirs (a discarded
//! upper whose delete was cut short) are deleted.
//!
//! Nothing here looks inside a view: liveness comes from `/proc` only, so a hung FUSE server
//! cannot block startup (its unmount aborts the connection; a server that does not exit is
//! killed by the backend).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::commit::Outcome;
use crate::driver::Driver;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, remove_tree};
use crate::names::CommitMode;
use crate::sessions::{self, Users};
use crate::store::VolumeRecord;

/// What startup recovery did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryReport {
    /// Sessions whose view is still used: kept.
    pub kept: Vec<String>,
    /// Sessions ended (committed per mode).
    pub ended: Vec<String>,
    /// Interrupted commits finished.
    pub finished: Vec<String>,
    /// Sessions that could not be ended (error text); retried by the sweep.
    pub failed: Vec<(String, String)>,
    /// Temp files and orphan uppers removed or committed.
    pub cleaned: Vec<String>,
}

/// One session, for `cachedriver sessions`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// The volume.
    pub volume: String,
    /// Its cache.
    pub cache: String,
    /// Backend of the view.
    pub backend: String,
    /// Outstanding Mount calls per mount ID.
    pub mounts: std::collections::BTreeMap<String, u32>,
    /// When it started.
    pub started_at: String,
    /// A commit in progress (or cut short).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committing: Option<String>,
    /// Who uses its view.
    pub users: Users,
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The writer's pid of an [`crate::fsutil::atomic_write`] temp file name: `.NAME.tmp-PID` or
/// `.NAME.tmp-PID-COUNTER`; `None` for any other name.
fn temp_writer_pid(name: &str) -> Option<i32> {
    let (_, tail) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let pid = match tail.split_once('-') {
        Some((pid, seq)) if !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) => pid,
        Some(_) => return None,
        None => tail,
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// When this process started (`/proc/self/stat` start time after boot, plus boot time).
fn own_start_time() -> Option<std::time::SystemTime> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses; starttime is 22nd.
    let rest = &stat[stat.rfind(')')? + 2..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(btime * 1000 + ticks * 1000 / hz))
}

/// True when the temp file `path` of writer `pid` may still be in use: the writer is a live
/// cachedriver process other than us, or is us and wrote it since we started (startup
/// recovery runs while requests are already served). Ours from before our start is a previous
/// incarnation's (the same pid after a restart, as in a container); a pid reused by some other
/// program does not keep a stale temp file either.
fn temp_in_use(pid: i32, path: &Path) -> bool {
    if pid == std::process::id() as i32 {
        let written = fs::symlink_metadata(path).and_then(|m| m.modified());
        return match (written, own_start_time()) {
            // One second of slack: start time has clock-tick granularity.
            (Ok(w), Some(start)) => w + std::time::Duration::from_secs(1) >= start,
            _ => true,
        };
    }
    live_writer(pid)
}

/// True when `pid` is a live cachedriver process (other than us): its temp files may still be
/// in use. A pid reused by some other program does not keep a stale temp file.
fn live_writer(pid: i32) -> bool {
    if pid == std::process::id() as i32 || !pid_alive(pid) {
        return false;
    }
    let ours = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("cachedriver"))
    };
    match fs::read_link(format!("/proc/{pid}/exe")) {
        // `(deleted)` suffix after a rebuild still starts with the binary's name.
        Ok(exe) => ours(&exe),
        // Not readable (process exiting, or no /proc): assume the writer is live, the safe side.
        Err(_) => fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().starts_with("cachedriver"))
            .unwrap_or(true),
    }
}

/// Removes atomic-write temp files (`.NAME.tmp-PID[-COUNTER]`) in `dir` whose writer is gone,
/// is not a cachedriver process, or is a previous incarnation of us (see [`temp_in_use`]).
fn remove_stale_temps(dir: &Path, report: &mut RecoveryReport) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    let mut removed = false;
    for e in rd.flatten() {
        let Some(n) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Some(pid) = temp_writer_pid(&n) else {
            continue;
        };
        if temp_in_use(pid, &e.path()) {
            continue;
        }
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            // One file that cannot go does not keep the others.
            let r = remove_stale_temp(&e.path());
            match r {
                Ok(()) => {
                    tracing::info!(file = %e.path().display(), "removed a stale temp file");
                    report.cleaned.push(e.path().display().to_string());
                    removed = true;
                }
                Err(err) => {
                    tracing::error!(file = %e.path().display(), error = %err, "could not remove a stale temp file")
                }
            }
        }
    }
    if removed {
        fsync_dir(dir)?;
    }
    Ok(())
}

impl Driver {
    /// Startup recovery (see the module doc). Errors of one session are logged and reported,
    /// never stop the others.
    pub fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        crate::failpoint!("recovery::start");
        if let Err(e) = remove_stale_temps(&self.store().root().join("volumes"), &mut report) {
            tracing::error!(error = %e, "could not clean up the volume records' temp files");
        }
        for v in self.store().list_volumes()? {
            if v.session.is_none() {
                // An upper no record names: a crash between making it and recording the session.
                let upper = self.store().upper_dir(&v.cache, &v.id);
                if fs::symlink_metadata(&upper).is_ok() {
                    let r = self.lock_volume(&v.name).and_then(|(_lock, rec)| {
                        if rec.session.is_none() {
                            self.resolve_stale_upper(&rec)?;
                        }
                        Ok(())
                    });
                    match r {
                        Ok(()) => report.cleaned.push(upper.display().to_string()),
                        Err(e) => {
                            tracing::error!(volume = %v.name, error = %e, "could not resolve a stale upper dir")
                        }
                    }
                }
                continue;
            }
            match self.recover_one(&v.name) {
                Ok(Some(what)) => match what {
                    Recovered::Kept(users) => {
                        tracing::info!(volume = %v.name, users = %users, "session from an earlier run is still used: kept");
                        report.kept.push(v.name.clone());
                    }
                    Recovered::Ended => report.ended.push(v.name.clone()),
                    Recovered::Finished => report.finished.push(v.name.clone()),
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(volume = %v.name, error = %e, "could not recover session; the sweep retries");
                    report.failed.push((v.name.clone(), e.to_string()));
                }
            }
        }
        for cache in self.store().list_caches()? {
            if let Err(e) = self.clean_cache(&cache, &mut report) {
                tracing::error!(cache, error = %e, "could not clean up cache");
            }
        }
        tracing::info!(
            kept = report.kept.len(),
            ended = report.ended.len(),
            finished = report.finished.len(),
            failed = report.failed.len(),
            cleaned = report.cleaned.len(),
            "startup recovery done"
        );
        Ok(report)
    }

    fn recover_one(&self, name: &str) -> Result<Option<Recovered>> {
        let (_lock, mut rec) = self.lock_volume(name)?;
        let Some(s) = rec.session.clone() else {
            return Ok(None);
        };
        if s.committing.is_some() {
            self.settle(&mut rec)?;
            if rec.session.is_none() {
                return Ok(Some(Recovered::Finished));
            }
        }
        let users = self.users_of(&rec);
        if users.in_use() {
            return Ok(Some(Recovered::Kept(users.describe())));
        }
        if !s.mounts.is_empty() && self.within_orphan_grace(name) {
            // Mounted moments before the restart: its container may not have the view yet.
            // The sweep ends it once the grace has passed if nobody took it.
            return Ok(Some(Recovered::Kept(
                "nobody yet, but mounted within the orphan grace".into(),
            )));
        }
        crate::failpoint!("recovery::before_end");
        let why = if users.mounted {
            "recovery: view mounted but nobody uses it"
        } else {
            "recovery: view gone (host or plugin namespace restart)"
        };
        self.end_session(&mut rec, why)?;
        Ok(Some(Recovered::Ended))
    }

    fn users_of(&self, rec: &VolumeRecord) -> Users {
        sessions::users(
            &self.store().merged_dir(&rec.cache, &rec.id),
            &self.store().upper_dir(&rec.cache, &rec.id),
        )
    }

    /// Temp files of the cache's state and orphan uppers (module doc).
    fn clean_cache(&self, cache: &str, report: &mut RecoveryReport) -> Result<()> {
        let _lock = self.store().lock_cache(cache)?;
        remove_stale_temps(&self.store().cache_dir(cache), report)?;
        let dir = self.store().root().join("upper").join(cache);
        let Ok(rd) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let Some(n) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let path = e.path();
            if n.starts_with(crate::commit::DISCARD_PREFIX) {
                // A discarded upper whose delete a crash cut short: finish deleting it.
                crate::failpoint!("recovery::remove_discarded");
                match remove_tree(&path) {
                    Ok(()) => report.cleaned.push(path.display().to_string()),
                    Err(e) => {
                        tracing::error!(dir = %path.display(), error = %e, "could not remove a discarded upper dir")
                    }
                }
                continue;
            }
            if !n.starts_with(".orphan-") || !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            match self.resolve_orphan_upper(cache, &path, &n) {
                Ok(true) => report.cleaned.push(path.display().to_string()),
                Ok(false) => {}
                // The next start retries; the other orphans go on.
                Err(e) => {
                    tracing::error!(dir = %path.display(), error = %e, "could not resolve an orphaned upper dir")
                }
            }
        }
        Ok(())
    }

    /// Resolves an upper dir that no session record names (`.orphan-*`, or a stale upper a
    /// Mount found): an empty one is removed; one holding entries is committed as a merge layer
    /// on the cache's latest snapshot, its writes kept as a `local` volume would keep them.
    /// `origin` is recorded as the layer's session. Returns false when it was left in place
    /// (the cache has no state yet). The caller holds the cache lock.
    pub(crate) fn resolve_orphan_upper(
        &self,
        cache: &str,
        path: &Path,
        origin: &str,
    ) -> Result<bool> {
        let dir = self.store().root().join("upper").join(cache);
        if crate::fsutil::dir_is_empty(path)? {
            crate::failpoint!("recovery::remove_orphan");
            remove_tree(path)?;
            tracing::info!(dir = %path.display(), "removed an empty orphaned upper dir");
            return Ok(true);
        }
        let Some(mut state) = self.store().load_state(cache)? else {
            return Ok(false);
        };
        let parent = state.state.latest.clone();
        let layer =
            state.unique_layer_name("orphan", |l| self.store().layer_dir(cache, l).exists());
        let dest = self.store().layer_dir(cache, &layer);
        let top = self.store().layer_dir(cache, &parent);
        // The orphan's root attributes are whatever its dead session gave it; the cache root's
        // owner/mode should not change because of it.
        if let Ok(m) = fs::symlink_metadata(&top) {
            let _ = std::os::unix::fs::lchown(path, Some(m.uid()), Some(m.gid()));
            let _ = fs::set_permissions(
                path,
                std::os::unix::fs::PermissionsExt::from_mode(m.mode() & 0o7777),
            );
        }
        crate::fsutil::syncfs(path)?;
        crate::failpoint!("recovery::orphan_before_rename");
        fs::rename(path, &dest).ctx("promoting orphaned upper dir to layer", &dest)?;
        fsync_dir(&self.store().cache_dir(cache))?;
        fsync_dir(&dir)?;
        crate::failpoint!("recovery::orphan_before_state");
        state.push_layer(&layer, &parent, origin);
        self.store().save_state(cache, &state)?;
        tracing::warn!(dir = %path.display(), layer, parent, "committed an orphaned upper dir as a merge layer");
        Ok(true)
    }

    /// Ends every session nobody uses (the periodic sweep). Skips caches that are busy and
    /// sessions with counted mounts whose volume was mounted within the orphan grace; returns how many sessions it ended, or `None`
    /// when another sweep is still running.
    pub fn sweep(&self) -> Option<usize> {
        if self.sweeping.swap(true, Ordering::SeqCst) {
            return None;
        }
        let mut ended = 0;
        let vols = self.store().list_volumes().unwrap_or_default();
        for v in vols.iter().filter(|v| v.session.is_some()) {
            let Ok(Some(_lock)) = self.store().try_lock_cache(&v.cache) else {
                continue;
            };
            let r: Result<bool> = (|| {
                let Some(mut rec) = self.store().load_volume(&v.name)? else {
                    return Ok(false);
                };
                self.settle(&mut rec)?;
                let Some(s) = &rec.session else {
                    return Ok(true);
                };
                // A fresh Mount's container may not have the view yet; a session with no
                // counts left has no Mount in flight.
                if !s.mounts.is_empty() && self.within_orphan_grace(&v.name) {
                    return Ok(false);
                }
                if self.users_of(&rec).in_use() {
                    return Ok(false);
                }
                crate::failpoint!("driver::sweep_before_end");
                self.end_session(&mut rec, "sweep: nobody uses its view")?;
                Ok(true)
            })();
            match r {
                Ok(true) => ended += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(volume = %v.name, error = %e, "sweep could not end session")
                }
            }
        }
        self.sweeping.store(false, Ordering::SeqCst);
        Some(ended)
    }

    /// Every session with its users (for `cachedriver sessions`).
    pub fn sessions(&self) -> Result<Vec<SessionInfo>> {
        let scan = sessions::Scan::take();
        Ok(self
            .store()
            .list_volumes()?
            .into_iter()
            .filter_map(|v| {
                let s = v.session.clone()?;
                Some(SessionInfo {
                    users: scan.users(
                        &self.store().merged_dir(&v.cache, &v.id),
                        &self.store().upper_dir(&v.cache, &v.id),
                    ),
                    volume: v.name,
                    cache: v.cache,
                    backend: s.backend.as_str().into(),
                    mounts: s.mounts,
                    started_at: s.started_at,
                    committing: s.committing,
                })
            })
            .collect())
    }

    /// Ends a volume's session for an operator (`cachedriver end`): committed per its mode, or
    /// discarded with `discard`. Refused while a container or process uses the view: ending it
    /// would take the files from under a running container (stop the container first).
    pub fn end(&self, name: &str, discard: bool) -> Result<Option<Outcome>> {
        let (_lock, mut rec) = self.lock_volume(name)?;
        self.settle(&mut rec)?;
        if rec.session.is_none() {
            return Ok(None);
        }
        let users = self.users_of(&rec);
        if users.in_use() {
            return Err(Error::Conflict(format!(
                "volume {name:?} is still used by {}; stop the container(s) using it first",
                users.describe()
            )));
        }
        let mode = if discard {
            CommitMode::Discard
        } else {
            rec.commit.unwrap_or(self.config().commit)
        };
        self.end_session_as(&mut rec, mode, "ended by the operator")
            .map(Some)
    }
}

enum Recovered {
    Kept(String),
    Ended,
    Finished,
}

/// Removes one stale temp file (its own step, for the failpoint).
fn remove_stale_temp(path: &std::path::Path) -> Result<()> {
    crate::failpoint!("recovery::remove_temp");
    fs::remove_file(path).ctx("removing stale temp file", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_old_and_new_forms() {
        assert_eq!(temp_writer_pid(".fp-r1.json.tmp-13879"), Some(13879));
        assert_eq!(temp_writer_pid(".fp-r1.json.tmp-13879-0"), Some(13879));
        assert_eq!(temp_writer_pid(".cache-state.json.tmp-42-17"), Some(42));
        for bad in [
            "fp-r1.json.tmp-1",
            ".fp-r1.json",
            ".x.tmp-",
            ".x.tmp-12-",
            ".x.tmp-12-a",
            ".x.tmp--3",
            ".x.tmp-0",
            ".x.tmp-1-2-3",
        ] {
            assert_eq!(temp_writer_pid(bad), None, "{bad}");
        }
    }

    #[test]
    fn stale_temps_removed_live_writer_kept() {
        let d = tempfile::tempdir().unwrap();
        // A dead pid: the highest possible pid is never live in practice.
        let dead = i32::MAX - 1;
        let me = std::process::id();
        // pid 1 is alive but is not cachedriver: its "temp" is stale too.
        let names = [
            format!(".v.json.tmp-{dead}"),
            format!(".v.json.tmp-{dead}-3"),
            format!(".w.json.tmp-{me}-0"),
            format!(".u.json.tmp-{me}-1"),
            ".z.json.tmp-1-5".to_string(),
            "v.json".to_string(),
        ];
        for n in &names {
            fs::write(d.path().join(n), b"x").unwrap();
        }
        // Ours from before we started: a previous incarnation's. Ours since: a write in flight.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(24 * 3600);
        fs::OpenOptions::new()
            .write(true)
            .open(d.path().join(format!(".w.json.tmp-{me}-0")))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let mut r = RecoveryReport::default();
        remove_stale_temps(d.path(), &mut r).unwrap();
        let mut left: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![format!(".u.json.tmp-{me}-1"), "v.json".to_string()]
        );
        assert_eq!(r.cleaned.len(), 4);
    }

    #[test]
    fn live_cachedriver_writer_detection() {
        assert!(!live_writer(std::process::id() as i32));
        assert!(!live_writer(i32::MAX - 1));
        let start = own_start_time().expect("start time");
        assert!(start <= std::time::SystemTime::now());
    }
}
