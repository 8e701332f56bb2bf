#!/usr/bin/env bash
# Create the project's virtual environment and install requirements plus the package (editable).
# Idempotent: it reinstalls only when requirements.txt or pyproject.toml changed.
# Usage: bash tools/setup_env.sh   (or `source` it; SPEAKERLAB_VENV overrides the location)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPEAKERLAB_VENV:-$root/.venv}"
stamp="$venv/.installed-requirements"
want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating virtual environment in $venv" >&2
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing requirements (first time: a few minutes, torch is large)" >&2
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$root/requirements.txt"
  "$venv/bin/pip" install -q --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
