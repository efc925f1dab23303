#!/usr/bin/env bash
# Installs what benchmarks/peers.py needs into the project's .venv (after ./deploy or ./run-tests made it):
# the `peers` extra, then litert-torch's converter without its dependencies (see pyproject.toml's note).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/.venv/bin/python" -m pip install -qq --disable-pip-version-check -e "$root[peers]"
"$root/.venv/bin/python" -m pip install -qq --disable-pip-version-check --no-deps litert-torch==0.10.0 \
    ai-edge-quantizer==0.10.0 litert-converter==0.5.0 litert-lm-builder==0.18.1 xdsl==0.28.0
