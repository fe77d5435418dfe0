#!/usr/bin/env bash
# Start minipacs on the embedded default: SQLite and a store folder under ./minipacs-data,
# AE title MINIPACS, port 11112. Extra arguments go to `minipacs serve`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/_venv.sh" ""
cd "$ROOT"
exec "$ROOT/.venv/bin/minipacs" serve "$@"
