//! The skip-or-fail policy every integration test shares, and the probes tests skip on
//! (`#[path = "support/probe.rs"] mod probe;`). A test that cannot run here (no root, no
//! backend, a missing tool) says so loudly and passes; under `CI=true` (or `1`) or
//! `CACHEDRIVER_REQUIRE_ALL=1` it fails instead.
#![allow(dead_code)]

use std::path::PathBuf;

use cachedriver::backend::BackendKind;

/// Whether a test that cannot run must fail instead of skipping.
pub fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("CACHEDRIVER_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Fails under [`strict`], else says loudly that `what` is skipped and why.
pub fn skip(what: &str, why: &str) {
    let msg = format!("{what}: SKIPPED: {why}");
    assert!(!strict(), "{msg} (required here)");
    eprintln!("\n*** {msg} ***\n");
}

/// Our binary (serves the plugin socket and FUSE mounts).
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cachedriver"))
}

/// Where `cmd` is installed: the first match on `PATH`, then in `/usr/sbin` and `/sbin` (not
/// on every user's `PATH`).
pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| PathBuf::from(d).join(cmd))
        .find(|p| p.is_file())
}

/// Whether we run as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Backends usable here; loud (or fatal under [`strict`]) about the ones that are not.
pub fn backends(test: &str) -> Vec<BackendKind> {
    if !is_root() {
        skip(test, "mounting overlays needs root");
        return vec![];
    }
    let probe_root = tempfile::tempdir().expect("tempdir");
    let report = cachedriver::probe::probe(probe_root.path(), &exe());
    let mut out = vec![];
    match &report.kernel {
        Ok(()) => out.push(BackendKind::Kernel),
        Err(e) => skip(&format!("{test} (kernel backend)"), e),
    }
    match &report.fuse {
        Ok(()) => out.push(BackendKind::Fuse),
        Err(e) => skip(&format!("{test} (fuse backend)"), e),
    }
    out
}
