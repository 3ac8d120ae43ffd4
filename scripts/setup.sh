#!/usr/bin/env bash
# Create .venv with diffadapt and its dependencies (CPU torch 2.13.0, pinned: an unpinned torch
# pulls a multi-GB CUDA build). `--dev` adds the test tools, and Debian's chromium for the
# browser test of app.py (Playwright cannot download its own browser here).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e ".${extra}"
if [ -n "$extra" ] && [ ! -x /usr/bin/chromium ]; then
    (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
