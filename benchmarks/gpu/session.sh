#!/usr/bin/env bash
# Run ON THE DEVICE, as one `run` call with carry [".whl"] and timeout_s 600:
#     bash benchmarks/gpu/session.sh            # 480p targets first (~6-8 min)
#     bash benchmarks/gpu/session.sh rest       # the other 480p configurations
#     bash benchmarks/gpu/session.sh 720p       # 720p, one step each
#     bash benchmarks/gpu/session.sh fastpath   # 480p: eager vs compiled vs torch's attention kernels vs fp8 (~9 min)
# Installs the carried wheels beside the device's torch, runs bench_gpu.py within a deadline that leaves time to copy
# the JSON to $OUT, and copies it there (the `run` tool brings it back; put it in benchmarks/results/).
# Every `:maskfree` configuration also carries `hvtune plan`'s prediction for the same step (plan_peak_gib,
# plan_peak_ratio = predicted / torch.cuda.max_memory_allocated, plan_s_per_step): the first session calibrates plan.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 13), f"Python {sys.version.split()[0]}: fetch_wheels.sh has wheels for 3.11-3.13"'
python3 -m pip install -q --no-index --no-deps --find-links .whl --target /tmp/site \
  diffusers torchao peft pydantic pydantic-core annotated-types typing-inspection typing-extensions importlib-metadata
export PYTHONPATH=/tmp/site:app PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "${1:-targets}" in
  # the two targets: <= 24 GB with offload + checkpointing; >= 40% MFU without offload (no mask vs key mask)
  targets) args=(--res 480p --configs "gc+offload+stream:maskfree,plain:maskfree,gc:maskfree,plain,gc" --deadline 380 --timeout 200) ;;
  rest) args=(--res 480p --configs "gc+offload,gc+int8,gc+offload+stream+int8,gc:maskfree,plain:trimmed" --no-sdpa
              --deadline 420 --timeout 200) ;;
  720p) args=(--res 720p --configs "gc:maskfree,gc+offload+stream:maskfree" --steps 1 --no-sdpa --deadline 300 --timeout 280) ;;
  # issue 22: the same 480p step (checkpointing, no padding) eager, compiled, on each attention kernel torch ships,
  # with an fp8 base; a kernel or fp8 the card lacks is recorded as skipped. warmup_times_s holds the compile.
  fastpath) args=(--res 480p --configs "gc:maskfree,gc+compile:maskfree,gc+cudnn:maskfree,gc+native-efficient:maskfree,gc+fp8:maskfree,gc+compile+fp8:maskfree,gc+flash-attn-3:maskfree"
                  --steps 2 --no-sdpa --no-backend-probe --deadline 400 --timeout 150) ;;
  *) echo "usage: $0 [targets|rest|720p|fastpath]" >&2; exit 2 ;;
esac
status=0
python3 benchmarks/bench_gpu.py "${args[@]}" || status=$?
cp benchmarks/results/gpu-*.json "${OUT:-/tmp}/" 2>/dev/null || true
exit "$status"
