//! cachedriver: a Docker volume plugin that gives every container an isolated copy-on-write view
//! of a shared cache and commits the container's changes back into the cache when it stops.
//!
//! - [`names`]: volume names and options, validated before they become paths.
//! - [`perms`]: every store dir root-only.
//! - [`state`], [`store`]: the on-disk layout, cache state and the volume registry.
//! - [`commit`]: O(1) promotion of a session's upper dir to a layer.
//! - [`backend`]: kernel overlayfs and the FUSE union filesystem behind one trait.
//! - [`driver`]: the one place where every state change happens.
//! - [`sessions`], [`recovery`]: who uses a session (from the kernel); orphaned sessions, startup
//!   recovery, the sweep.
//! - [`protocol`], [`server`]: the Docker VolumeDriver protocol over a unix socket.
//! - [`probe`], [`ls`]: what works on this host; what the store holds.
//! - [`gc`], [`budget`], [`maintenance`]: garbage collection, the disk budget, and the
//!   background worker that runs them with compaction ([`compact`]).

pub mod backend;
pub mod budget;
pub mod cli;
pub mod commit;
pub mod compact;
pub mod driver;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod gc;
pub mod init;
pub mod ls;
pub mod maint_cli;
pub mod maintenance;
pub mod metrics;
pub mod names;
pub mod perms;
pub mod policy;
pub mod preflight;
pub mod probe;
pub mod progress;
pub mod protocol;
pub mod recovery;
pub mod remote;
pub mod scope;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
