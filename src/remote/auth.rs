//! Registry credentials: Docker's `config.json` `auths` (`{"auths":{"HOST":{"auth":"base64(user:pass)"}}}`,
//! or `username`/`password` fields), from `--remote-auth-file` or else `$DOCKER_CONFIG/config.json`
//! / `~/.docker/config.json`. No credential helpers: a CI host that uses one writes an auth file.

use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;

use crate::error::{Error, Result};

/// The Docker config file to read when no auth file is given.
pub fn default_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Credentials for `registry` (`host[:port]`) from `file` (or the default Docker config):
/// anonymous when the file or the entry is absent; an error when the file exists but is bad.
pub fn for_registry(registry: &str, file: Option<&Path>) -> Result<RegistryAuth> {
    let (path, explicit) = match file {
        Some(p) => (p.to_path_buf(), true),
        None => match default_config() {
            Some(p) => (p, false),
            None => return Ok(RegistryAuth::Anonymous),
        },
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(RegistryAuth::Anonymous)
        }
        Err(e) => return Err(Error::io("reading registry credentials", path, e)),
    };
    parse(&bytes, registry).map_err(|m| Error::Remote(format!("{}: {m}", path.display())))
}

/// Looks `registry` up in a Docker config's `auths` (keys may carry a scheme and a path).
pub fn parse(bytes: &[u8], registry: &str) -> std::result::Result<RegistryAuth, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a Docker config JSON: {e}"))?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let host_of = |k: &str| {
        let k = k
            .strip_prefix("https://")
            .or_else(|| k.strip_prefix("http://"))
            .unwrap_or(k);
        k.split('/').next().unwrap_or(k).to_string()
    };
    let Some(entry) = auths
        .iter()
        .find(|(k, _)| host_of(k) == registry)
        .map(|(_, e)| e)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| format!("auths.{registry}.auth is not base64: {e}"))?;
        let s = String::from_utf8(raw)
            .map_err(|_| format!("auths.{registry}.auth is not UTF-8 user:password"))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| format!("auths.{registry}.auth is not user:password"))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    match (
        entry.get("username").and_then(|u| u.as_str()),
        entry.get("password").and_then(|p| p.as_str()),
    ) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.to_string(), p.to_string())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_auths() {
        let cfg = br#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dXNlcjpwYTpzcw=="},
            "other":{"username":"a","password":"b"}}}"#;
        match parse(cfg, "reg.example:5000").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("user", "pa:ss")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(cfg, "other").unwrap(),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            parse(cfg, "nope").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(parse(b"{", "x").is_err());
        assert!(parse(br#"{"auths":{"x":{"auth":"!!"}}}"#, "x").is_err());
    }
}
