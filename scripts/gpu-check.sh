#!/usr/bin/env bash
# GPU validation (issue 20) on a bare device machine, in one call:
#   here, once:   scripts/gpu-wheels.sh            (downloads the pinned wheels the device image lacks into .whl/)
#   device run:   carry [".whl"], command: bash scripts/gpu-check.sh          (< 8 min; results under $OUT)
#   CPU dry run:  bash scripts/gpu-check.sh --device cpu --quick --out runs/gpu-check
#   sharded:      scripts/gpu-wheels.sh --deepspeed here, then `bash scripts/gpu-check.sh --stages sharded` there:
#                 side-branch training under FSDP2, FSDP1 and ZeRO-3 through accelerate (~2 min; sharded.json)
# The device image has its own torch (2.11 + CUDA, seen 2026-11); dpvr's pinned transformers / tokenizers /
# peft travel as wheels and shadow the image's copies through PYTHONPATH. Any other argument goes to
# scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
PY=python3
[ -x .venv/bin/python ] && [ -z "${OUT:-}" ] && PY=.venv/bin/python   # here: the project's pinned stack
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
out="${OUT:-runs/gpu-check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" 2>/dev/null || rm -f "$out/nvidia-smi.csv"
timeout 480 "$PY" scripts/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu-check.log"
