#!/usr/bin/env bash
# make test-arm: cross-compile the test suite and run it under qemu-user for
# ARMv6 (the Pi Zero/Pi 1 CPU, arm1176: an ARMv7 binary dies there with
# "Illegal instruction", so this proves the v6 build is one), ARMv7 and
# arm64; then the end-to-end test with the real chatd, chatgw and chatctl
# binaries once under qemu-aarch64 (through binfmt_misc).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
[ -e /usr/sbin/update-binfmts ] || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test-arm: missing Debian packages: ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Tests that start other programs (the permission tests re-run the test
# binary as another user; the end-to-end tests run the real binaries) need
# the kernel to run ARM binaries through qemu: register binfmt_misc.
if [ "$(id -u)" = 0 ]; then
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc none /proc/sys/fs/binfmt_misc
  for f in qemu-aarch64 qemu-arm; do
    [ -e /proc/sys/fs/binfmt_misc/$f ] || update-binfmts --enable $f >/dev/null 2>&1 || true
  done
fi

# Packages whose tests spawn the project's binaries run once, below. The
# manual pages' test (it reads --help), the board's host side (skipped
# without a board) and the benchmark suite (it builds and runs host tools)
# depend on no architecture.
pkgs=$(go list ./... | grep -v -e '/cmd/chatd$' -e '/cmd/chatgw$' -e '/docs/man$' -e '/build/board$' -e '/bench$' -e '/cluster$' -e '/internal/natstest$')
export CGO_ENABLED=0
export CHATD_REQUIRE_MOSQUITTO=${CHATD_REQUIRE_MOSQUITTO:-0}
export CHATD_REQUIRE_INTEROP=${CHATD_REQUIRE_INTEROP:-0}

run() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name"
  "$@"
  echo "== $name: passed in $((SECONDS - start))s"
}

# -short: the fleet-sized tests (thousands of reconnects, hundreds of
# devices kicked at once, long random sequences) run with small fleets
# under emulation; they test the pattern, which the native run does at size.
run "arm64 (qemu-aarch64)" env GOARCH=arm64 go test -short -count=1 -exec qemu-aarch64-static $pkgs
run "armv7 (qemu-arm, cortex-a7)" env GOARCH=arm GOARM=7 go test -short -count=1 -exec 'qemu-arm-static -cpu cortex-a7' $pkgs
run "armv6 (qemu-arm, arm1176)" env GOARCH=arm GOARM=6 go test -short -count=1 -exec 'qemu-arm-static -cpu arm1176' $pkgs

# The ARMv6 check above means something only if an ARMv7 binary fails on
# that CPU: show it does.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
GOARCH=arm GOARM=7 go build -o "$tmp/v7" ./cmd/chatctl
if qemu-arm-static -cpu arm1176 "$tmp/v7" --version >/dev/null 2>&1; then
  echo "test-arm: an ARMv7 binary ran on the arm1176 CPU model; the ARMv6 run proves nothing" >&2
  exit 1
fi
echo "== armv6 control: an ARMv7 build fails on arm1176, as it must"

# End to end under arm64: the real binaries are built for arm64 by the test
# and run through binfmt_misc.
if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  run "end to end, arm64 binaries (binfmt)" env GOARCH=arm64 go test -count=1 -exec qemu-aarch64-static ./cmd/chatd -run 'TestE2EEmbedded'
else
  echo "test-arm: binfmt_misc has no qemu-aarch64 entry (needs root); skipped the arm64 end-to-end run" >&2
  exit 1
fi
