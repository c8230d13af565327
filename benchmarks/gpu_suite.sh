#!/usr/bin/env bash
# Everything the GPU run needs in ONE device call (benchmarks/GPU.md says how to call it and what
# to do with what comes back): the kernel tests, the contrastive-loss grid and the full-shape
# training throughput, each under a time limit, the whole within
# SUITE_BUDGET_S (under the device's 10-minute command limit).
#
#   bash benchmarks/gpu_suite.sh           # on the device machine: carry .whl
#                                          #   (built by scripts/device_wheels.sh)
#   bash benchmarks/gpu_suite.sh --smoke   # here, on the CPU: every step at its smallest shape
#
# Steps, in order (a failing step does not stop the later ones; optional steps run only when the
# time left allows and are then reported as skipped, not failed):
#   install  .whl/*.whl into /tmp/site (the device image lacks deepspeed, webdataset, soundfile...)
#   env      nvidia-smi, versions, carried requirements checked, imports -> env.txt
#   tests    pytest tests/test_kernels.py tests/test_kernel_compile.py tests/test_rq_device.py
#            -> tests_junit.xml
#   bf16     benchmarks/contrastive_loss.py, full grid, bfloat16 -> contrastive_loss_cuda_bf16.json
#   train    benchmarks/train_throughput.py --full --freeze_front_end --contrastive_backends
#            auto,dense -> train_throughput_cuda_full.json
#   e2e      `colld train` as a user runs it on one GPU (NCCL, bf16, ZeRO-2, 12 steps, tiny
#            wav2vec 2.0 teacher, teacher online), then from a teacher cache with the cached
#            front end; its log is in suite.log
#   fp16     (optional) the grid in float16 -> contrastive_loss_cuda_fp16.json
#   train_b8 (optional) the train step at batch 8 x 8 s -> train_throughput_cuda_full_b8.json
#   tiles    (optional) benchmarks/kernel_tiles.py: the Triton kernels' tiles and warps at
#            N = 4096 and 16384, K = 100, D = 1024, bf16 -> kernel_tiles_cuda_bf16.json
# SUITE_STEPS="install env train" runs only the steps named (a second call after a fix).
# All output also goes to suite.log. Files land in $OUT (the device tool's result folder; at most
# 8 come back: these are 8); where OUT is unset, in a new temporary folder, which is printed.
# Exit status 0 when every step that ran passed and no required step was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=full
case "${1:-}" in
  "") ;;
  --smoke) MODE=smoke ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [--smoke]" >&2; exit 2 ;;
esac
if [[ -z "${OUT:-}" ]]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
  echo "OUT is unset (not inside the device tool): writing to $OUT"
fi
mkdir -p "$OUT"

if [[ $MODE == full ]]; then
  PY=python3            # the device image's Python 3.12 with torch and triton
  DEV=cuda
  GRID_JSON=contrastive_loss_cuda          # + _bf16.json, _fp16.json
  TRAIN_JSON=train_throughput_cuda_full    # + .json, _b8.json
  SUITE_BUDGET_S=510    # the device kills a command at 600 s; leave room for the transfers
  GRID_ARGS=()          # contrastive_loss.py: the full N x K x D grid
  # 20 timed steps after 5 warm-ups per run; all CPU threads for the setup (random init and
  # save of the 315M-parameter teacher), which is not timed.
  TRAIN_ARGS=(--full --steps 20 --warmup 5 --threads 0)
  B8_ARGS=(--batch_size 8 --max_seconds 8)  # a GPU-sized batch: 64 s of audio per step
  TILES=(env "$PY" benchmarks/kernel_tiles.py --block_ks "(32,64)" --block_ds "(64,128)"
         --warps "(1,2,4,8)" --max_values_per_thread 128 --out "$OUT/kernel_tiles_cuda_bf16.json")
else
  PY=.venv/bin/python
  [[ -x $PY ]] || { echo "--smoke runs in .venv: run scripts/setup.sh first" >&2; exit 2; }
  DEV=cpu
  GRID_JSON=contrastive_loss_cpu_smoke
  TRAIN_JSON=train_throughput_cpu_smoke
  SUITE_BUDGET_S=1800
  GRID_ARGS=(--quick --device cpu --repeats 1)
  TRAIN_ARGS=(--steps 2 --warmup 1)
  B8_ARGS=(--batch_size 8 --max_seconds 1)
  TILES=(env TRITON_INTERPRET=1 "$PY" benchmarks/kernel_tiles.py --device cpu --dtype float32
         --shapes "((8,3,16),)" --block_ks "(4,)" --block_ds "(16,)" --warps "(1,2)" --repeats 1
         --out "$OUT/kernel_tiles_cpu_smoke.json")
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

START_S=$SECONDS
SUMMARY=()
FAILED=0

# run_step NAME CAP_S required|optional COMMAND...: run COMMAND under `timeout` (the functions
# below through `bash -c`), for CAP_S seconds or what is left of SUITE_BUDGET_S if less; record
# its status and duration.
run_step() {
  local name=$1 cap=$2 need=$3; shift 3
  [[ -z ${SUITE_STEPS:-} || " $SUITE_STEPS " == *" $name "* ]] || return 0
  local left=$((SUITE_BUDGET_S - (SECONDS - START_S)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 30)); then
    SUMMARY+=("$(printf '%-9s %-26s %5s s' "$name" "skipped: ${left} s left" 0)")
    [[ $need == required ]] && FAILED=1
    echo "=== [$name] skipped: only ${left} s of the ${SUITE_BUDGET_S} s budget left"
    return
  fi
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit} s: $*"
  local t0=$SECONDS status
  timeout --kill-after=15 "$limit" "$@"
  local rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status="timed out at ${limit} s"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "=== [$name] $status after $((SECONDS - t0)) s"
  SUMMARY+=("$(printf '%-9s %-26s %5s s' "$name" "$status" $((SECONDS - t0)))")
}

install_wheels() {
  compgen -G ".whl/*.whl" >/dev/null || {
    echo "no .whl/*.whl: run 'bash scripts/device_wheels.sh' here and name .whl in the call's carry"
    return 1
  }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
}

# Versions, the GPU, and every carried wheel's requirements against what is importable.
environment() {
  echo "date (UTC): $(date -u +%FT%TZ)  host: $(uname -n)  kernel: $(uname -r)  mode: $MODE"
  local unknown="unknown (no .git here; put COLLD_COMMIT=<sha> in the command)"
  echo "commit: ${COLLD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "$unknown")}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
      --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md
import pathlib
import platform
import torch
from packaging.requirements import Requirement

print(f"python {platform.python_version()} at {__import__('sys').executable}")
for name in ("torch", "triton", "transformers", "deepspeed", "numpy", "webdataset", "soundfile",
             "soxr", "pydantic", "pytest"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} NOT INSTALLED")
print(f"torch CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")

problems = []
for info in sorted(pathlib.Path("/tmp/site").glob("*.dist-info")):
    dist = md.Distribution.at(info)
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist.metadata['Name']} needs {req}: {req.name} {have} is installed")
for line in problems:
    print(f"REQUIREMENT NOT MET: {line}")
for module in ("deepspeed", "webdataset", "soundfile", "soxr", "triton", "transformers"):
    __import__(module)
print("imports: deepspeed, webdataset, soundfile, soxr, triton, transformers")
if torch.cuda.is_available():
    from colld_ds.kernels import resolve_backend

    # train_throughput's `auto` rows are CoLLD with the Triton loss only if this says triton
    print(f"contrastive backend 'auto' on CUDA: "
          f"{resolve_backend('auto', torch.zeros(1, device='cuda'), None)}")
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, 'L2_cache_size', 0)
    print(f"GPU {props.name}: {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.1f} GiB, L2 {l2_bytes / 2**20:.0f} MiB")
raise SystemExit(1 if problems else 0)
EOF
}

run_tests() {
  local files=() missing=0
  for f in tests/test_kernels.py tests/test_kernel_compile.py tests/test_rq_device.py; do
    if [[ -f $f ]]; then files+=("$f"); else echo "MISSING test file $f"; missing=1; fi
  done
  "$PY" -m pytest -q -p no:cacheprovider "${files[@]}" --junitxml="$OUT/tests_junit.xml"
  local rc=$?
  return $((rc ? rc : missing))
}

# The training command itself on the device: online, then cached with the cached front end.
end_to_end() {
  local root
  root=$(mktemp -d "${TMPDIR:-/tmp}/e2e.XXXXXX")
  "$PY" - "$root" <<'EOF' || return 1
import sys
from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

root = sys.argv[1]
teacher = make_tiny_teacher("wav2vec2", f"{root}/teacher", seed=0, num_layers=4)
write_audio_shards(generate_utterances(32, seed=1), f"{root}/shards", max_count=8, progress=False)
cache_teacher(f"{root}/shards", teacher, "2,4", f"{root}/cache", progress=False, front_end=True)
EOF
  local precision=bf16
  [[ $DEV == cpu ]] && precision=fp32
  local common=(-m colld_ds.cli train --config configs/tiny-wav2vec2_to_2l_colld.yaml
                --teacher.path "$root/teacher" --optim.max_steps 12 --optim.warmup_steps 2
                --run.log_every 4 --run.save_every 12 --run.precision "$precision"
                --data.num_workers 1)
  "$PY" "${common[@]}" --data.train_shards "$root/shards" --run.out_dir "$root/online" \
    && "$PY" "${common[@]}" --data.teacher_cache "$root/cache" --student.freeze_front_end true \
         --data.cached_front_end true --run.out_dir "$root/cached" \
    && tail -n 1 "$root/online/metrics.jsonl" "$root/cached/metrics.jsonl"
}

# headline: the rows each issue is judged on, read from the JSON the benchmarks wrote.
headline() {
  "$PY" - "$OUT" "$DEV" <<'EOF'
import json
import sys
from pathlib import Path

out, dev = Path(sys.argv[1]), sys.argv[2]
for path in sorted(out.glob("contrastive_loss_*.json")):
    rows = json.loads(path.read_text())
    n, k, d = (4096, 100, 1024) if dev == "cuda" else (1024, 100, 1024)
    print(f"{path.name}, N={n} K={k} D={d}:")
    for r in rows:
        if (r.get("N"), r.get("K"), r.get("D")) == (n, k, d):
            cells = {c: r[c] for c in ("fwd_bwd_ms", "peak_mib", "time_vs_naive", "mem_vs_naive",
                                       "frac_copy_gathered", "frac_copy_unique", "error") if c in r}
            print(f"  {r['method']:>8} " + "  ".join(
                f"{c} {v:.3f}" if isinstance(v, float) else f"{c} {v}" for c, v in cells.items()))
for path in sorted(out.glob("train_throughput_*.json")):
    print(f"{path.name}:")
    for r in json.loads(path.read_text()):
        print(f"  {r.get('mode', '?'):>18} step_ms {r.get('step_ms', float('nan')):.1f}  "
              f"{r.get('ratio', '')}")
EOF
}

export PY MODE OUT DEV
export -f install_wheels environment run_tests end_to_end

main() {
  echo "gpu_suite ($MODE) in $REPO, results in $OUT, budget ${SUITE_BUDGET_S} s"
  if [[ $MODE == full ]]; then
    run_step install 90 required bash -c install_wheels
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "=== [install] skipped in --smoke: .venv has every package"
  fi
  run_step env 90 required bash -c 'set -o pipefail; environment 2>&1 | tee "$OUT/env.txt"'
  run_step tests 150 required bash -c run_tests
  run_step bf16 180 required "$PY" benchmarks/contrastive_loss.py "${GRID_ARGS[@]}" \
    --dtype bfloat16 --out "$OUT/${GRID_JSON}_bf16.json"
  local train=("$PY" benchmarks/train_throughput.py "${TRAIN_ARGS[@]}" --freeze_front_end
               --contrastive_backends auto,dense)
  run_step train 210 required "${train[@]}" --out "$OUT/${TRAIN_JSON}.json"
  run_step e2e 120 required bash -c end_to_end
  run_step fp16 150 optional "$PY" benchmarks/contrastive_loss.py "${GRID_ARGS[@]}" \
    --dtype float16 --out "$OUT/${GRID_JSON}_fp16.json"
  run_step train_b8 150 optional "${train[@]}" "${B8_ARGS[@]}" \
    --out "$OUT/${TRAIN_JSON}_b8.json"
  run_step tiles 90 optional "${TILES[@]}"
  echo
  headline
  echo
  echo "=== summary ($MODE, $((SECONDS - START_S)) s of ${SUITE_BUDGET_S} s; files in $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
  ls -l "$OUT"
  echo "gpu_suite: $( ((FAILED)) && echo "SOME STEPS FAILED" || echo "all steps passed")"
  return $FAILED
}

main 2>&1 | tee "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
