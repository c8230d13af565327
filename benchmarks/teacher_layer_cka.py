"""Linear CKA between the layers of an fp16 teacher cache, with and without each layer's
highest-variance channel (issue 17: why the demo's student layer 2 has a linear CKA near 0 to
Whisper base's layer 4, step-0 and trained alike).

Per layer: the channel with the largest variance over all frames and its share of the layer's
total variance. Per pair of layers: linear CKA (``colld_ds.evaluate.linear_cka``) of their
frames, and again with each side's highest-variance channel left out. One channel that holds
most of a layer's variance decides its linear CKA to every other layer.

    python benchmarks/teacher_layer_cka.py --cache CACHE --out runs/teacher_layer_cka.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cache_codecs import layers_of  # noqa: E402
from colld_ds.atomic import write_text_atomic  # noqa: E402
from colld_ds.evaluate import linear_cka  # noqa: E402


def without_channel(x: torch.Tensor, channel: int) -> torch.Tensor:
    """(N, D) -> (N, D - 1): ``x`` without column ``channel``."""
    return torch.cat([x[:, :channel], x[:, channel + 1:]], dim=1)


def measure(cache: str, max_utterances: int | None) -> dict:
    """{"utterances", "frames", "layers": [per-layer rows], "pairs": [per-pair rows]}."""
    frames: dict[int, list[np.ndarray]] = {}
    utterances = 0
    for _, _, layers in layers_of(cache, max_utterances):
        utterances += 1
        for layer, x in layers.items():
            frames.setdefault(layer, []).append(x)
    states = {layer: torch.from_numpy(np.concatenate(xs).astype(np.float32))
              for layer, xs in sorted(frames.items())}      # layer -> (N, D)
    layer_rows, top = [], {}
    for layer, x in states.items():
        variance = x.double().var(dim=0)
        top[layer] = int(variance.argmax())
        layer_rows.append({"layer": layer, "top_channel": top[layer],
                           "top_channel_variance_share": float(variance.max() / variance.sum())})
    pair_rows = [{"layer_a": a, "layer_b": b, "cka": linear_cka(states[a], states[b]),
                  "cka_without_top_channels": linear_cka(without_channel(states[a], top[a]),
                                                         without_channel(states[b], top[b]))}
                 for a, b in itertools.combinations(states, 2)]
    return {"cache": cache, "utterances": utterances,
            "frames": len(next(iter(states.values()))), "layers": layer_rows, "pairs": pair_rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, help="fp16 teacher cache (folder or shards)")
    parser.add_argument("--out", default="runs/teacher_layer_cka.json")
    parser.add_argument("--max_utterances", type=int, default=None)
    args = parser.parse_args(argv)
    result = measure(args.cache, args.max_utterances)
    print(f"{result['utterances']} utterances, {result['frames']} frames")
    print("| layer | top channel | its variance share |\n|---|---|---|")
    for row in result["layers"]:
        share = row["top_channel_variance_share"]
        print(f"| {row['layer']} | {row['top_channel']} | {share:.3f} |")
    print("\n| layers | CKA | CKA without their top channels |\n|---|---|---|")
    for row in result["pairs"]:
        print(f"| {row['layer_a']}, {row['layer_b']} | {row['cka']:.3f} | "
              f"{row['cka_without_top_channels']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
