//! Flattening rules and the state switch, on real directories (no mounts).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cachedriver_common::at;

use super::*;
use crate::state::{CacheState, XattrNs};

const CACHE: &str = "c";

/// A store whose cache `c` has the given layers (bottom first), each filled by its closure.
struct Fix {
    _dir: tempfile::TempDir,
    store: Store,
}

type Fill = Box<dyn Fn(&Path)>;

/// Failpoints are process-wide: tests that compact hold this so a failpoint configured by one
/// test never fires in another.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn compact_cache(
    store: &Store,
    cache: &str,
    max_depth: usize,
    force: bool,
) -> Result<Option<CompactReport>> {
    let _g = serial();
    super::compact_cache(store, cache, max_depth, force)
}

impl Fix {
    fn new(layers: Vec<(&str, Fill)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut st = CacheState::new(XattrNs::Trusted);
        fs::create_dir_all(store.cache_dir(CACHE)).unwrap();
        let mut parent: Option<String> = None;
        for (name, fill) in layers {
            let d = store.layer_dir(CACHE, name);
            fs::create_dir(&d).unwrap();
            fill(&d);
            match &parent {
                None => {
                    st.layers.clear();
                    st.layers.insert(name.to_string(), Default::default());
                    st.state.latest = name.to_string();
                }
                Some(p) => st.push_layer(name, p, "v-x"),
            }
            parent = Some(name.to_string());
        }
        store.save_state(CACHE, &st).unwrap();
        Fix { _dir: dir, store }
    }

    fn state(&self) -> CacheState {
        self.store.load_state(CACHE).unwrap().unwrap()
    }

    fn layer(&self, name: &str) -> PathBuf {
        self.store.layer_dir(CACHE, name)
    }

    /// Force-compacts and returns (report, new layer dir).
    fn compact(&self) -> (CompactReport, PathBuf) {
        let r = compact_cache(&self.store, CACHE, 16, true)
            .unwrap()
            .expect("compacted");
        let d = self.layer(&r.new_layer);
        (r, d)
    }
}

fn whiteout(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) },
        0
    );
}

fn set_xattr(p: &Path, name: &str, v: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    at::setxattr(&c, &n, v, 0, false)
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

fn xattrs(p: &Path) -> Vec<String> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let buf = at::listxattr(&c, false).unwrap();
    let mut v: Vec<String> = cachedriver_common::xattr::xattr_names(&buf)
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    v.sort();
    v
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

fn top(_: &Path) {}

#[test]
fn keep_math() {
    assert_eq!(layers_to_keep(16, 16, false), None);
    assert_eq!(layers_to_keep(17, 16, false), Some(8));
    assert_eq!(layers_to_keep(2, 1, false), Some(1));
    assert_eq!(layers_to_keep(2, 0, false), Some(1));
    assert_eq!(layers_to_keep(1, 16, true), None);
    assert_eq!(layers_to_keep(2, 16, true), Some(1));
    assert_eq!(layers_to_keep(9, 16, true), Some(1));
}

#[test]
fn whiteout_over_a_file_and_the_state_switch() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                fs::write(d.join("a"), "a0").unwrap();
                fs::write(d.join("b"), "b0").unwrap();
            }),
        ),
        ("one", Box::new(|d: &Path| whiteout(&d.join("a")))),
        ("two", Box::new(top)),
    ]);
    let (r, new) = f.compact();
    assert_eq!(names(&new), vec!["b"]);
    assert_eq!(
        ino(&new.join("b")),
        ino(&f.layer("0").join("b")),
        "linked, not copied"
    );
    assert_eq!(r.flattened, vec!["0", "one"]);
    assert_eq!((r.depth_before, r.depth_after), (3, 2));
    let st = f.state();
    assert_eq!(st.state.latest, "two", "latest keeps its name");
    assert_eq!(
        st.latest_chain().unwrap(),
        vec!["two".to_string(), r.new_layer.clone()]
    );
    assert_eq!(st.layers[&r.new_layer].parent, None);
    let json = String::from_utf8(st.to_bytes()).unwrap();
    assert!(json.contains("compacted_from"), "{json}");
    assert!(
        f.layer("one").is_dir() && f.layer("0").is_dir(),
        "old layers stay for GC"
    );
    // Nothing left behind.
    assert!(!names(&f.store.cache_dir(CACHE))
        .iter()
        .any(|n| n.starts_with(".tmp")));
    // Again: nothing to do below the bound.
    assert!(compact_cache(&f.store, CACHE, 16, false).unwrap().is_none());
}

#[test]
fn opaque_dir_over_a_populated_dir() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/x"), "x").unwrap();
                fs::write(d.join("d/y"), "y").unwrap();
                fs::create_dir(d.join("e")).unwrap();
                fs::write(d.join("e/x"), "x").unwrap();
            }),
        ),
        (
            "one",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("d")).unwrap();
                set_xattr(&d.join("d"), "trusted.overlay.opaque", b"y");
                fs::write(d.join("d/z"), "z").unwrap();
                fs::create_dir(d.join("e")).unwrap();
                set_xattr(&d.join("e"), "user.overlay.opaque", b"y");
            }),
        ),
        ("two", Box::new(top)),
    ]);
    let (_, new) = f.compact();
    assert_eq!(names(&new.join("d")), vec!["z"]);
    assert!(names(&new.join("e")).is_empty());
    assert!(
        xattrs(&new.join("d")).is_empty(),
        "{:?}",
        xattrs(&new.join("d"))
    );
    assert!(xattrs(&new.join("e")).is_empty());
}

#[test]
fn dir_replaced_by_a_file_and_back() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/x"), "x").unwrap();
                fs::write(d.join("f"), "f0").unwrap();
            }),
        ),
        (
            "one",
            Box::new(|d: &Path| {
                fs::write(d.join("d"), "now a file").unwrap();
                fs::create_dir(d.join("f")).unwrap();
                fs::write(d.join("f/in"), "in").unwrap();
            }),
        ),
        (
            "two",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/y"), "y").unwrap();
                fs::write(d.join("f"), "f2").unwrap();
            }),
        ),
        ("three", Box::new(top)),
    ]);
    let (_, new) = f.compact();
    assert_eq!(
        names(&new.join("d")),
        vec!["y"],
        "the file below hides the old dir"
    );
    assert_eq!(fs::read(new.join("f")).unwrap(), b"f2");
    assert_eq!(ino(&new.join("f")), ino(&f.layer("two").join("f")));
}

#[test]
fn hard_links_across_the_range() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                fs::write(d.join("a"), "shared").unwrap();
                fs::hard_link(d.join("a"), d.join("b")).unwrap();
                fs::hard_link(d.join("a"), d.join("c")).unwrap();
                fs::create_dir(d.join("sub")).unwrap();
                fs::hard_link(d.join("a"), d.join("sub/d")).unwrap();
            }),
        ),
        (
            "one",
            Box::new(|d: &Path| {
                whiteout(&d.join("b"));
                fs::write(d.join("c"), "rewritten").unwrap();
                fs::write(d.join("p"), "p").unwrap();
                fs::hard_link(d.join("p"), d.join("q")).unwrap();
            }),
        ),
        ("two", Box::new(top)),
    ]);
    let (_, new) = f.compact();
    assert_eq!(names(&new), vec!["a", "c", "p", "q", "sub"]);
    let a = ino(&new.join("a"));
    assert_eq!(a, ino(&new.join("sub/d")));
    assert_eq!(a, ino(&f.layer("0").join("a")));
    assert_ne!(a, ino(&new.join("c")));
    assert_eq!(fs::read(new.join("c")).unwrap(), b"rewritten");
    assert_eq!(ino(&new.join("p")), ino(&new.join("q")));
}

#[test]
fn whiteout_at_the_bottom_hides_nothing_and_wh_files() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                whiteout(&d.join("ghost"));
                fs::write(d.join(".wh.ghost2"), "").unwrap();
                fs::write(d.join("a"), "a").unwrap();
                fs::write(d.join("keep"), "k").unwrap();
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/x"), "x").unwrap();
            }),
        ),
        (
            "one",
            Box::new(|d: &Path| {
                fs::write(d.join(".wh.a"), "").unwrap();
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/.wh..wh..opq"), "").unwrap();
                fs::write(d.join("d/z"), "z").unwrap();
                // A `.wh.NAME` beside NAME in one layer hides only the layers below.
                fs::write(d.join("keep"), "k1").unwrap();
                fs::write(d.join(".wh.keep"), "").unwrap();
            }),
        ),
        ("two", Box::new(top)),
    ]);
    let (_, new) = f.compact();
    assert_eq!(names(&new), vec!["d", "keep"]);
    assert_eq!(names(&new.join("d")), vec!["z"]);
    assert_eq!(fs::read(new.join("keep")).unwrap(), b"k1");
}

#[test]
fn dir_attributes_and_xattrs() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/x"), "x").unwrap();
                std::os::unix::fs::lchown(d.join("d"), Some(1000), Some(1000)).unwrap();
                fs::set_permissions(d.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
                set_xattr(&d.join("d"), "user.low", b"1");
            }),
        ),
        (
            "one",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/y"), "y").unwrap();
                std::os::unix::fs::lchown(d.join("d"), Some(5), Some(6)).unwrap();
                fs::set_permissions(d.join("d"), fs::Permissions::from_mode(0o3775)).unwrap();
                set_xattr(&d.join("d"), "user.k", b"v");
                set_xattr(&d.join("d"), "trusted.overlay.impure", b"y");
                set_xattr(&d.join("d"), "user.overlay.origin", b"zz");
                let t = CString::new(d.join("d").as_os_str().as_bytes()).unwrap();
                let ts = [
                    libc::timespec {
                        tv_sec: 1_000_000,
                        tv_nsec: 5,
                    },
                    libc::timespec {
                        tv_sec: 2_000_000,
                        tv_nsec: 7,
                    },
                ];
                // SAFETY: valid C string and timespecs.
                assert_eq!(
                    unsafe { libc::utimensat(libc::AT_FDCWD, t.as_ptr(), ts.as_ptr(), 0) },
                    0
                );
                // The layer root's attributes come from the topmost layer of the range too.
                fs::set_permissions(d, fs::Permissions::from_mode(0o751)).unwrap();
            }),
        ),
        ("two", Box::new(top)),
    ]);
    let (_, new) = f.compact();
    let m = fs::symlink_metadata(new.join("d")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (5, 6, 0o3775));
    assert_eq!((m.mtime(), m.mtime_nsec()), (2_000_000, 7));
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000, 5));
    assert_eq!(xattrs(&new.join("d")), vec!["user.k"]);
    assert_eq!(names(&new.join("d")), vec!["x", "y"]);
    assert_eq!(fs::symlink_metadata(&new).unwrap().mode() & 0o7777, 0o751);
}

#[test]
fn symlinks_and_devices_are_linked_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), "s").unwrap();
    let o = outside.path().to_path_buf();
    let f = Fix::new(vec![
        (
            "0",
            Box::new(move |d: &Path| {
                fs::create_dir(d.join("d")).unwrap();
                fs::write(d.join("d/x"), "x").unwrap();
                let c = CString::new(d.join("fifo").as_os_str().as_bytes()).unwrap();
                // SAFETY: valid C string.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
                symlink(&o, d.join("l")).unwrap();
            }),
        ),
        (
            "one",
            Box::new(|d: &Path| {
                // A symlink over a lower dir, pointing outside the layer.
                symlink("/etc", d.join("d")).unwrap();
            }),
        ),
        ("two", Box::new(top)),
    ]);
    let (_, new) = f.compact();
    assert!(fs::symlink_metadata(new.join("d"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(new.join("d")).unwrap(), Path::new("/etc"));
    assert_eq!(ino(&new.join("l")), ino(&f.layer("0").join("l")));
    assert_eq!(ino(&new.join("fifo")), ino(&f.layer("0").join("fifo")));
    assert_eq!(names(outside.path()), vec!["secret"]);
}

#[test]
fn emlink_fallback_copies_with_attributes_and_keeps_links() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                fs::write(d.join("a"), "data").unwrap();
                fs::hard_link(d.join("a"), d.join("b")).unwrap();
                std::os::unix::fs::lchown(d.join("a"), Some(7), Some(8)).unwrap();
                fs::set_permissions(d.join("a"), fs::Permissions::from_mode(0o4751)).unwrap();
                set_xattr(&d.join("a"), "user.x", b"1");
                symlink("target", d.join("s")).unwrap();
                let c = CString::new(d.join("fifo").as_os_str().as_bytes()).unwrap();
                // SAFETY: valid C string.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
            }),
        ),
        ("one", Box::new(top)),
    ]);
    flatten::FORCE_COPY.with(|c| c.set(true));
    let r = compact_cache(&f.store, CACHE, 16, true);
    flatten::FORCE_COPY.with(|c| c.set(false));
    let r = r.unwrap().unwrap();
    let new = f.layer(&r.new_layer);
    assert_eq!(r.copied, 3, "a (b links to the copy), s, fifo");
    let m = fs::symlink_metadata(new.join("a")).unwrap();
    assert_ne!(m.ino(), ino(&f.layer("0").join("a")));
    assert_eq!(m.ino(), ino(&new.join("b")));
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (7, 8, 0o4751));
    assert_eq!(fs::read(new.join("a")).unwrap(), b"data");
    assert_eq!(xattrs(&new.join("a")), vec!["user.x"]);
    assert_eq!(fs::read_link(new.join("s")).unwrap(), Path::new("target"));
    assert!(fs::symlink_metadata(new.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::symlink_metadata(new.join("fifo")).unwrap().mode() & 0o7777,
        0o640
    );
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn missing_layer_fails_naming_it_and_changes_nothing() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| fs::write(d.join("a"), "a").unwrap()),
        ),
        (
            "one",
            Box::new(|d: &Path| fs::write(d.join("b"), "b").unwrap()),
        ),
        ("two", Box::new(top)),
    ]);
    let before = f.state();
    fs::remove_dir_all(f.layer("one")).unwrap();
    let e = compact_cache(&f.store, CACHE, 16, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/one"), "{e}");
    assert_eq!(f.state(), before);
    let left: Vec<String> = names(&f.store.cache_dir(CACHE));
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with(".tmp") || n.starts_with("c.")),
        "{left:?}"
    );
}

#[test]
fn an_unknown_cache_is_not_created() {
    let f = Fix::new(vec![("0", Box::new(top))]);
    assert!(compact_cache(&f.store, "nope", 16, true).unwrap().is_none());
    assert!(!f.store.cache_dir("nope").exists());
    assert!(compact_cache(&f.store, "../x", 16, true).is_err());
}

#[test]
fn leftovers_of_a_crash_are_removed() {
    let f = Fix::new(vec![("0", Box::new(top)), ("one", Box::new(top))]);
    let stale = f.store.cache_dir(CACHE).join(".tmp-compact-c.1-1");
    fs::create_dir_all(stale.join("deep/er")).unwrap();
    assert!(compact_cache(&f.store, CACHE, 16, false).unwrap().is_none());
    assert!(!stale.exists());
}

#[test]
fn depth_bound_keeps_the_top_half() {
    let mut layers: Vec<(&str, Fill)> = Vec::new();
    let names_: Vec<String> = (0..10).map(|i| format!("l{i}")).collect();
    for (i, n) in names_.iter().enumerate() {
        layers.push((
            n.as_str(),
            Box::new(move |d: &Path| fs::write(d.join(format!("f{i}")), "x").unwrap()),
        ));
    }
    let f = Fix::new(layers);
    assert!(compact_cache(&f.store, CACHE, 10, false).unwrap().is_none());
    let r = compact_cache(&f.store, CACHE, 8, false).unwrap().unwrap();
    assert_eq!(r.flattened, vec!["l0", "l1", "l2", "l3", "l4", "l5"]);
    assert_eq!(r.depth_after, 5);
    assert_eq!(
        names(&f.layer(&r.new_layer)),
        vec!["f0", "f1", "f2", "f3", "f4", "f5"]
    );
    // Compacting again flattens the compacted layer with the next ones.
    let r2 = compact_cache(&f.store, CACHE, 16, true).unwrap().unwrap();
    assert_ne!(r2.new_layer, r.new_layer);
    assert_eq!(r2.depth_after, 2);
    assert_eq!(names(&f.layer(&r2.new_layer)).len(), 9);
}

/// Makes `depth` nested dirs named `d` under `root` through dir fds (the path is far beyond
/// PATH_MAX), with a file at the bottom.
fn make_deep(root: &Path, depth: usize) {
    let mut fd = at::open_dir_at(
        libc::AT_FDCWD,
        &CString::new(root.as_os_str().as_bytes()).unwrap(),
    )
    .unwrap();
    for _ in 0..depth {
        at::mkdirat(std::os::fd::AsRawFd::as_raw_fd(&fd), c"d", 0o755).unwrap();
        fd = at::open_dir_at(std::os::fd::AsRawFd::as_raw_fd(&fd), c"d").unwrap();
    }
    let f = at::openat(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        c"bottom",
        libc::O_CREAT | libc::O_WRONLY,
        0o644,
    )
    .unwrap();
    drop(f);
}

fn deep_len(root: &Path) -> (usize, bool) {
    let mut fd = at::open_dir_at(
        libc::AT_FDCWD,
        &CString::new(root.as_os_str().as_bytes()).unwrap(),
    )
    .unwrap();
    let mut n = 0;
    while let Ok(next) = at::open_dir_at(std::os::fd::AsRawFd::as_raw_fd(&fd), c"d") {
        fd = next;
        n += 1;
    }
    let bottom = at::fstatat(std::os::fd::AsRawFd::as_raw_fd(&fd), c"bottom").is_ok();
    (n, bottom)
}

#[test]
fn a_4000_deep_tree() {
    let f = Fix::new(vec![
        ("0", Box::new(|d: &Path| make_deep(d, 4000))),
        ("one", Box::new(|d: &Path| make_deep(d, 3000))),
        ("two", Box::new(top)),
    ]);
    let (r, new) = f.compact();
    assert_eq!(deep_len(&new), (4000, true));
    assert!(r.entries >= 4000);
    // Clean up with fd-relative removal (remove_dir_all copes with the depth).
    fs::remove_dir_all(f.store.cache_dir(CACHE)).unwrap();
}

#[test]
fn a_100k_entry_dir_and_odd_names() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("big")).unwrap();
                for i in 0..100_000 {
                    fs::write(d.join(format!("big/f{i}")), "").unwrap();
                }
                fs::write(d.join(std::ffi::OsStr::from_bytes(b"new\nline\xff")), "odd").unwrap();
            }),
        ),
        (
            "one",
            Box::new(|d: &Path| {
                fs::create_dir(d.join("big")).unwrap();
                for i in 0..1000 {
                    whiteout(&d.join(format!("big/f{i}")));
                }
            }),
        ),
        ("two", Box::new(top)),
    ]);
    let t = std::time::Instant::now();
    let (r, new) = f.compact();
    eprintln!("100k-entry dir: {} entries in {:?}", r.entries, t.elapsed());
    assert_eq!(fs::read_dir(new.join("big")).unwrap().count(), 99_000);
    assert_eq!(
        fs::read(new.join(std::ffi::OsStr::from_bytes(b"new\nline\xff"))).unwrap(),
        b"odd"
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn failpoints_leave_the_old_chain() {
    let f = Fix::new(vec![
        (
            "0",
            Box::new(|d: &Path| fs::write(d.join("a"), "a").unwrap()),
        ),
        (
            "one",
            Box::new(|d: &Path| fs::write(d.join("b"), "b").unwrap()),
        ),
        ("two", Box::new(top)),
    ]);
    let before = f.state();
    let _g = serial();
    let scenario = fail::FailScenario::setup();
    for fp in [
        "compact::after_flatten",
        "compact::after_syncfs",
        "compact::after_rename",
        "compact::before_state",
    ] {
        fail::cfg(fp, "return").unwrap();
        let e = super::compact_cache(&f.store, CACHE, 16, true).unwrap_err();
        assert!(matches!(e, Error::Failpoint(_)), "{fp}: {e}");
        fail::remove(fp);
        assert_eq!(f.state(), before, "{fp}");
        let left = names(&f.store.cache_dir(CACHE));
        assert!(
            !left
                .iter()
                .any(|n| n.starts_with(".tmp") || n.starts_with("c.")),
            "{fp}: {left:?}"
        );
    }
    scenario.teardown();
}

/// The state moving while the range is flattened: a commit on top still switches; a changed
/// parent of the layer above the range drops the new layer.
#[cfg(feature = "failpoints")]
#[test]
fn state_changes_during_flattening() {
    let mk = || {
        Fix::new(vec![
            (
                "0",
                Box::new(|d: &Path| fs::write(d.join("a"), "a").unwrap()),
            ),
            (
                "one",
                Box::new(|d: &Path| fs::write(d.join("b"), "b").unwrap()),
            ),
            ("two", Box::new(top)),
        ])
    };
    let _g = serial();
    let scenario = fail::FailScenario::setup();

    let f = mk();
    let store = f.store.clone();
    fs::create_dir(f.layer("three")).unwrap();
    fail::cfg_callback("compact::after_syncfs", move || {
        let mut st = store.load_state(CACHE).unwrap().unwrap();
        st.push_layer("three", "two", "c-three");
        store.save_state(CACHE, &st).unwrap();
    })
    .unwrap();
    let r = super::compact_cache(&f.store, CACHE, 16, true)
        .unwrap()
        .expect("a commit on top does not stop the switch");
    fail::remove("compact::after_syncfs");
    let chain = f.state().latest_chain().unwrap();
    assert_eq!(chain, vec!["three".to_string(), "two".into(), r.new_layer]);

    let f = mk();
    let store = f.store.clone();
    fail::cfg_callback("compact::after_syncfs", move || {
        let mut st = store.load_state(CACHE).unwrap().unwrap();
        st.layers.get_mut("two").unwrap().parent = Some("0".into());
        store.save_state(CACHE, &st).unwrap();
    })
    .unwrap();
    assert!(super::compact_cache(&f.store, CACHE, 16, true)
        .unwrap()
        .is_none());
    fail::remove("compact::after_syncfs");
    let left = names(&f.store.cache_dir(CACHE));
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with(".tmp") || n.starts_with("c.")),
        "{left:?}"
    );
    scenario.teardown();
}
