//! Volume names and volume options.
//!
//! A volume `<cache>-<id>` maps to cache `<cache>` and session `<id>` (split at the first `-`);
//! `-o cache=NAME` overrides the split, and then the whole volume name is the session id. Every
//! name is validated here, before it ever becomes a path.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Longest name we accept, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// What a valid volume name looks like; part of every name error.
const NAME_HELP: &str =
    "a volume name is <cache>-<session>, e.g. \"m2-job41\": the cache name uses \
[A-Za-z0-9_.], the session id [A-Za-z0-9_.-], each starts with a letter, digit or '_', at most 128 \
bytes, no \"..\"; or pass -o cache=NAME to pick the cache yourself";

/// Option keys accepted by `docker volume create -o`.
pub const KNOWN_OPTIONS: &[&str] = &["cache", "commit", "commit-on", "scope", "from"];

/// At most this many fallback scopes in `from=`.
pub const MAX_FALLBACKS: usize = 8;

/// How a session's changes reach the cache when its last mount ends.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum CommitMode {
    /// New snapshot = the session's changes on top of the snapshot it started from.
    Replace,
    /// New snapshot = the session's changes on top of the cache's latest snapshot.
    Merge,
    /// Nothing is written back.
    Discard,
}

impl CommitMode {
    /// The option value for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            CommitMode::Replace => "replace",
            CommitMode::Merge => "merge",
            CommitMode::Discard => "discard",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "replace" => Ok(CommitMode::Replace),
            "merge" => Ok(CommitMode::Merge),
            "discard" => Ok(CommitMode::Discard),
            _ => Err(Error::InvalidOption(format!(
                "invalid commit mode {}: use commit=replace, commit=merge or commit=discard",
                shown(s)
            ))),
        }
    }
}

impl std::fmt::Display for CommitMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name as error messages show it: quoted, and cut at 64 characters so a hostile megabyte-long
/// name does not come back whole in the reply and the log.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((i, _)) => format!("{:?}... ({} bytes)", &s[..i], s.len()),
    }
}

fn check_common(kind: &str, s: &str, extra: &[u8]) -> std::result::Result<(), String> {
    check_len(kind, s, extra, MAX_NAME_LEN)
}

fn check_len(kind: &str, s: &str, extra: &[u8], max: usize) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err(format!("{kind} is empty"));
    }
    if s.len() > max {
        return Err(format!("{kind} is longer than {max} bytes"));
    }
    if s.contains("..") {
        return Err(format!("{kind} {} contains \"..\"", shown(s)));
    }
    let first = s.as_bytes()[0];
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err(format!(
            "{kind} {} must start with a letter, digit or '_'",
            shown(s)
        ));
    }
    if let Some(c) = s
        .bytes()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.' || extra.contains(c)))
    {
        return Err(format!(
            "{kind} {} contains {:?}, which is not allowed",
            shown(s),
            c as char
        ));
    }
    Ok(())
}

/// Checks a cache name (`[A-Za-z0-9_.]`).
pub fn validate_cache(s: &str) -> Result<()> {
    check_common("cache name", s, b"").map_err(|m| Error::InvalidName(format!("{m}: {NAME_HELP}")))
}

/// Checks a session id or layer name (`[A-Za-z0-9_.-]`).
pub fn validate_id(s: &str) -> Result<()> {
    check_common("session id", s, b"-").map_err(|m| Error::InvalidName(format!("{m}: {NAME_HELP}")))
}

/// Checks a layer name found on disk or in a state file (same alphabet as session ids).
/// Layer names may carry a uniqueness suffix (`id.12`) beyond the session id's length.
pub fn is_valid_layer(s: &str) -> bool {
    check_len("layer", s, b"-", MAX_NAME_LEN + 24).is_ok()
}

/// Options of one volume, parsed from `docker volume create -o`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    /// `cache=NAME`: overrides the name split.
    pub cache: Option<String>,
    /// `commit=MODE`: overrides the server-wide default.
    pub commit: Option<CommitMode>,
    /// `commit-on=always|success`: overrides the server-wide default.
    pub commit_on: Option<crate::policy::CommitOn>,
    /// `scope=NAME`: the scope sessions start from and commit into (default: `default`).
    pub scope: Option<String>,
    /// `from=A:B`: scopes to start from, in order, when `scope` has no snapshot yet.
    pub from: Vec<String>,
}

/// Checks a scope name (`[A-Za-z0-9_.-]`, like a session id).
pub fn validate_scope(s: &str) -> Result<()> {
    check_common("scope name", s, b"-").map_err(|m| {
        Error::InvalidOption(format!(
            "{m}: a scope name uses [A-Za-z0-9_.-], e.g. scope=main or scope=pr-123"
        ))
    })
}

impl VolumeOptions {
    /// Parses and validates the `Opts` map of a Create request.
    pub fn parse(opts: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = VolumeOptions::default();
        for (k, v) in opts {
            match k.as_str() {
                "cache" => {
                    validate_cache(v)?;
                    out.cache = Some(v.clone());
                }
                "commit" => out.commit = Some(CommitMode::parse(v)?),
                "commit-on" => out.commit_on = Some(crate::policy::CommitOn::parse(v)?),
                "scope" => {
                    validate_scope(v)?;
                    out.scope = Some(v.clone());
                }
                "from" => {
                    let list: Vec<String> = v.split(':').map(str::to_string).collect();
                    if list.len() > MAX_FALLBACKS {
                        return Err(Error::InvalidOption(format!(
                            "from= names {} scopes; at most {MAX_FALLBACKS} fallbacks are allowed",
                            list.len()
                        )));
                    }
                    for sc in &list {
                        validate_scope(sc)?;
                    }
                    out.from = list;
                }
                _ => {
                    return Err(Error::InvalidOption(format!(
                        "unknown option {}: cachedriver knows {} (e.g. -o commit=merge)",
                        shown(k),
                        KNOWN_OPTIONS.join(", ")
                    )))
                }
            }
        }
        let me = out.scope.as_deref().unwrap_or(crate::state::DEFAULT_SCOPE);
        if out.from.iter().any(|f| f == me) {
            return Err(Error::InvalidOption(format!(
                "from= names the volume's own scope {me:?}: list the scopes to fall back to, e.g. -o scope=pr-123 -o from=main"
            )));
        }
        Ok(out)
    }

    /// The scope sessions of this volume commit into.
    pub fn scope(&self) -> &str {
        self.scope.as_deref().unwrap_or(crate::state::DEFAULT_SCOPE)
    }
}

/// A validated volume name and the cache and session it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeName {
    /// The Docker volume name.
    pub volume: String,
    /// The cache it belongs to.
    pub cache: String,
    /// The session id: names the upper dir and, on commit, the new layer.
    pub id: String,
}

/// Validates a bare volume name (used before any lookup by name).
pub fn validate_volume(name: &str) -> Result<()> {
    check_common("it", name, b"-").map_err(|m| {
        let m = m.replacen(&format!("it {}", shown(name)), "it", 1);
        Error::InvalidName(format!(
            "invalid volume name {}: {m}; {NAME_HELP}",
            shown(name)
        ))
    })
}

/// Splits `volume` into cache and session id, honouring a `cache=` override.
pub fn parse_volume(volume: &str, cache_override: Option<&str>) -> Result<VolumeName> {
    validate_volume(volume)?;
    let wrap = |e: Error| match e {
        Error::InvalidName(m) => {
            Error::InvalidName(format!("invalid volume name {}: {m}", shown(volume)))
        }
        other => other,
    };
    let (cache, id) = match cache_override {
        Some(c) => (c.to_string(), volume.to_string()),
        None => match volume.split_once('-') {
            Some((c, i)) => (c.to_string(), i.to_string()),
            None => {
                return Err(Error::InvalidName(format!(
                "invalid volume name {}: it has no '-' to split cache from session; {NAME_HELP}",
                shown(volume)
            )))
            }
        },
    };
    validate_cache(&cache).map_err(wrap)?;
    validate_id(&id).map_err(wrap)?;
    Ok(VolumeName {
        volume: volume.to_string(),
        cache,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_first_dash() {
        let v = parse_volume("foo-one-two", None).unwrap();
        assert_eq!((v.cache.as_str(), v.id.as_str()), ("foo", "one-two"));
    }

    #[test]
    fn override_uses_whole_name_as_id() {
        let v = parse_volume("build-cache", Some("m2")).unwrap();
        assert_eq!((v.cache.as_str(), v.id.as_str()), ("m2", "build-cache"));
        let v = parse_volume("plain", Some("m2")).unwrap();
        assert_eq!(v.id, "plain");
    }

    #[test]
    fn refuses_bad_names() {
        for bad in [
            "",
            "foo",
            "-x",
            "foo-",
            "a/b-c",
            "foo..x-1",
            "foo-..",
            "foo-a/b",
            "f\0o-a",
            ".foo-a",
            "foo-.a",
            "foo bar-a",
            "foo-a b",
        ] {
            let e = parse_volume(bad, None).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("m2-job41"), "{bad:?}: {msg}");
        }
        let long = format!("a-{}", "b".repeat(MAX_NAME_LEN));
        assert!(parse_volume(&long, None).is_err());
        assert!(parse_volume("x", Some("a/b")).is_err());
    }

    #[test]
    fn errors_do_not_echo_huge_names() {
        let huge = format!("a/{}", "x".repeat(1 << 20));
        let msg = parse_volume(&huge, None).unwrap_err().to_string();
        assert!(msg.len() < 2048, "{} bytes", msg.len());
        assert!(msg.contains("bytes)") && msg.contains("m2-job41"), "{msg}");
        let mut o = BTreeMap::new();
        o.insert("k".repeat(1 << 20), "v".to_string());
        assert!(VolumeOptions::parse(&o).unwrap_err().to_string().len() < 2048);
        assert_eq!(
            shown("é".repeat(70).as_str())
                .chars()
                .filter(|c| *c == 'é')
                .count(),
            64
        );
    }

    #[test]
    fn options() {
        let mut o = BTreeMap::new();
        o.insert("commit".to_string(), "merge".to_string());
        assert_eq!(
            VolumeOptions::parse(&o).unwrap().commit,
            Some(CommitMode::Merge)
        );
        o.insert("size".to_string(), "1".to_string());
        let msg = VolumeOptions::parse(&o).unwrap_err().to_string();
        assert!(
            msg.contains("\"size\"") && msg.contains("cache, commit"),
            "{msg}"
        );
        let mut o = BTreeMap::new();
        o.insert("commit".to_string(), "keep".to_string());
        assert!(VolumeOptions::parse(&o).is_err());
    }
}
