#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite and the docs build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m pytest -q "$@"
python -m sphinx -W --keep-going -q -b html docs docs/_build/html
echo "docs built in docs/_build/html"
