//! Crash-test failpoints. Built in only with `--features failpoints`; otherwise every
//! [`crate::failpoint!`] compiles to nothing.
//!
//! A failpoint is configured through the `FAILPOINTS` environment variable of the process
//! (`FAILPOINTS='commit::before_state=return'`), read once at startup by [`setup`]:
//! - `return` makes the step fail with [`crate::error::Error::Failpoint`] (error injection);
//! - `return(abort)` kills the process on the spot, as `kill -9` would: no unwinding, no
//!   destructors, no cleanup (crash injection).

/// Fails or aborts at a named step when that failpoint is configured (see the module doc).
/// Use inside a function returning `crate::error::Result<_>`.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        fail::fail_point!($name, |arg: Option<String>| {
            if arg.as_deref() == Some("abort") {
                $crate::failpoint::abort_now($name);
            }
            Err($crate::error::Error::Failpoint($name))
        })
    };
}

/// Ends the process at once, like `kill -9`: nothing is flushed, unmounted or removed.
pub fn abort_now(name: &str) -> ! {
    // SAFETY: _exit takes no pointers; the message goes through a raw write so no lock is taken.
    let msg = format!("cachedriver: failpoint {name}: aborting\n");
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(137)
    }
}

/// Reads `FAILPOINTS` from the environment (a no-op without the `failpoints` feature). Call once
/// at startup of a long-running command; keep the returned guard alive for the process.
pub fn setup() -> Option<fail::FailScenario<'static>> {
    if cfg!(feature = "failpoints") && std::env::var_os("FAILPOINTS").is_some() {
        tracing::warn!("failpoints configured from FAILPOINTS: this is a crash-test build");
        Some(fail::FailScenario::setup())
    } else {
        None
    }
}
