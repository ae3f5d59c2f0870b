#!/usr/bin/env bash
# Set up flashtier on a fresh machine: a virtual environment in .venv with the package installed
# (editable) and, with --test, the test/benchmark dependencies. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="server"
[ "${1:-}" = "--test" ] && extras="server,test,bench"
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the CPU build on this machine's disk (an unpinned torch pulls a CUDA build).
log=.venv/install.log
.venv/bin/python -m pip install -q "torch==2.13.0" >"$log" 2>&1 || { cat "$log"; exit 1; }
.venv/bin/python -m pip install -q -e ".[${extras}]" >>"$log" 2>&1 || { cat "$log"; exit 1; }
