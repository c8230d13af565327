"""Plumbing of ``benchmarks/kernel_tiles.py`` (the GPU tile sweep) in Triton's interpreter on
CPU: every tile runs, agrees with the default tile, the default is marked, bytes are counted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("targets_grad, default_warps", [(False, 2), (True, 4)])
def test_sweep_runs_every_tile_and_marks_the_default(tmp_path, targets_grad, default_warps):
    out = tmp_path / "tiles.json"
    command = [sys.executable, "benchmarks/kernel_tiles.py", "--device", "cpu",
               "--dtype", "float32", "--shapes", "((8,3,16),)", "--block_ks", "(2,4)",
               "--block_ds", "(16,)", "--warps", f"(1,{default_warps})", "--repeats", "1",
               "--out", str(out)]
    if targets_grad:
        command.append("--targets_grad")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    tiles = {(row["BLOCK_K"], row["BLOCK_D"], row["num_warps"]) for row in rows}
    assert tiles == {(k, 16, w) for k in (2, 4) for w in (1, default_warps)}
    for row in rows:
        assert "error" not in row, row
        assert row["max_loss_diff"] < 1e-5, row
        assert row["fwd_bwd_ms"] > 0 and row["targets_grad"] is targets_grad
        # fp32, N=8, K=3, D=16: predictions read twice, the K+1 candidate rows twice, indices
        # and per-row cos/norm/lse stats (3 x 8 bytes a candidate, 12 bytes a row).
        hand = 2 * 8 * 16 * 4 + 3 * 8 * 4 * 8 + 12 * 8 + 2 * 8 * 4 * 16 * 4
        assert row["read_gb_gathered"] == pytest.approx(hand / 1e9)
    defaults = [(r["BLOCK_K"], r["BLOCK_D"], r["num_warps"]) for r in rows if r["default"]]
    # K + 1 = 4 candidates and D = 16 make a (4, 16) tile; fp32 takes 2 warps with frozen
    # targets and 4 below the full tile with target gradients (kernels/contrastive.py).
    assert defaults == [(4, 16, default_warps)]


@pytest.mark.parametrize("blocks, expected", [((4, 16, 16), [16, 16]), ((4, 16), [2, 2]),
                                              (None, [2, 2])])
def test_blocks_set_the_warps_of_both_kernels(monkeypatch, blocks, expected):
    """``blocks``' third entry is the warp count of the forward and the backward launch (what
    the sweep times); without it both take ``_num_warps``'s (fp32, frozen targets: 2). The
    launches are recorded, not run."""
    import torch

    from colld_ds.kernels import contrastive

    warps = []
    monkeypatch.setattr(contrastive.KernelLaunch, "run", lambda launch: warps.append(
        launch.num_warps))
    predictions = torch.randn(8, 16, requires_grad=True)
    targets = torch.randn(12, 16)
    positive = torch.arange(8)
    negatives = torch.randint(0, 12, (8, 3))
    loss, _ = contrastive.contrastive_loss_triton(predictions, targets, positive, negatives,
                                                  0.1, blocks)
    loss.sum().backward()
    assert warps == expected
