//! PID 1 duties. Inside the managed plugin's container `serve` is process 1, so every FUSE
//! server it starts (they daemonize: double fork) is re-parented to it when it exits and would
//! stay a zombie. As process 1 we therefore fork once, like `tini`: the parent only reaps every
//! child and forwards SIGTERM/SIGINT/SIGHUP to the server, and exits with the server's status.

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, ForkResult, Pid};

/// Returns at once unless this process is PID 1; as PID 1 it forks, returns in the child (which
/// goes on to serve) and never returns in the parent. Call before any thread is started.
pub fn reap_as_pid1() -> anyhow::Result<()> {
    if getpid() != Pid::from_raw(1) {
        return Ok(());
    }
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set.thread_block()?;
    // SAFETY: single-threaded here (called before the runtime or any worker starts).
    match unsafe { fork() }? {
        ForkResult::Child => {
            set.thread_unblock()?;
            Ok(())
        }
        ForkResult::Parent { child } => {
            let code = supervise(child, &set);
            std::process::exit(code)
        }
    }
}

fn supervise(server: Pid, set: &SigSet) -> i32 {
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == server => return code,
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == server => {
                        return 128 + sig as i32
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => continue,
                }
            },
            Ok(sig) => {
                let _ = kill(server, sig);
            }
            Err(_) => {}
        }
    }
}
