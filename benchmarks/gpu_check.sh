#!/usr/bin/env bash
# The GPU checks, in one script for a session that is lent a GPU machine (a few minutes): set up,
# run the CUDA tests, then the measurements the GPU issue asks for that the runtime can make today,
# each result as one JSON line in $OUT/gpu_check.jsonl (OUT defaults to ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh          # on the GPU machine, from the repository root
#
# What it measures now:
#   * the CUDA tests (tests marked `cuda`: the forward on the GPU equals the CPU's, the store's
#     device tier moves bytes exactly, dense weights paged onto the GPU give the CPU's tokens),
#   * tiny-moe decode on the GPU against the CPU path on the same machine (target: GPU >= CPU),
#   * the store's host -> device copies against a plain pinned copy, and their overlap with compute
#     (bench_device_tier),
#   * dense-1.7g with --device-budget 800M (weights 2x the budget) against the link-bound limit and
#     against accelerate with the same GPU memory (bench_device_dense; targets 85% and 3x),
#   * moe-1.3g with --device-budget 400M (experts ~3x the budget): --expert-placement auto against
#     gpu (copy every miss) and cpu (every expert on the CPU) (bench_device_moe; target auto >= 2x
#     the better of the two).
#   * retrieval attention at 128K with the kv-long shapes on the GPU (sinks + window on the GPU,
#     search and far keys on the host, merged on the GPU) next to full attention on the GPU, then
#     (last, so a short lease loses only it) the same retrieval step on this machine's CPU
#     (bench_long_context --device; 128K of projection-only prefill and its index build each time).
# Budget: under 8 minutes on an H100 machine (setup ~2-3 min of it); each step has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
log() { echo "{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3}" >> "$OUT/gpu_check.jsonl"; }
run() {  # run NAME CMD...: the command's last JSON line is kept, with its exit status and duration
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  log "$name" "$rc" "$((SECONDS - t0))"
  grep '^{' "$OUT/$name.out" | tail -1 | sed "s/^{/{\"step\": \"$name\", /" >> "$OUT/gpu_check.jsonl"
  return 0
}
: > "$OUT/gpu_check.jsonl"
run setup bash scripts/setup.sh --test
PY=.venv/bin/python
run nvidia_smi nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run cuda_tests $PY -m pytest -q -m cuda -p no:cacheprovider tests
for device in cpu cuda; do
  run "tiny_moe_$device" $PY -m flashtier generate models/tiny-moe --prompt "def fibonacci(n):" \
    --max-new-tokens 128 --greedy --ignore-eos --json --device "$device"
done
run device_tier $PY -m flashtier.benchmarks.bench_device_tier --device cuda
run dense_device $PY -m flashtier.benchmarks.bench_device_dense --device cuda --device-budget 800M --tokens 32
run moe_device $PY -m flashtier.benchmarks.bench_device_moe --device cuda --device-budget 400M --tokens 32
run long_context_cuda timeout 180 $PY -m flashtier.benchmarks.bench_long_context --device cuda \
  --contexts 4096,131072 --full-at 131072 --steps 16 --full-steps 4 --warmup 2
run long_context_cpu timeout 150 $PY -m flashtier.benchmarks.bench_long_context --device cpu \
  --contexts 131072 --full-at "" --steps 8 --warmup 2
echo "results: $OUT/gpu_check.jsonl"
cat "$OUT/gpu_check.jsonl"
