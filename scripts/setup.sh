#!/usr/bin/env bash
# Idempotent set-up: Debian packages (when root), .venv, torch first, then colld and its tests.
#   COLLD_TORCH="torch==2.13.0" by default (our machines have its CPU wheel on disk); on a CUDA
#   cluster set COLLD_TORCH to the build you want, e.g. COLLD_TORCH="torch==2.13.0" with the
#   matching --index-url in PIP_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null && ! command -v espeak-ng >/dev/null; then
  echo "[setup] installing Debian packages: espeak-ng (speech synthesis for the demo corpus)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
torch_spec="${COLLD_TORCH:-torch==2.13.0}"
# torch before anything that depends on it, or pip pulls a CUDA build of several GB.
.venv/bin/python -m pip install -q "$torch_spec"
.venv/bin/python -m pip install -q -e ".[test]" "$torch_spec"
echo "[setup] ready: $(.venv/bin/python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)')"
