#!/usr/bin/env bash
# Builds cachedriver and serves it as a legacy Docker plugin (socket
# /run/docker/plugins/cachedriver.sock, store /var/lib/cachedriver). Extra arguments go to
# `cachedriver serve` (e.g. --backend fuse --commit merge). Run as root.
# Refuses to start when no Docker or Podman engine answers, saying how to start one
# (CACHEDRIVER_SKIP_ENGINE_CHECK=1 skips the check, e.g. to start the plugin before the engine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/run.sh: run as root (sudo $0); for rootless engines see the README, 'Rootless Podman' and 'Rootless Docker'" >&2
  exit 1
fi
if [ "${CACHEDRIVER_SKIP_ENGINE_CHECK:-}" != 1 ]; then
  engine=
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; fi
  if [ -z "$engine" ] && command -v podman >/dev/null && podman info >/dev/null 2>&1; then engine=podman; fi
  if [ -z "$engine" ]; then
    cat >&2 <<'MSG'
scripts/run.sh: no container engine answers here. Start one first:
  Docker:  sudo systemctl start docker      (or: sudo dockerd &)
  Podman:  nothing to start; install it (apt-get install podman) and name the plugin in
           /etc/containers/containers.conf, [engine.volume_plugins] cachedriver = "/run/docker/plugins/cachedriver.sock"
Or set CACHEDRIVER_SKIP_ENGINE_CHECK=1 to start the plugin anyway.
MSG
    exit 1
  fi
  echo "scripts/run.sh: found a running $engine engine" >&2
fi
bash scripts/install-deps.sh
cargo build --release --workspace --bins
install -m 0755 target/release/cachedriver target/release/cachedriver-fuse /usr/local/bin/
exec /usr/local/bin/cachedriver serve "$@"
