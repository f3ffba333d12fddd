//! The volume driver: the one place where every state change happens.
//!
//! Each operation takes the cache's lock (an `flock` on `lower/<cache>`: it excludes other
//! threads of this process, which open their own descriptor, as well as other plugin processes
//! sharing the root), re-reads the durable records under it, changes them in a crash-safe order
//! and writes them back. Operations on different caches never wait on each other. All methods
//! block: the server calls them from `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::backend::{self, Backend, BackendKind, MountSpec};
use crate::commit::{self, Outcome};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_dir_all_durable, now_rfc3339, remove_tree};
use crate::names::{parse_volume, validate_volume, CommitMode, VolumeOptions};
use crate::state::XattrNs;
use crate::store::{CacheLock, Session, Store, VolumeRecord};

/// Longest mount ID we accept (Docker sends 64 hex digits).
const MAX_MOUNT_ID: usize = 256;

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
}

impl Driver {
    /// A driver over `store`. Reports sessions found from an earlier run.
    pub fn new(store: Store, config: Config) -> Result<Self> {
        let backend = backend::for_kind(config.backend, &config.exe);
        let d = Driver {
            store,
            backend,
            xattr: XattrNs::for_this_process(),
            config,
            policy: crate::policy::Policy::default(),
            maintenance: std::sync::OnceLock::new(),
        };
        for v in d.store.list_volumes()? {
            if let Some(s) = &v.session {
                let merged = d.store.merged_dir(&v.cache, &v.id);
                let live = d.backend_for(s.backend).is_mounted(&merged);
                tracing::info!(volume = %v.name, backend = s.backend.as_str(), mounts = s.mount_count(), live,
                    "found session from an earlier run{}", if live { "" } else { "; it is remounted on its next Mount" });
            }
        }
        Ok(d)
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
    fn lock_volume(&self, name: &str) -> Result<(CacheLock, VolumeRecord)> {
        let cache = self.volume(name)?.cache;
        let lock = self.store.lock_cache(&cache)?;
        Ok((lock, self.volume(name)?))
    }

    /// Forgets a volume; refused while it is mounted. Unknown volumes are already gone.
    pub fn remove(&self, name: &str) -> Result<()> {
        let (_lock, rec) = match self.lock_volume(name) {
            Err(Error::NoSuchVolume(_)) => return Ok(()),
            r => r?,
        };
        if let Some(s) = &rec.session {
            return Err(Error::InUse {
                volume: name.to_string(),
                mounts: s.mount_count(),
            });
        }
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

    /// Makes a fresh upper dir whose root carries the snapshot root's owner, group and mode.
    fn prepare_upper(&self, rec: &VolumeRecord, top: &Path) -> Result<(u32, u32, u32)> {
        let upper = self.store.upper_dir(&rec.cache, &rec.id);
        if fs::symlink_metadata(&upper).is_ok() {
            // Left by a crash: keep it for recovery rather than losing or reusing it.
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
        std::os::unix::fs::lchown(&upper, Some(attrs.0), Some(attrs.1))
            .ctx("setting upper dir owner", &upper)?;
        fs::set_permissions(&upper, fs::Permissions::from_mode(attrs.2))
            .ctx("setting upper dir mode", &upper)?;
        Ok(attrs)
    }

    /// Mounts the volume for mount `id`: starts a session on the cache's latest snapshot, or
    /// joins the running one. Returns the merged dir.
    pub fn mount(&self, name: &str, id: &str) -> Result<PathBuf> {
        Self::check_mount_id(id)?;
        let started = std::time::Instant::now();
        let (_lock, mut rec) = self.lock_volume(name)?;
        crate::budget::mark_used(&self.store, &rec.cache);
        let merged = self.store.merged_dir(&rec.cache, &rec.id);
        if let Some(s) = rec.session.clone() {
            if !self.backend_for(s.backend).is_mounted(&merged) {
                tracing::warn!(
                    volume = name,
                    "session view is not mounted (host or plugin restart?): remounting"
                );
                let pid = self.mount_view(&rec, &s)?;
                if let Some(sess) = rec.session.as_mut() {
                    sess.pid = pid;
                }
            }
            if let Some(sess) = rec.session.as_mut() {
                *sess.mounts.entry(id.to_string()).or_insert(0) += 1;
            }
            self.store.save_volume(&rec)?;
            tracing::info!(volume = name, id, "joined session");
            return Ok(merged);
        }
        crate::remote::auto::before_session(&self.store, &rec.cache);
        let state = self.store.ensure_cache(&rec.cache, self.xattr)?;
        let lowers = state.latest_chain()?;
        let base = lowers[0].clone();
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
        self.store.save_volume(&rec)?;
        match self.mount_view(&rec, &session) {
            Ok(pid) => {
                if pid.is_some() {
                    if let Some(s) = rec.session.as_mut() {
                        s.pid = pid;
                    }
                    self.store.save_volume(&rec)?;
                }
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
    pub fn unmount(&self, name: &str, id: &str) -> Result<()> {
        Self::check_mount_id(id)?;
        let (_lock, mut rec) = self.lock_volume(name)?;
        let not_mounted = || Error::NotMounted {
            volume: name.to_string(),
            id: id.to_string(),
        };
        let Some(s) = rec.session.as_mut() else {
            return Err(not_mounted());
        };
        let Some(count) = s.mounts.get_mut(id) else {
            return Err(not_mounted());
        };
        *count -= 1;
        if *count == 0 {
            s.mounts.remove(id);
        }
        if !s.mounts.is_empty() {
            self.store.save_volume(&rec)?;
            tracing::info!(volume = name, id, "left session");
            return Ok(());
        }
        let session = s.clone();
        let merged = self.store.merged_dir(&rec.cache, &rec.id);
        let t0 = std::time::Instant::now();
        self.backend_for(session.backend)
            .unmount(&merged, session.pid)?;
        let mode = self.policy.decide(
            name,
            &rec.options,
            &session.started_at,
            rec.commit.unwrap_or(self.config.commit),
        );
        let t1 = std::time::Instant::now();
        let outcome = commit::commit(&self.store, &rec, &session, mode)?;
        crate::maintenance::after_commit(&self.store, &rec.cache, &outcome, self.maintenance.get());
        crate::remote::auto::after_commit(&self.store, &rec.cache, &outcome);
        let t2 = std::time::Instant::now();
        let _ = fs::remove_file(self.store.pid_file(&rec.cache, &rec.id));
        rec.session = None;
        self.store.save_volume(&rec)?;
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
                unmount_us,
                "session changed nothing; no commit"
            ),
            Outcome::Discarded => tracing::info!(volume = name, unmount_us, "session discarded"),
        }
        Ok(())
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
