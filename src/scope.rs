//! Scopes: several histories of one cache over shared layers (DESIGN §4).
//!
//! A volume with `-o scope=S -o from=A:B` starts its session from S's latest snapshot if S has
//! one, else from the first of A, B that has one, else from an empty layer; it commits into S
//! only. So a pull request's job (`scope=pr-123,from=main`) reads `main`'s cache but never
//! writes it, and its second job sees its first job's commit. The default scope's latest is
//! the seed's `state.latest`; other scopes live in `cache-state.json`'s `scopes`. A fork costs
//! nothing: the new scope's first commit sits on the layers it started from.

use std::fs;

use crate::error::{IoContext, Result};
use crate::fsutil::fsync_dir;
use crate::names::VolumeOptions;
use crate::state::CacheState;
use crate::store::Store;

/// Where a new session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The snapshot's chain, newest first.
    pub lowers: Vec<String>,
    /// The scope whose snapshot it is (`None`: an empty start).
    pub from_scope: Option<String>,
}

/// The chain a new session of a volume with `opts` starts on. May create (and record) an empty
/// layer when no candidate scope has a snapshot and the cache has no empty layer left (the
/// initial `0` can have been compacted away). Call under the cache lock.
pub fn start(
    store: &Store,
    cache: &str,
    state: &mut CacheState,
    opts: &VolumeOptions,
) -> Result<Start> {
    let own = opts.scope();
    for sc in std::iter::once(own).chain(opts.from.iter().map(String::as_str)) {
        if let Some(top) = state.scope_latest(sc) {
            let top = top.to_string();
            return Ok(Start {
                lowers: state.chain(&top)?,
                from_scope: Some(sc.to_string()),
            });
        }
    }
    let empty = empty_layer(store, cache, state)?;
    Ok(Start {
        lowers: vec![empty],
        from_scope: None,
    })
}

/// The name of an empty bottom layer of `cache`, made (durably, and recorded in the state) if
/// there is none.
fn empty_layer(store: &Store, cache: &str, state: &mut CacheState) -> Result<String> {
    let zero = store.layer_dir(cache, "0");
    let is_empty_bottom = |n: &str| {
        state.layers.get(n).is_none_or(|l| l.parent.is_none())
            && crate::fsutil::dir_is_empty(&store.layer_dir(cache, n)).unwrap_or(false)
    };
    if zero.is_dir() && is_empty_bottom("0") {
        state.layers.entry("0".to_string()).or_default();
        return Ok("0".to_string());
    }
    let name = state.unique_layer_name("empty", |n| store.layer_dir(cache, n).exists());
    let tmp = store.cache_dir(cache).join(format!(".tmp-{name}"));
    crate::fsutil::remove_tree(&tmp)?;
    fs::create_dir(&tmp).ctx("creating an empty layer", &tmp)?;
    let dest = store.layer_dir(cache, &name);
    fs::rename(&tmp, &dest).ctx("creating an empty layer", &dest)?;
    fsync_dir(&store.cache_dir(cache))?;
    crate::failpoint!("scope::empty_layer_before_state");
    state.layers.entry(name.clone()).or_default();
    store.save_state(cache, state)?;
    Ok(name)
}

/// The scope a session of `opts` that started on `base` forked from, for the record of its
/// scope's first commit: the first fallback scope whose chain holds `base`.
pub fn forked_from(state: &CacheState, opts: &VolumeOptions, base: &str) -> Option<String> {
    if state.scope_latest(opts.scope()).is_some() {
        return None;
    }
    opts.from
        .iter()
        .find(|f| {
            state
                .scope_latest(f)
                .and_then(|l| state.chain(l).ok())
                .is_some_and(|c| c.iter().any(|x| x == base))
        })
        .cloned()
}

/// Splits `CACHE[:SCOPE]`.
pub fn split(spec: &str) -> Result<(String, Option<String>)> {
    match spec.split_once(':') {
        Some((c, s)) => {
            crate::names::validate_cache(c)?;
            crate::names::validate_scope(s)?;
            Ok((c.to_string(), Some(s.to_string())))
        }
        None => {
            crate::names::validate_cache(spec)?;
            Ok((spec.to_string(), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::XattrNs;
    use std::collections::BTreeMap;

    fn opts(kv: &[(&str, &str)]) -> VolumeOptions {
        let m: BTreeMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        VolumeOptions::parse(&m).unwrap()
    }

    #[test]
    fn scopes_fall_back_in_order_and_fork_from_what_they_started_on() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let mut st = store.ensure_cache("m2", XattrNs::Trusted).unwrap();
        for l in ["a", "b"] {
            fs::create_dir(store.layer_dir("m2", l)).unwrap();
        }
        st.push_layer_in("main", None, "a", "0", "m2-a");
        st.push_layer_in("rel", None, "b", "0", "m2-b");
        assert_eq!(st.state.latest, "0", "the default scope is untouched");
        let s = start(
            &store,
            "m2",
            &mut st,
            &opts(&[("scope", "pr-1"), ("from", "nope:rel:main")]),
        )
        .unwrap();
        assert_eq!(s.lowers, vec!["b", "0"]);
        assert_eq!(s.from_scope.as_deref(), Some("rel"));
        assert_eq!(
            forked_from(&st, &opts(&[("scope", "pr-1"), ("from", "main:rel")]), "b").as_deref(),
            Some("rel")
        );
        let s = start(&store, "m2", &mut st, &opts(&[("scope", "main")])).unwrap();
        assert_eq!(s.lowers, vec!["a", "0"]);
        let s = start(&store, "m2", &mut st, &opts(&[("scope", "other")])).unwrap();
        assert_eq!(s.lowers, vec!["0"], "no fallback: an empty start");
        assert_eq!(st.roots(), vec!["0", "a", "b"]);
        let back = CacheState::parse(&st.to_bytes()).unwrap();
        assert_eq!(back.scope_latest("main"), Some("a"));
    }

    #[test]
    fn an_empty_layer_is_made_when_0_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let mut st = store.ensure_cache("m2", XattrNs::Trusted).unwrap();
        fs::remove_dir(store.layer_dir("m2", "0")).unwrap();
        let s = start(&store, "m2", &mut st, &opts(&[("scope", "x")])).unwrap();
        assert_eq!(s.lowers, vec!["empty"]);
        assert!(store.layer_dir("m2", "empty").is_dir());
        assert!(store
            .load_state("m2")
            .unwrap()
            .unwrap()
            .layers
            .contains_key("empty"));
    }

    #[test]
    fn bad_scope_options_are_refused() {
        let bad = |kv: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            VolumeOptions::parse(&m).unwrap_err().to_string()
        };
        assert!(bad(&[("scope", "a/b")]).contains("scope"));
        assert!(bad(&[("scope", "main"), ("from", "main")]).contains("own scope"));
        assert!(bad(&[("from", "a:b:c:d:e:f:g:h:i")]).contains("at most 8"));
        assert!(bad(&[("from", "a::b")]).contains("empty"));
        assert!(bad(&[("from", "default")]).contains("own scope"));
    }
}

/// What [`drop_scope`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The scope is gone; its layers no other scope or session needs go with the next GC.
    Done,
    /// Volumes with a live session in that scope.
    InUse(Vec<String>),
    /// No such scope.
    Missing,
}

/// Forgets `scope` of `cache` (not the default one: `rm CACHE` drops the whole cache); refused
/// while a session of that scope is live. Takes the cache lock; the caller runs GC afterwards.
pub fn drop_scope(store: &Store, cache: &str, scope: &str) -> Result<Dropped> {
    if scope == crate::state::DEFAULT_SCOPE {
        return Err(crate::error::Error::InvalidOption(format!(
            "the default scope is the cache itself: `cachedriver rm {cache}` drops the whole cache"
        )));
    }
    let _lock = store.lock_cache(cache)?;
    let in_use: Vec<String> = store
        .list_volumes()?
        .into_iter()
        .filter(|v| v.cache == cache && v.session.is_some())
        .filter(|v| {
            VolumeOptions::parse(&v.options)
                .map(|o| o.scope() == scope)
                .unwrap_or(true)
        })
        .map(|v| v.name)
        .collect();
    if !in_use.is_empty() {
        return Ok(Dropped::InUse(in_use));
    }
    let Some(mut st) = store.load_state(cache)? else {
        return Ok(Dropped::Missing);
    };
    if st.scopes.remove(scope).is_none() {
        return Ok(Dropped::Missing);
    }
    crate::failpoint!("scope::drop_before_state");
    store.save_state(cache, &st)?;
    Ok(Dropped::Done)
}
