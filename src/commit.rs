//! Commit: turning a session's upper dir into a new layer and making it the cache's latest.
//!
//! The cost is one `syncfs`, one `rename(2)` of the upper dir into `lower/<cache>/<layer>` and one
//! atomic state write, whatever the size of the cache or of the change. The order makes a crash
//! at any point safe: the state never names a layer before the layer is complete on disk, and a
//! renamed-but-unnamed layer is found by recovery through the session record that still exists.

use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, remove_tree, syncfs};
use crate::names::CommitMode;
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

/// True when the upper dir holds no change: no entries and the root's owner/mode as we made it.
fn upper_unchanged(upper: &std::path::Path, session: &Session) -> Result<bool> {
    if !crate::fsutil::dir_is_empty(upper)? {
        return Ok(false);
    }
    let m = fs::symlink_metadata(upper).ctx("inspecting upper dir", upper)?;
    Ok((m.uid(), m.gid(), m.mode() & 0o7777) == session.root_attrs)
}

/// Commits (or discards) the ended session of `rec`. The caller holds the cache lock and has
/// unmounted the view.
pub fn commit(
    store: &Store,
    rec: &VolumeRecord,
    session: &Session,
    mode: CommitMode,
) -> Result<Outcome> {
    let upper = store.upper_dir(&rec.cache, &rec.id);
    let work = store.work_dir(&rec.cache, &rec.id);
    let outcome = if mode == CommitMode::Discard {
        remove_tree(&upper)?;
        Outcome::Discarded
    } else if !upper.exists() {
        return Err(Error::Corrupt(format!(
            "session {} has no upper dir {}",
            rec.name,
            upper.display()
        )));
    } else if upper_unchanged(&upper, session)? {
        remove_tree(&upper)?;
        Outcome::Empty
    } else {
        let mut state = store.load_state(&rec.cache)?.ok_or_else(|| {
            Error::Corrupt(format!(
                "cache {:?} has no {}",
                rec.cache,
                crate::store::STATE_FILE
            ))
        })?;
        // Commits go into the volume's scope only; `merge` lands on that scope's latest.
        let opts = crate::names::VolumeOptions::parse(&rec.options).unwrap_or_default();
        let scope = opts.scope();
        let parent = match (mode, state.scope_latest(scope)) {
            (CommitMode::Merge, Some(latest)) => latest.to_string(),
            _ => session.base.clone(),
        };
        let forked_from = crate::scope::forked_from(&state, &opts, &session.base);
        if !store.layer_dir(&rec.cache, &parent).is_dir() {
            return Err(Error::Corrupt(format!(
                "cache {:?}: parent layer {parent:?} is missing",
                rec.cache
            )));
        }
        let layer = state.unique_layer_name(&rec.id, |n| store.layer_dir(&rec.cache, n).exists());
        let dest = store.layer_dir(&rec.cache, &layer);
        // The container's writes were never fsynced: make them durable before a layer names them.
        syncfs(&upper)?;
        crate::failpoint!("commit::before_rename");
        fs::rename(&upper, &dest).ctx("promoting upper dir to layer", &dest)?;
        fsync_dir(&store.cache_dir(&rec.cache))?;
        if let Some(p) = upper.parent() {
            fsync_dir(p)?;
        }
        crate::failpoint!("commit::before_state");
        state.push_layer_in(scope, forked_from.as_deref(), &layer, &parent, &rec.name);
        store.save_state(&rec.cache, &state)?;
        Outcome::Committed { layer, parent }
    };
    remove_tree(&work)?;
    Ok(outcome)
}
