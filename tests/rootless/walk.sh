#!/usr/bin/env bash
# The seed walkthrough under a ROOTLESS engine, run as an unprivileged user by tests/rootless.rs.
#   walk.sh ENGINE BACKEND BIN IMAGE_TAR
# ENGINE: podman (rootless Podman; the plugin runs in Podman's user+mount namespace through
# `podman unshare`) or docker (rootless Docker from dockerd-rootless.sh; the plugin runs in
# rootlesskit's namespaces through nsenter and binds its socket at /run/docker/plugins inside
# them, where dockerd 20.10 looks). Prints "WALK OK" at the end; any failed check exits non-zero.
set -euo pipefail
engine=$1 backend=$2 bin=$3 image_tar=$4
export XDG_RUNTIME_DIR=/run/user/$(id -u)
export PATH=/usr/share/docker.io/contrib:/usr/sbin:/usr/bin:/sbin:/bin
cd ~
root=~/.local/share/cachedriver-$engine-$backend
name=cdrl
fail() { echo "WALK FAILED: $*" >&2; tail -20 ~/plugin-$engine-$backend.log >&2 || true; exit 1; }
plugin_pid=

case $engine in
podman)
  mkdir -p ~/.config/containers
  sock=$XDG_RUNTIME_DIR/$name.sock
  printf '[engine.volume_plugins]\n%s = "%s"\n' "$name" "$sock" > ~/.config/containers/containers.conf
  E() { podman "$@"; }
  E image exists localhost/bb:1 || E import "$image_tar" localhost/bb:1 >/dev/null
  image=localhost/bb:1
  podman unshare "$bin" serve --backend "$backend" --root "$root" --socket "$sock" --commit replace \
    >~/plugin-$engine-$backend.log 2>&1 &
  plugin_pid=$!
  vol() { E volume create --driver $name "$1" >/dev/null; echo "-v $1:/cache"; }
  ;;
docker)
  export DOCKER_HOST=unix://$XDG_RUNTIME_DIR/docker.sock
  if ! docker info >/dev/null 2>&1; then
    dockerd-rootless.sh --data-root ~/.local/share/docker >~/dockerd.log 2>&1 &
    for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 ~/dockerd.log >&2; fail "rootless dockerd did not start"; }
  fi
  E() { docker "$@"; }
  docker image inspect bb:1 >/dev/null 2>&1 || docker import "$image_tar" bb:1 >/dev/null
  image=bb:1
  dpid=$(pgrep -u "$(id -u)" -x dockerd)
  sock=/run/docker/plugins/$name.sock
  nsenter -U --preserve-credentials -m -t "$dpid" "$bin" serve --backend "$backend" --root "$root" \
    --socket "$sock" --commit replace >~/plugin-$engine-$backend.log 2>&1 &
  plugin_pid=$!
  vol() { echo "--volume-driver $name -v $1:/cache"; }
  ;;
*) fail "unknown engine $engine" ;;
esac
cleanup() {
  E rm -f -t 2 w-one w-two >/dev/null 2>&1 || true
  for v in foo-one foo-two foo-three foo-four; do E volume rm -f $v >/dev/null 2>&1 || true; done
  # the server itself, not only the `podman unshare`/nsenter wrapper; then wait for its exit
  pkill -TERM -u "$(id -u)" -f -- "--root $root " 2>/dev/null || true
  for _ in $(seq 1 50); do pgrep -u "$(id -u)" -f -- "--root $root " >/dev/null || break; sleep 0.1; done
  [ -n "$plugin_pid" ] && kill "$plugin_pid" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do grep -q serving ~/plugin-$engine-$backend.log 2>/dev/null && break; sleep 0.1; done
grep -q serving ~/plugin-$engine-$backend.log || fail "the plugin did not start"

latest() { sed -n 's/.*"latest": "\([^"]*\)".*/\1/p' "$root/lower/foo/cache-state.json" | head -1; }
run() { E run --rm --network none $(vol "$1") "$image" sh -c "$2"; }
sleeper='trap "exit 0" TERM; sleep 600 & wait'

E run -d --name w-one --network none $(vol foo-one) "$image" sh -c "echo one > /cache/one.txt; $sleeper" >/dev/null
E run -d --name w-two --network none $(vol foo-two) "$image" sh -c "echo two > /cache/two.txt; $sleeper" >/dev/null
sleep 1
E exec w-one ls /cache | grep -qx one.txt || fail "foo-one does not see its own file"
E exec w-one ls /cache | grep -qx two.txt && fail "foo-one sees foo-two's file while both run"
[ "$(latest)" = 0 ] || fail "latest before any commit is $(latest), not 0"
E stop -t 5 w-one >/dev/null; E rm w-one >/dev/null
[ "$(latest)" = one ] || fail "after foo-one stopped latest is $(latest), not one"
out=$(run foo-three 'ls /cache')
echo "$out" | grep -qx one.txt || fail "foo-three does not see one.txt: $out"
echo "$out" | grep -qx two.txt && fail "foo-three sees two.txt while foo-two runs"
E stop -t 5 w-two >/dev/null; E rm w-two >/dev/null
[ "$(latest)" = two ] || fail "after foo-two stopped (replace) latest is $(latest), not two"
out=$(run foo-four 'ls /cache')
echo "$out" | grep -qx two.txt || fail "foo-four does not see two.txt: $out"
echo "$out" | grep -qx one.txt && fail "foo-four sees one.txt although foo-two replaced it"
status=$(E volume inspect foo-four --format '{{json .Status}}')
echo "$status" | grep -q "\"backend\":\"$backend\"" || fail "volume inspect: $status"
grep -q '"xattr": "user"' "$root/lower/foo/cache-state.json" || fail "layers do not use user.overlay.* markers"
echo "WALK OK ($engine, $backend)"
