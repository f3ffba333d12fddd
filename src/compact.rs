//! Compaction: flattening the bottom of a cache's latest chain into one layer (DESIGN §6).
//!
//! Placeholder with the interface the maintenance worker and the `compact` command call; the
//! flattening itself lands with the compaction work.

use crate::error::Result;
use crate::store::Store;

/// Default bound on the depth of a latest chain before it is compacted.
pub const DEFAULT_DEPTH: usize = 16;

/// What one compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// The cache compacted.
    pub cache: String,
    /// The layers flattened (bottom-up); GC deletes them once nothing needs them.
    pub flattened: Vec<String>,
    /// The new layer that replaces them in the latest chain.
    pub new_layer: String,
    /// Entries linked or created in the new layer.
    pub entries: u64,
    /// Depth of the latest chain before and after.
    pub depth_before: usize,
    /// Depth of the latest chain after.
    pub depth_after: usize,
}

/// Compacts `cache` if its latest chain is deeper than `max_depth` (or unconditionally when
/// `force`); `Ok(None)` when there was nothing to do. Takes the cache's locks itself, holding the
/// cache lock only to read and to switch the state, never while flattening.
pub fn compact_cache(
    _store: &Store,
    _cache: &str,
    _max_depth: usize,
    _force: bool,
) -> Result<Option<CompactReport>> {
    Ok(None)
}
