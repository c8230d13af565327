"""Registers, spills, shared memory and theoretical occupancy of the Triton contrastive kernels.

Compiles each kernel ahead of time for a CUDA target (no GPU needed: Triton lowers to PTX and
its bundled ``ptxas`` assembles the cubin) with the arguments a real launch passes
(``colld_ds.kernels.contrastive.forward_launch``/``backward_launch`` on small CPU stand-in
tensors, mapped by ``colld_ds.kernels.contrastive.triton_signature``), and reads the cubin's
resource usage with the bundled ``cuobjdump --dump-resource-usage``: ``REG`` registers/thread;
``STACK`` + ``LOCAL`` bytes/thread as ``spill_bytes`` (these kernels have no local arrays, so only
spilled registers put anything there: where ``ptxas -v`` reported "4 bytes spill stores", cuobjdump
read STACK:8); ``SHARED`` static shared bytes/block (0 on sm_80, 1024 on sm_90: the kernels declare
none). Triton's dynamic shared bytes and ``num_warps`` come from the compiled metadata.

One row per distinct (kernel, dtype, arch, BLOCK_K, BLOCK_D, D_ALIGN) among the production shapes,
D in {768, 1000, 1024, 1280} x K in {1, 50, 100, 512}: the tile ``_block_sizes`` picks and the
power of two the kernel is told divides D (16, or 8 for D = 1000); ``D``, ``K`` name the
shape compiled for the row, ``shapes`` every shape with the same key. Triton also specialises
K (== 1: a constant, which comes with BLOCK_K = 2; a multiple of 16: K = 512), which changed
no register count when measured, so it is not a key of its own.

Theoretical occupancy, resident warps per SM (both archs: 65536 registers and at most 64 warps
and 32 blocks per SM; registers are allocated per warp in units of 256):
  by registers:     floor(65536 / (ceil(32 * REG / 256) * 256) / num_warps) * num_warps
  by shared memory: floor(SM shared / (SHARED + dynamic shared + 1 KiB)) * num_warps, SM
                    shared 228 KiB on sm_90 (H100), 164 KiB on sm_80 (A100); the 1 KiB is what
                    CUDA reserves per block on sm_80+ (perhaps counted twice on sm_90, where
                    SHARED may be that same reserve: no row here is limited by shared memory)
  occupancy = min(64, by registers, by shared memory, 32 * num_warps) / 64.

    python benchmarks/kernel_resources.py                  # sm_90 and sm_80, ~1 min on 2 cores
    python benchmarks/kernel_resources.py --arch 90 --jobs 4
"""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402

KERNELS = ("forward", "backward_targets_grad", "backward_targets_frozen")
DTYPES = ("float32", "float16", "bfloat16")
ARCHS = (90, 80)
ISSUE_SHAPES = [(d, k) for d in (768, 1000, 1024, 1280) for k in (1, 50, 100, 512)]  # (D, K)
SM_SHARED_BYTES = {80: 164 * 1024, 90: 228 * 1024}
SM_REGISTERS, SM_MAX_WARPS, SM_MAX_BLOCKS, REGISTER_UNIT = 65536, 64, 32, 256
RESERVED_SHARED_PER_BLOCK = 1024


def launch_for(kernel, dtype, D, K, **_):
    """The launch ``contrastive_loss_triton`` makes for this case, on stand-in CPU tensors
    (N = 1, M = 2): ``forward_launch`` or ``backward_launch`` of it."""
    from colld_ds.kernels.contrastive import backward_launch, forward_launch

    dtype = getattr(torch, dtype)
    predictions, targets = torch.ones(1, D, dtype=dtype), torch.ones(2, D, dtype=dtype)
    positive, negative = torch.zeros(1, dtype=torch.long), torch.ones(1, K, dtype=torch.long)
    forward = forward_launch(predictions, targets, positive, negative, temperature=0.1)
    if kernel == "forward":
        return forward
    return backward_launch(forward, torch.ones(1), targets_grad=kernel.endswith("targets_grad"))


def cases(kernels=KERNELS, dtypes=DTYPES, archs=ARCHS, shapes=ISSUE_SHAPES):
    """One dict per (kernel, dtype, arch, BLOCK_K, BLOCK_D, D_ALIGN) among ``shapes``: ``D``,
    ``K`` the first shape with it (N=4096, K=100, D=1024 first), ``shapes`` all."""
    out = {}
    for arch in archs:
        for kernel in kernels:
            for dtype in dtypes:
                for d, k in sorted(shapes, key=lambda shape: shape != (1024, 100)):
                    args = launch_for(kernel, dtype, d, k).args
                    tile = {name: args[name] for name in ("BLOCK_K", "BLOCK_D", "D_ALIGN")}
                    key = (arch, kernel, dtype, *tile.values())
                    if key in out:
                        out[key]["shapes"] += f" {d}x{k}"
                    else:
                        out[key] = dict(kernel=kernel, dtype=dtype, arch=arch, D=d, K=k, **tile,
                                        shapes=f"{d}x{k}")
    return list(out.values())


def nvidia_tool(name):
    """Path of a CUDA binary Triton bundles (``cuobjdump``), else one on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    path = str(bundled) if bundled.exists() else shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is neither bundled with triton ({bundled}) nor on PATH")
    return path


def resource_usage(cubin: bytes, kernel_name: str) -> dict:
    """``cuobjdump --dump-resource-usage`` of a cubin: REG, STACK, LOCAL, SHARED of the kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", path],
                              capture_output=True, text=True, check=True).stdout
    match = re.search(rf"Function {re.escape(kernel_name)}:\s*\n\s*(.*)", text)
    if match is None:
        raise RuntimeError(f"no resource usage of {kernel_name} in cuobjdump's output:\n{text}")
    usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", match.group(1)))
    return {key: int(usage[key]) for key in ("REG", "STACK", "LOCAL", "SHARED")}


def occupancy(registers, static_shared, dynamic_shared, num_warps, arch):
    """Resident warps per SM, limited by registers and by shared memory (module docstring)."""
    warp_registers = math.ceil(32 * registers / REGISTER_UNIT) * REGISTER_UNIT
    by_registers = SM_REGISTERS // warp_registers // num_warps * num_warps
    block_shared = static_shared + dynamic_shared + RESERVED_SHARED_PER_BLOCK
    by_shared = SM_SHARED_BYTES[arch] // block_shared * num_warps
    warps = min(SM_MAX_WARPS, by_registers, by_shared, SM_MAX_BLOCKS * num_warps)
    return dict(warps_by_registers=by_registers, warps_by_shared=by_shared,
                resident_warps=warps, occupancy=warps / SM_MAX_WARPS)


def compile_case(case: dict) -> dict:
    """Compile one case for its arch and return it with the resources (or ``error``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from colld_ds.kernels.contrastive import triton_signature

    launch = launch_for(**case)
    signature, constexprs, attrs = triton_signature(launch)
    try:
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", case["arch"], 32),
                                  options={"num_warps": launch.num_warps})
    except Exception as error:  # a compile failure is a result to report, not a crash
        return dict(case, error=f"{type(error).__name__}: {error}"[:2000])
    usage = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    num_warps, dynamic_shared = compiled.metadata.num_warps, compiled.metadata.shared
    return dict(
        case, registers=usage["REG"], spill_bytes=usage["STACK"] + usage["LOCAL"],
        static_shared_bytes=usage["SHARED"], dynamic_shared_bytes=dynamic_shared,
        num_warps=num_warps, cubin_bytes=len(compiled.asm["cubin"]),
        **occupancy(usage["REG"], usage["SHARED"], dynamic_shared, num_warps, case["arch"]),
    )  # fmt: skip


def compile_all(case_list, jobs):
    """``compile_case`` over the cases, in ``jobs`` worker processes (spawned: no state shared
    with the caller, so a caller that imported triton in interpreter mode does not leak it)."""
    if jobs <= 1:
        return [compile_case(case) for case in case_list]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_case, case_list))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out_dir", default="benchmarks/results",
                        help="writes kernel_resources_sm<arch>.json there, one file per arch")
    args = parser.parse_args()
    archs = [int(a) for a in args.arch.split(",")]
    rows = compile_all(cases(archs=archs), args.jobs)
    import triton

    info = dict(machine_info(torch.device("cpu")), triton=triton.__version__)
    rows = [dict(row, **info) for row in rows]
    print_table(rows, ["kernel", "dtype", "arch", "BLOCK_K", "BLOCK_D", "D", "K", "registers",
                       "spill_bytes", "dynamic_shared_bytes", "num_warps", "resident_warps",
                       "occupancy"])
    for arch in archs:
        arch_rows = [row for row in rows if row["arch"] == arch]
        write_rows(arch_rows, Path(args.out_dir) / f"kernel_resources_sm{arch}.json")
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
