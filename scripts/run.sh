#!/usr/bin/env bash
# Builds cachedriver and serves it as a legacy Docker plugin (socket
# /run/docker/plugins/cachedriver.sock, store /var/lib/cachedriver). Extra arguments go to
# `cachedriver serve` (e.g. --backend fuse --commit merge). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
install -m 0755 target/release/cachedriver target/release/cachedriver-fuse /usr/local/bin/
exec /usr/local/bin/cachedriver serve "$@"
