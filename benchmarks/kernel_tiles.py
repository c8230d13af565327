"""Tile sweep of the fused Triton contrastive kernels on one CUDA GPU (issue 4).

For each (BLOCK_K, BLOCK_D, num_warps) the forward and forward + backward times at the
issue's shapes (bf16, frozen targets as in cached training), the bytes-read bandwidth against
the device copy (``contrastive_loss.py``'s ``frac_copy_gathered``), and the largest loss
difference to the default tile (a wrong tile is a bug, not a speed). The default tile is
``kernels/contrastive.py``'s ``_block_sizes``/``_num_warps``; each tile is forced through
``contrastive_loss_triton``'s ``blocks`` argument, (BLOCK_K, BLOCK_D, num_warps).

    python benchmarks/kernel_tiles.py --out runs/kernel_tiles_cuda.json   # ~30 s on an H200
"""

import itertools
import json
import pathlib
import sys

import fire
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from contrastive_loss import copy_gbps, make_batch, read_bytes, time_ms  # noqa: E402
from harness import machine_info  # noqa: E402

from colld_ds.atomic import write_text_atomic  # noqa: E402
from colld_ds.kernels import contrastive  # noqa: E402

SHAPES = ((4096, 100, 1024), (16384, 100, 1024))
BLOCK_KS, BLOCK_DS, WARPS = (16, 32, 64), (64, 128, 256), (4, 8, 16)


def tiles(block_ks, block_ds, warps_options, max_values_per_thread=64):
    """(BLOCK_K, BLOCK_D, num_warps) with at most that many tile values a thread."""
    for block_k, block_d, warps in itertools.product(block_ks, block_ds, warps_options):
        if block_k * block_d // (32 * warps) <= max_values_per_thread:
            yield block_k, block_d, warps


def sweep_shape(shape, tile_options, dtype, device, repeats, targets_grad):
    """One row per tile at ``shape`` (N, K, D): times, the bytes read (``contrastive_loss.py``'s
    ``read_gb_gathered``) and the loss's largest difference to the default tile's."""
    n, k, d = shape
    batch = make_batch(n, k, d, dtype, device)
    batch[1].requires_grad_(targets_grad)
    gathered, _ = read_bytes(n, len(batch[1]), k, d, dtype)
    reference = contrastive.contrastive_loss_triton(*batch, 0.1)[0].detach()
    default = (*contrastive._block_sizes(k, d),)
    default += (contrastive._num_warps(*default, dtype, targets_grad),)
    rows = []
    for block_k, block_d, num_warps in tile_options:
        forward = lambda: contrastive.contrastive_loss_triton(  # noqa: E731
            *batch, 0.1, (block_k, block_d, num_warps))  # noqa: B023
        full = lambda: forward()[0].sum().backward()  # noqa: E731
        row = dict(N=n, K=k, D=d, targets_grad=targets_grad, BLOCK_K=block_k, BLOCK_D=block_d,
                   num_warps=num_warps, default=(block_k, block_d, num_warps) == default,
                   read_gb_gathered=gathered / 1e9)
        try:
            row["max_loss_diff"] = (forward()[0] - reference).abs().max().item()
            row["fwd_ms"] = time_ms(forward, device, repeats)
            row["fwd_bwd_ms"] = time_ms(full, device, repeats)
        except Exception as error:  # a tile that does not compile is a row, not a stop
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        batch[0].grad = batch[1].grad = None
        rows.append(row)
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    return rows


def print_best(rows, count=5):
    """Per shape: the default tile's time and the ``count`` fastest tiles."""
    for shape in dict.fromkeys((row["N"], row["K"], row["D"]) for row in rows):
        done = sorted((r for r in rows if (r["N"], r["K"], r["D"]) == shape and "error" not in r),
                      key=lambda r: r["fwd_bwd_ms"])
        base = next((r for r in done if r["default"]), done[0])
        print(f"N, K, D = {shape}: {'default' if base['default'] else 'first'} "
              f"{base['fwd_bwd_ms']:.2f} ms; best {count}:")
        for r in done[:count]:
            print(f"  ({r['BLOCK_K']}, {r['BLOCK_D']}) x {r['num_warps']} warps: fwd "
                  f"{r['fwd_ms']:.2f} fwd+bwd {r['fwd_bwd_ms']:.2f} ms "
                  f"({r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x default), "
                  f"frac_copy_gathered {r.get('frac_copy_gathered', float('nan')):.2f}")


def main(out="runs/kernel_tiles_cuda.json", repeats=20, dtype="bfloat16", shapes=SHAPES,
         block_ks=BLOCK_KS, block_ds=BLOCK_DS, warps=WARPS, max_values_per_thread=64,
         targets_grad=False, device="cuda"):
    """Sweep every tile of ``block_ks`` x ``block_ds`` x ``warps`` (at most
    ``max_values_per_thread``) at each (N, K, D) of ``shapes``; ``targets_grad`` times the
    backward that also scatters target gradients. ``device="cpu"`` with ``TRITON_INTERPRET=1``
    checks the plumbing (no bandwidth there)."""
    device, dtype = torch.device(device), getattr(torch, dtype)
    copy = copy_gbps(device) if device.type == "cuda" else None
    stamp = dict(copy_gbps=copy, **machine_info(device))
    tile_options = list(tiles(block_ks, block_ds, warps, max_values_per_thread))
    rows = []
    for shape in shapes:
        for row in sweep_shape(shape, tile_options, dtype, device, repeats, targets_grad):
            if copy and "error" not in row:
                gbps = row["read_gb_gathered"] / (row["fwd_bwd_ms"] * 1e-3)
                row["frac_copy_gathered"] = gbps / copy
            rows.append(dict(row, **stamp))
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(pathlib.Path(out), json.dumps(rows, indent=1))
    print_best(rows)


if __name__ == "__main__":
    fire.Fire(main)
