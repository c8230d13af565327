"""A larger distillation corpus for the quality protocol (benchmarks/quality.py): the demo's
espeak-ng corpus at more minutes per language, its train split mixed into equal shards, and a
teacher cache of the layers asked for.

    python benchmarks/quality_corpus.py --out_dir big --minutes_per_language 10 \\
        --teacher ~/.cache/colld/whisper-base-hf --layers 1,2,3,4,5,6

With the same seed the train split is a superset of the demo corpus's train sentences and holds none
of its dev/test sentences (``colld_ds.data_prep.synth`` splits by sentence index), so the probe's
splits stay unseen. Train utterances longer than the teacher's window are left out and listed (a
Whisper teacher refuses them); so are the ``n mod num_shards`` left over, so that every shard, hence
every rank, has as many. Each stage resumes: the corpus, shards and cache already complete are kept.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from colld_ds.data import read_samples  # noqa: E402
from colld_ds.data_prep.cache import cache_teacher  # noqa: E402
from colld_ds.data_prep.shards import write_shards  # noqa: E402
from colld_ds.data_prep.synth import DEFAULT_LANGS, synth  # noqa: E402


def mixed_shards(corpus_dir: Path, shards_dir: Path, num_shards: int, max_seconds: float,
                 seed: int) -> list[str]:
    """The train split shuffled into ``num_shards`` equal shards of utterances <= ``max_seconds``
    (members copied byte for byte); prints what it leaves out."""
    samples, too_long = [], []
    for sample in read_samples(sorted(map(str, corpus_dir.glob("train-*.tar")))):
        meta = json.loads(sample["json"])
        if meta["duration"] > max_seconds:
            too_long.append(f"{meta['utt_id']} ({meta['duration']:.2f} s)")
        else:
            samples.append({k: v for k, v in sample.items() if k != "__url__"})
    per_shard = len(samples) // num_shards
    print(f"{len(samples) + len(too_long)} train utterances; left out: {len(too_long)} longer "
          f"than {max_seconds:g} s {too_long}, {len(samples) - per_shard * num_shards} to make "
          f"{num_shards} shards of {per_shard}")
    random.Random(seed).shuffle(samples)
    return write_shards(samples[: per_shard * num_shards], dict, str(shards_dir), "train",
                        max_count=per_shard, progress=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--minutes_per_language", type=float, default=10.0)
    parser.add_argument("--langs", default=",".join(DEFAULT_LANGS))
    parser.add_argument("--teacher", required=True, help="a local Hugging Face teacher directory")
    parser.add_argument("--layers", default="all", help="teacher layers to cache: all, 3 or 3,6")
    parser.add_argument("--window_seconds", type=float, default=8.0,
                        help="a Whisper teacher's window; longer utterances are left out")
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    synth(str(out / "corpus"), args.minutes_per_language, args.langs, args.seed,
          shard_size=10**6)
    shards = mixed_shards(out / "corpus", out / "shards", args.num_shards, args.window_seconds,
                          args.seed)
    cache_teacher(shards, args.teacher, args.layers, str(out / "cache"),
                  window_seconds=args.window_seconds)


if __name__ == "__main__":
    main()
