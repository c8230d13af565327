"""Ahead-of-time compile of the Triton contrastive kernels for real GPUs, with no GPU present.

``benchmarks/kernel_resources.py`` compiles the forward and both backward variants (targets
with and without grad) to cubins for sm_80 and sm_90, in fp32/fp16/bf16, for every tile the
production shapes launch, with the arguments a real launch passes, and reads each cubin's resource
usage with ``cuobjdump``. It runs once, in a subprocess with a fresh Triton cache under
``tmp_path`` (what CI's clean machine sees), and the tests below read its rows: a compile the
interpreter tests cannot catch (a construct the compiler refuses, register spills, a block too
big for an SM) fails here. About 30 s on 2 cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernel_resources import ARCHS, DTYPES, KERNELS, launch_for

REPO = Path(__file__).resolve().parents[1]
MAX_REGISTERS_PER_THREAD = 255  # sm_80 and sm_90
REGISTERS_PER_SM = 65536

# By hand from the production shapes (D in 768, 1000, 1024, 1280; K in 1, 50, 100, 512):
# BLOCK_K = min(32, next power of two >= K+1) is 2 for K=1, 32 otherwise; BLOCK_D =
# min(128, next power of two >= D) is 128; D_ALIGN = gcd(D, 16) is 8 for D=1000, else 16.
EXPECTED_TILES = {(2, 128, 16), (2, 128, 8), (32, 128, 16), (32, 128, 8)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Rows of ``kernel_resources.py`` for sm_80 and sm_90, and the tail of its output."""
    out = tmp_path_factory.mktemp("kernel_resources")
    env = dict(os.environ, TRITON_CACHE_DIR=str(out / "triton_cache"))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernel_resources.py", "--out_dir", str(out),
         "--arch", ",".join(map(str, ARCHS))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    rows = []
    for arch in ARCHS:
        path = out / f"kernel_resources_sm{arch}.json"
        rows += json.loads(path.read_text()) if path.exists() else []
    return rows, (proc.stdout + proc.stderr)[-4000:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_without_spills(compiled, arch, kernel, dtype):
    rows, output = compiled
    rows = [r for r in rows if (r["arch"], r["kernel"], r["dtype"]) == (arch, kernel, dtype)]
    tiles = {(r["BLOCK_K"], r["BLOCK_D"], r["D_ALIGN"]) for r in rows}
    assert tiles == EXPECTED_TILES, f"compiled tiles {sorted(tiles)}; output:\n{output}"
    for row in rows:
        where = f"sm_{arch} {kernel} {dtype} D={row['D']} K={row['K']}"
        assert "error" not in row, f"{where}: {row['error']}"
        assert row["cubin_bytes"] > 0, where
        assert row["spill_bytes"] == 0, f"{where}: {row['spill_bytes']} bytes of spills"
        assert row["registers"] <= MAX_REGISTERS_PER_THREAD, where
        block_registers = row["registers"] * 32 * row["num_warps"]
        assert block_registers <= REGISTERS_PER_SM, f"{where}: one block needs {block_registers}"


def test_signature_matches_triton_specialisation():
    """``triton_signature`` gives each argument the type and divisibility Triton's own
    launcher specialisation gives it (Triton 3.9's ``native_specialize_impl``)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit

    from colld_ds.kernels.contrastive import triton_signature

    specialize = getattr(jit, "native_specialize_impl", None)
    if specialize is None:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    launches = [
        launch_for("forward", "float16", D=1000, K=1),
        launch_for("forward", "bfloat16", D=1024, K=100),
        launch_for("backward_targets_grad", "float32", D=768, K=512),
        launch_for("backward_targets_frozen", "float16", D=37, K=16),
    ]
    for launch in launches:
        signature, constexprs, attrs = triton_signature(launch)
        for index, (param, value) in enumerate(zip(launch.kernel.params, launch.args.values())):
            if param.is_constexpr:
                want_type, want_attr = "constexpr", value
            else:
                want_type, want_attr = specialize(BaseBackend, value, False, True, True)
            name = param.name
            assert signature[name] == want_type, (name, value, signature[name], want_type)
            if want_type == "constexpr":
                assert constexprs[name] == want_attr, (name, constexprs[name], want_attr)
            else:
                divisible = [["tt.divisibility", 16]] if want_attr and "D" in want_attr else None
                assert attrs.get((index,)) == divisible, (name, value, want_attr)
