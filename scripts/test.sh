#!/usr/bin/env bash
# Install what the tests need (DCMTK, PostgreSQL, docker-compose, Python's venv; with apt-get, via sudo when
# not root), create or update .venv with the test extras, then run lint and the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k config -x.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

apt_install() {
    local sudo=()
    if ! command -v apt-get >/dev/null; then
        echo "test.sh: please install $* (no apt-get on this machine)" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "test.sh: run as root to install $*" >&2; exit 1; }
        sudo=(sudo)
    fi
    echo "test.sh: installing $* with apt-get" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need=()
command -v echoscu >/dev/null || need+=(dcmtk)
# The TLS tests make their certificates with the openssl command line tool.
command -v openssl >/dev/null || need+=(openssl)
# The tests run their own PostgreSQL from its binaries (initdb, pg_ctl), not the service.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
# tests/test_deploy.py validates docker-compose.yml; Debian's docker-compose needs no engine.
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    need+=(docker-compose)
fi
# Debian ships venv's ensurepip separately; without it `python3 -m venv` half-creates .venv.
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip' 2>/dev/null; then
    need+=(python3 python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "test.sh: minipacs needs Python 3.11 or newer, python3 is $(python3 -V 2>&1)" >&2
    exit 1
fi
source scripts/_venv.sh "[test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pytest's exit code is the script's: 5 (no tests collected) counts as a failure too.
exec .venv/bin/python -m pytest -q "$@"
