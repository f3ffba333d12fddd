//! Commit: turning a session's upper dir into a new layer and making it the cache's latest.
//!
//! The cost is one `syncfs`, one `rename(2)` of the upper dir into `lower/<cache>/<layer>` and one
//! atomic state write, whatever the size of the cache or of the change. The order makes a crash
//! at any point safe: the state never names a layer before the layer is complete on disk, and
//! the volume record names the layer (`session.committing`) before the rename, so recovery
//! ([`finish`]) can tell a renamed-but-unnamed layer from a lost upper and complete the commit.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, remove_tree, syncfs};
use crate::names::CommitMode;
use crate::state::CacheState;
use crate::store::{Session, Store, VolumeRecord};

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new layer was made the latest.
    Committed {
        /// The new layer's name.
        layer: String,
        /// The layer it sits on.
        parent: String,
    },
    /// The session changed nothing.
    Empty,
    /// The volume's mode is `discard`.
    Discarded,
}

fn root_attrs(m: &fs::Metadata) -> (u32, u32, u32) {
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// True when the upper dir holds no change: no entries and the root's owner/mode as we made it.
fn upper_unchanged(upper: &Path, session: &Session) -> Result<bool> {
    if !crate::fsutil::dir_is_empty(upper)? {
        return Ok(false);
    }
    let m = fs::symlink_metadata(upper).ctx("inspecting upper dir", upper)?;
    Ok(root_attrs(&m) == session.root_attrs)
}

fn open_dir_nofollow(p: &Path) -> Result<OwnedFd> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .ctx("opening directory", p)?;
    Ok(f.into())
}

/// Merge mode: the upper root copied the owner/mode of the session's *base*, but the commit
/// lands on the *latest* snapshot. If the session left them as they were, give the root the
/// latest root's owner/mode so the merge does not reset a change someone else committed.
fn carry_latest_root_attrs(
    store: &Store,
    cache: &str,
    upper: &Path,
    session: &Session,
    parent: &str,
) -> Result<()> {
    let fd = open_dir_nofollow(upper)?;
    let now = root_attrs(
        &fs::File::from(fd.try_clone().ctx("duplicating fd", upper)?)
            .metadata()
            .ctx("inspecting upper dir", upper)?,
    );
    if now != session.root_attrs {
        return Ok(()); // the session changed them: its change wins, as for any path
    }
    let top = store.layer_dir(cache, parent);
    let want = root_attrs(&fs::symlink_metadata(&top).ctx("inspecting snapshot root", &top)?);
    if want == now {
        return Ok(());
    }
    crate::failpoint!("commit::root_attrs");
    nix::unistd::fchown(
        fd.as_fd(),
        Some(nix::unistd::Uid::from_raw(want.0)),
        Some(nix::unistd::Gid::from_raw(want.1)),
    )
    .ctx("setting upper dir owner", upper)?;
    nix::sys::stat::fchmod(
        fd.as_fd(),
        nix::sys::stat::Mode::from_bits_truncate(want.2 as libc::mode_t),
    )
    .ctx("setting upper dir mode", upper)?;
    Ok(())
}

fn load_state(store: &Store, cache: &str) -> Result<CacheState> {
    store.load_state(cache)?.ok_or_else(|| {
        Error::Corrupt(format!(
            "cache {cache:?} has no {}",
            crate::store::STATE_FILE
        ))
    })
}

/// Where a session's new layer goes: its volume's scope, on that scope's latest (`merge`) or on
/// the session's base (`replace`).
struct Target {
    opts: crate::names::VolumeOptions,
    parent: String,
    forked_from: Option<String>,
}

/// The commit target of `session`, shared by a commit and its recovery; the parent must exist.
fn target(
    store: &Store,
    rec: &VolumeRecord,
    session: &Session,
    state: &CacheState,
    mode: CommitMode,
) -> Result<Target> {
    let opts = crate::names::VolumeOptions::parse(&rec.options).unwrap_or_default();
    let parent = match (mode, state.scope_latest(opts.scope())) {
        (CommitMode::Merge, Some(latest)) => latest.to_string(),
        _ => session.base.clone(),
    };
    let forked_from = crate::scope::forked_from(state, &opts, &session.base);
    if !store.layer_dir(&rec.cache, &parent).is_dir() {
        return Err(Error::Corrupt(format!(
            "cache {:?}: parent layer {parent:?} of the commit is missing",
            rec.cache
        )));
    }
    Ok(Target {
        opts,
        parent,
        forked_from,
    })
}

/// Commits (or discards) the ended session of `rec` (`rec.session` must be set). The caller
/// holds the cache lock and has unmounted the view; it clears the session afterwards. Before the
/// rename, `rec` is saved naming the new layer in `session.committing`.
pub fn commit(store: &Store, rec: &mut VolumeRecord, mode: CommitMode) -> Result<Outcome> {
    let session = rec
        .session
        .clone()
        .ok_or_else(|| Error::Corrupt(format!("volume {} has no session to commit", rec.name)))?;
    let upper = store.upper_dir(&rec.cache, &rec.id);
    let work = store.work_dir(&rec.cache, &rec.id);
    crate::failpoint!("commit::start");
    let outcome = if mode == CommitMode::Discard {
        crate::failpoint!("commit::before_discard");
        discard_upper(store, &rec.cache, &rec.id)?;
        Outcome::Discarded
    } else if fs::symlink_metadata(&upper).is_err() {
        // Record names a session but its upper is gone: an end cut short after the upper was
        // removed (empty or discarded) and before the record was cleared. Nothing is left to
        // commit; failing here would refuse every later Mount and Remove of the volume.
        tracing::warn!(volume = %rec.name, upper = %upper.display(),
            "the session's upper dir is already gone (an end cut short after removing it): nothing to commit");
        Outcome::Empty
    } else if upper_unchanged(&upper, &session)? {
        crate::failpoint!("commit::before_remove_empty");
        remove_tree(&upper)?;
        Outcome::Empty
    } else {
        let mut state = load_state(store, &rec.cache)?;
        let Target {
            opts,
            parent,
            forked_from,
        } = target(store, rec, &session, &state, mode)?;
        let scope = opts.scope();
        if mode == CommitMode::Merge {
            carry_latest_root_attrs(store, &rec.cache, &upper, &session, &parent)?;
        }
        let layer = state.unique_layer_name(&rec.id, |n| store.layer_dir(&rec.cache, n).exists());
        let dest = store.layer_dir(&rec.cache, &layer);
        // The container's writes were never fsynced: make them durable before a layer names them.
        syncfs(&upper)?;
        crate::failpoint!("commit::before_record");
        if let Some(s) = rec.session.as_mut() {
            s.committing = Some(layer.clone());
        }
        store.save_volume(rec)?;
        crate::failpoint!("commit::before_rename");
        fs::rename(&upper, &dest).ctx("promoting upper dir to layer", &dest)?;
        fsync_dir(&store.cache_dir(&rec.cache))?;
        if let Some(p) = upper.parent() {
            fsync_dir(p)?;
        }
        crate::failpoint!("commit::before_state");
        state.push_layer_in(scope, forked_from.as_deref(), &layer, &parent, &rec.name);
        store.save_state(&rec.cache, &state)?;
        crate::failpoint!("commit::after_state");
        Outcome::Committed { layer, parent }
    };
    remove_tree(&work)?;
    Ok(outcome)
}

/// Prefix of a discarded upper moved aside (`upper/<cache>/.discard-<id>`) before it is deleted,
/// so a crash mid-delete never leaves a half-deleted tree under the session's own name for a
/// later end (whose `commit-on` decision may differ) to commit. Startup recovery removes them.
pub const DISCARD_PREFIX: &str = ".discard-";

/// Throws a session's upper dir away: renamed aside first (atomic), then deleted.
fn discard_upper(store: &Store, cache: &str, id: &str) -> Result<()> {
    let upper = store.upper_dir(cache, id);
    let aside = store.upper_dir(cache, &format!("{DISCARD_PREFIX}{id}"));
    // A leftover of an earlier attempt at the same name goes first.
    remove_tree(&aside)?;
    match fs::rename(&upper, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("moving a discarded upper dir aside", &upper),
    }
    if let Some(p) = upper.parent() {
        fsync_dir(p)?;
    }
    crate::failpoint!("commit::discard_before_delete");
    remove_tree(&aside)?;
    Ok(())
}

/// Finishes a commit cut short by a crash: `rec.session.committing` names the layer the upper
/// was being renamed to. Returns `None` when the rename never happened (the upper is still in
/// place: `committing` is cleared and the session is ended like any other), else the outcome,
/// after which the caller clears the session.
pub fn finish(store: &Store, rec: &mut VolumeRecord, mode: CommitMode) -> Result<Option<Outcome>> {
    let Some(session) = rec.session.clone() else {
        return Ok(None);
    };
    let Some(layer) = session.committing.clone() else {
        return Ok(None);
    };
    let upper = store.upper_dir(&rec.cache, &rec.id);
    let dest = store.layer_dir(&rec.cache, &layer);
    crate::failpoint!("recovery::finish_commit");
    if fs::symlink_metadata(&upper).is_ok() {
        tracing::warn!(volume = %rec.name, layer, "commit was cut short before its rename; committing again");
        if let Some(s) = rec.session.as_mut() {
            s.committing = None;
        }
        store.save_volume(rec)?;
        return Ok(None);
    }
    let mut state = load_state(store, &rec.cache)?;
    // Named, or already flattened into a compacted layer: the commit completed before the crash.
    // (Compaction waits for unsettled commits, see `compact::switch`; this is the second guard.)
    if state.layers.contains_key(&layer)
        || state.roots().contains(&layer.as_str())
        || state.compacted_into(&layer).is_some()
    {
        tracing::info!(volume = %rec.name, layer, "commit cut short after its state write: already complete");
        let parent = state
            .layers
            .get(&layer)
            .and_then(|l| l.parent.clone())
            .unwrap_or_default();
        remove_tree(&store.work_dir(&rec.cache, &rec.id))?;
        return Ok(Some(Outcome::Committed { layer, parent }));
    }
    if !dest.is_dir() {
        tracing::error!(volume = %rec.name, layer, upper = %upper.display(),
            "commit cut short: neither the upper dir nor the layer exists; the session's writes are lost");
        remove_tree(&store.work_dir(&rec.cache, &rec.id))?;
        return Ok(Some(Outcome::Empty));
    }
    let Target {
        opts,
        parent,
        forked_from,
    } = target(store, rec, &session, &state, mode)?;
    let scope = opts.scope();
    crate::failpoint!("recovery::before_state");
    state.push_layer_in(scope, forked_from.as_deref(), &layer, &parent, &rec.name);
    store.save_state(&rec.cache, &state)?;
    remove_tree(&store.work_dir(&rec.cache, &rec.id))?;
    tracing::warn!(volume = %rec.name, layer, parent, "finished a commit cut short by a crash");
    Ok(Some(Outcome::Committed { layer, parent }))
}
