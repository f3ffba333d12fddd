//! Who uses a session's view, read from the kernel rather than from mount counts.
//!
//! # Orphaned sessions
//! An engine killed -9 (or a host losing power) sends no Unmount for the containers it loses, so
//! counts alone can keep a session alive forever. The rule: a session's view is **used** iff
//! - some mount other than the view itself shows the same filesystem (same `major:minor`), in any
//!   mount namespace (a container's bind mount of the view), not counting copies of the view
//!   itself (at its own path, in a namespace cloned from ours such as a systemd unit's or a
//!   snap's; or propagated from its peer group to the same `merged/<cache>/<id>` below another
//!   prefix, as on the host side of a managed plugin): they hold the view only incidentally; or
//! - some process other than the plugin itself holds a file, its cwd or its root in one of those
//!   mounts, copies included (`/proc/PID/fdinfo/*` `mnt_id:`, `/proc/PID/{cwd,root}`).
//!
//! A session nobody uses is ended (unmounted and committed per its mode, as a normal last Unmount
//! would) at Remove, at the next Mount of its volume, at startup and by the periodic sweep. A
//! session whose view is used is never ended: with dockerd's `live-restore` its containers keep
//! running across an engine restart and keep their bind mounts.
//!
//! Nothing here touches a FUSE view: everything is read from `/proc` (`mountinfo`, `fdinfo`,
//! `O_PATH` opens of `cwd`/`root` links, which resolve without asking the filesystem), so a hung
//! FUSE server cannot hang a request. The one unavoidable touch ([`stat_with_timeout`]) runs on
//! its own thread behind a timeout.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use cachedriver_common::mounts::unescape_mountinfo;
use serde::Serialize;

/// One line of a `mountinfo` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (unique system-wide).
    pub id: u64,
    /// The filesystem's device (`major:minor`).
    pub dev: (u32, u32),
    /// The mount point, as the namespace sees it (octal escapes decoded).
    pub point: String,
    /// Peer group this mount shares propagation with (`shared:N`).
    pub shared: Option<u64>,
    /// Peer group this mount receives propagation from (`master:N`).
    pub master: Option<u64>,
    /// Filesystem type.
    pub fstype: String,
    /// Superblock options (`upperdir=...` for overlay).
    pub super_opts: String,
}

/// Parses a `mountinfo` file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 10 {
            continue;
        }
        let Ok(id) = f[0].parse() else { continue };
        let Some((ma, mi)) = f[2].split_once(':') else {
            continue;
        };
        let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse()) else {
            continue;
        };
        let Some(sep) = f.iter().skip(6).position(|x| *x == "-").map(|p| p + 6) else {
            continue;
        };
        let mut shared = None;
        let mut master = None;
        for opt in &f[6..sep] {
            if let Some(n) = opt.strip_prefix("shared:") {
                shared = n.parse().ok();
            } else if let Some(n) = opt.strip_prefix("master:") {
                master = n.parse().ok();
            }
        }
        out.push(MountEntry {
            id,
            dev: (ma, mi),
            point: unescape_mountinfo(f[4].as_bytes())
                .to_string_lossy()
                .into_owned(),
            shared,
            master,
            fstype: f.get(sep + 1).copied().unwrap_or_default().to_string(),
            super_opts: f.get(sep + 3).copied().unwrap_or_default().to_string(),
        });
    }
    out
}

/// A mount namespace other than ours that has the view mounted.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NsUser {
    /// The namespace's inode (`/proc/PID/ns/mnt`).
    pub ns: u64,
    /// One process in it.
    pub pid: i32,
    /// Where that namespace has the view.
    pub mountpoint: String,
    /// The container id, when the process's cgroup names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Who uses a view.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Users {
    /// The view is mounted in our namespace.
    pub mounted: bool,
    /// Other namespaces (or other mounts in ours) showing the view.
    pub namespaces: Vec<NsUser>,
    /// Processes (not the plugin) holding files, cwd or root in the view.
    pub pids: Vec<i32>,
}

impl Users {
    /// True when some container or process still uses the view.
    pub fn in_use(&self) -> bool {
        !self.namespaces.is_empty() || !self.pids.is_empty()
    }

    /// A short description for logs and errors.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for n in &self.namespaces {
            parts.push(match &n.container {
                Some(c) => format!("container {} (pid {})", &c[..c.len().min(12)], n.pid),
                None => format!(
                    "mount namespace {} (pid {}) at {}",
                    n.ns, n.pid, n.mountpoint
                ),
            });
        }
        if !self.pids.is_empty() {
            parts.push(format!("open files of pid(s) {:?}", self.pids));
        }
        if parts.is_empty() {
            "nobody".into()
        } else {
            parts.join(", ")
        }
    }
}

struct Namespace {
    ns: u64,
    pid: i32,
    mounts: Vec<MountEntry>,
}

/// What the kernel says about every mount namespace and every open file, read once; answers
/// [`Scan::users`] for any number of views.
pub struct Scan {
    own: Vec<MountEntry>,
    others: Vec<Namespace>,
    /// Mount id → pids (not ours) holding something in it.
    holders: HashMap<u64, BTreeSet<i32>>,
}

fn ns_inode(pid: &str) -> Option<u64> {
    let l = fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
    let s = l.to_str()?;
    s.strip_prefix("mnt:[")?.strip_suffix(']')?.parse().ok()
}

fn fdinfo_mnt_id(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The mount id of a `/proc/PID/{cwd,root}` link, through an `O_PATH` open (no filesystem call).
fn link_mnt_id(link: &str) -> Option<u64> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(link)
        .ok()?;
    let t = fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).ok()?;
    fdinfo_mnt_id(&t)
}

fn container_of(pid: i32) -> Option<String> {
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cg.lines() {
        for part in line.rsplit('/') {
            let part = part
                .trim_start_matches("docker-")
                .trim_start_matches("libpod-")
                .trim_end_matches(".scope");
            if part.len() == 64 && part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Some(part.to_string());
            }
        }
    }
    None
}

impl Scan {
    /// Reads `/proc` once: our mount table, one mount table per other mount namespace, and the
    /// mount ids of every other process's open files, cwd and root.
    pub fn take() -> Scan {
        Self::read(true)
    }

    fn read(with_files: bool) -> Scan {
        let me = std::process::id().to_string();
        let own_ns = ns_inode("self");
        let own = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
        let mut seen: HashSet<u64> = own_ns.into_iter().collect();
        let mut others = Vec::new();
        let mut holders: HashMap<u64, BTreeSet<i32>> = HashMap::new();
        let Ok(rd) = fs::read_dir("/proc") else {
            return Scan {
                own,
                others,
                holders,
            };
        };
        for e in rd.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Ok(pid) = name.parse::<i32>() else {
                continue;
            };
            if name == me {
                continue;
            }
            if let Some(ns) = ns_inode(&name) {
                if seen.insert(ns) {
                    if let Ok(t) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) {
                        others.push(Namespace {
                            ns,
                            pid,
                            mounts: parse_mountinfo(&t),
                        });
                    }
                }
            }
            if !with_files {
                continue;
            }
            let mut add = |id: u64| {
                holders.entry(id).or_default().insert(pid);
            };
            for l in ["cwd", "root"] {
                if let Some(id) = link_mnt_id(&format!("/proc/{pid}/{l}")) {
                    add(id);
                }
            }
            if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) {
                for fd in fds.flatten() {
                    if let Some(id) = fs::read_to_string(fd.path())
                        .ok()
                        .and_then(|t| fdinfo_mnt_id(&t))
                    {
                        add(id);
                    }
                }
            }
        }
        Scan {
            own,
            others,
            holders,
        }
    }

    /// Our (topmost) mount at exactly `target`.
    pub fn view(&self, target: &Path) -> Option<&MountEntry> {
        let t = target.to_string_lossy();
        self.own.iter().rev().find(|m| m.point == t)
    }

    /// Who uses the view mounted at `target` (see the module doc for the rule). `upper` finds
    /// the view in other namespaces when ours no longer has it (a restarted plugin namespace).
    pub fn users(&self, target: &Path, upper: &Path) -> Users {
        let suffix = {
            let c: Vec<_> = target.components().collect();
            let n = c.len().saturating_sub(3);
            format!("/{}", c[n..].iter().collect::<PathBuf>().to_string_lossy())
        };
        let ours = self.view(target).cloned();
        let mounted = ours.is_some();
        let upper_opt = format!("upperdir={}", upper.to_string_lossy());
        let find_dev = || {
            self.others
                .iter()
                .flat_map(|n| n.mounts.iter())
                .find(|m| m.super_opts.split(',').any(|o| o == upper_opt))
                .map(|m| m.dev)
        };
        let Some(dev) = ours.as_ref().map(|m| m.dev).or_else(find_dev) else {
            return Users::default();
        };
        let our_id = ours.as_ref().map(|m| m.id);
        let our_group = ours.as_ref().and_then(|m| m.shared);
        let here = target.to_string_lossy();
        // A copy of our own mount: at our very path in a namespace cloned from ours (systemd
        // units, snaps), or made by propagation from our peer group at the same place below
        // another prefix (the host side of a managed plugin's propagated mount). Containers
        // bind the view at their own destination instead. A copy counts only through the
        // processes holding files in it.
        let is_copy = |m: &MountEntry| {
            m.point == here
                || (our_group.is_some()
                    && (m.shared == our_group || m.master == our_group)
                    && m.point.ends_with(&suffix))
        };
        let mut users = Users {
            mounted,
            ..Users::default()
        };
        let mut ids: BTreeSet<u64> = our_id.into_iter().collect();
        for m in self.own.iter().filter(|m| m.dev == dev) {
            ids.insert(m.id);
            if Some(m.id) != our_id && !is_copy(m) {
                users.namespaces.push(NsUser {
                    ns: 0,
                    pid: std::process::id() as i32,
                    mountpoint: m.point.clone(),
                    container: None,
                });
            }
        }
        for n in &self.others {
            let mut hit = None;
            for m in n.mounts.iter().filter(|m| m.dev == dev) {
                ids.insert(m.id);
                if !is_copy(m) && hit.is_none() {
                    hit = Some(m.point.clone());
                }
            }
            if let Some(mountpoint) = hit {
                users.namespaces.push(NsUser {
                    ns: n.ns,
                    pid: n.pid,
                    mountpoint,
                    container: container_of(n.pid),
                });
            }
        }
        let mut pids = BTreeSet::new();
        for id in ids {
            if let Some(p) = self.holders.get(&id) {
                pids.extend(p.iter().copied());
            }
        }
        users.pids = pids.into_iter().collect();
        users
    }
}

/// Who uses the view at `target`. The mount tables are read first; open files (the costly part
/// on a busy host: one `fdinfo` read per descriptor) only when no other namespace has the view.
pub fn users(target: &Path, upper: &Path) -> Users {
    let u = Scan::read(false).users(target, upper);
    if u.in_use() {
        return u;
    }
    Scan::take().users(target, upper)
}

fn probes_in_flight() -> &'static Mutex<HashSet<PathBuf>> {
    static P: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashSet::new()))
}

/// True while a [`stat_with_timeout`] of `path` has not returned (its server does not answer).
pub fn probe_stuck(path: &Path) -> bool {
    probes_in_flight()
        .lock()
        .map(|g| g.contains(path))
        .unwrap_or(false)
}

/// `stat(path)` on a helper thread: `None` when it did not answer within `timeout` (a hung FUSE
/// server), or while an earlier probe of the same path is still stuck (so stuck threads never
/// pile up: at most one per path).
pub fn stat_with_timeout(path: &Path, timeout: Duration) -> Option<std::io::Result<fs::Metadata>> {
    {
        let mut g = probes_in_flight().lock().ok()?;
        if !g.insert(path.to_path_buf()) {
            return None;
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("stat-probe".into())
        .spawn(move || {
            let r = fs::metadata(&p);
            if let Ok(mut g) = probes_in_flight().lock() {
                g.remove(&p);
            }
            let _ = tx.send(r);
        });
    if spawned.is_err() {
        if let Ok(mut g) = probes_in_flight().lock() {
            g.remove(path);
        }
        return None;
    }
    rx.recv_timeout(timeout).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let t = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 40 36 0:52 / /x rw shared:7 master:3 - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n\
                 bad line\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].point, "/mnt/a b");
        assert_eq!(m[0].master, Some(1));
        assert_eq!(m[0].shared, None);
        assert_eq!(m[1].dev, (0, 52));
        assert_eq!(m[1].shared, Some(7));
        assert_eq!(m[1].fstype, "overlay");
        assert!(m[1].super_opts.contains("upperdir=/u"));
    }

    #[test]
    fn fdinfo_mnt_id_is_read() {
        assert_eq!(
            fdinfo_mnt_id("pos:\t0\nflags:\t02\nmnt_id:\t31\n"),
            Some(31)
        );
        assert_eq!(fdinfo_mnt_id("pos:\t0\n"), None);
    }

    fn entry(id: u64, point: &str, shared: Option<u64>, master: Option<u64>) -> MountEntry {
        MountEntry {
            id,
            dev: (0, 50),
            point: point.into(),
            shared,
            master,
            fstype: "overlay".into(),
            super_opts: "rw,upperdir=/r/upper/c/i".into(),
        }
    }

    #[test]
    fn copies_of_the_view_do_not_count_but_binds_and_open_files_do() {
        let ns = |ns, pid, mounts| Namespace { ns, pid, mounts };
        let mut scan = Scan {
            own: vec![entry(10, "/r/merged/c/i", Some(5), None)],
            others: vec![
                ns(1, 100, vec![entry(11, "/r/merged/c/i", None, None)]), // cloned namespace
                ns(
                    2,
                    200,
                    vec![entry(12, "/host/pm/merged/c/i", None, Some(5))],
                ), // propagated
            ],
            holders: HashMap::new(),
        };
        let (t, u) = (Path::new("/r/merged/c/i"), Path::new("/r/upper/c/i"));
        assert!(!scan.users(t, u).in_use(), "copies alone are no users");
        scan.holders.insert(11, BTreeSet::from([101]));
        assert_eq!(scan.users(t, u).pids, vec![101], "a file open in a copy is");
        scan.holders.clear();
        // A container's bind mount, even at a path that looks like ours.
        scan.others
            .push(ns(3, 300, vec![entry(13, "/x/merged/c/i", None, None)]));
        let users = scan.users(t, u);
        assert_eq!(users.namespaces.len(), 1);
        assert_eq!(users.namespaces[0].pid, 300);
        // Our own view gone (plugin namespace restarted): found through its upper dir.
        scan.own.clear();
        assert!(scan.users(t, u).in_use());
    }

    #[test]
    fn our_own_root_is_found_and_we_do_not_count() {
        let s = Scan::take();
        assert!(s.view(Path::new("/")).is_some());
    }
}
