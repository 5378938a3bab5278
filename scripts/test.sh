#!/usr/bin/env bash
# The test command of the README: installs what the tests need on a fresh machine, then runs them.
#   bash scripts/test.sh            (CI runs exactly this through .ci/run)
# Rust: the toolchain must exist (rustup). Python: the notebook test needs jupyter + polars +
# matplotlib; they come from PyPI (scripts/requirements-test.txt) and are installed if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import polars, matplotlib, nbconvert, nbformat, ipykernel" 2>/dev/null; then
  python3 -m pip install -q -r scripts/requirements-test.txt
fi
# Every CUDA source the engine compiles with NVRTC at run time compiles, with the kernels it
# looks up (NVRTC from PyPI; no GPU needed).
python3 scripts/nvrtc_check.py
cargo test --all-targets "$@"
# The real-Slurm test of `harness slurm` (a one-node Slurm started here; see the script).
bash scripts/slurm_test.sh "${CARGO_TARGET_DIR:-target}/debug/harness"
# The aarch64 NEON kernels, bit-equal to the portable ones, under qemu (see the script).
bash scripts/cross_test.sh
