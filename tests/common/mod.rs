//! Helpers shared by the crash, stress, full-disk and fuzz tests: the real `serve` process on a
//! temp root, a blocking HTTP/1.1 client over its unix socket (raw, so tests can also send bytes
//! no well-behaved client would), and the checks every test runs afterwards (mounts, FUSE
//! servers and temp files left under a root, the cache state's invariants).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

// The skip-or-fail probe (strict, skip, exe, is_root, backends) has one home.
#[path = "../support/probe.rs"]
mod probe;

// Each test binary uses its own subset.
#[allow(unused_imports)]
pub use probe::{exe, is_root, skip, strict};

/// The backends that work here, by name (`kernel`, `fuse`), loud (fatal under CI) about the
/// others.
pub fn backends(test: &str) -> Vec<&'static str> {
    probe::backends(test)
        .into_iter()
        .map(|k| k.as_str())
        .collect()
}

/// One HTTP request over the plugin's socket, as Docker sends it (POST, no Content-Type).
/// `Err` when the server is gone or the connection broke (the outcome is then unknown).
pub fn call(socket: &Path, endpoint: &str, body: &[u8]) -> Result<(u16, Value), String> {
    let mut req = format!(
        "POST {endpoint} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let raw = raw_request(socket, &req, Duration::from_secs(120))?;
    let (status, body) = parse_response(&raw)?;
    let v = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "{endpoint}: reply is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body)
        )
    })?;
    Ok((status, v))
}

/// [`call`] with a JSON body.
pub fn callj(socket: &Path, endpoint: &str, body: &Value) -> Result<(u16, Value), String> {
    call(socket, endpoint, body.to_string().as_bytes())
}

/// Writes `bytes` to the socket and reads until the server closes (or `timeout`).
pub fn raw_request(socket: &Path, bytes: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // The server may answer (413) and close before reading a large body: not an error here.
    // (No half-close: hyper treats a read EOF as the client going away and drops the reply.)
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if !buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(format!("reading reply: {e}")),
    }
    if buf.is_empty() {
        return Err("connection closed without a reply".into());
    }
    Ok(buf)
}

/// Status and (de-chunked) body of an HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16)
                .map_err(|e| format!("bad chunk size: {e}"))?;
            if n == 0 {
                break;
            }
            let start = nl + 2;
            out.extend_from_slice(&rest[start..(start + n).min(rest.len())]);
            rest = &rest[(start + n + 2).min(rest.len())..];
        }
        body = out;
    }
    Ok((status, body))
}

/// The `serve` process on a root and socket of a temp dir; on drop it is killed and every mount,
/// FUSE server and file it left is cleaned up.
pub struct Plugin {
    /// The running process, if any.
    pub child: Option<Child>,
    /// Holds root, socket and logs.
    pub dir: tempfile::TempDir,
    /// The store root.
    pub root: PathBuf,
    /// The socket.
    pub socket: PathBuf,
    /// `kernel` or `fuse`.
    pub backend: String,
    /// Extra `serve` flags (e.g. `--compact-depth 2`).
    pub extra: Vec<String>,
    starts: u32,
}

impl Plugin {
    /// A plugin on a fresh temp dir (under `parent` if given, e.g. a small loop mount).
    pub fn new(backend: &str, root_parent: Option<&Path>, extra: &[String]) -> Plugin {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = match root_parent {
            Some(p) => p.join("root"),
            None => dir.path().join("root"),
        };
        Plugin {
            child: None,
            socket: dir.path().join("plugin.sock"),
            dir,
            root,
            backend: backend.to_string(),
            extra: extra.to_vec(),
            starts: 0,
        }
    }

    /// Starts `serve` with `failpoints` as `FAILPOINTS` (if any) and waits for its socket.
    pub fn start(&mut self, failpoints: Option<&str>) -> Result<(), String> {
        assert!(self.child.is_none(), "start: the plugin is already running");
        self.starts += 1;
        let log = self.dir.path().join(format!("plugin.{}.log", self.starts));
        let mut cmd = Command::new(exe());
        cmd.arg("serve")
            .arg("--root")
            .arg(&self.root)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--backend")
            .arg(&self.backend)
            .args(&self.extra)
            .env("CACHEDRIVER_LOG", "info")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&log).expect("log file")));
        if let Some(fp) = failpoints {
            cmd.env("FAILPOINTS", fp);
        }
        let child = cmd.spawn().map_err(|e| format!("starting serve: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(st) = self.try_exit() {
                return Err(format!(
                    "serve exited during startup ({st}):\n{}",
                    self.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "serve did not bind its socket in 60 s:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has ended (reaping it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(st)
    }

    /// Waits up to `d` for the process to end by itself.
    pub fn wait_exit(&mut self, d: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if self.child.is_none() || Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.try_exit();
        self.child.is_some()
    }

    /// SIGKILL, as a crash: nothing is cleaned up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; `Err` if it does not exit 0 within 30 s.
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(c) = self.child.as_ref() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        match self.wait_exit(Duration::from_secs(30)) {
            Some(st) if st.success() => Ok(()),
            Some(st) => Err(format!("serve exited with {st} on SIGTERM")),
            None => {
                self.kill9();
                Err("serve did not exit within 30 s of SIGTERM".into())
            }
        }
    }

    /// Every log of this plugin's runs, concatenated.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            out += &format!("--- run {i} ---\n");
            out += &fs::read_to_string(self.dir.path().join(format!("plugin.{i}.log")))
                .unwrap_or_default();
        }
        out
    }

    /// How many times the plugin was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The log of the `i`-th start (1-based).
    pub fn log_of(&self, i: u32) -> String {
        fs::read_to_string(self.dir.path().join(format!("plugin.{i}.log"))).unwrap_or_default()
    }

    /// The last 40 lines of the logs.
    pub fn log_tail(&self) -> String {
        let l = self.logs();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Calls an endpoint with a JSON body.
    pub fn call(&self, endpoint: &str, body: Value) -> Result<(u16, Value), String> {
        callj(&self.socket, endpoint, &body)
    }

    /// Calls an endpoint and requires a 200 reply.
    pub fn ok(&self, endpoint: &str, body: Value) -> Result<Value, String> {
        match self.call(endpoint, body.clone())? {
            (200, v) => Ok(v),
            (st, v) => Err(format!("{endpoint} {body} -> {st} {v}")),
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill9();
        cleanup_root(&self.root);
    }
}

/// Mount points under `root` in our namespace, deepest first.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let prefix = format!("{}/", root.display());
    let mut v: Vec<String> = cachedriver_fuse::mount_table()
        .into_iter()
        .map(|(p, _)| p.display().to_string())
        .filter(|p| p.starts_with(&prefix))
        .collect();
    v.sort();
    v.dedup();
    v.reverse();
    v
}

/// Pids of processes whose command line names a path under `root` (FUSE servers of its
/// sessions), other than us.
pub fn processes_under(root: &Path) -> Vec<(i32, String)> {
    let needle = format!("{}/", root.display());
    let me = std::process::id() as i32;
    let mut out = vec![];
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) && cmd.contains(" fuse ") {
            let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            if stat.contains(") Z ") {
                continue;
            }
            out.push((pid, cmd));
        }
    }
    out
}

/// Unmounts (lazily) everything under `root` and kills FUSE servers serving it.
pub fn cleanup_root(root: &Path) {
    for m in mounts_under(root) {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    for (pid, _) in processes_under(root) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Temp files the plugin's crash-safe steps leave while they run (`.*.tmp-*`, `.tmp-*`,
/// `.gc-*`, `.orphan-*`) anywhere under `root`, without following symlinks or leaving the fs.
pub fn temp_files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(m) = fs::symlink_metadata(root) else {
        return out;
    };
    let dev = m.dev();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let p = e.path();
            let is_temp = (name.starts_with('.') && name.contains(".tmp-"))
                || name.starts_with(".tmp-")
                || name.starts_with(".gc-")
                || name.starts_with(".orphan-");
            if is_temp {
                out.push(p.clone());
            }
            if let Ok(m) = fs::symlink_metadata(&p) {
                if m.is_dir() && m.dev() == dev {
                    stack.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

/// One entry of a directory tree as a test compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file and its content.
    File(Vec<u8>),
    /// A kernel-format whiteout (char device 0/0).
    Whiteout,
}

/// Regular files and whiteouts of a tree, by relative path (dirs are implied).
pub fn read_tree(dir: &Path) -> Result<BTreeMap<String, Entry>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let rd = fs::read_dir(&abs).map_err(|e| format!("listing {}: {e}", abs.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("listing {}: {e}", abs.display()))?;
            let r = rel.join(e.file_name());
            let m = fs::symlink_metadata(e.path())
                .map_err(|err| format!("stat {}: {err}", e.path().display()))?;
            let ft = m.file_type();
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                let c = fs::read(e.path())
                    .map_err(|err| format!("reading {}: {err}", e.path().display()))?;
                out.insert(r.display().to_string(), Entry::File(c));
            } else if ft.is_char_device() && m.rdev() == 0 {
                out.insert(r.display().to_string(), Entry::Whiteout);
            }
        }
    }
    Ok(out)
}

/// Regular files only, as a merged view shows them.
pub fn files_of(tree: &BTreeMap<String, Entry>) -> BTreeMap<String, Vec<u8>> {
    tree.iter()
        .filter_map(|(k, v)| match v {
            Entry::File(c) => Some((k.clone(), c.clone())),
            Entry::Whiteout => None,
        })
        .collect()
}

/// A short description of how two file maps differ.
pub fn diff(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>) -> String {
    let mut d = vec![];
    for k in want.keys() {
        if !got.contains_key(k) {
            d.push(format!("missing {k}"));
        }
    }
    for (k, v) in got {
        match want.get(k) {
            None => d.push(format!("extra {k}")),
            Some(w) if w != v => d.push(format!(
                "{k} differs ({} bytes, starts {:?}; want {} bytes, starts {:?})",
                v.len(),
                String::from_utf8_lossy(&v[..v.len().min(12)]),
                w.len(),
                String::from_utf8_lossy(&w[..w.len().min(12)])
            )),
            _ => {}
        }
    }
    d.join(", ")
}

/// A cache's `cache-state.json`, parsed.
pub fn load_state(root: &Path, cache: &str) -> Result<Value, String> {
    let p = root.join("lower").join(cache).join("cache-state.json");
    let b = fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
    serde_json::from_slice(&b).map_err(|e| format!("{} does not parse: {e}", p.display()))
}

/// The latest chain of a state, newest first; `Err` names the broken link.
pub fn latest_chain(state: &Value) -> Result<Vec<String>, String> {
    let mut cur = state["state"]["latest"]
        .as_str()
        .ok_or("state.latest is missing")?
        .to_string();
    let mut out = vec![];
    loop {
        if out.contains(&cur) {
            return Err(format!("layer chain loops at {cur:?}"));
        }
        out.push(cur.clone());
        match state["layers"][&cur]["parent"].as_str() {
            Some(p) => cur = p.to_string(),
            None => return Ok(out),
        }
    }
}

/// The durable invariant of one cache: the state parses, the latest chain resolves, and every
/// layer the state names exists as a directory. Returns the state.
pub fn check_state(root: &Path, cache: &str) -> Result<Value, String> {
    let st = load_state(root, cache)?;
    let chain = latest_chain(&st).map_err(|e| format!("cache {cache}: {e}"))?;
    let mut named: Vec<String> = chain;
    if let Some(l) = st["layers"].as_object() {
        named.extend(l.keys().cloned());
    }
    for l in named {
        let d = root.join("lower").join(cache).join(&l);
        if !d.is_dir() {
            return Err(format!(
                "INVARIANT layer-exists: cache {cache}: cache-state.json names layer {l:?} but {} does not exist",
                d.display()
            ));
        }
    }
    Ok(st)
}

/// A read-only kernel overlay of a cache's latest snapshot (or the one layer itself), unmounted
/// on drop.
pub struct SnapshotView {
    /// Where the snapshot shows.
    pub path: PathBuf,
    mounted: bool,
    _dir: Option<tempfile::TempDir>,
}

impl SnapshotView {
    /// Mounts the latest snapshot of `cache` under `root` read-only.
    pub fn latest(root: &Path, cache: &str) -> Result<SnapshotView, String> {
        let st = check_state(root, cache)?;
        let chain = latest_chain(&st)?;
        let dirs: Vec<String> = chain
            .iter()
            .map(|l| root.join("lower").join(cache).join(l).display().to_string())
            .collect();
        if dirs.len() == 1 {
            return Ok(SnapshotView {
                path: PathBuf::from(&dirs[0]),
                mounted: false,
                _dir: None,
            });
        }
        let t = tempfile::tempdir().map_err(|e| e.to_string())?;
        let opts = format!(
            "lowerdir={},redirect_dir=off,index=off,metacopy=off",
            dirs.join(":")
        );
        nix::mount::mount(
            Some("overlay"),
            t.path(),
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(opts.as_str()),
        )
        .map_err(|e| format!("mounting the latest snapshot of {cache} ({opts}): {e}"))?;
        Ok(SnapshotView {
            path: t.path().to_path_buf(),
            mounted: true,
            _dir: Some(t),
        })
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// `serve --help` mentions `flag`.
pub fn serve_has_flag(flag: &str) -> bool {
    Command::new(exe())
        .args(["serve", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// The subcommands `cachedriver --help` lists.
pub fn subcommands() -> Vec<String> {
    let Ok(o) = Command::new(exe()).arg("--help").output() else {
        return vec![];
    };
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut in_cmds = false;
    let mut out = vec![];
    for l in text.lines() {
        if l.starts_with("Commands:") {
            in_cmds = true;
            continue;
        }
        if in_cmds {
            if !l.starts_with("  ") {
                break;
            }
            if let Some(w) = l.split_whitespace().next() {
                out.push(w.to_string());
            }
        }
    }
    out
}

/// True when `dir` carries an overlay opaque marker (either xattr namespace).
fn is_opaque(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    cachedriver_common::xattr::OPAQUE_XATTRS
        .iter()
        .any(|name| cachedriver_common::at::getxattr(&c, name, false).is_ok_and(|v| v == b"y"))
        || dir.join(".wh..wh..opq").exists()
}

/// The files a stack of layers (newest first) shows, computed in user space with overlayfs'
/// rules (whiteouts, `.wh.` whiteouts, opaque dirs): for chains too long for a classic mount.
pub fn merge_layers(layers: &[PathBuf]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let drop_under = |out: &mut BTreeMap<String, Vec<u8>>, rel: &str| {
        let prefix = format!("{rel}/");
        out.retain(|k, _| k != rel && !k.starts_with(&prefix));
    };
    for layer in layers.iter().rev() {
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let abs = layer.join(&rel);
            if !rel.as_os_str().is_empty() && is_opaque(&abs) {
                drop_under(&mut out, &rel.display().to_string());
            }
            let rd = fs::read_dir(&abs).map_err(|e| format!("listing {}: {e}", abs.display()))?;
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name == ".wh..wh..opq" {
                    continue;
                }
                let r = rel.join(&name);
                let key = r.display().to_string();
                let Ok(m) = fs::symlink_metadata(e.path()) else {
                    continue;
                };
                let ft = m.file_type();
                if let Some(target) = name.strip_prefix(".wh.") {
                    drop_under(&mut out, &rel.join(target).display().to_string());
                } else if ft.is_char_device() && m.rdev() == 0 {
                    drop_under(&mut out, &key);
                } else if ft.is_dir() {
                    out.remove(&key);
                    stack.push(r);
                } else if ft.is_file() {
                    drop_under(&mut out, &key);
                    let c = fs::read(e.path()).map_err(|err| format!("reading {key}: {err}"))?;
                    out.insert(key, c);
                }
            }
        }
    }
    Ok(out)
}

/// The files of a cache's latest snapshot: through a read-only kernel overlay mount when the
/// chain fits a classic option string, else merged in user space.
pub fn latest_files(root: &Path, cache: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let st = check_state(root, cache)?;
    let chain = latest_chain(&st)?;
    let dirs: Vec<PathBuf> = chain
        .iter()
        .map(|l| root.join("lower").join(cache).join(l))
        .collect();
    let opts_len: usize = dirs.iter().map(|d| d.as_os_str().len() + 1).sum();
    if opts_len < 3500 {
        let v = SnapshotView::latest(root, cache)?;
        return Ok(files_of(&read_tree(&v.path)?));
    }
    merge_layers(&dirs)
}
