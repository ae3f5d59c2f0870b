#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# llama.cpp (llama-cpp-python, compiled once, ~3 min on 2 cores; cached wheel afterwards): the GGUF
# tests check that llama.cpp loads the files flashtier writes and that flashtier runs the files
# llama.cpp's quantizer writes. Without it those tests are skipped with a reason.
bash scripts/install_llamacpp.sh >/dev/null 2>&1 || echo "note: could not build llama-cpp-python; the llama.cpp GGUF tests will be skipped" >&2
# Headless Chromium for the web chat page test (Debian packages; skipped with a reason if absent).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the web page test will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
