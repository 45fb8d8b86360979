#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the whole suite (CPU).
# Tests that need ../shared (the real SmolLM2 model, WikiText-2, C4) find it through QUANTEASE_SHARED.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/env.sh"
export QUANTEASE_SHARED=${QUANTEASE_SHARED:-$root/../shared}
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
cd "$root"
exec python -m pytest -q -ra "$@"
