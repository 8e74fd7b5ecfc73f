#!/usr/bin/env bash
# The README's suite at the lowest transformers pyproject.toml allows (`python3 run.py test` gets the highest:
# a clean clone's pip resolves to it), so CI tests both ends of the range. The lower bound is read from
# pyproject.toml: a change to the range is tested without editing this script.
#
# torch comes from run.py's own install command (the CPU build on a machine without nvidia-smi), then dpvr[test]
# with transformers held at the lower bound in the same resolution. The environment lives outside the clone,
# keyed by what decides its contents (pyproject.toml, run.py and this script), so a later CI run on the same
# machine reuses it and downloads nothing; only the editable dpvr is re-linked to this clone. A lock keeps two
# runs from installing into it at once.
set -euo pipefail
cd "$(dirname "$0")/.."
LOWEST=$(grep -o '"transformers>=[0-9.]*' pyproject.toml | cut -d= -f2)
[ -n "$LOWEST" ] || { echo "ci: no transformers>= lower bound in pyproject.toml" >&2; exit 1; }
KEY=$(cat pyproject.toml run.py .ci/lowest.sh | sha256sum | cut -c1-12)
VENV=${DPVR_LOWEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dpvr/venv-lowest-$KEY}
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# run.py's torch command, alone and first (as run.py installs it): the resolution below finds torch satisfied
python3 -c "import run, subprocess, sys; from pathlib import Path
sys.exit(subprocess.call(run.install_commands(Path(sys.argv[1]), run.torch_build())[0]))" "$VENV/bin/python"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# (this machine's pip config names local index folders that do not all exist: drop those warnings only)
"${PIP[@]}" install -q -e '.[test]' "transformers==$LOWEST" 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" check
"$VENV/bin/python" -c "import transformers; print('lowest env: transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest tests
