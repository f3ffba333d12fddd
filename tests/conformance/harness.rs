//! Mounting machinery for the conformance suite: backends, fixtures (two lowers, an upper, a work dir and a
//! mount point in one temp dir), unmount guards, loud skips, the kernel oracle, running code as another
//! user, and small syscall helpers that report errno names so results can be compared across backends.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `statfs.f_type` of a FUSE mount.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// `statfs.f_type` of an overlayfs mount.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// A union filesystem implementation under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Kernel overlayfs with `index=off,redirect_dir=off,metacopy=off` (plus `userxattr` in a user namespace).
    Kernel,
    /// Our FUSE union filesystem, mounted through `cachedriver fuse`.
    Fuse,
    /// Debian's fuse-overlayfs (C), a reference peer.
    FuseOverlayfs,
    /// fuse-overlayfs 2.0.0 (the Rust rewrite), if the backends bench installed it into `<target>/fo2`
    /// (or `FUSE_OVERLAYFS2` names a binary). A reference peer.
    FuseOverlayfs2,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Fuse => "fuse",
            Backend::FuseOverlayfs => "fuse-overlayfs",
            Backend::FuseOverlayfs2 => "fuse-overlayfs-2",
        }
    }

    pub fn is_kernel(self) -> bool {
        self == Backend::Kernel
    }
}

/// Which test runs on which backend; passed to every test body by the generated `#[test]` wrappers.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub backend: Backend,
    pub test: &'static str,
}

impl Run {
    /// Reports a loud skip for this run (a failure under CI).
    pub fn skip(self, why: &str) {
        skip(self.test, self.backend, why)
    }
}

/// True when running inside a user namespace (the rootless run), where overlay markers live in `user.`.
pub fn in_userns() -> bool {
    static CACHE: OnceLock<bool> = OnceLock::new();
    *CACHE.get_or_init(|| {
        std::env::var_os("CONFORMANCE_USERNS").is_some()
            || cachedriver_common::userns::in_user_namespace()
    })
}

/// The namespace of overlay's own xattrs on this run: `trusted.` as real root, `user.` in a user namespace.
pub fn overlay_xattr(name: &str) -> String {
    let ns = if in_userns() { "user" } else { "trusted" };
    format!("{ns}.overlay.{name}")
}

/// Reports a test that cannot run here, loudly. With `CI=true` or `CACHEDRIVER_REQUIRE_ALL=1` it fails.
pub fn skip(test: &str, backend: Backend, why: &str) {
    eprintln!(
        "\n******** SKIPPED {test} [{}]: {why} ********\n",
        backend.name()
    );
    if crate::probe::strict() {
        panic!("{test} [{}] could not run ({why}) and CI=true / CACHEDRIVER_REQUIRE_ALL=1 forbids skips", backend.name());
    }
}

/// Why `backend` cannot be mounted on this machine, if it cannot.
pub fn unavailable(backend: Backend) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (run the suite as root, or inside `unshare -Urm`)".into());
    }
    match backend {
        Backend::Kernel => {
            static PROBE: OnceLock<Option<String>> = OnceLock::new();
            PROBE.get_or_init(probe_kernel).clone()
        }
        Backend::Fuse | Backend::FuseOverlayfs | Backend::FuseOverlayfs2 => {
            if !Path::new("/dev/fuse").exists() {
                return Some("/dev/fuse does not exist".into());
            }
            if backend == Backend::FuseOverlayfs2 && !fuse_overlayfs2().is_file() {
                return Some(format!(
                    "{} is missing (`cargo bench --bench backends` installs it, or set FUSE_OVERLAYFS2)",
                    fuse_overlayfs2().display()
                ));
            }
            if backend == Backend::FuseOverlayfs && !Path::new(FUSE_OVERLAYFS).exists() {
                return Some(format!(
                    "{FUSE_OVERLAYFS} is not installed (apt-get install fuse-overlayfs)"
                ));
            }
            None
        }
    }
}

const FUSE_OVERLAYFS: &str = "/usr/bin/fuse-overlayfs";

/// fuse-overlayfs 2.0.0: `$FUSE_OVERLAYFS2`, else `<target>/fo2/bin/fuse-overlayfs` (this test binary is
/// `<target>/<profile>/deps/conformance-HASH`).
fn fuse_overlayfs2() -> PathBuf {
    if let Some(p) = std::env::var_os("FUSE_OVERLAYFS2") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(3)
        .unwrap_or(Path::new("target"))
        .join("fo2/bin/fuse-overlayfs")
}

fn probe_kernel() -> Option<String> {
    let dir = tempfile::tempdir().ok()?;
    for d in ["l1", "l2", "u", "w", "m"] {
        fs::create_dir(dir.path().join(d)).ok()?;
    }
    let p = |d: &str| dir.path().join(d);
    match mount_kernel(&[p("l2"), p("l1")], Some((&p("u"), &p("w"))), &p("m")) {
        Ok(()) => {
            let _ = nix::mount::umount2(&p("m"), nix::mount::MntFlags::MNT_DETACH);
            None
        }
        Err(e) => Some(format!("kernel overlayfs mount failed: {e}")),
    }
}

fn kernel_options(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> String {
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut opts = format!("lowerdir={lower}");
    if let Some((u, w)) = upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            u.display(),
            w.display()
        ));
    }
    // With `userxattr` the kernel (6.18) refuses `redirect_dir=off` (EINVAL: "conflicting options");
    // `nofollow` means the same for us: no redirects are created (dir renames get EXDEV) or followed.
    if in_userns() {
        opts.push_str(",index=off,redirect_dir=nofollow,metacopy=off,userxattr");
    } else {
        opts.push_str(",index=off,redirect_dir=off,metacopy=off");
    }
    opts
}

fn mount_kernel(lowers: &[PathBuf], upper: Option<(&Path, &Path)>, mnt: &Path) -> io::Result<()> {
    let opts = kernel_options(lowers, upper);
    nix::mount::mount(
        Some("overlay"),
        mnt,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| io::Error::other(format!("mount -t overlay -o {opts} {}: {e}", mnt.display())))
}

fn fuse_options(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> String {
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut opts = format!("lowerdir={lower}");
    if let Some((u, w)) = upper {
        opts.push_str(&format!(
            ",upperdir={},workdir={}",
            u.display(),
            w.display()
        ));
    }
    opts
}

fn fs_type(p: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(p)
        .ok()
        .map(|s| s.filesystem_type().0)
}

fn wait_for_fs_type(
    mnt: &Path,
    magic: i64,
    child: Option<&mut Child>,
    what: &str,
) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut child = child;
    loop {
        if fs_type(mnt) == Some(magic) {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut() {
            if let Some(status) = c.try_wait()? {
                return Err(io::Error::other(format!(
                    "{what} exited with {status} before the mount appeared"
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "{what}: {} did not become a mount within 15 s",
                mnt.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A mounted union filesystem; unmounted on drop (lazily if busy), even when the test panicked.
pub struct MountGuard {
    mnt: PathBuf,
    backend: Backend,
    mounted: bool,
    /// The foreground daemon (fuse-overlayfs), reaped after unmount.
    child: Option<Child>,
    /// Our daemon's pid file; we wait for that process to exit after unmount.
    pidfile: Option<PathBuf>,
    upper: Option<PathBuf>,
}

impl MountGuard {
    /// Mounts `lowers` (top first) with an optional (upper, work) pair at `mnt`.
    pub fn mount(
        backend: Backend,
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        mnt: &Path,
    ) -> io::Result<MountGuard> {
        let mut guard = MountGuard {
            mnt: mnt.to_path_buf(),
            backend,
            mounted: false,
            child: None,
            pidfile: None,
            upper: upper.map(|(u, _)| u.to_path_buf()),
        };
        match backend {
            Backend::Kernel => {
                mount_kernel(lowers, upper, mnt)?;
                guard.mounted = true;
                wait_for_fs_type(mnt, OVERLAYFS_SUPER_MAGIC, None, "overlay")?;
            }
            Backend::Fuse => {
                let pidfile = mnt.with_extension("pid");
                let mut opts = fuse_options(lowers, upper);
                opts.push_str(&format!(",pidfile={}", pidfile.display()));
                if in_userns() {
                    opts.push_str(",xattr=user");
                }
                guard.pidfile = Some(pidfile);
                let out = Command::new(env!("CARGO_BIN_EXE_cachedriver"))
                    .arg("fuse")
                    .arg("-o")
                    .arg(&opts)
                    .arg(mnt)
                    .stdin(Stdio::null())
                    .output()?;
                // Register the guard first: if a mount exists, the guard must remove it whatever happens next.
                guard.mounted = true;
                if !out.status.success() {
                    return Err(io::Error::other(format!(
                        "`cachedriver fuse -o {opts} {}` failed with {}: {}",
                        mnt.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                if fs_type(mnt) != Some(FUSE_SUPER_MAGIC) {
                    return Err(io::Error::other(format!(
                        "`cachedriver fuse` exited 0 but {} is not a FUSE mount (it must return once the mount is ready); stderr: {}",
                        mnt.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            Backend::FuseOverlayfs | Backend::FuseOverlayfs2 => {
                let opts = fuse_options(lowers, upper);
                let bin = if backend == Backend::FuseOverlayfs {
                    PathBuf::from(FUSE_OVERLAYFS)
                } else {
                    fuse_overlayfs2()
                };
                let child = Command::new(bin)
                    .arg("-f")
                    .arg("-o")
                    .arg(&opts)
                    .arg(mnt)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                guard.mounted = true;
                guard.child = Some(child);
                wait_for_fs_type(
                    mnt,
                    FUSE_SUPER_MAGIC,
                    guard.child.as_mut(),
                    "fuse-overlayfs",
                )?;
            }
        }
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `rel` under the mount point.
    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.mnt.clone()
        } else {
            self.mnt.join(rel)
        }
    }

    /// `rel` in the upper dir (panics on a read-only mount).
    pub fn upper(&self, rel: &str) -> PathBuf {
        self.upper
            .as_ref()
            .expect("mount has an upper dir")
            .join(rel)
    }

    /// Unmounts now and waits until the daemon (if any) has gone, so the upper dir is final.
    pub fn unmount(mut self) -> io::Result<()> {
        self.do_unmount(true)
    }

    /// Like [`MountGuard::unmount`], for a guard owned by someone else (a [`Ctx`]).
    pub fn unmount_in_place(&mut self) -> io::Result<()> {
        self.do_unmount(true)
    }

    /// Unmounts; with `wait_daemon`, also waits for our daemon (known by its pid file) to exit. A guard
    /// that is merely dropped does not wait: the daemon exits on its own once unmounted.
    fn do_unmount(&mut self, wait_daemon: bool) -> io::Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let mut result = Ok(());
        let mut tries = 0;
        loop {
            match nix::mount::umount2(&self.mnt, nix::mount::MntFlags::empty()) {
                Ok(()) => break,
                Err(nix::errno::Errno::EINVAL) => break, // not mounted (a mount that failed half-way)
                Err(nix::errno::Errno::EBUSY) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
                    result = Err(io::Error::other(format!(
                        "umount {}: {e} (detached lazily)",
                        self.mnt.display()
                    )));
                    break;
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(pidfile) = self.pidfile.take().filter(|_| wait_daemon) {
            if let Some(pid) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let pid = nix::unistd::Pid::from_raw(pid);
                let deadline = Instant::now() + Duration::from_secs(10);
                while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        result
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount(false) {
            eprintln!("warning [{}]: {e}", self.backend.name());
        }
    }
}

/// The two lower layers of a fixture, for setup functions. `l2` is the top lower, `l1` the bottom one.
pub struct Layers {
    pub l1: PathBuf,
    pub l2: PathBuf,
}

/// Builds the lowers of a fixture; a plain `fn` so the kernel oracle can build identical ones.
pub type Setup = fn(&Layers);

/// A temp dir with `l1`, `l2`, `upper`, `work`, `mnt` and a mount guard slot; everything is unmounted and
/// removed on drop.
pub struct Fixture {
    pub backend: Backend,
    pub layers: Layers,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(backend: Backend, setup: Setup) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("cd-conf-")
            .tempdir()
            .expect("tempdir");
        // Other uids must reach the mount point (permission tests run as uid 1000).
        chmod(dir.path(), 0o755);
        let j = |d: &str| dir.path().join(d);
        for d in ["l1", "l2", "upper", "work", "mnt"] {
            fs::create_dir(j(d)).expect("mkdir");
        }
        let layers = Layers {
            l1: j("l1"),
            l2: j("l2"),
        };
        setup(&layers);
        Fixture {
            backend,
            upper: j("upper"),
            work: j("work"),
            mnt: j("mnt"),
            layers,
            dir,
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Mounts read-write over `l2:l1`.
    pub fn mount(&self) -> io::Result<MountGuard> {
        MountGuard::mount(
            self.backend,
            &[self.layers.l2.clone(), self.layers.l1.clone()],
            Some((&self.upper, &self.work)),
            &self.mnt,
        )
    }

    /// Mounts read-only (no upper dir) over `l2:l1`.
    pub fn mount_ro(&self) -> io::Result<MountGuard> {
        MountGuard::mount(
            self.backend,
            &[self.layers.l2.clone(), self.layers.l1.clone()],
            None,
            &self.mnt,
        )
    }
}

/// One test's mounted fixture. Field order matters: the mount is dropped before the fixture's temp dir.
pub struct Ctx {
    pub m: MountGuard,
    pub fx: Fixture,
    pub test: &'static str,
    pub setup: Setup,
}

impl Ctx {
    /// Builds the fixture and mounts it; `None` (after a loud skip) when the backend cannot run here.
    /// A backend that is available but fails to mount fails the test.
    pub fn new(r: Run, setup: Setup) -> Option<Ctx> {
        Ctx::new_with(r, setup, false)
    }

    pub fn new_ro(r: Run, setup: Setup) -> Option<Ctx> {
        Ctx::new_with(r, setup, true)
    }

    fn new_with(r: Run, setup: Setup, ro: bool) -> Option<Ctx> {
        let Run { backend, test } = r;
        if let Some(why) = unavailable(backend) {
            skip(test, backend, &why);
            return None;
        }
        let fx = Fixture::new(backend, setup);
        let m = if ro { fx.mount_ro() } else { fx.mount() };
        let m = m.unwrap_or_else(|e| panic!("{test} [{}]: mount failed: {e}", backend.name()));
        Some(Ctx { m, fx, test, setup })
    }

    pub fn backend(&self) -> Backend {
        self.fx.backend
    }

    /// `rel` in the merged view.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.m.p(rel)
    }

    pub fn upper(&self, rel: &str) -> PathBuf {
        self.fx.upper.join(rel)
    }

    pub fn l1(&self, rel: &str) -> PathBuf {
        self.fx.layers.l1.join(rel)
    }

    pub fn l2(&self, rel: &str) -> PathBuf {
        self.fx.layers.l2.join(rel)
    }

    /// Runs `f` on this mount and, unless this is the kernel backend, on a fresh kernel mount over identical
    /// lowers; asserts that both observations are equal and returns ours. The kernel is the oracle.
    pub fn same_as_kernel<T, F>(&self, what: &str, f: F) -> T
    where
        T: PartialEq + std::fmt::Debug,
        F: Fn(&MountGuard) -> T,
    {
        self.same_as_kernel_with(what, false, f)
    }

    pub fn same_as_kernel_with<T, F>(&self, what: &str, ro: bool, f: F) -> T
    where
        T: PartialEq + std::fmt::Debug,
        F: Fn(&MountGuard) -> T,
    {
        let ours = f(&self.m);
        if self.backend().is_kernel() {
            return ours;
        }
        let Some(theirs) = kernel_oracle(self.test, self.setup, ro, &f) else {
            return ours;
        };
        assert_eq!(
            ours,
            theirs,
            "{} [{}]: {what}: backend (left) differs from kernel overlayfs (right)",
            self.test,
            self.backend().name()
        );
        ours
    }
}

/// Runs `f` on a kernel overlay mount over lowers built by `setup`; `None` after a loud skip if the
/// kernel cannot mount here.
pub fn kernel_oracle<T>(
    test: &str,
    setup: Setup,
    ro: bool,
    f: impl Fn(&MountGuard) -> T,
) -> Option<T> {
    if let Some(why) = unavailable(Backend::Kernel) {
        skip(
            test,
            Backend::Kernel,
            &format!("kernel oracle unavailable: {why}"),
        );
        return None;
    }
    let fx = Fixture::new(Backend::Kernel, setup);
    let m = if ro { fx.mount_ro() } else { fx.mount() }.expect("kernel oracle mount");
    let out = f(&m);
    m.unmount().expect("kernel oracle unmount");
    Some(out)
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers.

/// `"ok"` or the errno name (`"EXDEV"`), so results compare across backends and read well in failures.
pub fn outcome<T>(r: &io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errname(e),
    }
}

pub fn errname(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{:?}", nix::errno::Errno::from_raw(n)),
        None => format!("{e}"),
    }
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn write(p: impl AsRef<Path>, data: impl AsRef<[u8]>) {
    let p = p.as_ref();
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub fn read(p: impl AsRef<Path>) -> String {
    let p = p.as_ref();
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn mkdir(p: impl AsRef<Path>) {
    let p = p.as_ref();
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

pub fn lstat(p: impl AsRef<Path>) -> fs::Metadata {
    let p = p.as_ref();
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

pub fn exists(p: impl AsRef<Path>) -> bool {
    fs::symlink_metadata(p).is_ok()
}

pub fn chmod(p: impl AsRef<Path>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let p = p.as_ref();
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

pub fn chown(p: impl AsRef<Path>, uid: u32, gid: u32) {
    let p = p.as_ref();
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

/// Sets atime and mtime of `p` (not following symlinks) to `secs` since the epoch.
pub fn set_mtime(p: impl AsRef<Path>, secs: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let p = p.as_ref();
    let t = TimeSpec::new(secs, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// A kernel-format whiteout: a character device 0/0.
pub fn mkwhiteout(p: impl AsRef<Path>) {
    use nix::sys::stat::{mknod, Mode, SFlag};
    let p = p.as_ref();
    mknod(p, SFlag::S_IFCHR, Mode::empty(), 0)
        .unwrap_or_else(|e| panic!("mknod whiteout {}: {e}", p.display()));
}

pub fn is_whiteout(p: impl AsRef<Path>) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match fs::symlink_metadata(p) {
        Ok(m) => m.file_type().is_char_device() && m.rdev() == 0,
        Err(_) => false,
    }
}

pub use crate::xattr_io::{getxattr, listxattr, removexattr, setxattr};

/// Directory entry names through `getdents64` (nix `Dir`), including `.` and `..`, in the order returned.
pub fn raw_names(p: impl AsRef<Path>) -> Vec<String> {
    use nix::dir::Dir;
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let p = p.as_ref();
    let mut dir = Dir::open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
        .unwrap_or_else(|e| panic!("opendir {}: {e}", p.display()));
    dir.iter()
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()));
            String::from_utf8_lossy(e.file_name().to_bytes()).into_owned()
        })
        .collect()
}

/// Sorted names in `p` (without `.` and `..`); panics on duplicates.
pub fn names(p: impl AsRef<Path>) -> Vec<String> {
    let p = p.as_ref();
    let mut v: Vec<String> = raw_names(p)
        .into_iter()
        .filter(|n| n != "." && n != "..")
        .collect();
    let n = v.len();
    v.sort();
    v.dedup();
    assert_eq!(
        v.len(),
        n,
        "readdir {} returned duplicate names",
        p.display()
    );
    v
}

pub fn strs(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Runs `f` in a forked child as `uid`/`gid` with no supplementary groups; returns what `f` returned
/// (0 for success, else an errno). `f` runs after fork in a multi-threaded process: it must only make raw
/// syscalls on data prepared before the call (no allocation, no locks, no panics).
pub fn as_user(uid: u32, gid: u32, f: impl FnOnce() -> i32) -> i32 {
    fork_run(Some((uid, gid)), f)
}

/// Runs `f` in a forked child (another process, same credentials); same rules as [`as_user`].
pub fn in_child(f: impl FnOnce() -> i32) -> i32 {
    fork_run(None, f)
}

fn fork_run(creds: Option<(u32, u32)>, f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only makes async-signal-safe syscalls and then `_exit`s.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => unsafe {
            if let Some((uid, gid)) = creds {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    libc::_exit(200);
                }
            }
            let r = f();
            libc::_exit(if (0..=255).contains(&r) { r } else { 255 });
        },
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None).expect("waitpid") {
                nix::sys::wait::WaitStatus::Exited(_, code) => {
                    assert_ne!(code, 200, "could not switch to {creds:?}");
                    code
                }
                other => panic!("forked child ended with {other:?}"),
            }
        }
    }
}

/// Last errno (for use inside [`as_user`] closures).
pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(255)
}

/// Inode number of `p` (lstat).
pub fn ino(p: impl AsRef<Path>) -> u64 {
    lstat(p).ino()
}

/// The `user.*` xattr names of `p`, sorted (hosts with SELinux or ACLs add `security.*`/`system.*`).
pub fn user_xattrs(p: impl AsRef<Path>) -> io::Result<Vec<String>> {
    Ok(listxattr(p)?
        .into_iter()
        .filter(|n| n.starts_with("user."))
        .collect())
}
