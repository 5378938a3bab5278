#!/usr/bin/env bash
# Type-checks the `--features metal` build for Apple silicon (aarch64-apple-darwin) on Linux:
# `cargo clippy --all-targets -D warnings`, which compiles every Rust crate (candle's Metal backend
# and objc2-metal included) but links nothing, so it needs no macOS SDK. It cannot tell whether
# the binary links or runs on a Mac; nobody here can do that.
#   bash scripts/metal_check.sh
# Needs: `rustup target add aarch64-apple-darwin` (done here if missing) and clang (Debian's
# package) for the build scripts of the C dependencies (zstd, lz4, psm). Those compile against
# this machine's libc headers, only so that the build scripts succeed: the objects are never
# linked.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx aarch64-apple-darwin || rustup target add aarch64-apple-darwin
command -v clang >/dev/null || { echo "metal_check: clang not found (apt-get install clang)" >&2; exit 1; }
ar=$(command -v llvm-ar || ls /usr/bin/llvm-ar-* 2>/dev/null | head -1 || true)
[ -n "$ar" ] || { echo "metal_check: llvm-ar not found (it comes with Debian's llvm package)" >&2; exit 1; }
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
mkdir -p "$w/inc/gnu" && : > "$w/inc/gnu/stubs-32.h"
# glibc headers under an Apple target: undo clang's Apple nullability macros, which glibc also
# uses as a name, and give glibc the stub header its x86_64 check expects.
flags="--target=arm64-apple-macos11 -U__nonnull -U__nullable -U__null_unspecified -w"
inc="-isystem $w/inc -isystem /usr/include -isystem /usr/include/$(gcc -dumpmachine)"
printf '#!/bin/sh\nexec clang %s %s "$@"\n' "$flags" "$inc" > "$w/cc"
printf '#!/bin/sh\nexec clang++ %s %s "$@"\n' "$flags" "$inc" > "$w/cxx"
chmod +x "$w/cc" "$w/cxx"
CC_aarch64_apple_darwin="$w/cc" CXX_aarch64_apple_darwin="$w/cxx" AR_aarch64_apple_darwin="$ar" \
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/metal-check" \
  cargo clippy --all-targets --target aarch64-apple-darwin --features metal -- -D warnings
echo "metal_check: the metal build type-checks for aarch64-apple-darwin (not linked, not run)"
