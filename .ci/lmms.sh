#!/usr/bin/env bash
# lmms-eval for real (tests/test_lmms_real.py) and the Qwen2-VL commands (tests/test_family_commands.py: its
# processor needs torchvision) in their own environment with the `[lmms]` extra; the
# README's suite skips that test where lmms-eval is absent, and stays lean.
#
# Why the CUDA build of torch 2.13.0 here: lmms-eval (and timm) require torchvision, and PyPI's x86_64
# torchvision 0.28.0 (the release for torch 2.13.0) is a CUDA build whose ops library needs libtorch_cuda:
# next to the CPU wheel `import torchvision` fails ("operator torchvision::nms does not exist"), and with it
# `import transformers`' LLaVA, so `import dpvr`. The CUDA build of the same torch runs on the CPU.
# `--isolated` makes pip skip this machine's local wheel folders (which hold the CPU build of 2.13.0).
#
# The environment (about 6 GB) lives outside the clone, keyed by what decides its contents (pyproject.toml
# and this script), so a later CI run on the same machine reuses it and downloads nothing; only the
# editable dpvr is re-linked to this clone. A lock keeps two runs from installing into it at once.
set -euo pipefail
cd "$(dirname "$0")/.."
KEY=$(cat pyproject.toml .ci/lmms.sh | sha256sum | cut -c1-12)
VENV=${DPVR_LMMS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dpvr/venv-lmms-$KEY}
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [ "$(uname -m)" = x86_64 ] && ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  "${PIP[@]}" uninstall -q -y torch 2>/dev/null || true  # a CPU build would satisfy the pin and stay
  "${PIP[@]}" --isolated install -q torch==2.13.0
fi
# (this machine's pip config names local index folders that do not all exist: drop those warnings only)
"${PIP[@]}" install -q -e '.[lmms,test]' 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" check
"$VENV/bin/python" -c "import dpvr, torchvision, lmms_eval; print('lmms env: dpvr + torchvision', torchvision.__version__)"
"$VENV/bin/python" -m pytest tests/test_lmms_real.py tests/test_family_commands.py
