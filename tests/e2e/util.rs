//! Process, signal, file and mount helpers shared by the e2e harness.
//!
//! Every external command runs with a timeout (a hung `docker` CLI must not hang the suite) and is
//! aborted when the harness receives SIGINT/SIGTERM, so that teardown still runs.

use anyhow::{bail, Context, Result};
use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Set by the SIGINT/SIGTERM handler; polled by every wait loop.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT/SIGTERM into a flag, so a Ctrl-C unwinds through the teardown guards instead of
/// leaking dockerd, the plugin and their mounts.
pub fn install_signal_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(sig, &action) } {
            eprintln!("e2e: cannot install {sig} handler: {e}");
        }
    }
}

/// Set once the interruption has been raised as a panic: teardown code that runs afterwards
/// (during unwinding) must complete its commands, not panic again (which would abort).
static INTERRUPT_RAISED: AtomicBool = AtomicBool::new(false);

/// Whether the harness was asked to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Whether an interruption should be raised now: once only, and never while unwinding.
fn should_raise_interrupt() -> bool {
    interrupted() && !thread::panicking() && !INTERRUPT_RAISED.swap(true, Ordering::SeqCst)
}

/// Panics (unwinding into the teardown guards) when the harness was interrupted; only the first
/// time, so that the teardown guards can run their own commands.
pub fn check_interrupted() {
    if should_raise_interrupt() {
        panic!("e2e: interrupted by signal");
    }
}

/// Sleeps in small steps, staying responsive to interruption.
pub fn sleep(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted();
        thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct CmdOut {
    /// The command line, for messages.
    pub desc: String,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails with the command line, exit code and both outputs unless it succeeded.
    pub fn check(self) -> Result<CmdOut> {
        if self.success() {
            Ok(self)
        } else {
            bail!("command failed: {}", self.describe())
        }
    }

    /// A multi-line description: command, exit code, stdout and stderr.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.desc,
            self.code,
            ensure_nl(&self.stdout),
            ensure_nl(&self.stderr)
        )
    }
}

fn ensure_nl(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// A printable command line, quoted so that it can be pasted into a shell.
pub fn describe_command(cmd: &Command) -> String {
    let quote = |a: &str| -> String {
        let plain = !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
        if plain {
            a.to_string()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    let mut s = quote(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(&a.to_string_lossy()));
    }
    s
}

/// Runs `cmd` to completion (stdin closed), capturing its output; kills it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<CmdOut> {
    let desc = describe_command(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning `{desc}`"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_timeout(&mut child, timeout, &desc);
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    match status {
        Ok(st) => Ok(CmdOut {
            desc,
            code: st.code(),
            stdout,
            stderr,
        }),
        Err(e) => Err(e.context(format!("stdout: {stdout}\nstderr: {stderr}"))),
    }
}

/// Waits for `child`, killing it (and failing) after `timeout` or on interruption.
fn wait_timeout(child: &mut Child, timeout: Duration, desc: &str) -> Result<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if should_raise_interrupt() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("e2e: interrupted by signal while running `{desc}`");
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{desc}` timed out after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or fails with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        sleep(Duration::from_millis(50));
    }
}

/// The last `n` lines of a (log) file, or a note why there are none.
pub fn tail(path: &Path, n: usize) -> String {
    tail_window(path, (0, None), n, &[])
}

/// The last `n` lines of the bytes `start..end` of a file (to its end for `None`), without lines
/// containing any of `noise`.
pub fn tail_window(path: &Path, range: (u64, Option<u64>), n: usize, noise: &[&str]) -> String {
    tail_window_matching(path, range, n, &[], noise)
}

/// Like [`tail_window`], keeping only lines that contain one of `keep` (all when empty).
pub fn tail_window_matching(
    path: &Path,
    (start, end): (u64, Option<u64>),
    n: usize,
    keep: &[&str],
    noise: &[&str],
) -> String {
    match fs::read(path) {
        Ok(mut bytes) => {
            if let Some(end) = end {
                bytes.truncate(usize::try_from(end).unwrap_or(usize::MAX));
            }
            let start = usize::try_from(start)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            bytes.drain(..start);
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| keep.is_empty() || keep.iter().any(|x| l.contains(x)))
                .filter(|l| !noise.iter().any(|x| l.contains(x)))
                .collect();
            let from = lines.len().saturating_sub(n);
            lines[from..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Current length of a file (0 if it does not exist).
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Whether process `pid` exists and its command line contains `needle` (guards against pid reuse
/// before we signal a process recorded in a pid file).
pub fn pid_matches(pid: i32, needle: &str) -> bool {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => String::from_utf8_lossy(&c)
            .replace('\0', " ")
            .contains(needle),
        Err(_) => false,
    }
}

/// Whether process `pid` still exists (zombies count as gone).
pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the first field after the parenthesised comm
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Reads a pid file.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// SIGTERM, wait up to `grace`, then SIGKILL: stops a process that is not our child.
pub fn terminate_pid(pid: i32, grace: Duration) {
    let p = Pid::from_raw(pid);
    if !pid_alive(pid) {
        return;
    }
    let _ = kill(p, Signal::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if !pid_alive(pid) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(p, Signal::SIGKILL);
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && pid_alive(pid) {
        thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL: stops and reaps our own child.
pub fn terminate_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "e2e: pid {} ignored SIGTERM for {grace:?}; sending SIGKILL",
        child.id()
    );
    let _ = child.kill();
    child.wait().ok()
}

/// Decodes the octal escapes (`\040`) that /proc/self/mountinfo uses in paths.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (with their fs type) currently visible in our mount namespace.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let mp = f.get(4)?;
            let sep = f.iter().position(|x| *x == "-")?;
            let fstype = f.get(sep + 1)?;
            Some((PathBuf::from(unescape_mount_path(mp)), fstype.to_string()))
        })
        .collect()
}

/// Whether `path` is currently a mount point.
pub fn is_mountpoint(path: &Path) -> bool {
    mounts().iter().any(|(m, _)| m == path)
}

/// Lazily unmounts everything at or below `dir` (deepest first). Returns what is still mounted.
pub fn unmount_below(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..5 {
        let mut ms: Vec<PathBuf> = mounts()
            .into_iter()
            .map(|(m, _)| m)
            .filter(|m| m.starts_with(dir))
            .collect();
        if ms.is_empty() {
            return ms;
        }
        ms.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        ms.dedup();
        for m in &ms {
            if let Err(e) = umount2(m, MntFlags::MNT_DETACH) {
                eprintln!("e2e: umount -l {}: {e}", m.display());
            }
        }
    }
    mounts()
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Removes `dir` after making sure nothing is mounted below it (never recurse into a mount).
pub fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let left = unmount_below(dir);
    if !left.is_empty() {
        eprintln!(
            "e2e: NOT removing {}: still mounted below it: {left:?}",
            dir.display()
        );
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        eprintln!("e2e: removing {}: {e}", dir.display());
    }
}

/// Unified-style line diff of two outputs for failure messages (`-` only left, `+` only right),
/// aligned on their longest common subsequence of lines.
pub fn line_diff(left_name: &str, left: &str, right_name: &str, right: &str) -> String {
    let l: Vec<&str> = left.lines().collect();
    let r: Vec<&str> = right.lines().collect();
    // lcs[i][j] = LCS length of l[i..] and r[j..]; outputs are small (hundreds of lines)
    let mut lcs = vec![vec![0usize; r.len() + 1]; l.len() + 1];
    for i in (0..l.len()).rev() {
        for j in (0..r.len()).rev() {
            lcs[i][j] = if l[i] == r[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut s = format!("--- {left_name}\n+++ {right_name}\n");
    let (mut i, mut j) = (0, 0);
    while i < l.len() || j < r.len() {
        if i < l.len() && j < r.len() && l[i] == r[j] {
            s.push_str(&format!("  {}\n", l[i]));
            i += 1;
            j += 1;
        } else if i < l.len() && (j == r.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            s.push_str(&format!("- {}\n", l[i]));
            i += 1;
        } else {
            s.push_str(&format!("+ {}\n", r[j]));
            j += 1;
        }
    }
    s
}
