fn main() {
    std::process::exit(cachedriver_fuse::cli_main(
        std::env::args_os().skip(1).collect(),
    ));
}
