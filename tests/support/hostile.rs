//! A hostile tree, as a container could write into its view, and canaries outside it, for any
//! test of code that walks, removes, compacts or collects container data
//! (`#[path = "support/hostile.rs"] mod hostile;`).
//!
//! [`build_hostile_tree`] writes into `dir` (a session's merged view, an upper, a layer):
//! - `deep/d/d/.../d/leaf`: a chain [`HostileSpec::depth`] deep (4,000: the path is ~8 KB, far
//!   beyond PATH_MAX), with a symlink to the canaries a hundred levels down (a filesystem that
//!   refuses the depth with ENAMETOOLONG gets a shorter chain without `leaf`, said loudly and
//!   recorded in [`Canaries::deep_reached`]);
//! - `wide/`: [`HostileSpec::wide`] entries (100k), a few of them directories;
//! - `links/`: symlinks to `/etc`, to the canary dir and file (absolute), up `..` chains, to
//!   itself, dangling;
//! - `dev/`: a char device (1,3), a block device (7,0) (as root only) and a fifo;
//! - `hard/`: one file under three names (and one more in `wide/`);
//! - `names/`: names with newlines, tabs, invalid UTF-8, leading dashes and spaces.
//!
//! It returns [`Canaries`]: a temp dir outside the tree that the symlinks point at, plus
//! snapshots of a few real `/etc` files; [`Canaries::check`] panics if anything there changed
//! (`/etc/passwd` is only checked to still hold root: test hosts add users while we run).
//! [`check_hostile_tree`] checks that a view (or layer) still shows the tree.
#![allow(dead_code)]

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How big a hostile tree to build.
#[derive(Debug, Clone)]
pub struct HostileSpec {
    /// Depth of `deep/`.
    pub depth: usize,
    /// Entries in `wide/`.
    pub wide: usize,
    /// Make device nodes (needs CAP_MKNOD in the initial user namespace).
    pub devices: bool,
}

impl Default for HostileSpec {
    /// 4,000 deep, 100k wide, devices when running as root outside a user namespace.
    fn default() -> Self {
        HostileSpec {
            depth: 4000,
            wide: 100_000,
            devices: nix::unistd::geteuid().is_root()
                && !cachedriver_common::userns::in_user_namespace(),
        }
    }
}

/// Names in `names/` (bytes: some are not UTF-8).
pub fn odd_names() -> Vec<Vec<u8>> {
    vec![
        b"new\nline".to_vec(),
        b"\n".to_vec(),
        b"tab\tname".to_vec(),
        b"\xff\xfe-not-utf8".to_vec(),
        b"-rf".to_vec(),
        b" leading space".to_vec(),
        b"...".to_vec(),
        b"\x1b[31mred".to_vec(),
        vec![b'x'; 255],
    ]
}

/// Symlinks in `links/`, relative to the canary dir where `@` starts the target.
fn link_targets(canary: &Path) -> Vec<(&'static str, OsString)> {
    let c = |rest: &str| {
        let mut v = canary.as_os_str().as_bytes().to_vec();
        v.extend_from_slice(rest.as_bytes());
        OsString::from_vec(v)
    };
    vec![
        ("etc", "/etc".into()),
        ("etc-passwd", "/etc/passwd".into()),
        ("root", "/".into()),
        ("canary-dir", c("")),
        ("canary-file", c("/secret")),
        ("canary-etc", c("/etc")),
        (
            "up",
            "../../../../../../../../../../../../../../../..".into(),
        ),
        ("up-etc", format!("{}etc", "../".repeat(40)).into()),
        ("self", ".".into()),
        ("loop", "loop".into()),
        ("dangling", "/nonexistent/cachedriver-hostile".into()),
    ]
}

/// Canaries outside the tree; [`Canaries::check`] proves nothing touched them.
pub struct Canaries {
    /// How deep the `deep/` chain got (the spec's depth unless the filesystem refused).
    pub deep_reached: usize,
    dir: tempfile::TempDir,
    snapshot: Vec<(PathBuf, Snap)>,
}

/// Content (files only), mode and mtime of a path, or `None` when it is missing.
type Snap = Option<(Vec<u8>, u32, i64, i64)>;

fn snap(p: &Path) -> Snap {
    let m = fs::symlink_metadata(p).ok()?;
    let data = if m.is_file() {
        fs::read(p).ok()?
    } else {
        Vec::new()
    };
    Some((data, m.mode(), m.mtime(), m.mtime_nsec()))
}

impl Canaries {
    fn new() -> Canaries {
        let dir = tempfile::Builder::new()
            .prefix("cachedriver-canary-")
            .tempdir()
            .expect("canary dir");
        let d = dir.path();
        fs::write(d.join("secret"), b"canary secret\n").unwrap();
        fs::create_dir(d.join("etc")).unwrap();
        fs::write(d.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::create_dir(d.join("etc/sub")).unwrap();
        fs::write(d.join("etc/sub/file"), b"deep canary\n").unwrap();
        let mut c = Canaries {
            deep_reached: 0,
            dir,
            snapshot: Vec::new(),
        };
        c.snapshot = c
            .paths()
            .into_iter()
            .map(|p| (p.clone(), snap(&p)))
            .collect();
        c
    }

    fn paths(&self) -> Vec<PathBuf> {
        let d = self.dir.path();
        let mut v: Vec<PathBuf> = ["", "secret", "etc", "etc/passwd", "etc/sub", "etc/sub/file"]
            .iter()
            .map(|p| d.join(p))
            .collect();
        // Real /etc files nobody on a test host rewrites (passwd and group are: useradd).
        for p in ["/etc/hostname", "/etc/hosts", "/etc/os-release"] {
            v.push(PathBuf::from(p));
        }
        v
    }

    /// The canary dir the tree's symlinks point at.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Panics if any canary (or a snapshotted `/etc` file) changed, vanished or appeared.
    pub fn check(&self) {
        for (p, before) in &self.snapshot {
            let now = snap(p);
            assert!(
                &now == before,
                "canary {} changed: {:?} -> {:?}",
                p.display(),
                before.as_ref().map(|b| (b.1, b.2)),
                now.as_ref().map(|b| (b.1, b.2))
            );
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        assert!(
            passwd.starts_with("root:"),
            "/etc/passwd lost its root entry"
        );
        let mut names: Vec<_> = fs::read_dir(self.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["etc", "secret"],
            "canary dir gained or lost entries"
        );
    }
}

fn cstr(b: &[u8]) -> CString {
    CString::new(b).expect("no NUL in a test name")
}

fn open_dir(dirfd: RawFd, name: &CStr) -> OwnedFd {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid C string; fresh fd owned below.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags) };
    assert!(
        fd >= 0,
        "open {:?}: {}",
        name,
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn ok(r: libc::c_int, what: &str) {
    assert!(r == 0, "{what}: {}", std::io::Error::last_os_error());
}

fn mkdir(dirfd: RawFd, name: &[u8]) {
    let c = cstr(name);
    // SAFETY: valid C string.
    ok(
        unsafe { libc::mkdirat(dirfd, c.as_ptr(), 0o755) },
        "mkdirat",
    );
}

fn create(dirfd: RawFd, name: &[u8], data: &[u8]) {
    let c = cstr(name);
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
    // SAFETY: valid C string.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags, 0o644) };
    assert!(
        fd >= 0,
        "create {:?}: {}",
        String::from_utf8_lossy(name),
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh fd.
    let f = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if !data.is_empty() {
        std::io::Write::write_all(&mut &f, data).unwrap();
    }
}

fn symlink(dirfd: RawFd, name: &[u8], target: &OsStr) {
    let (c, t) = (cstr(name), cstr(target.as_bytes()));
    // SAFETY: valid C strings.
    ok(
        unsafe { libc::symlinkat(t.as_ptr(), dirfd, c.as_ptr()) },
        "symlinkat",
    );
}

fn root_fd(dir: &Path) -> OwnedFd {
    open_dir(libc::AT_FDCWD, &cstr(dir.as_os_str().as_bytes()))
}

/// Builds the default hostile tree in `dir` (see the module doc).
pub fn build_hostile_tree(dir: &Path) -> Canaries {
    build_hostile_tree_with(dir, &HostileSpec::default())
}

/// Builds a hostile tree of the given size in `dir`.
pub fn build_hostile_tree_with(dir: &Path, spec: &HostileSpec) -> Canaries {
    let canaries = Canaries::new();
    let top = root_fd(dir);
    let t = top.as_raw_fd();

    mkdir(t, b"deep");
    let mut cur = open_dir(t, c"deep");
    let mut canaries = canaries;
    for level in 0..spec.depth {
        // SAFETY: valid C string.
        if unsafe { libc::mkdirat(cur.as_raw_fd(), c"d".as_ptr(), 0o755) } != 0 {
            let e = std::io::Error::last_os_error();
            // Our FUSE backend names nodes by their path from the layer root, so it refuses
            // chains whose path exceeds PATH_MAX; say so loudly and build the rest.
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENAMETOOLONG),
                "mkdirat at depth {level}: {e}"
            );
            eprintln!(
                "\n*** hostile tree: {} refuses a chain deeper than {level} ({e}) ***\n",
                dir.display()
            );
            canaries.deep_reached = level;
            break;
        }
        cur = open_dir(cur.as_raw_fd(), c"d");
        canaries.deep_reached = level + 1;
        if level == 100 {
            symlink(cur.as_raw_fd(), b"escape", canaries.dir().as_os_str());
            symlink(
                cur.as_raw_fd(),
                b"up",
                OsStr::new("../../../../../../../../.."),
            );
        }
    }
    if canaries.deep_reached == spec.depth {
        create(cur.as_raw_fd(), b"leaf", b"bottom\n");
    }
    drop(cur);

    mkdir(t, b"wide");
    let wide = open_dir(t, c"wide");
    for i in 0..spec.wide {
        let name = format!("e{i:06}");
        if i % 1000 == 0 {
            mkdir(wide.as_raw_fd(), name.as_bytes());
        } else {
            create(wide.as_raw_fd(), name.as_bytes(), b"");
        }
    }

    mkdir(t, b"links");
    let links = open_dir(t, c"links");
    for (name, target) in link_targets(canaries.dir()) {
        symlink(links.as_raw_fd(), name.as_bytes(), &target);
    }

    mkdir(t, b"dev");
    let dev = open_dir(t, c"dev");
    // SAFETY: valid C strings.
    ok(
        unsafe { libc::mkfifoat(dev.as_raw_fd(), c"fifo".as_ptr(), 0o644) },
        "mkfifoat",
    );
    if spec.devices {
        // SAFETY: valid C strings.
        unsafe {
            ok(
                libc::mknodat(
                    dev.as_raw_fd(),
                    c"null".as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(1, 3),
                ),
                "mknod char",
            );
            ok(
                libc::mknodat(
                    dev.as_raw_fd(),
                    c"loop0".as_ptr(),
                    libc::S_IFBLK | 0o660,
                    libc::makedev(7, 0),
                ),
                "mknod block",
            );
        }
    }

    mkdir(t, b"hard");
    let hard = open_dir(t, c"hard");
    create(hard.as_raw_fd(), b"a", b"linked\n");
    for (dfd, name) in [
        (hard.as_raw_fd(), &b"b"[..]),
        (hard.as_raw_fd(), b"c"),
        (wide.as_raw_fd(), b"hard-too"),
    ] {
        let n = cstr(name);
        // SAFETY: valid C strings.
        ok(
            unsafe { libc::linkat(hard.as_raw_fd(), c"a".as_ptr(), dfd, n.as_ptr(), 0) },
            "linkat",
        );
    }

    mkdir(t, b"names");
    let names = open_dir(t, c"names");
    for n in odd_names() {
        create(names.as_raw_fd(), &n, &n);
    }
    mkdir(names.as_raw_fd(), b"dir\nwith\nnewlines");
    let nd = open_dir(names.as_raw_fd(), c"dir\nwith\nnewlines");
    create(nd.as_raw_fd(), b"\xff", b"inner\n");
    canaries
}

fn stat_at(dirfd: RawFd, name: &[u8]) -> libc::stat {
    let c = cstr(name);
    // SAFETY: plain old data; valid C string and pointer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    ok(
        unsafe { libc::fstatat(dirfd, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) },
        "fstatat",
    );
    st
}

/// Checks that `dir` (a view or a layer) shows the tree [`build_hostile_tree_with`] built with
/// `spec` and `canaries`: the bottom of the chain, the entry count of `wide/`, every symlink's
/// target (unresolved), special files, hard-linked content and the odd names.
pub fn check_hostile_tree(dir: &Path, spec: &HostileSpec, canaries: &Canaries) {
    let top = root_fd(dir);
    let mut cur = open_dir(top.as_raw_fd(), c"deep");
    for _ in 0..canaries.deep_reached {
        cur = open_dir(cur.as_raw_fd(), c"d");
    }
    if canaries.deep_reached == spec.depth {
        let leaf = fs::read(format!("/proc/self/fd/{}/leaf", cur.as_raw_fd())).unwrap();
        assert_eq!(leaf, b"bottom\n", "the bottom of the deep chain");
    }
    drop(cur);

    let n = fs::read_dir(dir.join("wide")).unwrap().count();
    assert_eq!(n, spec.wide + 1, "entries in wide/ (plus a hard link)");

    for (name, target) in link_targets(canaries.dir()) {
        let got = fs::read_link(dir.join("links").join(name)).unwrap();
        assert_eq!(got.as_os_str(), target.as_os_str(), "symlink links/{name}");
    }

    let dev = dir.join("dev");
    assert!(fs::symlink_metadata(dev.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    if spec.devices {
        let st = stat_at(root_fd(&dev).as_raw_fd(), b"null");
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(st.st_rdev, libc::makedev(1, 3));
        let st = stat_at(root_fd(&dev).as_raw_fd(), b"loop0");
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFBLK);
        assert_eq!(st.st_rdev, libc::makedev(7, 0));
    }

    for p in ["hard/a", "hard/b", "hard/c", "wide/hard-too"] {
        assert_eq!(fs::read(dir.join(p)).unwrap(), b"linked\n", "{p}");
    }

    let names = dir.join("names");
    for n in odd_names() {
        let p = names.join(OsStr::from_bytes(&n));
        assert_eq!(
            fs::read(&p).unwrap(),
            n,
            "odd name {:?}",
            String::from_utf8_lossy(&n)
        );
    }
    let inner = names
        .join("dir\nwith\nnewlines")
        .join(OsStr::from_bytes(b"\xff"));
    assert_eq!(fs::read(inner).unwrap(), b"inner\n");
}

/// Makes the `deep/` chain under `dir` `depth` levels deep by adding levels below its deepest
/// directory (`reached` levels exist), for a filesystem whose view refused to go deeper.
pub fn extend_chain(dir: &Path, reached: usize, depth: usize) {
    let top = root_fd(dir);
    let mut cur = open_dir(top.as_raw_fd(), c"deep");
    for _ in 0..reached {
        cur = open_dir(cur.as_raw_fd(), c"d");
    }
    for _ in reached..depth {
        mkdir(cur.as_raw_fd(), b"d");
        cur = open_dir(cur.as_raw_fd(), c"d");
    }
}
