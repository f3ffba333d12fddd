//! The e2e suite's engine pieces (tests/e2e: private dockerd, offline busybox image, the plugin
//! as a legacy Docker plugin, command helpers), compiled into a bench.

#[path = "../../tests/e2e/util.rs"]
pub mod util;

#[path = "../../tests/e2e/daemon.rs"]
pub mod daemon;

#[path = "../../tests/e2e/image.rs"]
pub mod image;

#[path = "../../tests/e2e/plugin.rs"]
pub mod plugin;
