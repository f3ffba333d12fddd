#!/usr/bin/env bash
# Installs what cachedriver's build, tests and benchmarks need on a fresh Debian host (idempotent).
set -euo pipefail
pkgs=(docker.io podman fuse3 fuse-overlayfs busybox-static util-linux mount e2fsprogs kmod iproute2 uidmap slirp4netns rootlesskit docker-registry apache2-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
modprobe overlay 2>/dev/null || true
modprobe fuse 2>/dev/null || true
# allow_other for non-root FUSE users (rootless hosts); harmless for root.
if [ -f /etc/fuse.conf ] && ! grep -q '^user_allow_other' /etc/fuse.conf; then
  echo user_allow_other >> /etc/fuse.conf
fi
