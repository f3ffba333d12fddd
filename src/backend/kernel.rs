//! Kernel overlayfs through the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`).
//!
//! `lowerdir+` adds one layer per call, so chains are limited by the kernel's 500 layers rather
//! than by the one-page option string of mount(2); the classic string is the fallback for
//! kernels before 6.8. `index=off,redirect_dir=off,metacopy=off` keep the upper dir valid as a
//! lower layer later; `userxattr` (with `redirect_dir=nofollow`) inside a user namespace.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{unmount_path, Backend, BackendKind, MountSpec, Mounted};
use crate::error::{Error, Result};
use crate::state::XattrNs;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// Kernel overlayfs.
#[derive(Debug, Default)]
pub struct Kernel;

impl Kernel {
    /// A kernel backend.
    pub fn new() -> Self {
        Kernel
    }
}

fn cstr(s: &[u8]) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Backend("path contains a NUL byte".into()))
}

/// An fs context: `fsconfig` calls, with the kernel's own error messages on failure.
struct FsContext {
    fd: OwnedFd,
}

impl FsContext {
    fn open() -> std::io::Result<Self> {
        let name = c"overlay";
        // SAFETY: valid NUL-terminated string; the returned fd is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fsopen returned a fresh fd.
        Ok(FsContext {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// The messages the kernel logged into this context (`e overlayfs: ...`).
    fn kernel_messages(&self) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let msg = String::from_utf8_lossy(&buf[..n as usize])
                .trim()
                .to_string();
            out.push(msg);
        }
        out.join("; ")
    }

    /// One `fsconfig` call; the bare errno on failure.
    fn raw(
        &self,
        cmd: libc::c_uint,
        key: Option<&str>,
        value: Option<&[u8]>,
    ) -> Result<std::io::Result<()>> {
        let key_c = key.map(|k| cstr(k.as_bytes())).transpose()?;
        let val_c = value.map(cstr).transpose()?;
        // SAFETY: pointers are NULL or point at live NUL-terminated strings.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                cmd,
                key_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                val_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                0,
            )
        };
        Ok(if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        })
    }

    /// Turns a failed call into an error naming `what` and the kernel's own messages.
    fn explain(&self, what: &str, e: std::io::Error) -> Error {
        let msgs = self.kernel_messages();
        Error::Backend(format!(
            "overlay mount: {what}: {e}{}",
            if msgs.is_empty() {
                String::new()
            } else {
                format!(" (kernel: {msgs})")
            }
        ))
    }

    fn call(
        &self,
        cmd: libc::c_uint,
        key: Option<&str>,
        value: Option<&[u8]>,
        what: &str,
    ) -> Result<()> {
        self.raw(cmd, key, value)?
            .map_err(|e| self.explain(what, e))
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.call(FSCONFIG_SET_STRING, Some(key), Some(value), key)
    }
}

/// `redirect_dir=off` still *follows* redirects, which the kernel refuses together with
/// `userxattr`; `nofollow` neither creates nor follows them, and our layers never hold any.
fn redirect_dir(userxattr: bool) -> &'static [u8] {
    if userxattr {
        b"nofollow"
    } else {
        b"off"
    }
}

/// Why the new mount API did not mount.
enum NewApiError {
    /// `fsopen` failed (ENOSYS on old kernels, or ENODEV/EPERM), or the kernel does not know
    /// `lowerdir+` (EINVAL, before 6.8): the classic option string may still work.
    Unsupported(std::io::Error),
    /// A real mount error.
    Failed(Error),
}

impl From<Error> for NewApiError {
    fn from(e: Error) -> Self {
        NewApiError::Failed(e)
    }
}

fn mount_new_api(spec: &MountSpec<'_>, userxattr: bool) -> std::result::Result<(), NewApiError> {
    let ctx = FsContext::open().map_err(NewApiError::Unsupported)?;
    {
        ctx.set("source", b"cachedriver")?;
        for l in &spec.lowers {
            match ctx.raw(
                FSCONFIG_SET_STRING,
                Some("lowerdir+"),
                Some(l.as_os_str().as_bytes()),
            )? {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Err(NewApiError::Unsupported(e))
                }
                Err(e) => return Err(ctx.explain("lowerdir+", e).into()),
            }
        }
        ctx.set("upperdir", spec.upper.as_os_str().as_bytes())?;
        ctx.set("workdir", spec.work.as_os_str().as_bytes())?;
        ctx.set("index", b"off")?;
        ctx.set("redirect_dir", redirect_dir(userxattr))?;
        ctx.set("metacopy", b"off")?;
        if userxattr {
            ctx.call(FSCONFIG_SET_FLAG, Some("userxattr"), None, "userxattr")?;
        }
        ctx.call(FSCONFIG_CMD_CREATE, None, None, "creating the overlay")?;
        // SAFETY: plain syscall on an fd we own.
        let mfd =
            unsafe { libc::syscall(libc::SYS_fsmount, ctx.fd.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
        if mfd < 0 {
            return Err(NewApiError::Failed(Error::Backend(format!(
                "overlay mount: fsmount: {}",
                std::io::Error::last_os_error()
            ))));
        }
        // SAFETY: fsmount returned a fresh fd.
        let mfd = unsafe { OwnedFd::from_raw_fd(mfd as i32) };
        let target = cstr(spec.target.as_os_str().as_bytes())?;
        // SAFETY: valid fd and NUL-terminated strings.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mfd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if r < 0 {
            return Err(NewApiError::Failed(Error::Backend(format!(
                "overlay mount: attaching at {}: {}",
                spec.target.display(),
                std::io::Error::last_os_error()
            ))));
        }
        Ok(())
    }
}

/// mount(2) with the classic option string: one page at most, so about 60 layers.
fn mount_classic(spec: &MountSpec<'_>, userxattr: bool) -> Result<()> {
    let mut lower = Vec::new();
    for (i, l) in spec.lowers.iter().enumerate() {
        let b = l.as_os_str().as_bytes();
        if b.iter().any(|c| matches!(c, b':' | b',' | b'\\')) {
            return Err(Error::Backend(format!(
                "overlay mount: layer path {} contains ':', ',' or '\\', which the classic mount options cannot express",
                l.display()
            )));
        }
        if i > 0 {
            lower.push(b':');
        }
        lower.extend_from_slice(b);
    }
    let mut opts = b"lowerdir=".to_vec();
    opts.extend_from_slice(&lower);
    opts.extend_from_slice(b",upperdir=");
    opts.extend_from_slice(spec.upper.as_os_str().as_bytes());
    opts.extend_from_slice(b",workdir=");
    opts.extend_from_slice(spec.work.as_os_str().as_bytes());
    opts.extend_from_slice(b",index=off,metacopy=off,redirect_dir=");
    opts.extend_from_slice(redirect_dir(userxattr));
    if userxattr {
        opts.extend_from_slice(b",userxattr");
    }
    if opts.len() >= 4096 {
        return Err(Error::Backend(format!(
            "overlay mount: {} layers do not fit in one page of mount options and this kernel lacks lowerdir+ (needs Linux 6.8); compact the cache",
            spec.lowers.len()
        )));
    }
    let data = cstr(&opts)?;
    nix::mount::mount(
        Some("cachedriver"),
        spec.target,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_c_str()),
    )
    .map_err(|e| Error::Backend(format!("overlay mount at {}: {e}", spec.target.display())))
}

impl Backend for Kernel {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn mount(&self, spec: &MountSpec<'_>) -> Result<Mounted> {
        let userxattr = spec.xattr == XattrNs::User;
        match mount_new_api(spec, userxattr) {
            Ok(()) => Ok(Mounted::default()),
            Err(NewApiError::Failed(e)) => Err(e),
            Err(NewApiError::Unsupported(e))
                if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) =>
            {
                tracing::info!(error = %e, "no fsopen/lowerdir+ here; using the classic option string");
                mount_classic(spec, userxattr).map(|()| Mounted::default())
            }
            Err(NewApiError::Unsupported(e)) => Err(Error::Backend(format!(
                "overlay mount: fsopen(\"overlay\"): {e}{}",
                match e.raw_os_error() {
                    Some(libc::ENODEV) =>
                        " (overlayfs is not available: `modprobe overlay`, or use --backend fuse)",
                    Some(libc::EPERM) => " (no CAP_SYS_ADMIN here: use --backend fuse)",
                    _ => "",
                }
            ))),
        }
    }

    fn unmount(&self, target: &Path, _pid: Option<i32>) -> Result<()> {
        unmount_path(target)
    }

    fn is_mounted(&self, target: &Path) -> bool {
        crate::fsutil::mount_fstype(target).as_deref() == Some("overlay")
    }
}
