//! Support modules of the end-to-end suite (`tests/e2e_docker.rs`).
//!
//! - [`util`]: commands with timeouts, signals, pid files, mounts, diffs.
//! - [`daemon`]: the private dockerd.
//! - [`image`]: the offline busybox test image.
//! - [`plugin`]: `cachedriver serve` as a legacy plugin.
//! - [`harness`]: preconditions, per-run setup/teardown, per-scenario [`harness::Scope`].
//! - scenarios: [`walkthrough`], [`parity`], [`restart`], [`sessions`], [`podman`], [`managed`],
//!   [`policy`], [`scopes`], [`store_perms`], [`orphans`].

pub mod daemon;
pub mod harness;
pub mod image;
pub mod managed;
pub mod orphans;
pub mod parity;
pub mod plugin;
pub mod podman;
pub mod policy;
pub mod restart;
pub mod scopes;
pub mod sessions;
pub mod store_perms;
pub mod util;
pub mod walkthrough;

pub use harness::Harness;
