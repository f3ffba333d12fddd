//! `cachedriver probe`: which backends work here, and why.
//!
//! Each backend is tried for real: a throw-away overlay of one lower layer is mounted under the
//! store root, read through, written (copy-up) and unmounted. `auto` picks the kernel when it
//! works, FUSE otherwise.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::backend::{self, BackendChoice, BackendKind, MountSpec};
use crate::state::XattrNs;

/// The outcome of probing both backends.
#[derive(Debug)]
pub struct Report {
    /// Running inside a user namespace (rootless).
    pub userns: bool,
    /// The xattr namespace in use.
    pub xattr: XattrNs,
    /// `Ok` or why the kernel overlay failed.
    pub kernel: Result<(), String>,
    /// How the kernel backend mounted (new mount API or classic option string, and why).
    pub kernel_path: Option<String>,
    /// `Ok` or why the FUSE mount failed.
    pub fuse: Result<(), String>,
    /// When run outside a user namespace: the same probe inside a fresh one (`unshare -Urm`),
    /// i.e. what a rootless Docker or Podman host would get. `None` when already inside one.
    pub rootless: Option<Box<Report>>,
}

/// The backend `choice` resolves to, given how to learn whether each backend works. `auto` asks
/// about FUSE only when the kernel fails, so a lazy `fuse` is never run on a kernel host.
fn choose(
    choice: BackendChoice,
    kernel: impl FnOnce() -> Result<(), String>,
    fuse: impl FnOnce() -> Result<(), String>,
) -> Result<BackendKind, String> {
    match choice {
        BackendChoice::Kernel => kernel()
            .map(|()| BackendKind::Kernel)
            .map_err(|e| format!("--backend kernel: {e}")),
        BackendChoice::Fuse => fuse()
            .map(|()| BackendKind::Fuse)
            .map_err(|e| format!("--backend fuse: {e}")),
        BackendChoice::Auto => match kernel() {
            Ok(()) => Ok(BackendKind::Kernel),
            Err(k) => fuse()
                .map(|()| BackendKind::Fuse)
                .map_err(|f| format!("no backend works here: kernel overlayfs: {k}; FUSE: {f}")),
        },
    }
}

impl Report {
    /// The backend `choice` resolves to, or why none can be used.
    pub fn pick(&self, choice: BackendChoice) -> Result<BackendKind, String> {
        choose(choice, || self.kernel.clone(), || self.fuse.clone())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |r: &Result<(), String>| match r {
            Ok(()) => "works".to_string(),
            Err(e) => format!("fails: {e}"),
        };
        writeln!(
            f,
            "user namespace: {} (overlay markers use {}.overlay.*{})",
            if self.userns { "yes" } else { "no" },
            self.xattr.as_str(),
            if self.userns {
                ", kernel mounts need userxattr"
            } else {
                ""
            }
        )?;
        writeln!(f, "kernel overlayfs: {}", show(&self.kernel))?;
        if let Some(p) = &self.kernel_path {
            writeln!(f, "  mounted through: {p}")?;
        }
        writeln!(f, "fuse (cachedriver-fuse): {}", show(&self.fuse))?;
        match self.pick(BackendChoice::Auto) {
            Ok(k) => writeln!(f, "auto picks: {}", k.as_str())?,
            Err(e) => writeln!(f, "auto picks: nothing ({e})")?,
        }
        if let Some(r) = &self.rootless {
            writeln!(
                f,
                "inside a new user namespace (as rootless Docker/Podman run):"
            )?;
            writeln!(f, "  kernel overlayfs (userxattr): {}", show(&r.kernel))?;
            if let Some(p) = &r.kernel_path {
                writeln!(f, "    mounted through: {p}")?;
            }
            writeln!(f, "  fuse (cachedriver-fuse): {}", show(&r.fuse))?;
            match r.pick(BackendChoice::Auto) {
                Ok(k) => writeln!(f, "  auto would pick: {}", k.as_str())?,
                Err(e) => writeln!(f, "  auto would pick: nothing ({e})")?,
            }
        }
        Ok(())
    }
}

/// Resolves `--backend` at startup, probing only what it needs: `auto` tries the kernel first and
/// FUSE only if the kernel fails.
pub fn resolve(choice: BackendChoice, root: &Path, exe: &Path) -> Result<BackendKind, String> {
    let xattr = XattrNs::for_this_process();
    let kernel = || {
        let r = try_backend(BackendKind::Kernel, root, exe, xattr).map(|_| ());
        if let (Err(e), BackendChoice::Auto) = (&r, choice) {
            tracing::warn!("kernel overlayfs does not work here ({e}); trying FUSE");
        }
        r
    };
    choose(choice, kernel, || {
        try_backend(BackendKind::Fuse, root, exe, xattr).map(|_| ())
    })
}

fn try_backend(
    kind: BackendKind,
    root: &Path,
    exe: &Path,
    xattr: XattrNs,
) -> Result<String, String> {
    if kind == BackendKind::Fuse && !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse is missing (load the fuse module or pass --device /dev/fuse)".into(),
        );
    }
    fs::create_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let dir = tempfile::Builder::new()
        .prefix(".probe-")
        .tempdir_in(root)
        .map_err(|e| format!("creating a probe dir under {}: {e}", root.display()))?;
    let d = dir.path();
    let (lower, upper, work, target) = (d.join("l"), d.join("u"), d.join("w"), d.join("m"));
    for p in [&lower, &upper, &work, &target] {
        fs::create_dir(p).map_err(|e| format!("creating {}: {e}", p.display()))?;
    }
    fs::write(lower.join("f"), b"probe").map_err(|e| format!("writing probe file: {e}"))?;
    let b = backend::for_kind(kind, exe);
    let spec = MountSpec {
        lowers: vec![lower.clone()],
        upper: &upper,
        work: &work,
        target: &target,
        xattr,
        pid_file: &d.join("pid"),
    };
    let mounted = b.mount(&spec).map_err(|e| e.to_string())?;
    let check = (|| {
        let got =
            fs::read(target.join("f")).map_err(|e| format!("reading through the mount: {e}"))?;
        if got != b"probe" {
            return Err("reading through the mount gave the wrong content".to_string());
        }
        fs::write(target.join("f"), b"changed").map_err(|e| format!("copy-up write: {e}"))?;
        Ok(())
    })();
    let un = b.unmount(&target, mounted.pid).map_err(|e| e.to_string());
    check?;
    un?;
    if fs::read(upper.join("f")).ok().as_deref() != Some(b"changed".as_slice()) {
        return Err("the write did not reach the upper dir".into());
    }
    if fs::read(lower.join("f")).ok().as_deref() != Some(b"probe".as_slice()) {
        return Err("the write changed the lower layer".into());
    }
    Ok(mounted.how)
}

/// Probes both backends under `root`; `exe` serves FUSE mounts. Outside a user namespace it
/// also probes inside a fresh one (`unshare -Urm`), as rootless engines would run.
pub fn probe(root: &Path, exe: &Path) -> Report {
    let xattr = XattrNs::for_this_process();
    let userns = crate::fsutil::in_user_namespace();
    let kernel = try_backend(BackendKind::Kernel, root, exe, xattr);
    Report {
        userns,
        xattr,
        kernel: kernel.clone().map(|_| ()),
        kernel_path: kernel.ok(),
        fuse: try_backend(BackendKind::Fuse, root, exe, xattr).map(|_| ()),
        rootless: (!userns).then(|| Box::new(probe_in_user_namespace(root, exe))),
    }
}

/// Runs `exe probe --json` under `unshare -Urm` and reads its report back.
fn probe_in_user_namespace(root: &Path, exe: &Path) -> Report {
    let failed = |why: String| Report {
        userns: true,
        xattr: XattrNs::User,
        kernel: Err(why.clone()),
        kernel_path: None,
        fuse: Err(why),
        rootless: None,
    };
    let out = std::process::Command::new("unshare")
        .args(["-Urm", "--propagation", "private", "--"])
        .arg(exe)
        .arg("probe")
        .arg("--json")
        .arg("--root")
        .arg(root)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return failed(format!("cannot run unshare: {e}")),
    };
    let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => {
            let err = String::from_utf8_lossy(&out.stderr);
            return failed(format!(
                "cannot create a user namespace here: {}",
                err.trim().lines().last().unwrap_or("unshare failed")
            ));
        }
    };
    let get = |k: &str| match v[k].as_str() {
        Some("ok") => Ok(()),
        Some(e) => Err(e.to_string()),
        None => Err("no answer".to_string()),
    };
    Report {
        userns: true,
        xattr: XattrNs::User,
        kernel: get("kernel"),
        kernel_path: v["kernel_path"].as_str().map(str::to_string),
        fuse: get("fuse"),
        rootless: None,
    }
}

impl Report {
    /// The machine-readable form `probe --json` prints (`"ok"` or the reason per backend).
    pub fn to_json(&self) -> serde_json::Value {
        let show = |r: &Result<(), String>| match r {
            Ok(()) => "ok".to_string(),
            Err(e) => e.clone(),
        };
        serde_json::json!({
            "userns": self.userns,
            "xattr": self.xattr.as_str(),
            "kernel": show(&self.kernel),
            "kernel_path": self.kernel_path,
            "fuse": show(&self.fuse),
            "auto": self.pick(BackendChoice::Auto).ok().map(|k| k.as_str()),
            "rootless": self.rootless.as_ref().map(|r| r.to_json()),
        })
    }
}
