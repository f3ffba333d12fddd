//! cachedriver: a Docker volume plugin that gives every container an isolated copy-on-write view
//! of a shared cache and commits the container's changes back into the cache when it stops.
//!
//! - [`names`]: volume names and options, validated before they become paths.
//! - [`state`], [`store`]: the on-disk layout, cache state and the volume registry.
//! - [`commit`]: O(1) promotion of a session's upper dir to a layer.
//! - [`backend`]: kernel overlayfs and the FUSE union filesystem behind one trait.
//! - [`driver`]: the one place where every state change happens.
//! - [`sessions`], [`recovery`]: who uses a session (from the kernel); orphaned sessions, startup
//!   recovery, the sweep.
//! - [`protocol`], [`server`]: the Docker VolumeDriver protocol over a unix socket.
//! - [`probe`], [`ls`]: what works on this host; what the store holds.

pub mod backend;
pub mod cli;
pub mod commit;
pub mod compact;
pub mod driver;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod ls;
pub mod names;
pub mod probe;
pub mod protocol;
pub mod recovery;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
