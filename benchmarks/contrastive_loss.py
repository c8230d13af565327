"""Speed, peak memory and bytes read of the sampled-negative contrastive loss: naive, chunked,
dense, Triton.

Each method runs forward + backward of ``loss.sum()`` on N frames of (N, D) predictions against
frozen targets (M, D), M = N rounded up to whole utterances of T=500 frames (the padding rows
are never candidates); the positive of a frame is the same frame, its K negatives other frames
of the same utterance. Methods:

- ``naive``: ``colld_ds.kernels.reference`` (gathers (N, K+1, D)).
- ``chunked``: ``colld_ds.kernels.chunked`` (the CPU path of
  ``colld_ds.kernels.contrastive_loss`` without ``num_frames``).
- ``dense``: ``colld_ds.kernels.dense.contrastive_loss_dense``, what CoLLD runs on the CPU: per
  utterance a (rows, T) cosine matrix by batched matmul (fp32), then a gather of the K+1 logits.
- ``triton``: ``colld_ds.kernels.contrastive`` (CUDA only).

Peak memory is the allocator peak above what existed before the call: CUDA
``max_memory_allocated``; CPU the profiler's ``Total Allocated`` memory events.

Bytes read (analytic, the same for every method: what the fused kernels must read, s = bytes
per element of the input dtype). Forward: predictions N*D*s, the K+1 candidate rows of every
prediction N*(K+1)*D*s, the indices N*(K+1)*8. Backward: the same again, plus the forward's
saved fp32 cosines and norms N*(K+1)*8 and three fp32 (N,) vectors (lse, |p|, grad). So

    read_gb_gathered = (2*N*D*s + 2*N*(K+1)*D*s + 3*N*(K+1)*8 + 12*N) / 1e9
    read_gb_unique   = (2*N*D*s + 2*M*D*s       + 3*N*(K+1)*8 + 12*N) / 1e9

``gathered`` counts a target row each time it is a candidate (the bound if no row is found in
cache); ``unique`` counts each target row once (the bound if the L2 cache serves repeats: on an
H100, 50 MB of L2 holds M*D fp16 for M=16384, D=1024). Writes (the (N, D) fp32 gradient, the
saved state) are not counted. On CUDA each row also has the achieved ``gbps_*`` = read bytes /
forward+backward time and ``frac_copy_*`` = that over ``copy_gbps``, the device's bandwidth
for a 1 GiB device-to-device ``copy_`` measured in the same run (bytes read + written / time).
The target is Triton within 2x of the bandwidth bound: ``frac_copy >= 0.5``.

    python benchmarks/contrastive_loss.py --quick   # CPU-sized subset
    python benchmarks/contrastive_loss.py --dtype bfloat16,float16   # N {1024, 4096, 16384}
                                                    # x K {50, 100} x D {768, 1024}, on a GPU
"""

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, peak_bytes, print_table, write_rows  # noqa: E402
from colld_ds.kernels.chunked import contrastive_loss_chunked  # noqa: E402
from colld_ds.kernels.dense import contrastive_loss_dense  # noqa: E402
from colld_ds.kernels.reference import contrastive_loss_reference  # noqa: E402

FRAMES = 500  # T, frames per utterance


def make_batch(n, k, d, dtype, device, seed=0):
    """Predictions (N, D) requiring grad, targets (M, D) with M = N rounded up to a multiple of
    T (rows N..M-1 are zeros, never candidates), positives (N,), negatives (N, K)."""
    g = torch.Generator().manual_seed(seed)
    predictions = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    num_targets = -(-n // FRAMES) * FRAMES
    targets = torch.zeros(num_targets, d)
    targets[:n] = torch.randn(n, d, generator=g)
    frame = torch.arange(n)
    start = frame // FRAMES * FRAMES
    length = (n - start).clamp_max(FRAMES)
    offset = 1 + (torch.rand(n, k, generator=g) * (length - 1)[:, None]).long()
    negatives = start[:, None] + (frame - start)[:, None].add(offset) % length[:, None]
    return predictions, targets.to(device, dtype), frame.to(device), negatives.to(device)


def read_bytes(n, m, k, d, dtype):
    """(gathered, unique) bytes the fused forward + backward must read (module docstring)."""
    s = torch.finfo(dtype).bits // 8
    common = 2 * n * d * s + 3 * n * (k + 1) * 8 + 12 * n
    return common + 2 * n * (k + 1) * d * s, common + 2 * m * d * s


def time_ms(fn, device, repeats):
    """Median wall time of ``fn`` in ms after one warm-up call."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_gbps(device, repeats=20):
    """Device-to-device copy bandwidth, GB/s of bytes read + written, of a 1 GiB ``copy_``."""
    src = torch.randn(2**29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    del src, dst
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def methods(device):
    out = {"naive": contrastive_loss_reference, "chunked": contrastive_loss_chunked}
    out["dense"] = lambda *args: contrastive_loss_dense(*args, num_frames=FRAMES)
    if device.type == "cuda":
        from colld_ds.kernels.contrastive import contrastive_loss_triton

        out["triton"] = contrastive_loss_triton
    return out


def run(shapes, device, dtypes, repeats, temperature=0.1):
    """One row per (dtype, shape, method): fwd and fwd+bwd ms, peak MiB, ratios to naive, bytes
    read and, on CUDA, the achieved bandwidth against the device's copy bandwidth."""
    info = machine_info(device)
    copy = round(copy_gbps(device), 1) if device.type == "cuda" else None
    rows = []
    for dtype, (n, k, d) in itertools.product(dtypes, shapes):
        batch = make_batch(n, k, d, dtype, device)
        gathered, unique = read_bytes(n, len(batch[1]), k, d, dtype)
        naive = None
        for name, loss_fn in methods(device).items():
            forward = lambda: loss_fn(*batch, temperature)  # noqa: E731
            full = lambda: forward()[0].sum().backward()  # noqa: E731
            row = dict(method=name, N=n, K=k, D=d, dtype=str(dtype).removeprefix("torch."),
                       read_gb_gathered=gathered / 1e9, read_gb_unique=unique / 1e9)
            try:
                row["fwd_ms"] = time_ms(forward, device, repeats)
                row["fwd_bwd_ms"] = time_ms(full, device, repeats)
                row["peak_mib"] = peak_bytes(full, device) / 2**20
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            batch[0].grad = None
            naive = row if name == "naive" else naive
            if "error" not in row and "error" not in naive:
                row["time_vs_naive"] = row["fwd_bwd_ms"] / naive["fwd_bwd_ms"]
                row["mem_vs_naive"] = row["peak_mib"] / naive["peak_mib"]
            if copy is not None and "error" not in row:
                for kind, nbytes in (("gathered", gathered), ("unique", unique)):
                    row[f"gbps_{kind}"] = nbytes / (row["fwd_bwd_ms"] * 1e-3) / 1e9
                    row[f"frac_copy_{kind}"] = row[f"gbps_{kind}"] / copy
                row["copy_gbps"] = copy
            rows.append(dict(row, device=device.type, **info))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a CPU-sized subset of the shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated, e.g. bfloat16,float16; default bfloat16 on CUDA, "
                             "float32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 quick, 10 full")
    parser.add_argument(
        "--out", default=None, help="default benchmarks/results/contrastive_loss_<device>.json"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    names = (args.dtype or ("bfloat16" if device.type == "cuda" else "float32")).split(",")
    dtypes = []
    for name in names:
        if not isinstance(getattr(torch, name, None), torch.dtype):
            parser.error(f"--dtype {name!r} is not a torch dtype (e.g. bfloat16, float16)")
        dtypes.append(getattr(torch, name))
    if args.quick:
        shapes = [(1024, 50, 768), (1024, 100, 1024), (4096, 100, 768)]
    else:
        shapes = list(itertools.product([1024, 4096, 16384], [50, 100], [768, 1024]))
    rows = run(shapes, device, dtypes, args.repeats or (3 if args.quick else 10))
    columns = ["method", "dtype", "N", "K", "D", "fwd_ms", "fwd_bwd_ms", "peak_mib",
               "time_vs_naive", "mem_vs_naive", "read_gb_gathered", "read_gb_unique"]
    if device.type == "cuda":
        columns += ["gbps_gathered", "frac_copy_gathered", "gbps_unique", "frac_copy_unique"]
    print_table(rows, columns)
    write_rows(rows, args.out or f"benchmarks/results/contrastive_loss_{device.type}.json")


if __name__ == "__main__":
    main()
