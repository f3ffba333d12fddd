#!/usr/bin/env bash
# The whole test suite on a fresh Debian host, as root: installs what it needs (docker.io, podman,
# fuse3, fuse-overlayfs, busybox-static), then runs unit, integration, conformance (kernel and
# FUSE backends), crash (failpoints), full-disk, stress and protocol-fuzz tests, and end-to-end
# tests against a real dockerd the tests start themselves.
# Set CACHEDRIVER_REQUIRE_ALL=1 (CI=true does) to turn every "cannot run here" skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: the tests mount filesystems and start dockerd: run as root (sudo $0)" >&2
  exit 1
fi
bash scripts/install-deps.sh
if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
  export CACHEDRIVER_REQUIRE_ALL=1
fi
# Failpoints built in: tests/crash.rs drives every failpoint!() of src/ through the real binary (the
# failpoints stay inert unless FAILPOINTS is set, so every other test runs the same code).
features=(--features cachedriver/failpoints)
cargo build --workspace --bins "${features[@]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast "${features[@]}" -- --test-threads="${TEST_THREADS:-4}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every runner (libtest's "test result:" lines and the e2e harness's own).
awk '
  /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  /^e2e: [0-9]+ passed, [0-9]+ failed/ { p += $2; f += $4 }
  END { printf "total: %d passed, %d failed\n", p, f }
' "$log"
exit "$status"
