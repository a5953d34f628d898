#!/usr/bin/env bash
# Create (once) the project virtualenv in .venv and install patchaug + pwself_reference
# with everything the tests, docs and main job need. Sourced by quickstart.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PATCHAUG_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.patchaug-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    # torch first, pinned to the build this project is tested with
    python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    python -m pip install --quiet -e "$root[test,docs,reference]"
    touch "$stamp"
fi
cd "$root"
