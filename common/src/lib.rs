//! cachedriver-common: the helpers both the plugin (`cachedriver`) and the FUSE union filesystem
//! (`cachedriver-fuse`) need, each kept in one place.
//!
//! - [`at`]: the `*at` syscall wrappers (never following a final symlink), fd and xattr calls.
//! - [`dir`]: a directory's entries through a descriptor, names as bytes.
//! - [`mounts`]: this namespace's mount table (`/proc/self/mountinfo`).
//! - [`userns`]: whether we run inside a user namespace.
//! - [`xattr`]: which xattr namespace overlay markers use, and reading the opaque marker.
//! - [`tree`]: removing and walking container-written trees without following symlinks, with
//!   O(1) descriptors and no call recursion.
//! - [`rlimit`]: raising RLIMIT_NOFILE at startup.

pub mod at;
pub mod dir;
pub mod mounts;
pub mod rlimit;
pub mod tree;
pub mod userns;
pub mod xattr;

pub use xattr::XattrNs;
