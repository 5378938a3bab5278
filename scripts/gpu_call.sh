#!/usr/bin/env bash
# Runs one of the GPU scripts with its output folder in /tmp and packs that folder as one file,
# $OUT/NAME.tar.xz: the lent GPU machine returns at most 8 files of $OUT, and the scripts write
# more (every bench cell, logs, Nsight tables). Anywhere else the scripts can write their folder
# directly.
# Usage: bash scripts/gpu_call.sh NAME SCRIPT [ARGS...]   e.g. bash scripts/gpu_call.sh sweep47 scripts/gpu_speed.sh 47 16,32,64
set -u
name=$1; script=$2; shift 2
dest=${OUT:?OUT is not set (the device machine sets it)}
tmp=/tmp/gpu_call/$name
mkdir -p "$tmp"
bash "$script" "$tmp" "$@"
rc=$?
echo "exit $rc" > "$tmp/exit.txt"
tar -cJf "$dest/$name.tar.xz" -C /tmp/gpu_call "$name"
exit $rc
