//! The `cachedriver` binary: `serve`, `probe`, `ls`, and `fuse` (the union filesystem with the
//! fuse-overlayfs command line, which the FUSE backend starts once per session).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `fuse` takes fuse-overlayfs's own command line, so it bypasses clap.
    if args.get(1).is_some_and(|a| a == "fuse") {
        let code = cachedriver_fuse::cli_main(args[2..].to_vec());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    match cachedriver::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cachedriver: {e:#}");
            ExitCode::FAILURE
        }
    }
}
