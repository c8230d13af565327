"""How much of CoLLD's task the frame index alone solves, on a real fp16 teacher cache.

A teacher with absolute positional embeddings (Whisper) leaves a trace of each frame's position
in its hidden states, and CoLLD's negatives are other frames of the same utterance. The
"position-only student" predicts every target by the mean standardised target at its frame index
(learned on one third of the utterances) and is scored by CoLLD's own loss
(``colld_ds.kernels.contrastive_loss``, uniform same-utterance negatives, drawn with repeats as
in training) on another third. Rows per layer: the targets as ``objective.target_norm:
utterance`` gives them (``utterance``), and minus the mean per frame index learned on the last
third by ``colld_ds.distill.position_mean``, as training does (``utterance_position``). Also the
share of the targets' variance that the position mean explains.

    python benchmarks/position_shortcut.py --cache demo_out/whisper/cache
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cache_codecs import layers_of  # noqa: E402
from benchmarks.harness import machine_info, write_rows  # noqa: E402
from colld_ds.distill import position_mean  # noqa: E402
from colld_ds.kernels import contrastive_loss  # noqa: E402
from colld_ds.objectives import sample_negatives  # noqa: E402
from colld_ds.objectives.base import utterance_norm  # noqa: E402


def standardised(x: np.ndarray) -> torch.Tensor:
    """(T, D) -> (T, D) fp32 standardised over its frames, as ``target_norm: utterance``."""
    features = torch.from_numpy(x.astype(np.float32)).unsqueeze(0)
    return utterance_norm(features, torch.ones(1, x.shape[0], dtype=torch.bool))[0]


def removed_mean(arrays: list[np.ndarray], num_frames: int) -> torch.Tensor:
    """(T, D) raw targets -> (num_frames, D): what ``target_norm: utterance_position`` removes,
    computed by the library (``distill.position_mean``) as training does."""
    targets = (([torch.from_numpy(x.astype(np.float32)).unsqueeze(0)], torch.tensor([len(x)]))
               for x in arrays)
    return position_mean(targets, num_frames, len(arrays), torch.device("cpu"))[0]


def mean_per_index(utterances: list[torch.Tensor], num_frames: int) -> torch.Tensor:
    """(T, D) targets -> (num_frames, D) their mean at each frame index: the position-only
    student."""
    sums = torch.zeros(num_frames, utterances[0].shape[1], dtype=torch.float64)
    counts = torch.zeros(num_frames, dtype=torch.float64)
    for u in utterances:
        sums[:u.shape[0]] += u.double()
        counts[:u.shape[0]] += 1
    return (sums / counts.clamp_min(1).unsqueeze(1)).float()


def score(utterances: list[torch.Tensor], mean: torch.Tensor, num_negatives: int,
          temperature: float, seed: int) -> dict:
    """The position-only student ``mean[t]`` on every frame of ``utterances``: CoLLD's mean loss
    and accuracy, and the share of the targets' variance that ``mean`` explains."""
    losses, hits, residual, total = [], [], 0.0, 0.0
    generator = torch.Generator().manual_seed(seed)
    for targets in utterances:
        length = targets.shape[0]
        frames = torch.arange(length)
        negatives = sample_negatives(torch.tensor([length]), torch.zeros(length, dtype=torch.long),
                                     frames, length, num_negatives, generator=generator)
        loss, correct = contrastive_loss(mean[:length], targets, frames, negatives, temperature,
                                         backend="chunked")
        losses.append(loss)
        hits.append(correct)
        residual += float(((targets - mean[:length]) ** 2).sum())
        total += float((targets**2).sum())
    return {"loss": float(torch.cat(losses).mean()), "acc": float(torch.cat(hits).float().mean()),
            "variance_explained": 1 - residual / total}


def measure(layers: dict[int, list[np.ndarray]], num_negatives: int = 100,
            temperature: float = 0.1, seed: int = 0) -> list[dict]:
    """layer -> its (T, D) fp16 targets per utterance -> one row per (layer, target_norm).
    Utterance n goes to third n % 3: 0 learns the mean removed by ``utterance_position``, 1
    the position-only student, 2 is scored."""
    rows = []
    for layer, arrays in layers.items():
        utterances = [standardised(x) for x in arrays]
        num_frames = max(u.shape[0] for u in utterances)
        removed = removed_mean(arrays[0::3], num_frames)
        for target_norm, targets in (
                ("utterance", utterances),
                ("utterance_position", [u - removed[:u.shape[0]] for u in utterances])):
            student = mean_per_index(targets[1::3], num_frames)
            rows.append({"layer": layer, "target_norm": target_norm,
                         **score(targets[2::3], student, num_negatives, temperature, seed),
                         "chance_loss": math.log(num_negatives + 1),
                         "num_negatives": num_negatives,
                         "temperature": temperature,
                         "utterances_scored": len(targets[2::3])})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="demo_out/whisper/cache", help="an fp16 teacher cache")
    parser.add_argument("--max_utterances", type=int, default=None)
    parser.add_argument("--num_negatives", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/results/position_shortcut_whisper_demo.json")
    args = parser.parse_args(argv)
    layers: dict[int, list[np.ndarray]] = {}
    for _, _, features in layers_of(args.cache, args.max_utterances):
        for layer, x in features.items():
            layers.setdefault(layer, []).append(x)
    stamp = machine_info(torch.device("cpu"))
    rows = [{**row, "cache": args.cache, **stamp}
            for row in measure(layers, args.num_negatives, args.temperature)]
    print("layer | targets            | position-only acc | loss  | chance loss | var. explained")
    for r in rows:
        print(f"{r['layer']:>5} | {r['target_norm']:<18} | {r['acc']:17.3f} | {r['loss']:.3f} | "
              f"{r['chance_loss']:11.3f} | {r['variance_explained']:.3f}")
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
