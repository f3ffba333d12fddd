//! The layer stack: opening and validating the layer directories, and the per-layer reads the
//! union is built from (stat a child, whiteout and opaque checks, merged directory listing).

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::options::Options;
use crate::sys;
use crate::whiteout::{self, XattrNs};

/// Problems with the layer/mount setup; each is one line naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A layer cannot be opened.
    #[error("{what} {path:?}: {err}")]
    Open {
        /// Which role the path plays.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        err: io::Error,
    },
    /// A layer is not a directory.
    #[error("{what} {path:?} is not a directory")]
    NotDir {
        /// Which role the path plays.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Another inconsistency.
    #[error("{0}")]
    Invalid(String),
}

/// The opened layers. Index 0 is the upper layer when there is one; lowers follow, topmost first.
#[derive(Debug)]
pub struct Layers {
    /// Root fds (O_PATH) of every layer.
    pub roots: Vec<OwnedFd>,
    /// Whether index 0 is a writable upper.
    pub has_upper: bool,
    /// The work dir (`WORKDIR/work`), on the upper's filesystem.
    pub work: Option<OwnedFd>,
    /// Namespace for the opaque xattr we write.
    pub xattr_ns: XattrNs,
    /// Whether the upper may hold `.wh.NAME` files (only if it did at mount: we never create
    /// such names), so lookups can skip looking for them there.
    pub upper_wh: bool,
}

fn open_root(what: &'static str, path: &Path) -> Result<(OwnedFd, libc::stat), SetupError> {
    let c = sys::cstr(path.as_os_str()).map_err(|err| SetupError::Open {
        what,
        path: path.into(),
        err,
    })?;
    // Layer roots are named by the administrator: following symlinks in them is fine; only what
    // is INSIDE a layer is untrusted.
    // SAFETY: valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOTDIR) {
            return Err(SetupError::NotDir {
                what,
                path: path.into(),
            });
        }
        return Err(SetupError::Open {
            what,
            path: path.into(),
            err,
        });
    }
    // SAFETY: fresh fd.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let st = sys::fstat(fd.as_raw_fd()).map_err(|err| SetupError::Open {
        what,
        path: path.into(),
        err,
    })?;
    Ok((fd, st))
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl Layers {
    /// Opens and validates the layers named in the options.
    pub fn open(o: &Options, xattr_ns: XattrNs) -> Result<Layers, SetupError> {
        let mut roots = Vec::new();
        let mut ids = Vec::new();
        let mut upper_id = None;
        let writable = o.upper.is_some() && !o.read_only;
        if let (Some(upper), true) = (&o.upper, writable) {
            let (fd, st) = open_root("upperdir", upper)?;
            upper_id = Some((st.st_dev, st.st_ino));
            roots.push(fd);
        }
        for l in &o.lowers {
            let (fd, st) = open_root("lowerdir", l)?;
            if upper_id == Some((st.st_dev, st.st_ino)) {
                return Err(SetupError::Invalid(format!(
                    "upperdir {:?} is also a lowerdir",
                    o.upper.as_deref().unwrap_or(Path::new(""))
                )));
            }
            ids.push((st.st_dev, st.st_ino));
            roots.push(fd);
        }
        let mut work = None;
        if let (Some(upper), Some(workdir), true) = (&o.upper, &o.work, writable) {
            let (wfd, wst) = open_root("workdir", workdir)?;
            let ust = sys::fstat(roots[0].as_raw_fd()).map_err(|err| SetupError::Open {
                what: "upperdir",
                path: upper.clone(),
                err,
            })?;
            if wst.st_dev != ust.st_dev {
                return Err(SetupError::Invalid(format!(
                    "workdir {workdir:?} and upperdir {upper:?} must be on the same filesystem"
                )));
            }
            if (wst.st_dev, wst.st_ino) == (ust.st_dev, ust.st_ino) {
                return Err(SetupError::Invalid(format!(
                    "workdir {workdir:?} and upperdir {upper:?} must be different directories"
                )));
            }
            let (cu, cw) = (canonical(upper), canonical(workdir));
            if cw.starts_with(&cu) {
                return Err(SetupError::Invalid(format!(
                    "workdir {workdir:?} is inside upperdir {upper:?}"
                )));
            }
            if cu.starts_with(&cw) {
                return Err(SetupError::Invalid(format!(
                    "upperdir {upper:?} is inside workdir {workdir:?}"
                )));
            }
            for l in &o.lowers {
                let cl = canonical(l);
                if cl == cu {
                    return Err(SetupError::Invalid(format!(
                        "upperdir {upper:?} is also a lowerdir"
                    )));
                }
            }
            work = Some(
                prepare_workdir(wfd.as_raw_fd()).map_err(|err| SetupError::Open {
                    what: "workdir",
                    path: workdir.clone(),
                    err,
                })?,
            );
        }
        let upper_wh = writable && tree_has_wh_names(roots[0].as_raw_fd(), 100_000);
        Ok(Layers {
            roots,
            has_upper: writable,
            work,
            xattr_ns,
            upper_wh,
        })
    }

    /// Whether layer `li` is the writable upper.
    pub fn is_upper(&self, li: usize) -> bool {
        self.has_upper && li == 0
    }

    /// Root fd of a layer.
    pub fn root(&self, li: usize) -> RawFd {
        self.roots[li].as_raw_fd()
    }

    /// The work dir fd, or EROFS without an upper.
    pub fn work_fd(&self) -> io::Result<RawFd> {
        self.work
            .as_ref()
            .map(|w| w.as_raw_fd())
            .ok_or_else(|| sys::errno(libc::EROFS))
    }

    /// Whether the directory `fd` (or its child `name`) carries an opaque marker (either xattr
    /// namespace, or a `.wh..wh..opq` file).
    pub fn is_opaque(&self, dirfd: RawFd, name: Option<&CStr>) -> bool {
        let (path, follow) = match name {
            Some(n) => (sys::proc_path(dirfd, Some(n)), false),
            None => (sys::proc_path(dirfd, None), true),
        };
        for x in whiteout::OPAQUE_XATTRS {
            if let Ok(v) = sys::getxattr(&path, x, follow) {
                if whiteout::is_opaque_value(&v) {
                    return true;
                }
            }
        }
        let mut marker = Vec::new();
        if let Some(n) = name {
            marker.extend_from_slice(n.to_bytes());
            marker.push(b'/');
        }
        marker.extend_from_slice(whiteout::OPAQUE_FILE);
        match CString::new(marker) {
            Ok(m) => sys::fstatat(dirfd, &m).is_ok(),
            Err(_) => false,
        }
    }

    /// Whether the directory `dirfd` of layer `li` holds a `.wh.NAME` file for `name`.
    pub fn has_wh_file(&self, li: usize, dirfd: RawFd, name: &CStr) -> bool {
        if self.is_upper(li) && !self.upper_wh {
            return false;
        }
        match CString::new(whiteout::wh_name(name.to_bytes())) {
            Ok(w) => sys::fstatat(dirfd, &w).is_ok(),
            Err(_) => false,
        }
    }
}

/// Whether a tree holds any `.wh.`-prefixed name. Gives up (answers yes) after `budget`
/// entries or on any error, so a huge or odd pre-existing upper costs a bounded scan (an
/// iterative walk with O(1) descriptors, whatever the depth).
fn tree_has_wh_names(dirfd: RawFd, budget: usize) -> bool {
    use cachedriver_common::tree::{walk, Walk};
    let mut budget = budget;
    let mut found = false;
    let top = PathBuf::from(format!("/proc/self/fd/{dirfd}"));
    let r = walk(&top, |e| {
        if budget == 0 || whiteout::is_reserved_name(e.name.to_bytes()) {
            found = true;
            return Walk::Stop;
        }
        budget -= 1;
        Walk::Continue
    });
    found || r.is_err()
}

/// Creates `WORKDIR/work` (as the kernel does) and empties it of leftovers from a crash.
fn prepare_workdir(wfd: RawFd) -> io::Result<OwnedFd> {
    match sys::mkdirat(wfd, c"work", 0o700) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    let st = sys::fstatat(wfd, c"work")?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(sys::errno(libc::ENOTDIR));
    }
    let fd = sys::openat(wfd, c"work", libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for (name, _) in sys::list_dir(sys::reopen_dir(fd.as_raw_fd())?)? {
        if let Ok(c) = CString::new(name) {
            let _ = remove_tree(fd.as_raw_fd(), &c);
        }
    }
    Ok(fd)
}

/// Removes `name` in `dirfd` (a file or a whole tree), never following symlinks, with O(1)
/// descriptors and no recursion (one home: `cachedriver_common::tree`).
pub use cachedriver_common::tree::remove_tree_at as remove_tree;

/// One entry of a merged directory listing.
#[derive(Debug, Clone)]
pub struct MergedEntry {
    /// Name.
    pub name: OsString,
    /// d_type of the topmost entry.
    pub dtype: u8,
    /// Position in the directory's layer stack where the entry was found.
    pub pos: usize,
}

/// Builds the merged listing of a directory from its per-layer directories (topmost first,
/// each opened readable): upper entries win, whiteouts and `.wh.` files hide lower names,
/// reserved names are never shown.
pub fn merged_listing(dirs: Vec<OwnedFd>) -> io::Result<Vec<MergedEntry>> {
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut out = Vec::new();
    let n = dirs.len();
    for (i, fd) in dirs.into_iter().enumerate() {
        let path_fd = sys::openat(fd.as_raw_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let entries = sys::list_dir(fd)?;
        let mut hidden_below = Vec::new();
        for (name, dtype) in entries {
            if let Some(t) = whiteout::whiteout_target(&name) {
                hidden_below.push(t.to_vec());
                continue;
            }
            if whiteout::is_reserved_name(&name) {
                continue;
            }
            if seen.contains(&name) {
                continue;
            }
            if dtype == libc::DT_CHR || dtype == libc::DT_UNKNOWN {
                let c = match CString::new(name.clone()) {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                match sys::fstatat(path_fd.as_raw_fd(), &c) {
                    Ok(st) if whiteout::is_whiteout(&st) => {
                        seen.insert(name);
                        continue;
                    }
                    Ok(st) => {
                        out.push(MergedEntry {
                            name: OsString::from_vec(name.clone()),
                            dtype: mode_to_dtype(st.st_mode),
                            pos: i,
                        });
                        seen.insert(name);
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            out.push(MergedEntry {
                name: OsString::from_vec(name.clone()),
                dtype,
                pos: i,
            });
            seen.insert(name);
        }
        if i + 1 < n {
            seen.extend(hidden_below);
        }
    }
    Ok(out)
}

/// Converts st_mode's file type to a d_type value.
pub fn mode_to_dtype(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_UNKNOWN,
    }
}
