"""`spm`: a sentencepiece model trained on the transcripts of manifests or shards.

Sources are manifests (`.tsv`/`.jsonl`, their `text` column) or audio/cache shards (a `.tar`,
a directory of shards or a brace pattern; their json `text`). Empty transcripts are left out
(generated or split utterances have none). Prints sentences per language before training.
"""

from __future__ import annotations

import collections
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator, Sequence

import sentencepiece as spm

from colld_ds.data import expand_urls
from colld_ds.data_prep.manifest import read_manifest


def transcripts(sources: Sequence[str]) -> Iterator[tuple[str, str]]:
    """`(lang, text)` of every non-empty transcript in `sources` (module docstring)."""
    for source in sources:
        if source.endswith((".tsv", ".jsonl")):
            rows = read_manifest(source)
        else:
            rows = []
            for path in expand_urls(source):
                with tarfile.open(path, "r:") as tar:
                    rows += [json.loads(tar.extractfile(m).read())
                             for m in tar if m.name.endswith(".json")]
        yield from ((row["lang"], row["text"].strip())
                    for row in rows if row.get("text", "").strip())


def train_spm(
    sources: Sequence[str],
    out_prefix: str,
    vocab_size: int = 1000,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
) -> str:
    """Train `<out_prefix>.model` / `.vocab` on the transcripts of `sources`; return the model
    path. `vocab_size` is an upper bound when the text is too small to fill it."""
    counts: collections.Counter = collections.Counter()
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as text_file:
        for lang, text in transcripts(sources):
            counts[lang] += 1
            text_file.write(text.replace("\n", " ") + "\n")
        text_file.flush()
        print("sentences per language: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if not counts:
            raise ValueError(f"no transcripts in {list(sources)}")
        spm.SentencePieceTrainer.train(
            input=text_file.name, model_prefix=out_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            hard_vocab_limit=False, minloglevel=2,
        )
    return out_prefix + ".model"
