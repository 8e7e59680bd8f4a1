#!/usr/bin/env bash
# The suite's GPU paths in one command, in under 8 minutes on one modern GPU:
#   1. the step-cost table of every method at DiT-B/2 on 4x32x32 latents, bf16, eager and
#      torch.compile'd (python -m benchmark.stepcost);
#   2. a 200-step training of every method on CIFAR-shaped (3x32x32) synthetic data,
#      DiT-S/2, bf16, with its time and counted FLOPs;
#   3. with two GPUs or more: 2-process NCCL data parallelism against one process with the
#      same micro-batches (weights must agree);
#   and peak memory.  Writes <out>/gpu_check.json and <out>/gpu_check.md (default out: gpu_check/).
#
#   bash scripts/gpu_check.sh [out_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
  exit 2
fi
exec python scripts/gpu_check.py "${1:-gpu_check}"
