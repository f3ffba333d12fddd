//! Automatic mode (`serve --remote REPO`, `CACHEDRIVER_REMOTE`): the first session of a cache
//! with no local snapshot starts from the registry's, and every commit is pushed in the
//! background.
//!
//! - [`before_session`] runs in Mount with the cache lock held, before the session picks its
//!   base. When the cache has no snapshot here (never used, or only its empty `0`), it fetches
//!   the remote one on a separate thread (its own runtime: Mount may run inside the server's)
//!   and waits at most the configured timeout; a fetch that arrives in time is landed under the
//!   lock Mount already holds. A miss, an error or a timeout is logged and the session starts
//!   empty: a cache miss is never an error. A fetch that arrives late removes its temp dirs.
//! - [`after_commit`] queues a push of the cache and returns at once. One pusher thread per
//!   cache at a time; commits during a push make it push again once (latest wins per tag).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::commit::Outcome;
use crate::store::Store;

use super::Access;

/// The automatic mode's settings.
#[derive(Debug, Clone)]
pub struct Auto {
    /// `HOST[:PORT]/PATH`: tags are `CACHE.default` in it.
    pub repo: String,
    /// How to reach it.
    pub access: Access,
    /// How long a first session waits for the remote snapshot.
    pub pull_timeout: Duration,
}

static AUTO: OnceLock<Auto> = OnceLock::new();
/// Per cache: whether a pusher runs, and whether it must push again.
static PUSHERS: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();

/// Turns automatic mode on for this process (once; later calls are ignored).
pub fn install(auto: Auto) {
    tracing::info!(
        repo = auto.repo,
        timeout_s = auto.pull_timeout.as_secs(),
        "remote caches on"
    );
    let _ = AUTO.set(auto);
}

/// Whether the cache has no snapshot of its own here: no state, or only an empty `0`.
fn is_cold(store: &Store, cache: &str) -> bool {
    match store.load_state(cache) {
        Ok(None) => true,
        Ok(Some(s)) => {
            s.state.latest == "0"
                && s.layers.get("0").is_none_or(|l| l.parent.is_none())
                && crate::fsutil::dir_is_empty(&store.layer_dir(cache, "0")).unwrap_or(false)
        }
        Err(_) => false,
    }
}

/// Mount hook (cache lock held): pulls the remote snapshot of a cold cache, bounded by the
/// timeout. Never fails.
pub fn before_session(store: &Store, cache: &str) {
    let Some(auto) = AUTO.get() else {
        return;
    };
    if !is_cold(store, cache) {
        return;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let st = store.clone();
    let c = cache.to_string();
    let a = auto.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("pull-{cache}"))
        .spawn(move || {
            let r = super::runtime().and_then(|rt| {
                let state = st.load_state(&c)?;
                rt.block_on(super::fetch(&st, &a.repo, &c, &a.access, state.as_ref()))
            });
            // A late result is dropped here, removing its temp dirs.
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        tracing::warn!(cache, error = %e, "cannot start the remote pull; starting empty");
        return;
    }
    match rx.recv_timeout(auto.pull_timeout) {
        Ok(Ok(f)) => match f.land(store, false) {
            Ok(r) => tracing::info!(
                cache,
                latest = r.latest,
                layers = r.layers,
                bytes = r.bytes,
                "first session starts from the remote snapshot"
            ),
            Err(e) => {
                tracing::warn!(cache, error = %e, "remote snapshot not landed; starting empty")
            }
        },
        Ok(Err(e)) => tracing::info!(cache, error = %e, "no remote snapshot; starting empty"),
        Err(_) => tracing::warn!(
            cache,
            timeout_s = auto.pull_timeout.as_secs(),
            "remote pull timed out; starting empty"
        ),
    }
}

/// Unmount hook: queues a background push of `cache` after a commit. Never blocks.
pub fn after_commit(store: &Store, cache: &str, outcome: &Outcome) {
    let Some(auto) = AUTO.get() else {
        return;
    };
    if !matches!(outcome, Outcome::Committed { .. }) {
        return;
    }
    let map = PUSHERS.get_or_init(|| Mutex::new(HashMap::new()));
    let Ok(mut m) = map.lock() else {
        return;
    };
    if let Some(again) = m.get_mut(cache) {
        *again = true;
        return;
    }
    m.insert(cache.to_string(), false);
    drop(m);
    let st = store.clone();
    let c = cache.to_string();
    let a = auto.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("push-{cache}"))
        .spawn(move || loop {
            match super::push(&st, &c, &a.repo, &a.access) {
                Ok(r) => tracing::info!(
                    cache = c,
                    reference = r.reference,
                    uploaded = r.uploaded.len(),
                    bytes = r.bytes,
                    "pushed in the background"
                ),
                Err(e) => tracing::warn!(cache = c, error = %e, "background push failed"),
            }
            let Ok(mut m) = map.lock() else {
                return;
            };
            match m.get(&c) {
                Some(true) => {
                    m.insert(c.clone(), false);
                }
                _ => {
                    m.remove(&c);
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(cache, error = %e, "cannot start a background push");
        if let Ok(mut m) = map.lock() {
            m.remove(cache);
        }
    }
}

/// Waits until no background push runs (tests, shutdown), at most `max`.
pub fn wait_idle(max: Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        let idle = PUSHERS
            .get()
            .and_then(|m| m.lock().ok().map(|m| m.is_empty()))
            .unwrap_or(true);
        if idle {
            return true;
        }
        if start.elapsed() > max {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
