#!/usr/bin/env bash
# The aarch64 (NEON) kernels, tested where they run: src/weights/kernels/q4.rs compiled alone
# (it uses only std) for aarch64-unknown-linux-gnu and its unit tests run under qemu-aarch64,
# which checks that the NEON forms are bit-equal to the portable ones. Run by scripts/test.sh.
# Installs what it needs when missing: the Rust target (rustup), and qemu-user +
# gcc-aarch64-linux-gnu from the distribution's packages (apt). Fails if anything is wrong,
# except on a machine whose network cannot reach rustup's server for the aarch64 standard
# library: there it says NOT RUN, loudly, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
fail() { echo "cross test FAILED: $*" >&2; exit 1; }
target=aarch64-unknown-linux-gnu
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  if ! rustup target add "$target" >/dev/null 2>"${TMPDIR:-/tmp}/rustup-target.log"; then
    # The one case that does not fail the suite: a machine whose network does not reach
    # rustup's server cannot have the aarch64 standard library at all (CI machines reach
    # only the package registries). Said loudly; every other failure below fails.
    echo "cross test NOT RUN: rustup could not download the $target standard library" >&2
    echo "  ($(tail -1 "${TMPDIR:-/tmp}/rustup-target.log")); the NEON kernels were not tested here" >&2
    exit 0
  fi
fi
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  command -v apt-get >/dev/null || fail "qemu-aarch64 / aarch64-linux-gnu-gcc missing and no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null || fail "apt-get update failed"
  $SUDO apt-get install -y -qq --no-install-recommends qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    >/dev/null || fail "apt-get install qemu-user gcc-aarch64-linux-gnu failed"
fi
t=$(mktemp -d /tmp/moe-cross.XXXXXX)
trap 'rm -rf "$t"' EXIT
mkdir -p "$t/src"
cat > "$t/Cargo.toml" <<TOML
[package]
name = "q4-cross-test"
version = "0.0.0"
edition = "2021"
publish = false
[lib]
path = "src/lib.rs"
[workspace]
TOML
printf '#[path = "%s/src/weights/kernels/q4.rs"]\npub mod q4;\n' "$repo" > "$t/src/lib.rs"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# One test at a time: with several, the harness's progress dots land inside the line grepped
# for below (".kernel form under test: .neon" failed a run).
out=$(cd "$t" && CARGO_TARGET_DIR="$t/target" cargo test --quiet --target "$target" -- --nocapture --test-threads=1 2>&1) \
  || { echo "$out" >&2; fail "the aarch64 kernel tests failed"; }
echo "$out" | grep -q "kernel form under test: neon" || { echo "$out" >&2; fail "the NEON form did not run"; }
echo "$out" | grep -E "test result" >&2
echo "cross test: the NEON kernels are bit-equal to the portable ones under qemu-aarch64" >&2
