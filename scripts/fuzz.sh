#!/usr/bin/env bash
# The seeded fuzzers of tests/integration/fuzz.rs (safetensors headers, index files, traces), run
# longer than the test suite does: bash scripts/fuzz.sh [CASES_PER_TARGET] (default 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
MOE_FUZZ_CASES="${1:-20000}" cargo test --release --test integration fuzz:: -- --nocapture
