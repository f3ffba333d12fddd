//! Command line parsing, compatible with fuse-overlayfs and with mount(8) helpers:
//! `cachedriver-fuse [SOURCE] MOUNTPOINT -o lowerdir=A:B,upperdir=U,workdir=W[,...] [-f] [-d]`.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use crate::whiteout::XattrNs;

/// Errors in the command line; each prints as one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    /// An option we do not know.
    #[error("unknown option {0:?}")]
    Unknown(String),
    /// An option with a bad value.
    #[error("bad value for option {0}: {1:?}")]
    BadValue(&'static str, String),
    /// Missing positional mountpoint.
    #[error("no mountpoint given (usage: cachedriver-fuse [SOURCE] MOUNTPOINT -o lowerdir=A:B,upperdir=U,workdir=W)")]
    NoMountpoint,
    /// Too many positionals.
    #[error("unexpected argument {0:?}")]
    ExtraArg(String),
    /// lowerdir is required.
    #[error("lowerdir= is required")]
    NoLower,
    /// upperdir and workdir go together.
    #[error("upperdir= and workdir= must be given together")]
    UpperWithoutWork,
    /// `-o` at the end of the line.
    #[error("-o needs an argument")]
    MissingOptArg,
}

/// How to use FUSE passthrough for open files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// Try it, fall back silently when the kernel refuses.
    Auto,
    /// Try it, log loudly when refused.
    On,
    /// Never.
    Off,
}

/// Parsed options.
#[derive(Debug, Clone)]
pub struct Options {
    /// fsname shown in /proc/mounts.
    pub source: String,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    /// Upper layer (None: read-only mount).
    pub upper: Option<PathBuf>,
    /// Work dir on the upper's filesystem.
    pub work: Option<PathBuf>,
    /// Namespace of the opaque xattr we write (None: decide from the user namespace).
    pub xattr: Option<XattrNs>,
    /// Where to write our pid once the mount is ready.
    pub pidfile: Option<PathBuf>,
    /// Worker threads (None: default).
    pub threads: Option<usize>,
    /// Passthrough mode.
    pub passthrough: Passthrough,
    /// No-open mode (`noopen=on|off`; None: on unless `passthrough=on`).
    pub no_open: Option<bool>,
    /// Entry/attr cache TTL.
    pub timeout: Duration,
    /// Stay in the foreground.
    pub foreground: bool,
    /// Debug logging.
    pub debug: bool,
    /// Read-only requested (`ro`).
    pub read_only: bool,
    /// Options we accepted but ignore, to warn about.
    pub ignored: Vec<String>,
}

/// Generic mount(8) options accepted silently.
const GENERIC: &[&str] = &[
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "defaults",
    "sync",
    "async",
    "dirsync",
    "mand",
    "nomand",
    "silent",
    "loud",
    "nofail",
    "allow_other",
    "allow_root",
    "default_permissions",
    "iversion",
    "noiversion",
    "bind",
];

/// fuse-overlayfs options we accept but do not need (warned about).
const FUSE_OVERLAYFS_IGNORED: &[&str] = &[
    "squash_to_root",
    "squash_to_uid",
    "squash_to_gid",
    "static_nlink",
    "noacl",
    "fsync",
    "uidmapping",
    "gidmapping",
    "redirect_dir",
    "index",
    "metacopy",
    "plugins",
    "fast_ino",
    "volatile",
    "xino",
    "userxattr",
    "auto_unmount",
    "max_idle_threads",
    "clone_fd",
    "noxattrs",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "blksize",
    "max_read",
    "subtype",
    "fsname",
    "nfs_export",
    "debug",
];

/// Default cache TTL: layers are immutable and only we write the upper.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(86400);

fn split_paths(v: &[u8]) -> Vec<PathBuf> {
    // Colons separate layers; `\:` escapes a colon inside a path (as in overlayfs).
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut it = v.iter().peekable();
    while let Some(&b) = it.next() {
        match b {
            b'\\' if it.peek().is_some() => {
                if let Some(&n) = it.next() {
                    cur.push(n);
                }
            }
            b':' => out.push(PathBuf::from(OsString::from_vec(std::mem::take(&mut cur)))),
            _ => cur.push(b),
        }
    }
    out.push(PathBuf::from(OsString::from_vec(cur)));
    out.into_iter()
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// Splits one `-o` argument on commas (a `\,` stays a comma).
fn split_opts(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut it = s.iter().peekable();
    while let Some(&b) = it.next() {
        match b {
            b'\\' if it.peek() == Some(&&b',') => {
                cur.push(b',');
                it.next();
            }
            b',' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(b),
        }
    }
    out.push(cur);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

fn apply_opt(o: &mut Options, opt: &[u8]) -> Result<(), OptionError> {
    let text = String::from_utf8_lossy(opt).into_owned();
    let (key, val) = match opt.iter().position(|b| *b == b'=') {
        Some(i) => (&text[..i.min(text.len())], Some(&opt[i + 1..])),
        None => (text.as_str(), None),
    };
    let sval = || String::from_utf8_lossy(val.unwrap_or_default()).into_owned();
    match (key, val) {
        ("lowerdir", Some(v)) => o.lowers = split_paths(v),
        ("upperdir", Some(v)) => o.upper = Some(PathBuf::from(OsString::from_vec(v.to_vec()))),
        ("workdir", Some(v)) => o.work = Some(PathBuf::from(OsString::from_vec(v.to_vec()))),
        ("pidfile", Some(v)) => o.pidfile = Some(PathBuf::from(OsString::from_vec(v.to_vec()))),
        ("xattr", Some(_)) => {
            o.xattr = Some(match sval().as_str() {
                "trusted" => XattrNs::Trusted,
                "user" => XattrNs::User,
                other => return Err(OptionError::BadValue("xattr", other.into())),
            })
        }
        ("threads", Some(_)) => {
            let n: usize = sval()
                .parse()
                .map_err(|_| OptionError::BadValue("threads", sval()))?;
            if n == 0 || n > 256 {
                return Err(OptionError::BadValue("threads", sval()));
            }
            o.threads = Some(n);
        }
        ("passthrough", Some(_)) => {
            o.passthrough = match sval().as_str() {
                "auto" => Passthrough::Auto,
                "on" | "yes" | "true" => Passthrough::On,
                "off" | "no" | "false" => Passthrough::Off,
                other => return Err(OptionError::BadValue("passthrough", other.into())),
            }
        }
        ("noopen", Some(_)) => {
            o.no_open = match sval().as_str() {
                "auto" => None,
                "on" | "yes" | "true" => Some(true),
                "off" | "no" | "false" => Some(false),
                other => return Err(OptionError::BadValue("noopen", other.into())),
            }
        }
        ("timeout", Some(_)) => {
            let secs: f64 = sval()
                .parse()
                .map_err(|_| OptionError::BadValue("timeout", sval()))?;
            if !(0.0..=1e9).contains(&secs) {
                return Err(OptionError::BadValue("timeout", sval()));
            }
            o.timeout = Duration::from_secs_f64(secs);
        }
        ("ro", None) => o.read_only = true,
        // Generic options, some of which mount(8) passes with a value (user=NAME, ...).
        (k, _) if GENERIC.contains(&k) => {}
        (k, _) if k.starts_with("x-") || k.starts_with("comment=") => {}
        (k, _) if FUSE_OVERLAYFS_IGNORED.contains(&k) => o.ignored.push(text.clone()),
        // mount(8)/mount.fuse pass these with values; harmless.
        (
            "uid" | "gid" | "mode" | "rootmode" | "user_id" | "group_id" | "max_read" | "blksize",
            Some(_),
        ) => {}
        _ => return Err(OptionError::Unknown(text)),
    }
    Ok(())
}

/// Parses the argument list (without program name).
pub fn parse(args: &[OsString]) -> Result<Options, OptionError> {
    let mut o = Options {
        source: "overlay".into(),
        mountpoint: PathBuf::new(),
        lowers: Vec::new(),
        upper: None,
        work: None,
        xattr: None,
        pidfile: None,
        threads: None,
        passthrough: Passthrough::Auto,
        no_open: None,
        timeout: DEFAULT_TIMEOUT,
        foreground: false,
        debug: false,
        read_only: false,
        ignored: Vec::new(),
    };
    let mut positionals: Vec<OsString> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_bytes();
        if a == b"-o" {
            i += 1;
            let v = args.get(i).ok_or(OptionError::MissingOptArg)?;
            for opt in split_opts(v.as_bytes()) {
                apply_opt(&mut o, &opt)?;
            }
        } else if let Some(v) = a.strip_prefix(b"-o") {
            for opt in split_opts(v) {
                apply_opt(&mut o, &opt)?;
            }
        } else if a == b"-f" {
            o.foreground = true;
        } else if a == b"-d" || a == b"--debug" {
            o.debug = true;
            o.foreground = true;
        } else if a == b"-s" || a == b"-n" || a == b"-v" {
            // mount helpers pass -s (single thread) / -n (no mtab) / -v: harmless
        } else if a == b"--" {
            positionals.extend(args[i + 1..].iter().cloned());
            break;
        } else if a.starts_with(b"-") && a.len() > 1 {
            return Err(OptionError::Unknown(
                String::from_utf8_lossy(a).into_owned(),
            ));
        } else {
            positionals.push(args[i].clone());
        }
        i += 1;
    }
    match positionals.len() {
        0 => return Err(OptionError::NoMountpoint),
        1 => o.mountpoint = PathBuf::from(positionals.remove(0)),
        2 => {
            o.source = positionals[0].to_string_lossy().into_owned();
            o.mountpoint = PathBuf::from(positionals.remove(1));
        }
        _ => {
            return Err(OptionError::ExtraArg(
                positionals[2].to_string_lossy().into_owned(),
            ))
        }
    }
    if o.source.is_empty() || o.source.contains(',') {
        o.source = "overlay".into();
    }
    if o.lowers.is_empty() {
        return Err(OptionError::NoLower);
    }
    if o.upper.is_some() != o.work.is_some() {
        return Err(OptionError::UpperWithoutWork);
    }
    Ok(o)
}

/// Whether we run inside a user namespace (one home: `cachedriver_common::userns`).
pub use cachedriver_common::userns::in_user_namespace;

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn fuse_overlayfs_style() {
        let o = parse(&args(&[
            "-o",
            "lowerdir=/a:/b,upperdir=/u,workdir=/w",
            "/mnt",
        ]))
        .unwrap();
        assert_eq!(o.lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(o.upper, Some(PathBuf::from("/u")));
        assert_eq!(o.work, Some(PathBuf::from("/w")));
        assert_eq!(o.mountpoint, PathBuf::from("/mnt"));
        assert_eq!(o.source, "overlay");
        assert!(!o.foreground);
    }

    #[test]
    fn mount_helper_style() {
        let o = parse(&args(&[
            "myfs",
            "/mnt",
            "-o",
            "rw,nodev,relatime,x-foo=bar,lowerdir=/a",
            "-o",
            "threads=3,xattr=user,timeout=2.5,passthrough=off,pidfile=/p",
            "-f",
        ]))
        .unwrap();
        assert_eq!(o.source, "myfs");
        assert_eq!(o.threads, Some(3));
        assert_eq!(o.xattr, Some(XattrNs::User));
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert_eq!(o.passthrough, Passthrough::Off);
        assert_eq!(o.pidfile, Some(PathBuf::from("/p")));
        assert!(o.foreground);
        assert!(o.upper.is_none());
    }

    #[test]
    fn escapes_and_joined_o() {
        let o = parse(&args(&["-olowerdir=/a\\:b:/c", "/m", "-d"])).unwrap();
        assert_eq!(o.lowers, vec![PathBuf::from("/a:b"), PathBuf::from("/c")]);
        assert!(o.debug && o.foreground);
    }

    #[test]
    fn errors() {
        assert_eq!(parse(&args(&["/m"])).unwrap_err(), OptionError::NoLower);
        assert_eq!(
            parse(&args(&["-o", "lowerdir=/a"])).unwrap_err(),
            OptionError::NoMountpoint
        );
        assert_eq!(
            parse(&args(&["-o", "lowerdir=/a,upperdir=/u", "/m"])).unwrap_err(),
            OptionError::UpperWithoutWork
        );
        assert!(matches!(
            parse(&args(&["-o", "lowerdir=/a,bogus", "/m"])),
            Err(OptionError::Unknown(_))
        ));
        assert!(matches!(
            parse(&args(&["-o", "lowerdir=/a,xattr=foo", "/m"])),
            Err(OptionError::BadValue("xattr", _))
        ));
        assert!(matches!(
            parse(&args(&["-o", "lowerdir=/a,threads=0", "/m"])),
            Err(OptionError::BadValue("threads", _))
        ));
    }

    #[test]
    fn ignored_fuse_overlayfs_options_are_noted() {
        let o = parse(&args(&["-o", "lowerdir=/a,squash_to_root", "/m"])).unwrap();
        assert_eq!(o.ignored, vec!["squash_to_root".to_string()]);
    }
}
