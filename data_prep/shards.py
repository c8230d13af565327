"""Writing audio tar shards: an atomic, resumable writer, the shard index, and audio file I/O.

The format is ``colld_ds.formats``. A shard is written to ``<name>.tar.tmp`` and renamed to
``<name>.tar`` only when complete, so a file named ``*.tar`` is always a whole shard. A re-run
skips shards whose final file exists: the samples of a skipped shard are counted from the shard
itself and consumed from the input without encoding, so a killed prep job resumes with exactly
the same sample-to-shard assignment (given the same input order and limits). A stray
``*.tar.tmp`` is never read as a shard and is overwritten by the next run.

Every writer of shards (``write_shards``, ``colld_ds.data_prep.cache``) refreshes the
directory's shard index atomically when it finishes, under a lock (``shardindex.json.lock``,
removed on release: ``exclusive_lock``) so that concurrent cache-teacher ranks never lose one
another's entries.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import itertools
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm
from webdataset import TarWriter

from colld_ds.errors import ColldError
from colld_ds.formats import (SAMPLE_RATE, SHARD_INDEX, SHARD_INDEX_KIND, shard_index_entry,
                              shard_keys)


def shard_path(out_dir: str, prefix: str, index: int) -> str:
    """The final path of shard `index`: `{out_dir}/{prefix}-{index:06d}.tar`."""
    return os.path.join(out_dir, f"{prefix}-{index:06d}.tar")


def count_samples(path: str) -> int:
    """Number of samples (distinct keys) in the local tar shard `path`, from its headers only."""
    return len(shard_keys(path))


def finished_keys(out_dir: str, prefix: str) -> frozenset[str]:
    """Keys of all complete shards `{out_dir}/{prefix}-*.tar` (what a resumed run need not redo)."""
    if not os.path.isdir(out_dir):
        return frozenset()
    names = [n for n in os.listdir(out_dir) if n.startswith(f"{prefix}-") and n.endswith(".tar")]
    return frozenset(k for n in names for k in shard_keys(os.path.join(out_dir, n)))


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `path`, created for it and removed on release, so no
    empty lock file is left behind. A process that waited on a lock file removed meanwhile finds
    after locking that `path` is no longer the file it holds, and locks the new one: two
    holders never overlap. (A lock on the directory itself would leave nothing either, but NFS
    emulates `flock` with POSIX locks, which need a file open for writing.)"""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                try:
                    yield
                finally:
                    os.unlink(path)  # while still locked: a waiter then sees it is stale
                return
        finally:
            os.close(fd)


def write_shard_index(directory: str) -> str:
    """Write or refresh `directory/shardindex.json` for every `*.tar` in `directory`, atomically
    (temporary name, then rename); return its path. Entries whose shard has the same size and
    mtime as when indexed are kept without reading the shard again."""
    path = os.path.join(directory, SHARD_INDEX)
    with exclusive_lock(path + ".lock"):  # concurrent writers: each scans after the previous wrote
        try:
            with open(path) as f:
                previous = {e["url"]: e for e in json.load(f)["shardlist"]}
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: rebuild
            previous = {}
        shardlist = []
        for name in sorted(n for n in os.listdir(directory) if n.endswith(".tar")):
            stat = os.stat(os.path.join(directory, name))
            entry = previous.get(name, {})
            if (entry.get("filesize"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
                entry = {**shard_index_entry(os.path.join(directory, name)),
                         "mtime_ns": stat.st_mtime_ns}
            shardlist.append(entry)
        index = {"__kind__": SHARD_INDEX_KIND, "wids_version": 1, "shardlist": shardlist}
        with open(path + ".tmp", "w") as f:
            json.dump(index, f)
        os.replace(path + ".tmp", path)
    return path


def shard_stats(paths: Iterable[str]) -> dict:
    """`{"shards", "utterances", "hours", "hours_per_lang": {lang: hours}}` of audio shards,
    reading only their json members."""
    paths = list(paths)
    utterances, seconds = 0, collections.Counter()
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for member in tar.getmembers():
                if member.isreg() and member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    utterances += 1
                    seconds[meta.get("lang", "?")] += meta["duration"]
    per_lang = {lang: s / 3600 for lang, s in sorted(seconds.items())}
    return {"shards": len(paths), "utterances": utterances, "hours": sum(per_lang.values()),
            "hours_per_lang": per_lang}


class ShardWriteError(ColldError, OSError):
    """A shard could not be written (disk full, permissions); earlier shards are intact and no
    partial file is left behind."""


@contextlib.contextmanager
def atomic_shard(path: str) -> Iterator[TarWriter]:
    """A `TarWriter` on `path + ".tmp"`, renamed to `path` when the block completes.

    On an OSError (disk full, permissions, ...) the temporary file is removed and
    `ShardWriteError` names the shard and the fix; any other error also removes it.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f, TarWriter(f) as writer:
            yield writer
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, ShardWriteError):
            error = ShardWriteError(
                f"cannot write shard {path}: {exc.strerror or exc}. Free disk space or fix the "
                f"permissions of {os.path.dirname(path) or '.'}, then re-run: complete shards "
                "are kept and skipped"
            )
            error.errno = exc.errno
            raise error from exc
        raise


def write_shards(
    samples: Iterable[Any],
    encode: Callable[[Any], dict],
    out_dir: str,
    prefix: str = "train",
    max_count: int = 1000,
    max_bytes: int = 1 << 30,
    progress: bool = True,
    key: Callable[[Any], str] | None = None,
) -> list[str]:
    """Write `samples` into atomic tar shards, then refresh `out_dir`'s shard index; return all
    shard paths (written or skipped).

    `encode(sample)` returns a webdataset dict `{"__key__": str, "<ext>": bytes, ...}`. A shard
    is closed after `max_count` samples or once its payload reaches `max_bytes`. Shards whose
    final file exists are skipped (see module docstring); their samples are not encoded. With
    `key(sample)`, the skipped samples' keys must equal the existing shard's keys (in order),
    else ValueError: the inputs or limits changed since the run that wrote it.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be >= 1, got {max_count}, {max_bytes}")
    os.makedirs(out_dir, exist_ok=True)
    it, end = iter(samples), object()
    paths = []
    bar = tqdm(desc=f"shards {prefix}", unit="utt", disable=not progress)
    for index in itertools.count():
        sample = next(it, end)
        if sample is end:
            break
        path = shard_path(out_dir, prefix, index)
        paths.append(path)
        if os.path.exists(path):  # complete shard from an earlier run
            keys = shard_keys(path)
            if not keys:
                raise ValueError(f"existing shard {path} has no samples; delete it and re-run")
            consumed = itertools.chain([sample], itertools.islice(it, len(keys) - 1))
            if key is None:
                collections.deque(consumed, maxlen=0)
            elif [key(s) for s in consumed] != keys:
                raise ValueError(
                    f"existing shard {path} holds other samples than this run puts there: the "
                    "inputs, their order or the shard size changed; delete the shards and re-run"
                )
            bar.update(len(keys))
            continue
        with atomic_shard(path) as writer:
            count, size = 0, 0
            while sample is not end:
                size += writer.write(encode(sample))
                count += 1
                bar.update(1)
                if count >= max_count or size >= max_bytes:
                    break
                sample = next(it, end)
    bar.close()
    write_shard_index(out_dir)
    return paths


def encode_audio_sample(sample: dict) -> dict:
    """Audio sample dict -> webdataset dict with `flac` and `json` members (`colld_ds.formats`).

    `sample`: `{"utt_id": str, "wave": (S,) float32 at 16 kHz or a zero-argument callable
    returning it, "lang": str, "text": str, "phones": str (optional)}`. Samples beyond
    [-1, 1] are clipped. Raises ValueError naming the utt_id for a bad id or waveform.
    """
    utt_id = sample["utt_id"]
    if not utt_id or "." in utt_id or "/" in utt_id:
        raise ValueError(f"utt_id {utt_id!r} must be non-empty without '.' or '/'")
    wave = sample["wave"]() if callable(sample["wave"]) else sample["wave"]
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"{utt_id}: waveform must be non-empty 1-D, got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise ValueError(f"{utt_id}: waveform contains NaN or inf")
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    meta = {"utt_id": utt_id, "lang": sample["lang"], "text": sample["text"]}
    if sample.get("phones") is not None:
        meta["phones"] = sample["phones"]
    meta.update(duration=wave.size / SAMPLE_RATE, sample_rate=SAMPLE_RATE)
    return {"__key__": utt_id, "flac": buf.getvalue(), "json": json.dumps(meta).encode()}


def write_audio_shards(
    samples: Iterable[dict],
    out_dir: str,
    prefix: str = "train",
    max_count: int = 1000,
    max_bytes: int = 1 << 30,
    progress: bool = True,
) -> list[str]:
    """Write audio sample dicts (see `encode_audio_sample`) as atomic shards; return their paths."""
    return write_shards(samples, encode_audio_sample, out_dir, prefix, max_count, max_bytes,
                        progress)


def load_audio(path: str | BinaryIO) -> np.ndarray:
    """Read an audio file as a (S,) float32 mono 16 kHz waveform (channels averaged, soxr).

    Raises ValueError naming the file when soundfile cannot read it.
    """
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)  # (S, C)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise ValueError(f"cannot read audio file {path}: {exc}") from exc
    wave = wave.mean(axis=1)
    if sr != SAMPLE_RATE:
        wave = soxr.resample(wave, sr, SAMPLE_RATE)
    return np.ascontiguousarray(wave, dtype=np.float32)
