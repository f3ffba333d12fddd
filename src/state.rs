//! `cache-state.json`: which layer is a cache's latest snapshot, and the layer chain.
//!
//! The seed project wrote only `{"state":{"latest":"three"}}` with full-copy snapshot dirs; we keep
//! that key so its tooling still reads our caches, and add `layers` (each layer's parent) and
//! `format`. A layer missing from `layers` has no parent, so a seed cache reads as a one-layer chain.
//! Unknown keys are preserved on rewrite.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names::is_valid_layer;

/// The format version we write.
pub const FORMAT: u32 = 2;

/// The kernel refuses more lower layers than this in one overlay mount.
pub const MAX_CHAIN: usize = 500;

/// Which xattr namespace a store's overlay markers (opaque dirs) use; serialised as
/// `"trusted"`/`"user"` (one home: `cachedriver_common::xattr`).
pub use cachedriver_common::XattrNs;

/// `state` object: the seed's key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latest {
    /// Name of the layer at the top of the latest snapshot.
    pub latest: String,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

/// One layer's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LayerInfo {
    /// The layer below this one; `None` for a bottom layer.
    pub parent: Option<String>,
    /// When it was committed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_at: Option<String>,
    /// The volume whose session produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

impl LayerInfo {
    /// A value another module recorded under `key` (e.g. `remote`: the layer's registry digests).
    pub fn ext(&self, key: &str) -> Option<&serde_json::Value> {
        self.extra.get(key)
    }

    /// Records `value` under `key`; kept on rewrite by versions that do not know the key.
    pub fn set_ext(&mut self, key: &str, value: serde_json::Value) {
        self.extra.insert(key.to_string(), value);
    }
}

/// The whole `cache-state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheState {
    /// The seed's `state.latest`.
    pub state: Latest,
    /// Every layer we know, by name.
    #[serde(default)]
    pub layers: BTreeMap<String, LayerInfo>,
    /// 2 for layered caches; absent (0) in the seed's files.
    #[serde(default)]
    pub format: u32,
    /// The xattr namespace the layers' overlay markers use; absent in the seed's files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xattr: Option<XattrNs>,
    /// Scopes other than the default one (whose latest is `state.latest`), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scopes: BTreeMap<String, ScopeInfo>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

/// The name of the scope whose latest is the seed's `state.latest`.
pub const DEFAULT_SCOPE: &str = "default";

/// One scope of a cache: its own latest snapshot over layers shared with the other scopes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ScopeInfo {
    /// The top layer of the scope's latest snapshot.
    pub latest: String,
    /// The scope whose snapshot its first session started from, if it forked one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<String>,
    /// When its latest last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(flatten)]
    extra: BTreeMap<String, serde_json::Value>,
}

impl CacheState {
    /// A fresh cache whose only layer is the empty `0`.
    pub fn new(xattr: XattrNs) -> Self {
        let mut layers = BTreeMap::new();
        layers.insert("0".to_string(), LayerInfo::default());
        CacheState {
            state: Latest {
                latest: "0".to_string(),
                extra: BTreeMap::new(),
            },
            layers,
            format: FORMAT,
            xattr: Some(xattr),
            scopes: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Parses and checks a state file: every layer name must be a valid path component.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let s: CacheState = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("cache-state.json does not parse: {e}")))?;
        for scope in s.scopes.keys() {
            if crate::names::validate_scope(scope).is_err() || scope == DEFAULT_SCOPE {
                return Err(Error::Corrupt(format!(
                    "cache-state.json names scope {scope:?}, which is not a valid scope name"
                )));
            }
        }
        let names = std::iter::once(&s.state.latest)
            .chain(s.scopes.values().map(|sc| &sc.latest))
            .chain(s.layers.keys())
            .chain(s.layers.values().filter_map(|l| l.parent.as_ref()));
        for n in names {
            if !is_valid_layer(n) {
                return Err(Error::Corrupt(format!(
                    "cache-state.json names layer {n:?}, which is not a valid layer name"
                )));
            }
        }
        Ok(s)
    }

    /// Serialises for writing (pretty, stable key order).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// The chain of layers from `top` down, newest first.
    pub fn chain(&self, top: &str) -> Result<Vec<String>> {
        let mut out = vec![top.to_string()];
        let mut cur = top;
        while let Some(parent) = self.layers.get(cur).and_then(|l| l.parent.as_deref()) {
            if out.iter().any(|l| l == parent) {
                return Err(Error::Corrupt(format!("layer chain loops at {parent:?}")));
            }
            if out.len() >= MAX_CHAIN {
                return Err(Error::Corrupt(format!(
                    "layer chain from {top:?} is deeper than the kernel's {MAX_CHAIN} layers; run `cachedriver compact`"
                )));
            }
            out.push(parent.to_string());
            cur = parent;
        }
        Ok(out)
    }

    /// Every snapshot top this state keeps alive: GC keeps their whole chains. Today that is the
    /// default scope's `latest`; scopes add their own latests here.
    pub fn roots(&self) -> Vec<&str> {
        std::iter::once(self.state.latest.as_str())
            .chain(self.scopes.values().map(|s| s.latest.as_str()))
            .collect()
    }

    /// The latest layer of `scope` (`default` is `state.latest`), if it has one.
    pub fn scope_latest(&self, scope: &str) -> Option<&str> {
        if scope == DEFAULT_SCOPE {
            Some(self.state.latest.as_str())
        } else {
            self.scopes.get(scope).map(|s| s.latest.as_str())
        }
    }

    /// Makes `layer` the latest of `scope`; a new scope remembers the scope it forked from.
    pub fn set_scope_latest(&mut self, scope: &str, layer: &str, forked_from: Option<&str>) {
        if scope == DEFAULT_SCOPE {
            self.state.latest = layer.to_string();
            return;
        }
        let e = self.scopes.entry(scope.to_string()).or_default();
        if e.latest.is_empty() {
            e.forked_from = forked_from.map(str::to_string);
        }
        e.latest = layer.to_string();
        e.updated_at = Some(crate::fsutil::now_rfc3339());
    }

    /// The chain of the latest snapshot, newest first.
    pub fn latest_chain(&self) -> Result<Vec<String>> {
        self.chain(&self.state.latest)
    }

    /// A layer name derived from `id` that no layer uses yet (`id`, `id.1`, `id.2`, ...).
    pub fn unique_layer_name(&self, id: &str, exists_on_disk: impl Fn(&str) -> bool) -> String {
        let taken =
            |n: &str| self.layers.contains_key(n) || self.roots().contains(&n) || exists_on_disk(n);
        if !taken(id) {
            return id.to_string();
        }
        (1u64..)
            .map(|i| format!("{id}.{i}"))
            .find(|n| n.len() <= crate::names::MAX_NAME_LEN + 12 && !taken(n))
            .unwrap_or_else(|| format!("{id}.{}", std::process::id()))
    }

    /// Records a new layer on top of `parent` and makes it the latest of `scope`.
    pub fn push_layer_in(
        &mut self,
        scope: &str,
        forked_from: Option<&str>,
        name: &str,
        parent: &str,
        session: &str,
    ) {
        let default_latest = self.state.latest.clone();
        self.push_layer(name, parent, session);
        if scope != DEFAULT_SCOPE {
            self.state.latest = default_latest;
            self.set_scope_latest(scope, name, forked_from);
        }
    }

    /// Records a new layer on top of `parent` and makes it the latest.
    pub fn push_layer(&mut self, name: &str, parent: &str, session: &str) {
        self.layers.insert(
            name.to_string(),
            LayerInfo {
                parent: Some(parent.to_string()),
                committed_at: Some(crate::fsutil::now_rfc3339()),
                session: Some(session.to_string()),
                extra: BTreeMap::new(),
            },
        );
        // A seed cache's layers are not in `layers` yet; record them so the chain is explicit.
        self.layers.entry(parent.to_string()).or_default();
        self.state.latest = name.to_string();
        self.format = FORMAT;
    }

    /// The compacted layer whose `compacted_from` lists `layer`, if compaction flattened it.
    pub fn compacted_into(&self, layer: &str) -> Option<&str> {
        self.layers.iter().find_map(|(name, info)| {
            info.ext("compacted_from")
                .and_then(|v| v.as_array())
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(layer)))
                .then_some(name.as_str())
        })
    }

    /// Records `name`, a bottom layer made by compaction from `from` (bottom-up), and makes it
    /// the parent of `above` in place of the layers it replaces.
    pub fn record_compacted(&mut self, name: &str, from: &[String], above: &str) {
        let mut extra = BTreeMap::new();
        extra.insert("compacted_from".to_string(), serde_json::json!(from));
        self.layers.insert(
            name.to_string(),
            LayerInfo {
                parent: None,
                committed_at: Some(crate::fsutil::now_rfc3339()),
                session: None,
                extra,
            },
        );
        self.layers.entry(above.to_string()).or_default().parent = Some(name.to_string());
        self.format = FORMAT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_state_is_a_one_layer_chain() {
        let s = CacheState::parse(br#"{"state":{"latest":"three"},"other":1}"#).unwrap();
        assert_eq!(s.latest_chain().unwrap(), vec!["three"]);
        let out = String::from_utf8(s.to_bytes()).unwrap();
        assert!(out.contains("\"other\": 1"), "unknown keys kept: {out}");
    }

    #[test]
    fn chain_and_push() {
        let mut s = CacheState::new(XattrNs::Trusted);
        s.push_layer("one", "0", "foo-one");
        s.push_layer("two", "0", "foo-two");
        s.push_layer("three", "one", "foo-three");
        assert_eq!(s.latest_chain().unwrap(), vec!["three", "one", "0"]);
        assert_eq!(s.unique_layer_name("one", |_| false), "one.1");
        assert_eq!(s.unique_layer_name("four", |n| n == "four"), "four.1");
        let back = CacheState::parse(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert!(String::from_utf8(s.to_bytes())
            .unwrap()
            .contains("\"latest\": \"three\""));
    }

    #[test]
    fn refuses_hostile_names_and_loops() {
        assert!(CacheState::parse(br#"{"state":{"latest":"../../etc"}}"#).is_err());
        assert!(
            CacheState::parse(br#"{"state":{"latest":"a"},"layers":{"a":{"parent":"/x"}}}"#)
                .is_err()
        );
        let s = CacheState::parse(
            br#"{"state":{"latest":"a"},"layers":{"a":{"parent":"b"},"b":{"parent":"a"}}}"#,
        )
        .unwrap();
        assert!(s.latest_chain().is_err());
    }
}
