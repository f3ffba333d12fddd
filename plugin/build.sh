#!/usr/bin/env bash
# Builds cachedriver's Docker managed plugin offline and registers it with `docker plugin create`.
#
#   bash plugin/build.sh [NAME]        # default NAME: cachedriver; then: docker plugin enable NAME
#
# The rootfs holds our binary and exactly the shared libraries it links (found with ldd), so no
# image registry is needed. CACHEDRIVER_BIN=PATH uses an already built binary instead of
# `cargo build --release` (the tests pass their debug build). The docker CLI talks to whatever
# DOCKER_HOST names. The plugin is created disabled: `docker plugin set` works only then.
set -euo pipefail
name="${1:-cachedriver}"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
if [ -n "${CACHEDRIVER_BIN:-}" ]; then
  bin="$CACHEDRIVER_BIN"
else
  (cd "$repo" && cargo build --release --bin cachedriver)
  bin="${CARGO_TARGET_DIR:-$repo/target}/release/cachedriver"
fi
[ -x "$bin" ] || { echo "plugin/build.sh: no executable at $bin" >&2; exit 1; }
command -v docker >/dev/null || { echo "plugin/build.sh: the docker CLI is needed for 'docker plugin create'" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{usr/bin,dev,proc,sys,tmp,etc,mnt/cache,run/docker/plugins,var/run}
chmod 1777 "$rootfs/tmp"
install -m 0755 "$bin" "$rootfs/usr/bin/cachedriver"
ln -s cachedriver "$rootfs/usr/bin/cachedriver-fuse"
# Every library the binary links, at the path ldd resolved it to, plus the dynamic loader.
ldd "$bin" | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+ \(/ { print $1 }' | sort -u | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
# fusermount3 is only a fallback for unmounting FUSE views; take it if the host has it.
if fm=$(command -v fusermount3); then
  install -m 0755 "$fm" "$rootfs/usr/bin/fusermount3"
fi
echo "root:x:0:0:root:/:/bin/false" > "$rootfs/etc/passwd"
echo "root:x:0:" > "$rootfs/etc/group"
cp "$here/config.json" "$work/config.json"
docker plugin rm -f "$name" >/dev/null 2>&1 || true
docker plugin create "$name" "$work"
echo "plugin/build.sh: created plugin $name (disabled); enable it with: docker plugin enable $name" >&2
