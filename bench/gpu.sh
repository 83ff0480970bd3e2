#!/usr/bin/env bash
# The GPU benchmarks (issue 7, item 6): items 1-3 on SD-2.1 shape in fp16 at a 96x96 latent with
# SDPA, within about 8 minutes on one H100/H200. Results go to $OUT (or bench-results/) as JSON,
# each with the device name. Dry run on CPU: DRY=1 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-results}; mkdir -p "$out"
py=${PYTHON:-python3}
if [ "${DRY:-0}" = 1 ]; then
  args=(--device cpu --dtype fp32 --tiny --latent 16 --reps 1); extra=(--prompts 16)
else
  args=(--device cuda --dtype fp16 --latent 96 --reps 10); extra=(--prompts 64)
fi
$py bench/expert_speed.py "${args[@]}" --json "$out/expert_speed.json"
$py bench/expert_speed.py "${args[@]}" --batch 8 --json "$out/expert_speed_b8.json"
$py bench/routed_throughput.py "${args[@]}" "${extra[@]}" --json "$out/routed_throughput.json"
$py bench/prune_cost.py "${args[@]}" --batch 4 --json "$out/prune_cost.json"
