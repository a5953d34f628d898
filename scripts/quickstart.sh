#!/usr/bin/env bash
# Set up the environment (first run only) and run the main job on the bundled data.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python pwself_reference/train.py "$@"
