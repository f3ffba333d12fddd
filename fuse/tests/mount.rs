//! Real-mount smoke tests of the cachedriver-fuse binary. They need root and a usable
//! /dev/fuse; without them they say so loudly and skip (a failure under CI=true). Every mount
//! is unmounted by a Drop guard, even when an assertion fails.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cachedriver-fuse");

/// Returns why real mounts cannot run here, if they cannot.
fn cannot_mount() -> Option<String> {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Some(format!("/dev/fuse unusable: {e}"));
    }
    None
}

/// Skips (loudly) when mounting is impossible; fails instead under CI=true.
fn require_mount() -> bool {
    match cannot_mount() {
        None => true,
        Some(why) => {
            eprintln!("SKIPPING cachedriver-fuse mount test: {why}");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: mount tests must run, but {why}"
            );
            false
        }
    }
}

/// A scratch tree with lower/upper/work/mnt, unmounted and removed on drop.
struct Fixture {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["lower", "upper", "work", "mnt"] {
            fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        Fixture {
            dir,
            mounted: false,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn mount(&mut self, extra: &str) -> std::process::Output {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}{extra}",
            self.p("lower").display(),
            self.p("upper").display(),
            self.p("work").display()
        );
        let out = Command::new(BIN)
            .arg("-o")
            .arg(opts)
            .arg(self.p("mnt"))
            .output()
            .expect("run cachedriver-fuse");
        self.mounted = out.status.success();
        out
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if self.mounted {
            let c = std::ffi::CString::new(self.p("mnt").as_os_str().as_encoded_bytes())
                .unwrap_or_default();
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Set in the environment of the copy of this test binary run inside `unshare -Urm`.
const IN_USERNS: &str = "CDF_TEST_IN_USERNS";

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and buffer.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

#[test]
fn read_through_copy_up_and_whiteouts() {
    if !require_mount() {
        return;
    }
    let mut f = Fixture::new();
    fs::write(f.p("lower/a"), b"lower a\n").unwrap();
    fs::create_dir_all(f.p("lower/d/sub")).unwrap();
    fs::write(f.p("lower/d/sub/x"), b"x").unwrap();
    fs::write(f.p("lower/gone"), b"g").unwrap();
    let out = f.mount("");
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let m = f.p("mnt");
    assert_eq!(fs::read(m.join("a")).unwrap(), b"lower a\n");
    fs::write(m.join("a"), b"changed\n").unwrap();
    assert_eq!(fs::read(f.p("upper/a")).unwrap(), b"changed\n");
    assert_eq!(fs::read(f.p("lower/a")).unwrap(), b"lower a\n");

    fs::remove_file(m.join("gone")).unwrap();
    assert!(
        is_whiteout(&f.p("upper/gone")),
        "unlink of a lower file leaves a 0/0 whiteout"
    );
    assert!(!m.join("gone").exists());

    fs::remove_dir_all(m.join("d")).unwrap();
    assert!(is_whiteout(&f.p("upper/d")));
    fs::create_dir(m.join("d")).unwrap();
    assert_eq!(
        fs::read_dir(m.join("d")).unwrap().count(),
        0,
        "new dir over a whiteout is opaque"
    );
    // The marker is in the namespace the kernel would use: user. inside a user namespace.
    let ns = if std::env::var_os(IN_USERNS).is_some() {
        "user"
    } else {
        "trusted"
    };
    let opaque = xattr(&f.p("upper/d"), &format!("{ns}.overlay.opaque"));
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));

    let mut names: Vec<_> = fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "d"]);
}

#[test]
fn read_only_without_upper() {
    if !require_mount() {
        return;
    }
    let f = Fixture::new();
    fs::write(f.p("lower/a"), b"a").unwrap();
    let out = Command::new(BIN)
        .arg("-o")
        .arg(format!("lowerdir={}", f.p("lower").display()))
        .arg(f.p("mnt"))
        .output()
        .unwrap();
    let mut f = f;
    f.mounted = out.status.success();
    assert!(f.mounted, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(f.p("mnt/a")).unwrap(), b"a");
    let err = fs::write(f.p("mnt/b"), b"b").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn bad_input_is_one_line_and_mounts_nothing() {
    if !require_mount() {
        return;
    }
    let mut f = Fixture::new();
    fs::remove_dir(f.p("lower")).unwrap();
    let out = f.mount("");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("lowerdir"), "{err}");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(f.p("mnt").to_str().unwrap()));
}

/// Runs the copy-up/whiteout test again inside a new user + mount namespace (rootless mode:
/// user.* xattrs, no passthrough).
#[test]
fn rootless_in_user_namespace() {
    if std::env::var_os(IN_USERNS).is_some() || !require_mount() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = match Command::new("unshare")
        .args(["-Urm", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "read_through_copy_up_and_whiteouts",
            "--test-threads=1",
        ])
        .env(IN_USERNS, "1")
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPING rootless test: cannot run unshare: {e}");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: unshare missing"
            );
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "rootless run failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the running kernel has FUSE passthrough (6.9+), which root mounts then use.
fn kernel_has_passthrough() -> bool {
    let rel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (maj, min) >= (6, 9)
}

/// A large lower file held open read-only (passthrough, when available) can still be opened for
/// writing, as on kernel overlayfs: both write opens succeed, the data lands in the upper copy,
/// mmap of the new fd works, and the old fd keeps reading one consistent version of the file.
fn open_for_write_while_big_lower_open(extra: &str, old_fd_sees_old: Option<bool>) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    let mut f = Fixture::new();
    let size = 2 << 20;
    let old: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    fs::write(f.p("lower/big"), &old).unwrap();
    let out = f.mount(extra);
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = f.p("mnt/big");

    let ro = fs::File::open(&p).unwrap();
    let mut head = [0u8; 6];
    ro.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, old[..6]);

    let mut ap = fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .expect("O_WRONLY|O_APPEND open while a read-only fd is open");
    ap.write_all(b"APPENDED").unwrap();
    let rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("O_RDWR open while a read-only fd is open");
    rw.write_all_at(b"NEW", 0).unwrap();

    // mmap of the new fd sees the write and writes through.
    // SAFETY: a fresh shared mapping of an fd we own, unmapped below.
    unsafe {
        let m = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rw.as_raw_fd(),
            0,
        );
        assert_ne!(m, libc::MAP_FAILED, "mmap of the new fd");
        let s = std::slice::from_raw_parts_mut(m.cast::<u8>(), 4096);
        assert_eq!(&s[..3], b"NEW");
        s[3..6].copy_from_slice(b"MAP");
        assert_eq!(libc::msync(m, 4096, libc::MS_SYNC), 0);
        libc::munmap(m, 4096);
    }

    let mut want = old.clone();
    want[..6].copy_from_slice(b"NEWMAP");
    want.extend_from_slice(b"APPENDED");
    assert_eq!(fs::read(&p).unwrap(), want, "new content through the mount");
    assert_eq!(
        fs::read(f.p("upper/big")).unwrap(),
        want,
        "new content in upper"
    );
    assert_eq!(fs::read(f.p("lower/big")).unwrap(), old, "lower untouched");

    // The old fd reads one whole version: the lower file it opened (passthrough) or, served by
    // us, the copy it follows after copy-up (what kernel overlayfs gives read(2)).
    let mut via_old = vec![0u8; size + 8];
    let mut n = 0;
    while n < via_old.len() {
        match ro.read_at(&mut via_old[n..], n as u64).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    via_old.truncate(n);
    let sees_old = via_old == old;
    assert!(sees_old || via_old == want, "old fd reads a mix");
    if let Some(expect) = old_fd_sees_old {
        assert_eq!(sees_old, expect, "version read through the old fd");
    }
    drop((ro, ap, rw));
    assert_eq!(fs::read(&p).unwrap(), want);
}

#[test]
fn open_for_write_while_big_lower_file_is_open() {
    if std::env::var_os(IN_USERNS).is_some() || !require_mount() {
        return;
    }
    // Default (no-open mode): the kernel opens files itself and every read follows the copy-up.
    open_for_write_while_big_lower_open("", Some(false));
    open_for_write_while_big_lower_open(
        ",passthrough=on",
        kernel_has_passthrough().then_some(true),
    );
    open_for_write_while_big_lower_open(",passthrough=off,noopen=off", Some(false));
}

/// Drops a file's clean pages from the kernel page cache, so the next read is a READ request.
fn drop_pages(f: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// Reads all of `f` with pread from offset 0.
fn read_all_at(f: &fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; 8 << 20];
    let mut n = 0;
    while n < out.len() {
        match f.read_at(&mut out[n..], n as u64).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    out.truncate(n);
    out
}

/// No-open mode answers large reads of lower files from a mapping of the lower file: the data is
/// right, reads follow a copy-up made while the file is open, and a lower file shrunk behind the
/// daemon's back (a broken layer) fails that read instead of killing the daemon.
#[test]
fn large_lower_reads_from_a_mapping() {
    use std::os::unix::fs::FileExt;
    if std::env::var_os(IN_USERNS).is_some() || !require_mount() {
        return;
    }
    let mut f = Fixture::new();
    let size = 3 << 20;
    let old: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    fs::write(f.p("lower/big"), &old).unwrap();
    fs::write(f.p("lower/shrink"), &old).unwrap();
    let out = f.mount("");
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ro = fs::File::open(f.p("mnt/big")).unwrap();
    drop_pages(&ro);
    assert_eq!(read_all_at(&ro), old, "cold read through the mount");
    // Unaligned reads past the mapping threshold, and one across the end of the file.
    let mut buf = vec![0u8; 10_000];
    ro.read_exact_at(&mut buf, 700_001).unwrap();
    assert_eq!(buf[..], old[700_001..710_001]);
    drop_pages(&ro);
    let n = ro.read_at(&mut buf, size as u64 - 100).unwrap();
    assert_eq!(buf[..n], old[size - 100..]);

    // Copy-up while `ro` stays open: its reads (from a dropped page cache) see the upper file.
    let rw = fs::OpenOptions::new()
        .write(true)
        .open(f.p("mnt/big"))
        .unwrap();
    rw.write_all_at(b"UPPER", 2 << 20).unwrap();
    drop(rw);
    let mut want = old.clone();
    want[2 << 20..(2 << 20) + 5].copy_from_slice(b"UPPER");
    drop_pages(&ro);
    assert_eq!(read_all_at(&ro), want, "open fd follows the copy-up");
    assert_eq!(fs::read(f.p("upper/big")).unwrap(), want);
    assert_eq!(fs::read(f.p("lower/big")).unwrap(), old, "lower untouched");

    // A broken layer: the lower file shrinks after the daemon mapped it.
    let sh = fs::File::open(f.p("mnt/shrink")).unwrap();
    drop_pages(&sh);
    assert_eq!(read_all_at(&sh), old);
    fs::OpenOptions::new()
        .write(true)
        .open(f.p("lower/shrink"))
        .unwrap()
        .set_len(100_000)
        .unwrap();
    drop_pages(&sh);
    let mut tail = vec![0u8; 4096];
    let res = sh.read_at(&mut tail, 2 << 20);
    assert!(
        !matches!(res, Ok(n) if n > 0 && tail[..n] != old[2 << 20..(2 << 20) + n]),
        "read past the shrunk lower returned wrong data"
    );
    // The daemon is alive and serving.
    assert_eq!(
        read_all_at(&ro),
        want,
        "mount still serves after the broken read"
    );
}
