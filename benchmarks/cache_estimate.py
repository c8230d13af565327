"""`colld prep cache-teacher --estimate` against caches actually written.

Each written cache's teacher identity (its first sample's json) says how it was stored: layers,
target kind, codec and M, Whisper window, front end, standardisation. The script estimates that
cache from its audio shards as `--estimate` does (`colld_ds.data_prep.cache_size.estimate_cache`,
shard index lengths and file sizes, no audio read) and compares it with the bytes on disk: the
cache's tar shards, plus its codebook for pq and rq.

    python benchmarks/cache_estimate.py --shards 'demo_out/whisper/corpus/train-*.tar' \\
        --teacher ~/.cache/colld/whisper-base-hf --caches demo_out/whisper/cache,runs/int8
"""

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.data import expand_urls, shard_infos  # noqa: E402
from colld_ds.data_prep.cache import CacheSettings, teacher_and_shape  # noqa: E402
from colld_ds.data_prep.cache_size import estimate_cache  # noqa: E402
from colld_ds.formats import (  # noqa: E402
    QUANTISED, CodebookIdentity, cache_codec, codebook_identity)


def cache_identity(cache_dir: str) -> tuple[dict, str, CodebookIdentity | None]:
    """The teacher identity of the first sample of `cache_dir`'s first shard, its codec and,
    for pq and rq, its codebook fields (codebook format 1 or 2)."""
    first = os.path.join(cache_dir, sorted(n for n in os.listdir(cache_dir)
                                           if n.endswith(".tar"))[0])
    with tarfile.open(first) as tar:
        member = next(m for m in tar if m.name.endswith(".json"))
        identity = json.load(tar.extractfile(member))["teacher"]
    codec = cache_codec(identity, first)
    return identity, codec, codebook_identity(identity, first) if codec in QUANTISED else None


def written_bytes(cache_dir: str, codebook: CodebookIdentity | None) -> int:
    """The bytes a cache takes on disk: its tar shards and its codebook, if any."""
    names = [n for n in os.listdir(cache_dir) if n.endswith(".tar")]
    names += [codebook.file_name] if codebook else []
    return sum(os.path.getsize(os.path.join(cache_dir, n)) for n in names)


def settings_of(identity: dict, codec: str, codebook: CodebookIdentity | None,
                teacher: str) -> CacheSettings:
    """The `cache-teacher` settings that wrote a cache of `identity` with `teacher` (the
    codebook's training settings do not change its size)."""
    return CacheSettings(
        teacher=teacher, layers=identity["layers"], target_kind=identity["target_kind"],
        dtype="fp32", window_seconds=identity.get("window_seconds"),
        front_end=bool(identity.get("front_end")), codec=codec,
        standardise=identity.get("standardised", "none"),
        num_codebooks=codebook.num_codebooks if codebook else 0, codebook_train_frames=0,
        seed=0)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="the audio shards the caches were made of")
    parser.add_argument("--shard_index", default=None)
    parser.add_argument("--teacher", required=True, help="the teacher's directory")
    parser.add_argument("--caches", required=True,
                        help="written cache directories, comma-separated")
    parser.add_argument("--out", default="benchmarks/results/cache_estimate.json")
    args = parser.parse_args(argv)
    infos = list(shard_infos(expand_urls(args.shards), args.shard_index, True).values())
    rows = []
    for cache_dir in args.caches.split(","):
        identity, codec, codebook = cache_identity(cache_dir)
        _, shape = teacher_and_shape(settings_of(identity, codec, codebook, args.teacher))
        estimated = estimate_cache(infos, shape).total_bytes
        written = written_bytes(cache_dir, codebook)
        rows.append({
            "cache": cache_dir, "codec": codec,
            "num_codebooks": codebook.num_codebooks if codebook else "-",
            "layers": ",".join(map(str, identity["layers"])),
            "front_end": bool(identity.get("front_end")),
            "estimated_bytes": estimated, "written_bytes": written,
            "estimate_error_pct": 100 * (estimated - written) / written,
            **machine_info(torch.device("cpu")),
        })
    print_table(rows, ["codec", "num_codebooks", "layers", "estimated_bytes", "written_bytes",
                       "estimate_error_pct"])
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
