//! The volume driver: the one place where every state change happens.
//!
//! Each operation takes the cache's lock (an `flock` on `lower/<cache>`: it excludes other
//! threads of this process, which open their own descriptor, as well as other plugin processes
//! sharing the root), re-reads the durable records under it, changes them in a crash-safe order
//! and writes them back. Operations on different caches never wait on each other. All methods
//! block: the server calls them from `spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::backend::{self, Backend, BackendKind, MountSpec};
use crate::commit::{self, Outcome};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_dir_all_durable, now_rfc3339, remove_tree};
use crate::names::{parse_volume, validate_volume, CommitMode, VolumeOptions};
use crate::sessions;
use crate::state::XattrNs;
use crate::store::{CacheLock, Session, Store, VolumeRecord};

/// Longest mount ID we accept (Docker sends 64 hex digits).
const MAX_MOUNT_ID: usize = 256;

/// How long after a Mount a session counts as in use even though no container has its view yet
/// (the engine bind-mounts it into the container only after our reply).
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The backend for new sessions.
    pub backend: BackendKind,
    /// The commit mode of volumes that do not set one.
    pub commit: CommitMode,
    /// Our own binary, whose `fuse` subcommand serves FUSE mounts.
    pub exe: PathBuf,
}

/// What Get and List report about a volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    /// The volume name.
    pub name: String,
    /// The merged dir while mounted.
    pub mountpoint: Option<PathBuf>,
    /// When it was created.
    pub created_at: String,
    /// Cache, base layer, backend, commit mode and session state, for `docker volume inspect`.
    pub status: BTreeMap<String, Value>,
}

/// The driver: a store plus the backend for new sessions.
#[derive(Debug)]
pub struct Driver {
    store: Store,
    config: Config,
    backend: Box<dyn Backend>,
    xattr: XattrNs,
    policy: crate::policy::Policy,
    maintenance: std::sync::OnceLock<crate::maintenance::Notifier>,
    /// Bumped by every `Plugin.Activate`: an engine that activates us again has restarted.
    generation: AtomicU64,
    /// (volume, mount ID) → the generation in which that ID was last counted.
    counted_in: Mutex<HashMap<(String, String), u64>>,
    /// Volume → when this process last mounted it (see [`DEFAULT_ORPHAN_GRACE`]).
    last_mount: Mutex<HashMap<String, Instant>>,
    orphan_grace: Duration,
    /// Set while a sweep runs, so sweeps never pile up.
    pub(crate) sweeping: AtomicBool,
}

impl Driver {
    /// A driver over `store`, after startup recovery ([`Driver::recover`]) has resolved what an
    /// earlier run left: orphaned sessions, commits cut short, temp files.
    pub fn new(store: Store, config: Config) -> Result<Self> {
        let d = Self::open(store, config);
        d.recover()?;
        Ok(d)
    }

    /// A driver over `store` without startup recovery (the server runs [`Driver::recover`] on a
    /// thread after binding its socket; the per-cache locks keep requests consistent meanwhile).
    pub fn open(store: Store, config: Config) -> Self {
        let backend = backend::for_kind(config.backend, &config.exe);
        Driver {
            store,
            backend,
            xattr: XattrNs::for_this_process(),
            config,
            policy: crate::policy::Policy::default(),
            maintenance: std::sync::OnceLock::new(),
            generation: AtomicU64::new(0),
            counted_in: Mutex::new(HashMap::new()),
            last_mount: Mutex::new(HashMap::new()),
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            sweeping: AtomicBool::new(false),
        }
    }

    /// Sets how long after a Mount an unused view still counts as used (default
    /// [`DEFAULT_ORPHAN_GRACE`]).
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// `Plugin.Activate`: the engine (re)started. IDs counted before this are suspect: a Mount of
    /// one of them resets its count instead of adding to it.
    pub fn activate(&self) {
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(generation = g, "activated by the engine");
    }

    fn note_mount(&self, name: &str, id: &str) {
        let g = self.generation.load(Ordering::SeqCst);
        if let Ok(mut m) = self.counted_in.lock() {
            m.insert((name.to_string(), id.to_string()), g);
        }
        if let Ok(mut m) = self.last_mount.lock() {
            m.insert(name.to_string(), Instant::now());
        }
    }

    /// Drops what memory holds about an ended session's mounts (bounded by live sessions).
    fn forget_mounts(&self, name: &str) {
        if let Ok(mut m) = self.counted_in.lock() {
            m.retain(|(v, _), _| v != name);
        }
        if let Ok(mut m) = self.last_mount.lock() {
            m.remove(name);
        }
    }

    /// How long ago this process last mounted `name`, if it did.
    fn mounted_ago(&self, name: &str) -> Option<Duration> {
        self.last_mount
            .lock()
            .ok()
            .and_then(|m| m.get(name).map(|t| t.elapsed()))
    }

    /// True while `name` was mounted by this process within the orphan grace period.
    pub(crate) fn recently_mounted(&self, name: &str) -> bool {
        self.mounted_ago(name)
            .is_some_and(|a| a < self.orphan_grace)
    }

    /// [`Driver::recently_mounted`], and for a session mounted before this process started
    /// (nothing in memory), its record written within the grace: a plugin restart between a
    /// Mount reply and the engine's bind mount must not end that session at startup or in the
    /// first sweep.
    pub(crate) fn within_orphan_grace(&self, name: &str) -> bool {
        self.mounted_ago(name)
            .or_else(|| self.store.volume_saved_ago(name))
            .is_some_and(|a| a < self.orphan_grace)
    }

    fn counted_before_activate(&self, name: &str, id: &str) -> bool {
        let g = self.generation.load(Ordering::SeqCst);
        self.counted_in
            .lock()
            .ok()
            .and_then(|m| m.get(&(name.to_string(), id.to_string())).copied())
            .is_some_and(|when| when < g)
    }

    /// The store this driver works on.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Connects the background maintenance worker, told of every commit.
    pub fn set_maintenance(&self, n: crate::maintenance::Notifier) {
        let _ = self.maintenance.set(n);
    }

    /// The server-wide settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Sets the commit policy (`--commit-on`, `--commit-on-unknown`, the engine's events).
    pub fn set_policy(&mut self, policy: crate::policy::Policy) {
        self.policy = policy;
    }

    /// The commit policy.
    pub fn policy(&self) -> &crate::policy::Policy {
        &self.policy
    }

    fn backend_for(&self, kind: BackendKind) -> Box<dyn Backend> {
        backend::for_kind(kind, &self.config.exe)
    }

    fn volume(&self, name: &str) -> Result<VolumeRecord> {
        self.store
            .load_volume(name)?
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    /// Records a new volume. Mounts nothing; the cache is created on first mount.
    pub fn create(&self, name: &str, opts: &BTreeMap<String, String>) -> Result<()> {
        let o = VolumeOptions::parse(opts)?;
        let vn = parse_volume(name, o.cache.as_deref())?;
        self.policy
            .check_create(o.commit_on.unwrap_or(self.policy.commit_on))?;
        let _lock = self.store.lock_cache(&vn.cache)?;
        if let Some(existing) = self.store.load_volume(name)? {
            // Docker may create again what it already knows; only conflicting options are an error.
            if existing.options == *opts || opts.is_empty() {
                return Ok(());
            }
            return Err(Error::Conflict(format!(
                "volume {name:?} already exists with options {:?}; remove it first to change them",
                existing.options
            )));
        }
        if let Some(other) = self
            .store
            .list_volumes()?
            .into_iter()
            .find(|v| v.cache == vn.cache && v.id == vn.id)
        {
            return Err(Error::Conflict(format!(
                "volume {name:?} would share cache {:?} session {:?} with volume {:?}; pick another name",
                vn.cache, vn.id, other.name
            )));
        }
        crate::failpoint!("driver::create_before_record");
        self.store.save_volume(&VolumeRecord {
            name: name.to_string(),
            cache: vn.cache,
            id: vn.id,
            options: opts.clone(),
            commit: o.commit,
            created_at: now_rfc3339(),
            session: None,
        })?;
        tracing::info!(volume = name, "created");
        Ok(())
    }

    /// Takes the lock of the volume's cache and reads the volume's record under it: the record
    /// read before the lock (to learn the cache) may be stale by the time the lock is held.
    pub(crate) fn lock_volume(&self, name: &str) -> Result<(CacheLock, VolumeRecord)> {
        let cache = self.volume(name)?.cache;
        let lock = self.store.lock_cache(&cache)?;
        Ok((lock, self.volume(name)?))
    }

    /// Forgets a volume. A mounted volume is refused while some container uses its view; a
    /// session nobody uses any more is ended first (committed per its mode). Unknown volumes
    /// are already gone.
    pub fn remove(&self, name: &str) -> Result<()> {
        let (_lock, mut rec) = match self.lock_volume(name) {
            Err(Error::NoSuchVolume(_)) => return Ok(()),
            r => r?,
        };
        self.settle(&mut rec)?;
        if let Some(s) = &rec.session {
            let users = sessions::users(
                &self.store.merged_dir(&rec.cache, &rec.id),
                &self.store.upper_dir(&rec.cache, &rec.id),
            );
            if users.in_use() {
                tracing::info!(volume = name, users = %users.describe(), "remove refused: in use");
                return Err(Error::InUse {
                    volume: name.to_string(),
                    mounts: s.mount_count().max(1),
                });
            }
            self.end_session(&mut rec, "volume removed; nobody uses its view")?;
        } else {
            self.resolve_stale_upper(&rec)?;
        }
        crate::failpoint!("driver::remove_before_delete");
        self.store.delete_volume(name)?;
        tracing::info!(volume = name, "removed");
        Ok(())
    }

    fn check_mount_id(id: &str) -> Result<()> {
        if id.len() > MAX_MOUNT_ID || id.contains('\0') {
            return Err(Error::BadRequest(format!(
                "mount ID must be at most {MAX_MOUNT_ID} bytes without NUL"
            )));
        }
        Ok(())
    }

    fn mount_view(&self, rec: &VolumeRecord, s: &Session) -> Result<Option<i32>> {
        let backend = self.backend_for(s.backend);
        let spec = MountSpec {
            lowers: s
                .lowers
                .iter()
                .map(|l| self.store.layer_dir(&rec.cache, l))
                .collect(),
            upper: &self.store.upper_dir(&rec.cache, &rec.id),
            work: &self.store.work_dir(&rec.cache, &rec.id),
            target: &self.store.merged_dir(&rec.cache, &rec.id),
            xattr: self.xattr,
            pid_file: &self.store.pid_file(&rec.cache, &rec.id),
        };
        create_dir_all_durable(spec.work)?;
        create_dir_all_durable(spec.target)?;
        Ok(backend.mount(&spec)?.pid)
    }

    /// An upper dir with no session record naming it (a crash between making it and recording
    /// the session, or a session record lost): resolved at once as recovery resolves
    /// `.orphan-*` dirs: removed when empty (nothing was ever mounted on it), else committed as
    /// a merge layer. Called under the cache lock, before the new session picks its snapshot.
    pub(crate) fn resolve_stale_upper(&self, rec: &VolumeRecord) -> Result<()> {
        let upper = self.store.upper_dir(&rec.cache, &rec.id);
        match fs::symlink_metadata(&upper) {
            Ok(m)
                if m.is_dir()
                    && rec.commit.unwrap_or(self.config.commit) == CommitMode::Discard =>
            {
                // A discard volume's writes never reach the cache, not even through a crash.
                remove_tree(&upper)?;
                tracing::warn!(volume = %rec.name, upper = %upper.display(), "removed a stale upper dir of a discard volume");
            }
            Ok(m) if m.is_dir() => {
                let origin = format!(".orphan-{}-{}", rec.id, now_rfc3339());
                if self.resolve_orphan_upper(&rec.cache, &upper, &origin)? {
                    tracing::warn!(volume = %rec.name, upper = %upper.display(), "resolved a stale upper dir no session record names");
                }
            }
            // Not a dir: nothing a container could have written through; prepare_upper moves
            // it aside.
            _ => {}
        }
        Ok(())
    }

    /// Saves the record of a session about to be mounted (its own step, for the failpoint).
    fn record_new_session(&self, rec: &VolumeRecord) -> Result<()> {
        crate::failpoint!("driver::mount_before_record");
        self.store.save_volume(rec)
    }

    /// Removes a fresh upper and work dir of a session that was never recorded: no container
    /// saw them, so they hold nothing. Errors are logged: the caller reports its own.
    fn discard_fresh_upper(&self, rec: &VolumeRecord) {
        for d in [
            self.store.upper_dir(&rec.cache, &rec.id),
            self.store.work_dir(&rec.cache, &rec.id),
        ] {
            if let Err(e) = remove_tree(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "could not remove an unused upper/work dir");
            }
        }
    }

    /// Makes a fresh upper dir whose root carries the snapshot root's owner, group and mode.
    fn prepare_upper(&self, rec: &VolumeRecord, top: &Path) -> Result<(u32, u32, u32)> {
        let upper = self.store.upper_dir(&rec.cache, &rec.id);
        if fs::symlink_metadata(&upper).is_ok() {
            // Left by a crash and not resolved by resolve_stale_upper (the cache has no state,
            // or it is not a dir): keep it for recovery rather than losing or reusing it.
            let aside = upper.with_file_name(format!(".orphan-{}-{}", rec.id, now_rfc3339()));
            tracing::warn!(upper = %upper.display(), aside = %aside.display(), "moving a stale upper dir aside");
            fs::rename(&upper, &aside).ctx("moving stale upper dir aside", &upper)?;
        }
        remove_tree(&self.store.work_dir(&rec.cache, &rec.id))?;
        if let Some(p) = upper.parent() {
            create_dir_all_durable(p)?;
        }
        let m = fs::symlink_metadata(top).ctx("inspecting snapshot root", top)?;
        let attrs = (m.uid(), m.gid(), m.mode() & 0o7777);
        fs::create_dir(&upper).ctx("creating upper dir", &upper)?;
        let r = std::os::unix::fs::lchown(&upper, Some(attrs.0), Some(attrs.1))
            .ctx("setting upper dir owner", &upper)
            .and_then(|_| {
                fs::set_permissions(&upper, fs::Permissions::from_mode(attrs.2))
                    .ctx("setting upper dir mode", &upper)
            });
        if let Err(e) = r {
            self.discard_fresh_upper(rec);
            return Err(e);
        }
        Ok(attrs)
    }

    /// Mounts the volume for mount `id`: starts a session on the cache's latest snapshot, or
    /// joins the running one. Returns the merged dir.
    ///
    /// A session nobody uses any more (see [`crate::sessions`]) is the engine having lost its
    /// containers: a Mount of an ID it still counts resets the counts, a Mount of a new ID ends
    /// the orphaned session (committed per its mode) and starts a fresh one.
    pub fn mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        Self::check_mount_id(id)?;
        let started = std::time::Instant::now();
        let (_lock, mut rec) = self.lock_volume(name)?;
        crate::budget::mark_used(&self.store, &rec.cache);
        self.settle(&mut rec)?;
        let merged = self.store.merged_dir(&rec.cache, &rec.id);
        if let Some(s) = rec.session.clone() {
            let upper = self.store.upper_dir(&rec.cache, &rec.id);
            let users = sessions::users(&merged, &upper);
            let counted = s.mounts.contains_key(id);
            if !users.in_use() && (s.mounts.is_empty() || !self.recently_mounted(name)) {
                if counted {
                    tracing::warn!(volume = name, id, stale = ?s.mounts,
                        "nobody uses the session's view: the engine restarted; resetting its mount counts");
                    if let Some(sess) = rec.session.as_mut() {
                        sess.mounts.clear();
                    }
                } else {
                    self.end_session(&mut rec, "orphaned (nobody uses its view)")?;
                }
            } else if counted && self.counted_before_activate(name, id) {
                tracing::warn!(
                    volume = name,
                    id,
                    "ID counted before the engine's new Plugin.Activate: resetting its count"
                );
                if let Some(sess) = rec.session.as_mut() {
                    sess.mounts.remove(id);
                }
            }
            if rec.session.is_some() {
                if !users.mounted && users.in_use() {
                    return Err(Error::Conflict(format!(
                        "volume {name:?}: the session's view is no longer mounted here but is still used by {}; \
                         stop those containers first",
                        users.describe()
                    )));
                }
                if !users.mounted || !self.backend_for(s.backend).is_mounted(&merged) {
                    tracing::warn!(
                        volume = name,
                        "session view is not mounted (host or plugin restart?): remounting"
                    );
                    crate::failpoint!("driver::mount_before_remount");
                    let pid = self.mount_view(&rec, &s)?;
                    if let Some(sess) = rec.session.as_mut() {
                        sess.pid = pid;
                    }
                }
                if let Some(sess) = rec.session.as_mut() {
                    *sess.mounts.entry(id.to_string()).or_insert(0) += 1;
                }
                crate::failpoint!("driver::mount_before_join_record");
                self.store.save_volume(&rec)?;
                self.note_mount(name, id);
                tracing::info!(volume = name, id, "joined session");
                return Ok(merged);
            }
        }
        self.resolve_stale_upper(&rec)?;
        crate::remote::auto::before_session(&self.store, &rec.cache);
        let mut state = self.store.ensure_cache(&rec.cache, self.xattr)?;
        let opts = VolumeOptions::parse(&rec.options)?;
        let lowers = crate::scope::start(&self.store, &rec.cache, &mut state, &opts)?.lowers;
        let base = lowers[0].clone();
        crate::failpoint!("driver::mount_before_upper");
        let root_attrs = self.prepare_upper(&rec, &self.store.layer_dir(&rec.cache, &base))?;
        let session = Session {
            base,
            lowers,
            backend: self.backend.kind(),
            mounts: BTreeMap::from([(id.to_string(), 1)]),
            started_at: now_rfc3339(),
            pid: None,
            root_attrs,
            committing: None,
        };
        // Record the session before mounting: a crash after the mount leaves a record naming it.
        rec.session = Some(session.clone());
        let saved = self.record_new_session(&rec);
        if let Err(e) = saved {
            // Unless the record landed after all (an error past the rename), nothing names the
            // fresh upper: remove it now rather than leave an orphan for recovery.
            let landed = self
                .store
                .load_volume(name)
                .map(|r| r.is_some_and(|r| r.session.is_some()))
                .unwrap_or(true);
            if !landed {
                self.discard_fresh_upper(&rec);
            }
            return Err(e);
        }
        crate::failpoint!("driver::mount_before_view");
        match self.mount_view(&rec, &session) {
            Ok(pid) => {
                crate::failpoint!("driver::mount_after_view");
                if pid.is_some() {
                    if let Some(s) = rec.session.as_mut() {
                        s.pid = pid;
                    }
                    self.store.save_volume(&rec)?;
                }
                self.note_mount(name, id);
                tracing::info!(volume = name, id, base = %session.base, layers = session.lowers.len(),
                    backend = session.backend.as_str(), "session started");
                let hit = session.lowers.iter().any(|l| l != "0");
                crate::metrics::session_started(&rec.cache, hit, started.elapsed());
                Ok(merged)
            }
            Err(e) => {
                rec.session = None;
                self.store.save_volume(&rec)?;
                remove_tree(&self.store.upper_dir(&rec.cache, &rec.id))?;
                remove_tree(&self.store.work_dir(&rec.cache, &rec.id))?;
                Err(e)
            }
        }
    }

    /// Ends mount `id` of the volume; the last one unmounts the view and commits the session.
    ///
    /// The decremented count is written before the view is touched, so an Unmount that fails
    /// (busy view, commit error) leaves a durable record of a session with no mounts left: the
    /// sweep and startup recovery end it once nobody uses it. A view some other container still
    /// has (live-restore, or counts reset by an engine restart) is kept until it is unused.
    pub fn unmount(&self, name: &str, id: &str) -> Result<()> {
        Self::check_mount_id(id)?;
        let (_lock, mut rec) = self.lock_volume(name)?;
        self.settle(&mut rec)?;
        let not_mounted = || Error::NotMounted {
            volume: name.to_string(),
            id: id.to_string(),
        };
        let Some(s) = rec.session.as_mut() else {
            // The session was ended without this Unmount (orphan rule, recovery, `end`), e.g.
            // while its container stopped during a plugin restart: its writes are committed.
            tracing::info!(
                volume = name,
                id,
                "unmount of a volume whose session already ended"
            );
            return Ok(());
        };
        let draining = s.mounts.is_empty();
        if let Some(count) = s.mounts.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                s.mounts.remove(id);
            }
        } else if draining {
            // No counts left, but the session waited for its last user (counts reset by an
            // engine restart while a live-restored container kept the view): this Unmount may
            // be that container stopping, so end the session now if nobody uses it.
            tracing::info!(
                volume = name,
                id,
                "unmount of a session waiting for its last user"
            );
        } else {
            return Err(not_mounted());
        }
        if !s.mounts.is_empty() {
            crate::failpoint!("driver::unmount_before_leave_record");
            self.store.save_volume(&rec)?;
            tracing::info!(volume = name, id, "left session");
            return Ok(());
        }
        let merged = self.store.merged_dir(&rec.cache, &rec.id);
        let users = sessions::users(&merged, &self.store.upper_dir(&rec.cache, &rec.id));
        if users.in_use() {
            self.store.save_volume(&rec)?;
            tracing::warn!(volume = name, id, users = %users.describe(),
                "last Unmount, but the view is still used: the session ends once nobody uses it");
            return Ok(());
        }
        crate::failpoint!("driver::unmount_before_end");
        match self.end_session(&mut rec, "last unmount") {
            Ok(_) => Ok(()),
            Err(e) => {
                // Whatever failed, the record must say the count is gone (and, if the commit
                // got that far, which layer it was writing); recovery and the sweep retry.
                if let Err(e2) = self.store.save_volume(&rec) {
                    tracing::error!(volume = name, error = %e2, "could not record the failed unmount");
                }
                Err(e)
            }
        }
    }

    /// Finishes a commit that a crash cut short (`session.committing` set), under the cache lock.
    pub(crate) fn settle(&self, rec: &mut VolumeRecord) -> Result<()> {
        if rec.session.as_ref().is_none_or(|s| s.committing.is_none()) {
            return Ok(());
        }
        let mode = rec.commit.unwrap_or(self.config.commit);
        if let Some(outcome) = commit::finish(&self.store, rec, mode)? {
            let _ = fs::remove_file(self.store.pid_file(&rec.cache, &rec.id));
            rec.session = None;
            crate::failpoint!("recovery::before_clear_session");
            self.store.save_volume(rec)?;
            tracing::info!(volume = %rec.name, ?outcome, "interrupted commit finished");
        }
        Ok(())
    }

    /// Ends `rec`'s session as a last Unmount does: unmounts the view, commits per the volume's
    /// mode, clears the session. The caller holds the cache lock and has decided nobody uses it.
    pub(crate) fn end_session(&self, rec: &mut VolumeRecord, why: &str) -> Result<Outcome> {
        let mode = rec.commit.unwrap_or(self.config.commit);
        self.end_session_as(rec, mode, why)
    }

    /// [`Driver::end_session`] with an explicit commit mode.
    pub(crate) fn end_session_as(
        &self,
        rec: &mut VolumeRecord,
        mode: CommitMode,
        why: &str,
    ) -> Result<Outcome> {
        let Some(session) = rec.session.clone() else {
            return Ok(Outcome::Empty);
        };
        let name = rec.name.clone();
        let merged = self.store.merged_dir(&rec.cache, &rec.id);
        let t0 = std::time::Instant::now();
        crate::failpoint!("driver::end_before_unmount");
        self.backend_for(session.backend)
            .unmount(&merged, session.pid)?;
        let t1 = std::time::Instant::now();
        // commit-on=success: a session some failed container used is discarded.
        let mode = self
            .policy
            .decide(&name, &rec.options, &session.started_at, mode);
        crate::failpoint!("driver::end_before_commit");
        let outcome = commit::commit(&self.store, rec, mode)?;
        crate::maintenance::after_commit(&self.store, &rec.cache, &outcome, self.maintenance.get());
        crate::remote::auto::after_commit(&self.store, &rec.cache, &outcome);
        let t2 = std::time::Instant::now();
        let _ = fs::remove_file(self.store.pid_file(&rec.cache, &rec.id));
        rec.session = None;
        crate::failpoint!("driver::end_before_clear");
        self.store.save_volume(rec)?;
        self.forget_mounts(&name);
        crate::metrics::session_ended(
            &rec.cache,
            match &outcome {
                Outcome::Committed { .. } => "committed",
                Outcome::Empty => "empty",
                Outcome::Discarded => "discarded",
            },
            t0.elapsed(),
        );
        let us = |a: std::time::Instant, b: std::time::Instant| (b - a).as_micros() as u64;
        let (unmount_us, commit_us, record_us) =
            (us(t0, t1), us(t1, t2), us(t2, std::time::Instant::now()));
        match &outcome {
            Outcome::Committed { layer, parent } => tracing::info!(
                volume = name,
                why,
                layer,
                parent,
                mode = mode.as_str(),
                unmount_us,
                commit_us,
                record_us,
                "committed"
            ),
            Outcome::Empty => tracing::info!(
                volume = name,
                why,
                unmount_us,
                "session changed nothing; no commit"
            ),
            Outcome::Discarded => {
                tracing::info!(volume = name, why, unmount_us, "session discarded")
            }
        }
        Ok(outcome)
    }

    /// The merged dir if mounted.
    pub fn path(&self, name: &str) -> Result<Option<PathBuf>> {
        Ok(self.info(&self.volume(name)?).mountpoint)
    }

    /// The volume's details for `docker volume inspect`.
    pub fn get(&self, name: &str) -> Result<VolumeInfo> {
        validate_volume(name)?;
        Ok(self.info(&self.volume(name)?))
    }

    /// Every volume.
    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        Ok(self
            .store
            .list_volumes()?
            .iter()
            .map(|v| self.info(v))
            .collect())
    }

    fn info(&self, v: &VolumeRecord) -> VolumeInfo {
        let mode = v.commit.unwrap_or(self.config.commit);
        let latest = self
            .store
            .load_state(&v.cache)
            .ok()
            .flatten()
            .map(|s| s.state.latest);
        let mut status = BTreeMap::new();
        status.insert("cache".into(), json!(v.cache));
        status.insert("session".into(), json!(v.id));
        status.insert("commit".into(), json!(mode.as_str()));
        status.insert("latest".into(), json!(latest));
        match &v.session {
            Some(s) => {
                status.insert("state".into(), json!("mounted"));
                status.insert("base".into(), json!(s.base));
                status.insert("layers".into(), json!(s.lowers.len()));
                status.insert("backend".into(), json!(s.backend.as_str()));
                status.insert("mounts".into(), json!(s.mount_count()));
                status.insert("started".into(), json!(s.started_at));
            }
            None => {
                status.insert("state".into(), json!("unmounted"));
                status.insert("base".into(), json!(latest));
                status.insert("backend".into(), json!(self.backend.kind().as_str()));
            }
        }
        VolumeInfo {
            name: v.name.clone(),
            mountpoint: v
                .session
                .as_ref()
                .map(|_| self.store.merged_dir(&v.cache, &v.id)),
            created_at: v.created_at.clone(),
            status,
        }
    }
}
