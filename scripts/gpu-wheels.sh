#!/usr/bin/env bash
# Download, for the device machine's Python 3.12 on x86-64, the wheels of dpvr's pins that its image lacks
# (transformers, tokenizers, peft; torch, accelerate, safetensors and the rest are in the image) into .whl/,
# which git ignores and `run` carries. With --deepspeed, DeepSpeed too (for gpu_check.py's sharded stage):
# PyPI has only its source, built here into a pure-Python wheel (its ops compile on first use), plus the
# pure dependencies the image may lack.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
# a pin or a range (transformers': pip downloads its highest release)
print(" ".join(d for d in deps if re.split("[=<>!~]", d)[0] in {"transformers", "tokenizers", "peft"}))
PY
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
if [ "${1:-}" = "--deepspeed" ]; then
  .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # needs torch: the venv's
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    einops hjson msgpack ninja py-cpuinfo
fi
ls -la .whl
