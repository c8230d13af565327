#!/usr/bin/env bash
# colld launcher: wraps the DeepSpeed launcher around `colld train`.
#
#   ./launch.sh --config configs/X.yaml [--section.field value ...]
#       this machine: one rank per GPU; on a machine without GPUs, 2 CPU ranks on gloo
#       (COLLD_CPU_RANKS=N for another count).
#   ./launch.sh --hostfile hosts --config configs/X.yaml [...]
#       multi-node over ssh/pdsh: every host in the DeepSpeed hostfile ("node1 slots=8" per
#       line) runs its slots; see README "Multi-node".
#   deepspeed [--hostfile hosts] --no_python --no_local_rank launch.sh --config ...
#       also works: run by the DeepSpeed launcher (RANK is set), this script just starts the
#       trainer for its rank.
#
# Launcher options (they must come before --config): --hostfile, --num_gpus, --num_nodes,
# --master_addr, --master_port, --launcher, --include, --exclude. The rest goes to `colld train`.
#
# The ranks run in the directory you launch from, so relative paths (--config, --teacher.path,
# --data.train_shards, --run.out_dir) mean what they do for `colld train`; PYTHONPATH makes
# them import this checkout's colld_ds from there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
python="${COLLD_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then
    python="$here/.venv/bin/python"
  else
    python=python3
  fi
fi

if [[ -n "${RANK:-}" && -n "${LOCAL_RANK:-}" ]]; then   # already one rank of a launched job
  exec "$python" -m colld_ds.cli train "$@"
fi

launcher_args=()
have_hostfile=0
have_count=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile)
      if [[ ! -f "${2:-}" ]]; then   # DeepSpeed would warn and run on this machine alone
        echo "colld: error: --hostfile '${2:-}' is not a file: give the path of a DeepSpeed" \
          "hostfile, one 'hostname slots=N' line per node (README \"Multi-node\")" >&2
        exit 1
      fi
      have_hostfile=1; launcher_args+=("$1" "$2"); shift 2 ;;
    --num_gpus|--num_accelerators) have_count=1; launcher_args+=("$1" "$2"); shift 2 ;;
    --num_nodes|--master_addr|--master_port|--launcher|--include|--exclude)
      launcher_args+=("$1" "$2"); shift 2 ;;
    *) break ;;
  esac
done

has_cuda='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
if [[ $have_hostfile == 0 ]] && ! "$python" -c "$has_cuda"; then
  export DS_ACCELERATOR=cpu
  [[ $have_count == 1 ]] || launcher_args+=(--num_accelerators "${COLLD_CPU_RANKS:-2}")
fi
port=""
for ((i = 0; i < ${#launcher_args[@]}; i++)); do
  [[ ${launcher_args[i]} == --master_port ]] && port=${launcher_args[i + 1]}
done
if [[ -z "$port" ]]; then   # a free port: parallel jobs coexist
  free_port='import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
  port="$("$python" -c "$free_port")"
  launcher_args+=(--master_port "$port")
fi
if [[ "${DS_ACCELERATOR:-}" == cpu ]]; then
  # DeepSpeed's CPU all-reduce maps one 64 MiB /dev/shm segment per rank and never unlinks
  # it: without this, every CPU run would leave RAM behind until the next reboot.
  trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_$(id -u)_*_"$port"_*' EXIT
fi
# COLLD_VERBOSE reaches every rank as --verbose: ssh to the other nodes does not carry it
[[ "${COLLD_VERBOSE:-0}" == 0 ]] || set -- "$@" --verbose
"$python" -m deepspeed.launcher.runner "${launcher_args[@]}" --no_local_rank \
  --module colld_ds.cli train "$@"
