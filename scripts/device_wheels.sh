#!/usr/bin/env bash
# Fetch into .whl/ the wheels that benchmarks/gpu_suite.sh needs on the lent GPU machine and its
# image lacks (benchmarks/GPU.md). That machine has no network: it installs these with
# `pip install --no-index --target /tmp/site .whl/*.whl`. Its Python is CPython 3.12 on x86-64
# Linux, so binary wheels are fetched for cp312 manylinux, whatever Python runs here.
#
# What is carried: the third-party imports of colld_ds.train, colld_ds.data,
# colld_ds.data_prep.cache, colld_ds.kernels and
# benchmarks/{contrastive_loss,train_throughput,harness}.py, with their requirements, minus what the
# image already has (its package list: the device documentation's KINDS.md, "Python packages already
# there"). The image's transformers (5.17), torch (2.11), triton (3.6) and numpy are used as they
# are: pyproject asks for no newer ones.
# Versions are the ones in .venv (what the tests here run with). deepspeed publishes only an
# sdist: it is built here into a pure wheel with DS_BUILD_OPS=0 (its CUDA ops JIT-compile on
# first use, and the suite uses none).
#
# Checks before .whl/ is replaced (a failed or killed run leaves the old .whl/ or none, never a
# half-filled one): one wheel per package; every wheel pure or for cp312 manylinux x86_64;
# every Requires-Dist either carried (at a version it accepts) or in the image; an offline
# `pip install --dry-run` for the device's platform finds all of them; the size of what travels
# (this tree's tracked and untracked-not-ignored files plus .whl/) is under the device's 64 MiB.
#
#   bash scripts/device_wheels.sh   # seconds with a warm pip cache: fetches ~4.6 MiB,
#                                   # builds deepspeed
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
# package: why it travels
CARRIED=(
  deepspeed          # colld_ds.train imports it
  hjson              # deepspeed
  pydantic           # deepspeed
  pydantic-core      # pydantic (binary)
  annotated-types    # pydantic
  typing-inspection  # pydantic
  webdataset         # colld_ds.data, colld_ds.data_prep.shards
  braceexpand        # colld_ds.data, webdataset
  soundfile          # colld_ds.data, colld_ds.data_prep (bundles libsndfile)
  cffi               # soundfile (binary)
  pycparser          # cffi
  soxr               # colld_ds.data_prep.shards resampling (binary)
  typing-extensions  # pydantic needs >= 4.16.0; KINDS.md does not say which the image has
  fire               # the colld CLI (gpu_suite.sh's e2e step runs `colld train`)
  termcolor          # fire
)
# Packages the carried wheels require that the image has (KINDS.md); version where KINDS.md
# gives one, '' where it names the package only (then the device-side check in gpu_suite.sh
# compares versions).
IMAGE_HAS='{"torch": "2.11.0", "numpy": "2.5.2", "pyyaml": "", "tqdm": "", "packaging": "",
  "psutil": "", "msgpack": "", "einops": "", "py-cpuinfo": "", "ninja": ""}'
# The device for pip: CPython 3.12 on x86-64 Linux, glibc 2.39 (inferred: its Python 3.12.3 is
# Ubuntu 24.04's; the wheels fetched today need at most 2.28). pip matches manylinux tags
# exactly, so every glibc from 2.17 up is named.
DEVICE_PIP_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp
                 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 39); do DEVICE_PIP_ARGS+=(--platform "manylinux_2_${n}_x86_64"); done
MAX_TRAVEL_MIB=56  # the device's limit is 64 MiB; keep room for files other engineers add

[[ -x "$PY" ]] || { echo "no $PY: run scripts/setup.sh first" >&2; exit 1; }
declare -a pins
for name in "${CARRIED[@]}"; do
  version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name") \
    || { echo "$name is not installed in .venv:" \
           "run scripts/setup.sh, or drop it from CARRIED" >&2; exit 1; }
  pins+=("$name==$version")
done

stage=.whl.partial
rm -rf "$stage" && mkdir "$stage"
binary_pins=()
for pin in "${pins[@]}"; do [[ $pin == deepspeed==* ]] || binary_pins+=("$pin"); done
echo "[wheels] downloading ${binary_pins[*]}"
"$PY" -m pip download -q --no-deps "${DEVICE_PIP_ARGS[@]}" -d "$stage" "${binary_pins[@]}"

ds_pin=$(printf '%s\n' "${pins[@]}" | grep '^deepspeed==')
echo "[wheels] building $ds_pin (DS_BUILD_OPS=0: pure Python, ops JIT-compile on first use)"
# --no-build-isolation: deepspeed's setup.py imports torch; .venv's CPU torch is enough for a
# build of no ops, where an isolated build would download a CUDA torch of several GB.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$stage" "$ds_pin" \
  > "$stage/.deepspeed_build.log" 2>&1 \
  || { tail -30 "$stage/.deepspeed_build.log" >&2
       echo "deepspeed wheel build failed (log above)" >&2; exit 1; }
rm "$stage/.deepspeed_build.log"

echo "[wheels] checking tags, one version each, and every requirement"
"$PY" - "$stage" "$IMAGE_HAS" "${pins[@]}" <<'EOF'
import json, sys, zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

stage, image_has, pins = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
image_has = {canonicalize_name(k): v for k, v in image_has.items()}
wanted = {canonicalize_name(p.split("==")[0]): Version(p.split("==")[1]) for p in pins}
device_env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "extra": ""}


# The tags the device's CPython 3.12 on glibc 2.39 x86-64 installs, best first.
platforms = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
device_tags = set(cpython_tags((3, 12), ["cp312"], platforms)) | set(
    compatible_tags((3, 12), "cp312", platforms))


errors, found = [], {}
for wheel in sorted(stage.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(wheel.name)
    if name in found:
        errors.append(f"two wheels of {name}: {found[name]} and {wheel.name}; keep one")
    found[name] = wheel.name
    if wanted.get(name) != version:
        errors.append(f"{wheel.name}: expected {name}=={wanted.get(name)} (the .venv version)")
    if not tags & device_tags:
        errors.append(f"{wheel.name}: no tag for CPython 3.12 manylinux x86_64 or pure Python")
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(device_env):
            continue  # an extra, or another platform's requirement
        dep = canonicalize_name(req.name)
        if dep in wanted:
            if not req.specifier.contains(wanted[dep], prereleases=True):
                errors.append(f"{name} needs {req}, but {dep}=={wanted[dep]} is carried")
        elif dep in image_has:
            known = image_has[dep]
            if known and not req.specifier.contains(known, prereleases=True):
                errors.append(f"{name} needs {req}, but the image has {dep}=={known}: carry it")
        else:
            errors.append(f"{name} needs {req}: neither carried nor in the image; add it to "
                          "CARRIED (if the image lacks it) or IMAGE_HAS in "
                          "scripts/device_wheels.sh")
missing = sorted(set(wanted) - set(found))
errors += [f"no wheel of {name} was fetched" for name in missing]
if errors:
    sys.exit("device wheels:\n  " + "\n  ".join(errors))
print(f"[wheels] {len(found)} wheels, each for the device, "
      "every requirement carried or in the image")
EOF

echo "[wheels] offline dry run of the device's install"
dry_target=$(mktemp -d)
"$PY" -m pip install -q --dry-run --no-index --no-deps --find-links "$stage" \
  --target "$dry_target" "${DEVICE_PIP_ARGS[@]}" "${pins[@]}"
rm -rf "$dry_target"

rm -rf .whl && mv "$stage" .whl
echo "[wheels] .whl/:"
ls -l .whl | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 2^20, $9}'
wheels_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheels_bytes + tree_bytes))
awk -v w="$wheels_bytes" -v t="$tree_bytes" -v s="$total" 'BEGIN {
  sizes = "[wheels] wheels %.2f MiB + working tree %.2f MiB = %.2f MiB travel"
  printf sizes " (device limit 64 MiB)\n", w / 2^20, t / 2^20, s / 2^20 }'
if ((total > MAX_TRAVEL_MIB * 1024 * 1024)); then
  echo "what travels is over $MAX_TRAVEL_MIB MiB: drop wheels or ignore large untracked files" >&2
  exit 1
fi
