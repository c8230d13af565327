"""How much of a padded batch is real audio: fixed batches vs dynamic batching by seconds.

The loader's own planner (``colld_ds.batching.EpochPlanner``, metadata only, no audio) lays out
epoch 0 of a synthetic long-tailed corpus (utterance lengths log-normal, median ``--median_s``,
clipped to ``[--min_s, --max_s]``) over ``--ranks`` x ``--workers``; per setting it reports the
real audio over the padded audio (longest utterance x utterances, summed over batches) of the
batches the workers yield, and the share of utterances left out of the epoch.

    python benchmarks/batch_fill.py        # 20k utterances of 1-30 s, B=8 vs 60/120/240 s
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.batching import Batching, EpochPlanner, ShardInfo  # noqa: E402
from colld_ds.formats import SAMPLE_RATE  # noqa: E402


def synthetic_shards(utterances: int, per_shard: int, median_s: float, min_s: float,
                     max_s: float, seed: int) -> dict[str, ShardInfo]:
    """Shards of utterances whose lengths (16 kHz samples) are log-normal, clipped."""
    rng = random.Random(seed)
    lengths = [round(min(max_s, max(min_s, rng.lognormvariate(0, 0.8) * median_s)) * SAMPLE_RATE)
               for _ in range(utterances)]
    shards = {}
    for start in range(0, utterances, per_shard):
        url = f"synthetic-{start // per_shard:06d}.tar"
        chunk = lengths[start:start + per_shard]
        shards[url] = ShardInfo(url, tuple(f"u{start + i}" for i in range(len(chunk))),
                                tuple(chunk))
    return shards


def fill(planner: EpochPlanner, ranks: int, workers: int) -> dict:
    """Real and padded audio (seconds) and utterances of the batches yielded in epoch 0."""
    yielded = planner.accounting(0).batches_per_worker
    real = padded = 0
    for rank in range(ranks):
        for worker in range(workers):
            for _, batch in zip(range(yielded), planner.worker_batches(0, rank, worker)):
                lengths = [record["__length__"] for record in batch]
                real += sum(lengths)
                padded += max(lengths) * len(lengths)
    accounting = planner.accounting(0)
    return {"real_over_padded": real / padded, "batches_per_worker": yielded,
            "used_utterances": accounting.used, "utterances": accounting.utterances,
            "left_out": 1 - accounting.used / accounting.utterances}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=20000)
    parser.add_argument("--per_shard", type=int, default=250)
    parser.add_argument("--median_s", type=float, default=6.0)
    parser.add_argument("--min_s", type=float, default=1.0)
    parser.add_argument("--max_s", type=float, default=30.0)
    parser.add_argument("--batch_size", type=int, default=8, help="the fixed batching compared")
    parser.add_argument("--budgets_s", default="60,120,240", help="dynamic batch budgets (s)")
    parser.add_argument("--bucket_buffer", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/batch_fill.json")
    args = parser.parse_args(argv)
    shards = synthetic_shards(args.utterances, args.per_shard, args.median_s, args.min_s,
                              args.max_s, args.seed)
    settings = [("fixed", f"B={args.batch_size}", Batching(batch_size=args.batch_size))]
    settings += [("dynamic", f"{budget} s", Batching(budget=int(float(budget) * SAMPLE_RATE),
                                                     bucket_buffer=args.bucket_buffer))
                 for budget in args.budgets_s.split(",")]
    stamp = machine_info(torch.device("cpu"))
    rows = []
    for kind, setting, batching in settings:
        planner = EpochPlanner(list(shards), shards, batching, args.seed, args.ranks,
                               args.workers)
        rows.append({"batching": kind, "setting": setting, **fill(planner, args.ranks,
                                                                  args.workers),
                     "median_s": args.median_s, "range_s": [args.min_s, args.max_s],
                     "bucket_buffer": args.bucket_buffer, "ranks": args.ranks,
                     "workers": args.workers, **stamp})
    print_table(rows, ["batching", "setting", "real_over_padded", "batches_per_worker",
                       "left_out"])
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
