#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite. Extra arguments go to pytest,
# e.g. `bash tools/test.sh -m "not slow"` to skip the end-to-end tests, or `-m oracle` for the
# parity tests against torchaudio (skipped unless `pip install -r requirements-oracle.txt`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
exec "${SPEAKERLAB_VENV:-$root/.venv}/bin/python" -m pytest "$@"
