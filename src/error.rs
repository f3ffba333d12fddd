//! The plugin's error type. Every message is written for the person who reads it in `docker run`
//! output: it says what was wrong and, where there is one, the fix.

use std::path::PathBuf;

/// Errors from the store, the backends and the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A volume, cache, session or layer name that cannot become a path.
    #[error("{0}")]
    InvalidName(String),
    /// A `-o` option we do not know or whose value is wrong.
    #[error("{0}")]
    InvalidOption(String),
    /// The request body was not what the protocol says.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The volume is not in the registry.
    #[error("no such volume: {0:?} (create it with `docker volume create --driver cachedriver {0}` or use it in `docker run -v`)")]
    NoSuchVolume(String),
    /// Unmount for an ID that holds no mount of the volume.
    #[error("volume {volume:?} is not mounted by ID {id:?}")]
    NotMounted { volume: String, id: String },
    /// Remove of a volume that is still mounted.
    #[error(
        "volume {volume:?} is in use by {mounts} mount(s); stop the container(s) using it first"
    )]
    InUse { volume: String, mounts: u32 },
    /// A name or session clash with an existing volume.
    #[error("{0}")]
    Conflict(String),
    /// On-disk state that does not make sense.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A backend failed to mount or unmount.
    #[error("{0}")]
    Backend(String),
    /// A registry, its credentials or what it sent were not usable (push/pull, issue 16).
    #[error("{0}")]
    Remote(String),
    /// A crash-test failpoint fired (only in `--features failpoints` builds).
    #[error("failpoint {0} fired")]
    Failpoint(&'static str),
    /// An I/O error, with what we were doing and where.
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what we were doing and on which path.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds path context to `std::io::Result`s.
pub trait IoContext<T> {
    /// Turns an I/O error into [`Error::Io`] naming `context` and `path`.
    fn ctx(self, context: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(context, path, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(context, path, std::io::Error::from(e)))
    }
}
