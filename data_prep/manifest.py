"""Inputs of `make-shards`: a manifest or a directory tree -> rows -> validated shard samples.

- `read_inputs(source)`: rows `{"utt_id", "path", "lang", "text", "phones"?}` from a TSV or
  JSONL manifest or from a directory tree of audio files, in a deterministic order.
- `prepare_input(row, ...)`: one row -> `(encoded samples, None)` or `([], reason)`. Bad inputs
  are skipped with a reason, never written: missing file, unreadable, empty, NaN/inf, shorter
  than `min_seconds`, longer than `max_seconds` (unless `split_long`).
- `prepared_samples(rows, ...)`: the encoded samples of all rows, in row order, prepared by a
  process pool; skipped rows are appended to a list for `write_skip_report`.

Splitting a long input (`split_long`) cuts it into `ceil(S / max)` equal parts keyed
`<utt_id>_part000`, ...; a part's json has `"split_from"` and `"offset"` (seconds) and an empty
`text` (a transcript cannot be cut with the audio).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np
import soundfile as sf

from colld_ds.formats import SAMPLE_RATE
from colld_ds.data_prep.shards import encode_audio_sample, load_audio

AUDIO_FILE_EXTS = tuple(f".{fmt.lower()}" for fmt in sf.available_formats()) + (".oga", ".opus")


def _utt_id(relative_path: str) -> str:
    """`a/b.c/d.wav` -> `a_b_c_d` (webdataset keys may hold neither `.` nor `/`)."""
    stem = os.path.splitext(relative_path)[0]
    return stem.replace(os.sep, "_").replace("/", "_").replace(".", "_")


def read_manifest(manifest: str, lang: str = "xx") -> list[dict]:
    """Rows of a TSV (header with `path`, optional `text`, `lang`, `utt_id`, `phones`, `speaker`)
    or JSONL manifest (`.jsonl`, one object per line with the same keys).

    Relative paths are taken relative to the manifest's directory; `utt_id` defaults to the
    file name without extension (dots replaced by `_`); `lang` defaults to `lang`.
    """
    with open(manifest, encoding="utf-8") as f:
        if manifest.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f, delimiter="\t"))
    base = os.path.dirname(os.path.abspath(manifest))
    for i, row in enumerate(rows):
        if not row.get("path"):
            raise ValueError(f"{manifest}: row {i + 1} has no 'path'")
        row["path"] = os.path.join(base, row["path"])
        row["utt_id"] = row.get("utt_id") or _utt_id(os.path.basename(row["path"]))
        row["text"] = row.get("text") or ""
        row["lang"] = row.get("lang") or lang
    return _unique(rows, manifest)


def read_directory(root: str, lang: str = "xx") -> list[dict]:
    """Rows for every audio file under `root` (sorted walk); `utt_id` from the relative path."""
    rows = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            if name.lower().endswith(AUDIO_FILE_EXTS):
                path = os.path.join(directory, name)
                utt_id = _utt_id(os.path.relpath(path, root))
                rows.append({"utt_id": utt_id, "path": path, "lang": lang, "text": ""})
    return _unique(rows, root)


def _unique(rows: list[dict], source: str) -> list[dict]:
    seen: dict[str, str] = {}
    for row in rows:
        if row["utt_id"] in seen:
            raise ValueError(f"{source}: duplicate utt_id {row['utt_id']!r} "
                             f"({seen[row['utt_id']]} and {row['path']})")
        seen[row["utt_id"]] = row["path"]
    return rows


def read_inputs(source: str, lang: str = "xx") -> list[dict]:
    """Rows from a directory tree (`read_directory`) or a manifest file (`read_manifest`)."""
    return read_directory(source, lang) if os.path.isdir(source) else read_manifest(source, lang)


def prepare_input(
    row: dict, min_seconds: float, max_seconds: float | None, split_long: bool
) -> tuple[list[dict], str | None]:
    """Load, validate and encode one input: `(webdataset dicts, None)` or `([], skip reason)`."""
    if not os.path.isfile(row["path"]):
        return [], "missing file"
    try:
        wave = load_audio(row["path"])  # (S,) float32 16 kHz mono
    except ValueError as exc:
        return [], f"unreadable: {exc.__cause__ or exc}"
    seconds = wave.size / SAMPLE_RATE
    if wave.size == 0:
        return [], "empty"
    if not np.isfinite(wave).all():
        return [], "NaN or inf samples"
    if seconds < min_seconds:
        return [], f"too short: {seconds:.3f} s < min_seconds {min_seconds}"
    sample = {k: row.get(k) for k in ("utt_id", "lang", "text", "phones")}
    if max_seconds is None or seconds <= max_seconds:
        return [encode_audio_sample({**sample, "wave": wave})], None
    if not split_long:
        return [], f"too long: {seconds:.3f} s > max_seconds {max_seconds} (see --split_long)"
    parts = math.ceil(seconds / max_seconds)
    size = math.ceil(wave.size / parts)
    encoded = []
    for k, start in enumerate(range(0, wave.size, size)):
        part = {**sample, "utt_id": f"{row['utt_id']}_part{k:03d}", "text": "", "phones": None}
        item = encode_audio_sample({**part, "wave": wave[start : start + size]})
        meta = json.loads(item["json"])
        meta.update(split_from=row["utt_id"], offset=start / SAMPLE_RATE)
        encoded.append({**item, "json": json.dumps(meta).encode()})
    return encoded, None


class Done:
    """Placeholder for an input already inside a finished shard: consumed, never re-encoded."""

    def __init__(self, utt_id: str):
        self.utt_id = utt_id


def prepared_samples(
    rows: list[dict],
    skipped: list[tuple[dict, str]],
    done_keys: frozenset[str] = frozenset(),
    workers: int = 1,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    split_long: bool = False,
) -> Iterator[dict | Done]:
    """Encoded samples of `rows` in row order; `(row, reason)` of each bad row goes to `skipped`.

    Rows whose `utt_id` is in `done_keys` (samples of finished shards) are not decoded: they
    yield a `Done`. Split inputs are always decoded again (their part count is unknown).
    `workers > 1` prepares rows in a process pool; results still come in row order.
    """
    todo = [row for row in rows if row["utt_id"] not in done_keys]
    prepare = functools.partial(
        prepare_input, min_seconds=min_seconds, max_seconds=max_seconds, split_long=split_long
    )
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    results = pool.imap(prepare, todo, chunksize=4) if pool else map(prepare, todo)
    try:
        for row in rows:
            if row["utt_id"] in done_keys:
                yield Done(row["utt_id"])
                continue
            encoded, reason = next(results)
            if reason is not None:
                skipped.append((row, reason))
            yield from encoded
    finally:
        if pool:
            pool.terminate()


def write_skip_report(path: str, skipped: list[tuple[dict, str]]) -> None:
    """TSV `utt_id, path, reason` of every skipped input (header only when none), atomically."""
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["utt_id", "path", "reason"])
        writer.writerows([row["utt_id"], row["path"], reason] for row, reason in skipped)
    os.replace(path + ".tmp", path)
