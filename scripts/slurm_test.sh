#!/usr/bin/env bash
# The real-Slurm test of `harness slurm` (run by scripts/test.sh, so CI runs it):
#   1. installs Slurm and MUNGE from the distribution's packages when missing;
#   2. starts munged, slurmctld and slurmd on this machine with a generated one-node slurm.conf
#      (all state, sockets, logs and pid files in a temp dir);
#   3. submits the default experiment's quick sweep as a job array with `harness slurm --submit`,
#      cancels it after some cells finished, resubmits the same script (finished cells must be
#      skipped), waits for the merge job, and checks that the merged results equal a
#      single-process `harness run --quick` (every field but the timings and memory counters);
#   4. stops the daemons it started, by pid, and removes the temp dir.
# If the daemons cannot start, it fails and prints their logs; it never passes silently.
# Usage: bash scripts/slurm_test.sh [HARNESS_BINARY]   (default: target/debug/harness, built)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
fail() { echo "slurm test FAILED: $*" >&2; exit 1; }

if [ $# -ge 1 ]; then
  H=$(realpath "$1")
else
  cargo build --quiet --bin harness
  H=$repo/${CARGO_TARGET_DIR:-target}/debug/harness
fi
[ -x "$H" ] || fail "no harness binary at $H"

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || fail "not root and no sudo: cannot install or run slurmd"
  SUDO="sudo -n"
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  echo "slurm test: installing slurm-wlm and munge from the distribution's packages" >&2
  command -v apt-get >/dev/null || fail "Slurm is missing and this is not a Debian/Ubuntu system (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null || fail "apt-get update failed"
  $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || fail "apt-get install slurm-wlm munge failed"
fi
PATH=$PATH:/usr/sbin:/sbin

t=$(mktemp -d /tmp/moe-slurm.XXXXXX)
chmod 755 "$t"
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do $SUDO kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do $SUDO kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    $SUDO kill -9 "$p" 2>/dev/null || true
  done
  if [ $rc -ne 0 ]; then
    for f in munged.log slurmctld.log slurmd.log; do
      [ -f "$t/$f" ] && { echo "--- $f (last lines)" >&2; tail -20 "$t/$f" >&2; }
    done
    ls "$t"/results/default/slurm/*.out >/dev/null 2>&1 && for f in "$t"/results/default/slurm/*.out; do
      echo "--- $f" >&2; tail -5 "$f" >&2; done
  fi
  $SUDO rm -rf "$t"
  exit $rc
}
trap cleanup EXIT

# MUNGE: its own key, socket, pid, log and seed files in the temp dir.
head -c 1024 /dev/urandom > "$t/munge.key"
chmod 400 "$t/munge.key"
$SUDO munged --force --key-file="$t/munge.key" --socket="$t/munge.socket" \
  --pid-file="$t/munged.pid" --log-file="$t/munged.log" --seed-file="$t/munge.seed" \
  || fail "munged did not start"
for _ in $(seq 50); do [ -s "$t/munged.pid" ] && break; sleep 0.1; done
[ -s "$t/munged.pid" ] || fail "munged wrote no pid file"
pids+=("$(cat "$t/munged.pid")")

host=$(hostname -s)
cpus=$(nproc)
mkdir -p "$t/state" "$t/spool"
cat > "$t/slurm.conf" <<EOF
ClusterName=moetest
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=socket=$t/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$t/state
SlurmdSpoolDir=$t/spool
SlurmctldPidFile=$t/slurmctld.pid
SlurmdPidFile=$t/slurmd.pid
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SlurmctldLogFile=$t/slurmctld.log
SlurmdLogFile=$t/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$t/slurm.conf
$SUDO env SLURM_CONF="$SLURM_CONF" slurmctld -f "$SLURM_CONF" -i || fail "slurmctld did not start"
for _ in $(seq 50); do [ -s "$t/slurmctld.pid" ] && break; sleep 0.1; done
[ -s "$t/slurmctld.pid" ] || fail "slurmctld wrote no pid file"
pids+=("$(cat "$t/slurmctld.pid")")
$SUDO env SLURM_CONF="$SLURM_CONF" slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
for _ in $(seq 50); do [ -s "$t/slurmd.pid" ] && break; sleep 0.1; done
[ -s "$t/slurmd.pid" ] || fail "slurmd wrote no pid file"
pids+=("$(cat "$t/slurmd.pid")")
up=""
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^idle'; then up=1; break; fi
  sleep 0.2
done
[ -n "$up" ] || fail "the node never became idle: $(sinfo -h 2>&1 || true)"
echo "slurm test: slurmctld + slurmd up on $host ($cpus CPUs)" >&2

exp=experiments/default.toml
out=$t/results
plan=$("$H" plan "$exp" --quick --out "$out" --json)
n=$(python3 -c 'import json,sys; print(len(json.load(sys.stdin)["cells"]))' <<<"$plan")
results=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["results_dir"])' <<<"$plan")
run_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])' <<<"$plan")
cells=$(dirname "$results")/.$run_id.partial/cells

# Submit with at most one task at a time, so that the cancel lands mid-way.
sub=$("$H" slurm "$exp" --quick --out "$out" --array-parallelism 1 --submit)
echo "slurm test: $sub" >&2
array=$(sed -n 's/^array job \([0-9]*\).*/\1/p' <<<"$sub")
merge=$(sed -n 's/.*merge job \([0-9]*\).*/\1/p' <<<"$sub")
script=$(sed -n 's/^script: //p' <<<"$sub")
[ -n "$array" ] && [ -n "$merge" ] && [ -f "$script" ] || fail "unexpected --submit output: $sub"

wait_gone() {  # waits until none of the given jobs is queued or running
  for _ in $(seq 1500); do
    [ -z "$(squeue -h -j "$1" 2>/dev/null)" ] && return 0
    sleep 0.2
  done
  fail "jobs $1 still queued after 300 s: $(squeue 2>&1)"
}
for _ in $(seq 1500); do
  done_n=$(ls "$cells"/*.json 2>/dev/null | grep -vc '\.env\.json$' || true)
  [ "$done_n" -ge 2 ] && break
  sleep 0.2
done
[ "${done_n:-0}" -ge 2 ] || fail "no cells finished in 300 s"
scancel "$array" "$merge"
wait_gone "$array,$merge"
done_first=$(ls "$cells"/*.json | grep -v '\.env\.json$' | sort)
k=$(wc -l <<<"$done_first")
[ "$k" -lt "$n" ] || fail "the whole array finished before the cancel; nothing to resume"
echo "slurm test: cancelled after $k of $n cells; resubmitting the same script" >&2

sub2=$(bash "$script")
echo "slurm test: $sub2" >&2
array2=$(sed -n 's/^array job \([0-9]*\).*/\1/p' <<<"$sub2")
merge2=$(sed -n 's/.*merge job \([0-9]*\).*/\1/p' <<<"$sub2")
wait_gone "$array2,$merge2"
[ -f "$results/summary.json" ] || fail "the merge job left no $results/summary.json"

# A single-process run of the same experiment, then field-by-field equality.
"$H" run "$exp" --quick --out "$t/single" 2>/dev/null
python3 - "$results" "$t/single/default/$run_id" "$array" "$array2" "$k" <<'EOF'
import json, sys
import polars as pl
merged, single, first, second, k = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
measured = {"load_seconds", "prefill_tps", "decode_tps", "decode_tps_min", "decode_tps_max",
            "ttft_seconds", "storage_read_gbps", "resident_decode_tps", "storage_bound_tps",
            "storage_bound_fraction", "peak_rss_bytes", "rss_anon_bytes", "rss_file_bytes",
            "overhead_bytes", "device_read_bytes", "page_cache_bytes"}
a = json.load(open(f"{merged}/summary.json"))
b = json.load(open(f"{single}/summary.json"))
assert [r["cell"] for r in a] == [r["cell"] for r in b], "cell order differs"
for x, y in zip(a, b):
    for key in x:
        if key not in measured and x[key] != y[key]:
            sys.exit(f"cell {x['cell']}: {key} = {x[key]!r} merged vs {y[key]!r} single")
ta = pl.read_parquet(f"{merged}/trace.parquet").drop("load_ns")
tb = pl.read_parquet(f"{single}/trace.parquet").drop("load_ns")
assert ta.equals(tb), "merged trace differs from the single-process trace"
env = json.load(open(f"{merged}/env.json"))
jobs = {c: e["slurm"]["array_job_id"] for c, e in env["cells"].items()}
assert all(e["slurm"] is not None for e in env["cells"].values()), "a cell did not run under Slurm"
n_first = sum(1 for j in jobs.values() if j == first)
n_second = sum(1 for j in jobs.values() if j == second)
assert n_first >= k and n_first + n_second == len(a), (jobs, k)
assert n_second > 0, "the resubmission ran no cell"
print(f"slurm test: merged results of {len(a)} cells equal the single-process run "
      f"({n_first} cells from array {first}, {n_second} from the resubmitted array {second})")
EOF
echo "slurm test: ok" >&2
