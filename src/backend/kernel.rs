//! Kernel overlayfs through the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`),
//! with the classic mount(2) option string as the fallback.
//!
//! `lowerdir+` adds one layer per call, so chains are limited by the kernel's 500 layers rather
//! than by the one-page option string of mount(2). Kernels before 6.8 lack `lowerdir+`: 6.5-6.7
//! refuse it with EINVAL at `fsconfig`, and before 6.5 the legacy fs context accepts any option
//! and fails only at `FSCONFIG_CMD_CREATE` (EINVAL); both fall back to the classic string.
//! The classic string must fit in one page: when absolute layer paths do not, the mount is made
//! from inside the cache dir with layer paths relative to it, the way containerd does (a forked
//! child `chdir`s into `lower/<cache>` and calls mount(2)). Compaction keeps chains short enough
//! for that; a chain that does not fit even so fails with an error that says to compact.
//!
//! `fsconfig` also refuses string values over 255 bytes: a chain with a longer layer, upper or
//! work path takes the classic path too.
//!
//! `index=off,redirect_dir=off,metacopy=off` keep the upper dir valid as a lower layer later;
//! `userxattr` (with `redirect_dir=nofollow`) inside a user namespace.
//!
//! `CACHEDRIVER_KERNEL_MOUNT=auto|new|classic` (read at each mount; default `auto`): `new` uses
//! only the new API, `classic` only mount(2) with the option string (what kernels before 6.8
//! get; tests force it on newer kernels).

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
/// The longest string value `fsconfig` accepts (`strndup_user(value, 256)`).
const FSCONFIG_MAX_STRING: usize = 255;

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
    /// `FSCONFIG_CMD_CREATE` refused a configuration that used `lowerdir+` (EINVAL): a legacy
    /// context before 6.5, or a real error; the kernel's messages say which.
    CreateRefused(std::io::Error, String),
    /// A real mount error.
    Failed(Error),
}

impl From<Error> for NewApiError {
    fn from(e: Error) -> Self {
        NewApiError::Failed(e)
    }
}

fn mount_new_api(spec: &MountSpec<'_>, userxattr: bool) -> std::result::Result<(), NewApiError> {
    // fsconfig copies a string value of at most 256 bytes (NUL included) and answers EINVAL
    // beyond: such paths need the classic string, which takes relative layer paths.
    let too_long = spec
        .lowers
        .iter()
        .map(|l| l.as_os_str())
        .chain([spec.upper.as_os_str(), spec.work.as_os_str()])
        .any(|p| p.len() > FSCONFIG_MAX_STRING);
    if too_long {
        tracing::info!("a layer, upper or work path is longer than fsconfig takes");
        return Err(NewApiError::Unsupported(std::io::Error::from_raw_os_error(
            libc::EINVAL,
        )));
    }
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
        match ctx.raw(FSCONFIG_CMD_CREATE, None, None)? {
            Ok(()) => {}
            // Before 6.5 the legacy context took `lowerdir+` without a word and refuses it only
            // here; the classic string may work (a real EINVAL fails there again).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !spec.lowers.is_empty() => {
                return Err(NewApiError::CreateRefused(e, ctx.kernel_messages()));
            }
            Err(e) => return Err(ctx.explain("creating the overlay", e).into()),
        }
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

/// How the kernel backend mounts (`CACHEDRIVER_KERNEL_MOUNT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MountMode {
    /// The new API, falling back to the classic string where the kernel lacks `lowerdir+`.
    Auto,
    /// The new API only.
    New,
    /// The classic option string only.
    Classic,
}

/// The environment variable that picks the [`MountMode`].
pub const MOUNT_MODE_ENV: &str = "CACHEDRIVER_KERNEL_MOUNT";

fn mount_mode() -> Result<MountMode> {
    match std::env::var(MOUNT_MODE_ENV).as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(MountMode::Auto),
        Ok("new") => Ok(MountMode::New),
        Ok("classic") => Ok(MountMode::Classic),
        Ok(other) => Err(Error::Backend(format!(
            "{MOUNT_MODE_ENV}={other:?} is not a kernel mount mode: use auto, new or classic"
        ))),
    }
}

/// The most option bytes mount(2) copies: one page, its NUL terminator included.
fn page_limit() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize - 1
    } else {
        4095
    }
}

/// The classic option string with the given lower paths.
fn classic_options(lowers: &[&[u8]], spec: &MountSpec<'_>, userxattr: bool) -> Result<Vec<u8>> {
    let mut opts = b"lowerdir=".to_vec();
    for (i, l) in lowers.iter().enumerate() {
        if l.iter().any(|c| matches!(c, b':' | b',' | b'\\')) {
            return Err(Error::Backend(format!(
                "overlay mount: layer path {} contains ':', ',' or '\\', which the classic mount options cannot express",
                String::from_utf8_lossy(l)
            )));
        }
        if i > 0 {
            opts.push(b':');
        }
        opts.extend_from_slice(l);
    }
    opts.extend_from_slice(b",upperdir=");
    opts.extend_from_slice(spec.upper.as_os_str().as_bytes());
    opts.extend_from_slice(b",workdir=");
    opts.extend_from_slice(spec.work.as_os_str().as_bytes());
    opts.extend_from_slice(b",index=off,metacopy=off,redirect_dir=");
    opts.extend_from_slice(redirect_dir(userxattr));
    if userxattr {
        opts.extend_from_slice(b",userxattr");
    }
    Ok(opts)
}

/// mount(2) with the classic option string: absolute layer paths when they fit in one page,
/// else paths relative to the cache dir that holds every layer (mounted from inside it).
fn mount_classic(spec: &MountSpec<'_>, userxattr: bool) -> Result<()> {
    let limit = page_limit();
    let abs: Vec<&[u8]> = spec
        .lowers
        .iter()
        .map(|l| l.as_os_str().as_bytes())
        .collect();
    let opts = classic_options(&abs, spec, userxattr)?;
    if opts.len() <= limit {
        let data = cstr(&opts)?;
        return nix::mount::mount(
            Some("cachedriver"),
            spec.target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_c_str()),
        )
        .map_err(|e| Error::Backend(format!("overlay mount at {}: {e}", spec.target.display())));
    }
    // Every layer of a chain lives in its cache dir: name them relative to it.
    let base = spec.lowers.first().and_then(|l| l.parent());
    let rel: Option<Vec<&[u8]>> = base.and_then(|b| {
        spec.lowers
            .iter()
            .map(|l| {
                (l.parent() == Some(b))
                    .then(|| l.file_name().map(|n| n.as_bytes()))
                    .flatten()
            })
            .collect()
    });
    let (Some(base), Some(rel)) = (base, rel) else {
        return Err(Error::Backend(format!(
            "overlay mount: {} layers do not fit in one page of mount options ({} bytes) and are not all in one directory; \
             this kernel's mount needs the classic option string (lowerdir+ needs Linux 6.8)",
            spec.lowers.len(),
            opts.len()
        )));
    };
    let rel_opts = classic_options(&rel, spec, userxattr)?;
    if rel_opts.len() > limit {
        let cache = base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Err(Error::Backend(format!(
            "overlay mount: the {} layers of cache {cache:?} do not fit in one page of mount options even relative to {} \
             ({} bytes, at most {limit}), and this mount uses the classic option string (the kernel lacks lowerdir+, \
             needs Linux 6.8, or {MOUNT_MODE_ENV}=classic); compact the cache: `cachedriver compact {cache}`",
            spec.lowers.len(),
            base.display(),
            rel_opts.len()
        )));
    }
    if !spec.target.is_absolute() {
        return Err(Error::Backend(format!(
            "overlay mount: target {} must be an absolute path",
            spec.target.display()
        )));
    }
    tracing::debug!(base = %base.display(), layers = spec.lowers.len(), "classic overlay mount with relative layer paths");
    mount_from_dir(base, spec.target, &cstr(&rel_opts)?).map_err(|e| {
        Error::Backend(format!(
            "overlay mount at {} (layers relative to {}): {e}",
            spec.target.display(),
            base.display()
        ))
    })
}

/// Mounts overlay at `target` with `data` from a child process whose working directory is
/// `dir`, so relative paths in `data` resolve there (our own cwd never changes: other threads
/// use it). Everything the child touches is prepared before the fork; the child makes only
/// async-signal-safe syscalls and reports the errno as its exit status.
fn mount_from_dir(dir: &Path, target: &Path, data: &std::ffi::CStr) -> std::io::Result<()> {
    let to_c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let dir_c = to_c(dir)?;
    let target_c = to_c(target)?;
    let source = c"cachedriver";
    let fstype = c"overlay";
    // SAFETY: the child runs only chdir, mount and _exit (async-signal-safe) on memory set up
    // before the fork, then exits without returning into Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; errno is read through its thread-local location.
        unsafe {
            if libc::chdir(dir_c.as_ptr()) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            if libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            ) != 0
            {
                libc::_exit(*libc::__errno_location());
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            code => Err(std::io::Error::from_raw_os_error(code)),
        }
    } else {
        Err(std::io::Error::other("the mount helper process was killed"))
    }
}

impl Backend for Kernel {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn mount(&self, spec: &MountSpec<'_>) -> Result<Mounted> {
        let userxattr = spec.xattr == XattrNs::User;
        let mode = mount_mode()?;
        let done = |how: String| Mounted { pid: None, how };
        if mode == MountMode::Classic {
            return mount_classic(spec, userxattr).map(|()| {
                done(format!(
                    "classic mount(2) option string ({MOUNT_MODE_ENV}=classic)"
                ))
            });
        }
        match mount_new_api(spec, userxattr) {
            Ok(()) => Ok(done(
                "new mount API (fsopen/fsconfig, one lowerdir+ per layer)".into(),
            )),
            Err(NewApiError::Failed(e)) => Err(e),
            Err(NewApiError::CreateRefused(e, msgs)) => {
                let said = if msgs.is_empty() {
                    e.to_string()
                } else {
                    format!("{e} (kernel: {msgs})")
                };
                if mode == MountMode::New {
                    return Err(Error::Backend(format!(
                        "overlay mount: creating the overlay: {said}"
                    )));
                }
                tracing::info!(error = %said, "overlay creation refused after lowerdir+; trying the classic option string");
                mount_classic(spec, userxattr)
                    .map(|()| {
                        done(format!(
                            "classic mount(2) option string: the kernel accepted lowerdir+ but refused the overlay at creation ({said}; kernels before 6.5)"
                        ))
                    })
                    .map_err(|c| {
                        Error::Backend(format!("{c} (the new mount API said: creating the overlay: {said})"))
                    })
            }
            Err(NewApiError::Unsupported(e))
                if mode == MountMode::Auto
                    && matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) =>
            {
                tracing::info!(error = %e, "no fsopen/lowerdir+ here; using the classic option string");
                mount_classic(spec, userxattr)
                    .map(|()| {
                        done(format!(
                            "classic mount(2) option string: the new mount API refused lowerdir+ ({e}; needs Linux 6.8) or a layer path longer than fsconfig's 255 bytes"
                        ))
                    })
                    .map_err(|c| Error::Backend(format!("{c} (the new mount API said: {e})")))
            }
            Err(NewApiError::Unsupported(e))
                if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) =>
            {
                Err(Error::Backend(format!(
                    "overlay mount: {e}: this kernel lacks the new mount API or lowerdir+ (Linux 6.8) and {MOUNT_MODE_ENV}=new forbids the classic option string"
                )))
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
