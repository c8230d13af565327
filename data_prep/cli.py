"""`fire` CLI for data preparation: generated-audio shards and manifest -> audio shards.

    python -m data_prep.cli generate out/shards --num_utterances 64 --shard_size 16
    python -m data_prep.cli make_shards manifest.tsv out/shards --shard_size 1000

Shard format: see `data_prep.shards`. Both commands are resumable: re-running skips complete
shards (see `write_shards`).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterator, Sequence

import fire

from data_prep.generated_audio import generate_utterances
from data_prep.shards import load_audio, shard_stats, write_audio_shards


def read_manifest(manifest: str, lang: str = "xx") -> list[dict]:
    """Rows of a TSV (header with `path`, optional `text`, `lang`, `utt_id`, `phones`) or JSONL
    manifest (`.jsonl`, one object per line with the same keys).

    Relative paths are taken relative to the manifest's directory; `utt_id` defaults to the
    file name without extension (dots replaced by `_`); `lang` defaults to `lang`.
    """
    with open(manifest, encoding="utf-8") as f:
        if manifest.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f, delimiter="\t"))
    base, seen = os.path.dirname(os.path.abspath(manifest)), set()
    for i, row in enumerate(rows):
        if not row.get("path"):
            raise ValueError(f"{manifest}: row {i + 1} has no 'path'")
        row["path"] = os.path.join(base, row["path"])
        stem = os.path.splitext(os.path.basename(row["path"]))[0]
        row["utt_id"] = row.get("utt_id") or stem.replace(".", "_")
        row.setdefault("text", "")
        row["lang"] = row.get("lang") or lang
        if row["utt_id"] in seen:
            raise ValueError(f"{manifest}: duplicate utt_id {row['utt_id']!r} (row {i + 1})")
        seen.add(row["utt_id"])
    return rows


def _manifest_samples(rows: list[dict]) -> Iterator[dict]:
    """Sample dicts whose `wave` loads lazily, so shards skipped on resume are never decoded."""
    for row in rows:
        yield {
            "utt_id": row["utt_id"],
            "wave": functools.partial(load_audio, row["path"]),
            "lang": row["lang"],
            "text": row["text"],
            "phones": row.get("phones"),
        }


def _print_summary(out_dir: str, paths: list[str]) -> None:
    stats = shard_stats(paths)
    print(
        f"{out_dir}: {stats['shards']} shards, {stats['utterances']} utterances, "
        f"{stats['hours']:.4f} hours"
    )


class DataPrep:
    """Data preparation commands (mounted as `colld prep ...`)."""

    def generate(
        self,
        out_dir: str,
        num_utterances: int = 64,
        seed: int = 0,
        shard_size: int = 16,
        min_seconds: float = 1.0,
        max_seconds: float = 3.0,
        langs: Sequence[str] = ("xx",),
        prefix: str = "train",
    ) -> None:
        """Write shards of deterministic generated speech-like audio (`data_prep.generated_audio`).

        `langs`: a sequence or a comma-separated string (`--langs en,de`); utterance i gets
        `langs[i % len(langs)]`.
        """
        langs = tuple(langs.split(",")) if isinstance(langs, str) else tuple(langs)
        samples = generate_utterances(num_utterances, seed, min_seconds, max_seconds, langs)
        paths = write_audio_shards(samples, out_dir, prefix, max_count=shard_size)
        _print_summary(out_dir, paths)

    def make_shards(
        self,
        manifest: str,
        out_dir: str,
        shard_size: int = 1000,
        prefix: str = "train",
        lang: str = "xx",
    ) -> None:
        """Write shards from a TSV/JSONL manifest of audio files (see `read_manifest`)."""
        rows = read_manifest(manifest, lang)
        paths = write_audio_shards(_manifest_samples(rows), out_dir, prefix, max_count=shard_size)
        _print_summary(out_dir, paths)


def main() -> None:
    fire.Fire(DataPrep)


if __name__ == "__main__":
    main()
