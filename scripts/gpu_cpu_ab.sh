#!/usr/bin/env bash
# An A/B of one CPU A/B knob on the GPU machine's host, the GPU hidden: `harness bench --device
# cpu` on the MLX 4-bit synth of the CPU-bench shape with the environment setting AB_ENV (e.g.
# HARNESS_HOST_QKV=0, the form before a change) and without it, in turn (A first in odd rounds, B
# first in even ones), ROUNDS rounds (default 4) at each of THREADS (default "1 4 16"), kernel
# kind KIND (default int8x2); then one `--profile` run of the default form at the largest thread
# count. Writes every bench output and OUT/ab.md: per round the pair's prefill and decode tok/s
# and their ratio (default ÷ AB_ENV), and per thread count the ratios' medians.
# Needs ./harness or .gpu/harness.xz (scripts/gpu_binary.sh; a CPU-only build will do).
# Usage (device call): AB_ENV=HARNESS_HOST_QKV=0 bash scripts/gpu_call.sh NAME scripts/gpu_cpu_ab.sh
set -u
O=${1:-/tmp/gpu_cpu_ab}; mkdir -p "$O"
AB_ENV=${AB_ENV:?AB_ENV: the setting of the A form, e.g. HARNESS_HOST_QKV=0}
source scripts/gpu_binary.sh
cfg=experiments/configs/glm4-moe-cpu-bench.json
[ -d /tmp/cb4 ] || ./harness synth --config $cfg --layout mlx4 --out /tmp/cb4 >> "$O/log.txt" 2>&1
THREADS=${THREADS:-"1 4 16"}; KIND=${KIND:-int8x2}
{ lscpu | grep -m1 "Model name"; echo "cores: $(nproc)"; echo "A: $AB_ENV, B: default";
  echo "binary sha256 $(sha256sum harness | cut -c1-16)"; date -u; } > "$O/machine.txt"
bench() {  # $1 label, $2 threads, $3 round, then env assignments
  local label=$1 t=$2 r=$3; shift 3
  env "$@" CUDA_VISIBLE_DEVICES= timeout 120 ./harness bench --model /tmp/cb4 --device cpu --policy lru \
    --capacity 64 --prompts 3 --prompt-len 16 --tokens 64 --threads "$t" --kernels "$KIND" \
    > "$O/${label}_t${t}_r$r.txt" 2>&1
}
# A then B in odd rounds, B then A in even ones: a host that runs the second of two runs faster
# (or slower) then tilts no ratio's median.
for r in $(seq "${ROUNDS:-4}"); do
  for t in $THREADS; do
    if [ $((r % 2)) = 1 ]; then
      bench A "$t" "$r" "$AB_ENV"; bench B "$t" "$r" AB_NONE=1
    else
      bench B "$t" "$r" AB_NONE=1; bench A "$t" "$r" "$AB_ENV"
    fi
  done
done
last=${THREADS##* }
CUDA_VISIBLE_DEVICES= timeout 120 ./harness bench --model /tmp/cb4 --device cpu --policy lru --capacity 64 \
  --prompts 6 --prompt-len 16 --tokens 16 --threads "$last" --kernels "$KIND" --profile > "$O/profile_t$last.txt" 2>&1
python3 - "$O" "$AB_ENV" "$THREADS" "${ROUNDS:-4}" > "$O/ab.md" <<'PY'
import re, sys
o, env, threads, rounds = sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4])
def row(path):
    for line in open(path):
        if line.startswith("resident "):
            f = line.split()
            return float(f[4]), float(f[3])  # prefill, decode tok/s
    return None
ratios = {}
def label(path):
    # What the run says it ran: the kernel label names any form an A/B knob turned off.
    for line in open(path):
        m = re.search(r"kernels ([^;]*);", line)
        if m:
            return m.group(1)
    return "no label: the run failed"
a_label, b_label = label(f"{o}/A_t{threads[0]}_r1.txt"), label(f"{o}/B_t{threads[0]}_r1.txt")
print(f"A: `{env}` (ran `{a_label}`); B: the default (ran `{b_label}`)")
print("harness bench --device cpu, the all-resident row (every expert in host memory, no I/O),")
print("routed by the synth checkpoint's own router; prefill of 16-token prompts, 64 new tokens.\n")
print("| threads | round | A prefill / decode tok/s | B prefill / decode tok/s | B ÷ A prefill | B ÷ A decode |")
print("|---|---|---|---|---|---|")
for t in threads:
    for r in range(1, rounds + 1):
        a, b = row(f"{o}/A_t{t}_r{r}.txt"), row(f"{o}/B_t{t}_r{r}.txt")
        if a and b:
            print(f"| {t} | {r} | {a[0]:.1f} / {a[1]:.1f} | {b[0]:.1f} / {b[1]:.1f} | {b[0]/a[0]:.2f} | {b[1]/a[1]:.2f} |")
            ratios.setdefault(t, []).append((b[0] / a[0], b[1] / a[1]))
        else:
            print(f"| {t} | {r} | failed | | | |")
print()
for t, v in ratios.items():
    med = lambda xs: sorted(xs)[len(xs) // 2] if len(xs) % 2 else sum(sorted(xs)[len(xs) // 2 - 1:len(xs) // 2 + 1]) / 2
    print(f"{t} threads: B ÷ A median prefill {med([x[0] for x in v]):.2f}, decode {med([x[1] for x in v]):.2f} ({len(v)} rounds)")
PY
cat "$O/ab.md"
exit 0
