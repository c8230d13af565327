"""``benchmarks/teacher_layer_cka.py`` on a hand-made fp16 cache: layer 2 is layer 1 with one
channel replaced by loud noise, so that channel holds most of its variance; the CKA figures are
checked against numpy's ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""

import io
import json

import numpy as np
import pytest
from webdataset import TarWriter

from benchmarks.teacher_layer_cka import main as teacher_layer_cka


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def hand_cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2
                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_one_loud_channel_decides_the_cka(tmp_path):
    rng = np.random.default_rng(0)
    lengths = (40, 55, 30)
    first = [rng.normal(size=(t, 8)) * np.array([3.0] + [1.0] * 7) for t in lengths]
    second = [np.concatenate([x[:, :5], 100 * rng.normal(size=(len(x), 1)), x[:, 6:]], axis=1)
              for x in first]
    first, second = ([x.astype(np.float16) for x in xs] for xs in (first, second))
    cache = tmp_path / "cache"
    cache.mkdir()
    with TarWriter(str(cache / "train-000000.tar")) as writer:
        for n, (x, y) in enumerate(zip(first, second)):
            teacher = {"layers": [1, 2], "target_kind": "layer_output", "num_frames": len(x)}
            writer.write({"__key__": f"utt{n}", "json": json.dumps({"teacher": teacher}).encode(),
                          "l01.layer_output.npy": npy(x), "l02.layer_output.npy": npy(y)})
    out = tmp_path / "cka.json"
    result = teacher_layer_cka(["--cache", str(cache), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    x, y = (np.concatenate(xs).astype(np.float32) for xs in (first, second))
    assert (result["utterances"], result["frames"]) == (3, sum(lengths))
    by_layer = {row["layer"]: row for row in result["layers"]}
    assert (by_layer[1]["top_channel"], by_layer[2]["top_channel"]) == (0, 5)
    share = y.var(0)[5] / y.var(0).sum()
    assert by_layer[2]["top_channel_variance_share"] == pytest.approx(share, rel=1e-4)
    assert share > 0.99
    (pair,) = result["pairs"]
    assert pair["cka"] == pytest.approx(hand_cka(x, y), rel=1e-4)
    assert pair["cka"] < 0.05
    kept = [c for c in range(8) if c != 5]
    assert pair["cka_without_top_channels"] == pytest.approx(
        hand_cka(x[:, 1:], y[:, kept]), rel=1e-4)
    assert pair["cka_without_top_channels"] > 5 * pair["cka"]
