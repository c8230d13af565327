"""Speed and peak memory of the sampled-negative contrastive loss: naive, chunked, dense, Triton.

Each method runs forward + backward of ``loss.sum()`` on N frames of (N, D) predictions against
(N, D) frozen targets, grouped in utterances of T=500 frames; the positive of a frame is the same
frame, its K negatives other frames of the same utterance. Methods:

- ``naive``: ``kernels.reference`` (gathers (N, K+1, D)).
- ``chunked``: ``kernels.chunked`` (the CPU path of ``kernels.contrastive_loss``).
- ``dense``: per utterance a (T, T) cosine matrix by batched matmul in the input dtype, then a
  gather of the K+1 logits: O(B*T^2) memory.
- ``triton``: ``kernels.contrastive`` (CUDA only).

Peak memory is the allocator peak above what existed before the call: CUDA
``max_memory_allocated``; CPU the profiler's ``Total Allocated`` memory events.

    python benchmarks/contrastive_loss.py --quick   # CPU-sized subset
    python benchmarks/contrastive_loss.py   # N {1024, 4096, 16384} x K {50, 100} x D {768, 1024}
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
from kernels.chunked import EPS, contrastive_loss_chunked  # noqa: E402
from kernels.reference import contrastive_loss_reference  # noqa: E402

FRAMES = 500  # T, frames per utterance


def dense_loss(predictions, targets, positive_index, negative_index, temperature):
    """Dense peer: (B, T, T) similarities per utterance, then a gather of the K+1 logits.

    Row i of predictions/targets is frame i % T of utterance i // T (the last one may be short);
    positive_index (N,) and negative_index (N, K) point inside the row's own utterance."""
    n, d = predictions.shape
    b = -(-n // FRAMES)

    def per_utterance(x):  # (N, D) -> (B, T, D) normalised, zero-padded
        x = x / x.float().norm(dim=-1, keepdim=True).clamp_min(EPS).to(x.dtype)
        return torch.nn.functional.pad(x, (0, 0, 0, b * FRAMES - n)).view(b, FRAMES, d)

    sim = torch.bmm(per_utterance(predictions), per_utterance(targets).transpose(1, 2))
    local = torch.cat([positive_index[:, None], negative_index], dim=1) % FRAMES  # (N, K+1)
    logits = sim.view(b * FRAMES, FRAMES)[:n].gather(1, local).float() / temperature
    loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return loss, logits[:, 0] > logits[:, 1:].amax(dim=1)


def make_batch(n, k, d, dtype, device, seed=0):
    """Predictions (N, D) requiring grad, targets (N, D), positives (N,), negatives (N, K)."""
    g = torch.Generator().manual_seed(seed)
    predictions = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    targets = torch.randn(n, d, generator=g).to(device, dtype)
    frame = torch.arange(n)
    start = frame // FRAMES * FRAMES
    length = (n - start).clamp_max(FRAMES)
    offset = 1 + (torch.rand(n, k, generator=g) * (length - 1)[:, None]).long()
    negatives = start[:, None] + (frame - start)[:, None].add(offset) % length[:, None]
    return predictions, targets, frame.to(device), negatives.to(device)


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


def methods(device):
    out = {"naive": contrastive_loss_reference, "chunked": contrastive_loss_chunked}
    out["dense"] = dense_loss
    if device.type == "cuda":
        from kernels.contrastive import contrastive_loss_triton

        out["triton"] = contrastive_loss_triton
    return out


def run(shapes, device, dtype, repeats, temperature=0.1):
    """One row per (shape, method): fwd and fwd+bwd ms, peak MiB and ratios to naive."""
    info = machine_info(device)
    rows = []
    for n, k, d in shapes:
        batch = make_batch(n, k, d, dtype, device)
        naive = None
        for name, loss_fn in methods(device).items():
            forward = lambda: loss_fn(*batch, temperature)  # noqa: E731
            full = lambda: forward()[0].sum().backward()  # noqa: E731
            row = dict(method=name, N=n, K=k, D=d, dtype=str(dtype).removeprefix("torch."))
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
            rows.append(dict(row, device=device.type, **info))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a CPU-sized subset of the shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 quick, 10 full")
    parser.add_argument(
        "--out", default=None, help="default benchmarks/results/contrastive_loss_<device>.json"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.quick:
        shapes = [(1024, 50, 768), (1024, 100, 1024), (4096, 100, 768)]
    else:
        shapes = list(itertools.product([1024, 4096, 16384], [50, 100], [768, 1024]))
    rows = run(shapes, device, dtype, args.repeats or (3 if args.quick else 10))
    print_table(rows, ["method", "N", "K", "D", "fwd_ms", "fwd_bwd_ms", "peak_mib",
                       "time_vs_naive", "mem_vs_naive"])
    write_rows(rows, args.out or f"benchmarks/results/contrastive_loss_{device.type}.json")


if __name__ == "__main__":
    main()
