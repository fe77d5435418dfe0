#!/usr/bin/env bash
# Start minipacs on the embedded default: SQLite and a store folder under ./minipacs-data,
# AE title MINIPACS, port 11112. The first run creates .venv and installs minipacs into it
# (and, on Debian/Ubuntu, python3-venv with apt-get when missing); later runs start at once.
# Extra arguments go to `minipacs serve`, e.g. --config PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

apt_install() {
    local sudo=()
    if ! command -v apt-get >/dev/null; then
        echo "serve.sh: please install $* (no apt-get on this machine)" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "serve.sh: run as root to install $*" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "serve.sh: installing $* with apt-get" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Debian ships venv's ensurepip separately; without it `python3 -m venv` half-creates .venv.
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "serve.sh: minipacs needs Python 3.11 or newer, python3 is $(python3 -V 2>&1)" >&2
    exit 1
fi
source scripts/_venv.sh ""
exec .venv/bin/minipacs serve "$@"
