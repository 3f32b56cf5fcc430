#!/usr/bin/env bash
# The test command of the README: makes a virtual environment, installs phi3v with its test
# extras (CPU PyTorch), and runs the whole suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser tests (tests/test_webui*.py) drive Debian's headless Chromium; as root, install it when missing.
# In CI (CI=true or PHI3V_REQUIRE_BROWSER=1, which .ci/run sets) they fail, not skip, without it.
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
  echo "installing chromium and chromium-driver for the browser tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    chromium chromium-driver) >/dev/null || echo "warning: installing chromium failed" >&2
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# CPU PyTorch: the pinned release installs from a local wheel where one is provided, else from PyPI.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".[test,serve,ray]"
python -m pytest -p no:cacheprovider "$@"
