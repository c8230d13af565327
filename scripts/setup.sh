#!/usr/bin/env bash
# Idempotent set-up: Debian packages (when root), .venv, torch first, then colld and its tests.
#   --tests: also the Debian packages only the tests need (openssh-server, pdsh).
#   COLLD_TORCH="torch==2.13.0" by default (our machines have its CPU wheel on disk); on a CUDA
#   cluster set COLLD_TORCH to the build you want, e.g. COLLD_TORCH="torch==2.13.0" with the
#   matching --index-url in PIP_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng: speech synthesis for the demo corpus. With --tests also openssh-server and pdsh:
# DeepSpeed's multi-node launcher, which tests/test_multinode.py runs over an sshd of its own on
# loopback (only then: where systemd runs, Debian's openssh-server also starts the ssh service).
packages=()
command -v espeak-ng >/dev/null || packages+=(espeak-ng)
if [[ "${1:-}" == --tests ]]; then
  [[ -x /usr/sbin/sshd ]] || packages+=(openssh-server)
  command -v pdsh >/dev/null || packages+=(pdsh)
fi
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null && [[ ${#packages[@]} -gt 0 ]]; then
  echo "[setup] installing Debian packages: ${packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
torch_spec="${COLLD_TORCH:-torch==2.13.0}"
# torch before anything that depends on it, or pip pulls a CUDA build of several GB.
.venv/bin/python -m pip install -q "$torch_spec"
.venv/bin/python -m pip install -q -e ".[test]" "$torch_spec"
versions='import torch, deepspeed, transformers; print("torch", torch.__version__,
  "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'
echo "[setup] ready: $(.venv/bin/python -c "$versions")"
