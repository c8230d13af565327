"""Streaming audio batches from webdataset tar shards, deterministic and exactly resumable.

`AudioBatchStream` yields `Batch`es (padded waves `(B, S)`, lengths, and in cached mode the
teacher's frames `(B, T, D)` per layer, decoded from fp16, int8, pq or rq by `colld_ds.codecs`)
forever, epoch after epoch, from local shards or streamed URLs (`colld_ds.remote`). Every
(rank, worker) takes the same number of batches per epoch, planned from the shard index before
any audio is read (`colld_ds.batching`), and `state_dict()` / `load_state_dict()` resume
mid-epoch exactly.
Errors name the shard, URL, sample or member at fault. The epoch layout, cropping rules and
resume mechanics: `docs/data.md`.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import re
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import braceexpand
import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from colld_ds.batching import Batching, EpochPlanner, ShardInfo
from colld_ds.codecs import (CodeDecoder, check_layer_arrays, codebook_path, decode,
                             read_codebook)
from colld_ds.errors import ColldError, DataError, verbose
from colld_ds.formats import (AUDIO_EXTS, FRONT_END_MEMBER, QUANTISED, SAMPLE_RATE, SHARD_INDEX,
                              FrameGeometry, cache_codec, check_teacher_identity, codebook_identity,
                              layer_members, read_shard_index, shard_index_entry, shard_keys)
from colld_ds.remote import RemoteReadError, is_remote, open_stream

_SHARD_NAME = re.compile(r"[^\s/'\"=]+\.tar\b")  # a shard's file name inside a path, URL or command
_REFRESH = ("refresh it with `colld prep index <shard directory>` (make_shards and "
            "cache-teacher do so when they finish)")


@dataclass
class Batch:
    """A batch of B zero-padded utterances.

    wave: (B, S) float32, S = longest utterance in the batch (after cropping).
    wave_lengths: (B,) int64, valid samples of each row.
    keys: B utterance ids; langs: B language tags.
    teacher_features: cached mode only: one (B, T, D_t) float16 tensor per expected teacher
        layer (in `expect_teacher["layers"]` order), zero at padded frames; T = frames of S.
        None while `teacher_codes` holds the layers.
    teacher_codes: cached mode, pq and rq caches read with `decode_codes=False` only: one
        (B, T, M) uint8 tensor of codes per expected layer (zero at padded frames), which
        `codecs.CodeDecoder` decodes into `teacher_features` on the training device.
    frame_lengths: cached mode only: (B,) int64 valid frames of each row.
    front_end_features: cached mode with `"front_end"` expected only: the teacher's conv
        front-end output, (B, T, C) float16 zero at padded frames (C = 512 for released
        wav2vec2-like models); Whisper: (B, W, D) float16, its whole window (padding included).
    """

    wave: torch.Tensor
    wave_lengths: torch.Tensor
    keys: list[str]
    langs: list[str]
    teacher_features: list[torch.Tensor] | None = None
    teacher_codes: list[torch.Tensor] | None = None
    frame_lengths: torch.Tensor | None = None
    front_end_features: torch.Tensor | None = None
    damaged: list[DamagedShard] = field(default_factory=list)
    """`on_bad_shard="skip"`: shards found damaged since the worker's previous batch."""

    @property
    def num_cached_frames(self) -> int:
        """Cached mode: T, the frames of the padded batch."""
        return (self.teacher_features or self.teacher_codes)[0].shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the tensors on `device`."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        features, codes = self.teacher_features, self.teacher_codes
        return replace(
            self,
            wave=move(self.wave),
            wave_lengths=move(self.wave_lengths),
            teacher_features=None if features is None else [move(f) for f in features],
            teacher_codes=None if codes is None else [move(c) for c in codes],
            frame_lengths=move(self.frame_lengths),
            front_end_features=move(self.front_end_features),
        )


def shard_name(url: str) -> str:
    """The shard's file name (the last `*.tar` name in a path, URL or `pipe:` command): the key
    of its shard index entry. ValueError when `url` names no `*.tar` file."""
    names = _SHARD_NAME.findall(url)
    if not names:
        raise DataError(f"shard {url} names no *.tar file: "
                        "shard index entries are matched by file name")
    return names[-1]


def expand_urls(urls: str | Sequence[str], allow_remote: bool = False) -> list[str]:
    """Shard paths from a list, a directory (its `*.tar`, sorted), a brace pattern or, for
    local paths, a glob (`data/test-*.tar`, sorted); with `allow_remote`, also streamed URLs
    (`is_remote`), which are not checked here.

    Raises ValueError naming the pattern when nothing matches or a listed local shard is
    missing, and naming the URL when a URL is given to a reader of local files.
    """
    if isinstance(urls, str):
        pattern = urls
        if os.path.isdir(urls):
            paths = sorted(glob.glob(os.path.join(urls, "*.tar")))
        else:
            paths = list(braceexpand.braceexpand(urls))
            paths = [match for p in paths for match in
                     (sorted(glob.glob(p)) if glob.has_magic(p) and not is_remote(p) else [p])]
    else:
        pattern, paths = repr(list(urls)), list(urls)
    remote = [p for p in paths if is_remote(p)]
    if remote and not allow_remote:
        raise DataError(f"shard {remote[0]} is not a local file: "
                        "this command reads local shards only")
    missing = [p for p in paths if not is_remote(p) and not os.path.isfile(p)]
    if not paths or missing:
        detail = f" (missing: {missing[:3]})" if missing else ""
        check = f"; check it with `ls {pattern}`" if isinstance(urls, str) else ""
        raise DataError(
            f"no shards matched {pattern}{detail}: give a directory of *.tar shards, a brace "
            f"pattern (train-{{000000..000003}}.tar) or a glob (train-*.tar), relative to "
            f"{os.getcwd()}{check}")
    return paths


def _index_beside(urls: Sequence[str]) -> str | None:
    """`shardindex.json` in the first shard's directory (URL directory for streamed shards):
    None for `pipe:` shards (no directory) and for local shards without one (they are scanned)."""
    if urls[0].startswith("pipe:"):
        return None
    index = os.path.join(os.path.dirname(urls[0]), SHARD_INDEX)
    return index if is_remote(index) or os.path.isfile(index) else None


def _scanned(url: str, need_lengths: bool) -> ShardInfo:
    """`ShardInfo` of a local shard from its tar headers (and json durations if needed)."""
    if not need_lengths:
        return ShardInfo(url, tuple(shard_keys(url)), None, os.path.getsize(url))
    entry = shard_index_entry(url)
    return ShardInfo(url, tuple(entry["keys"]), tuple(entry["lengths"]), entry["filesize"])


def shard_infos(urls: Sequence[str], shard_index: str | None,
                need_lengths: bool) -> dict[str, ShardInfo]:
    """`ShardInfo` of each url, from `shard_index` (path or URL), else from the index beside
    the shards; local shards without an entry (or without any index) are scanned.

    ValueError naming the shards and the fix for streamed shards without a readable index or
    entry, and naming index and shard when a local shard's size differs from its entry's.
    """
    index = shard_index or _index_beside(urls)
    streamed = next((u for u in urls if is_remote(u)), None)
    fix = (f"streamed shards ({streamed}, ...) need a shard index: put the shardindex.json that "
           "make_shards / cache-teacher write beside them, or set data.shard_index "
           "(cache-teacher: --shard_index)")
    if index is None:
        if streamed:
            raise DataError(f"no shard index found for {streamed}: {fix}")
        return {u: _scanned(u, need_lengths) for u in urls}
    try:
        entries = read_shard_index(index)
    except ValueError as exc:
        if streamed and not shard_index:  # the index we looked for beside them
            raise DataError(f"{exc}; if it is missing there: {fix}") from exc
        raise
    infos = {}
    for url in urls:
        entry = entries.get(shard_name(url))
        size = None if is_remote(url) else os.path.getsize(url)
        if entry is None and size is not None:
            infos[url] = _scanned(url, need_lengths)
        elif entry is None or (size is not None and entry.get("filesize", size) != size):
            problem = "has no entry for" if entry is None else "gives another file size for"
            raise DataError(f"shard index {index} {problem} shard {url}: "
                            f"it is stale or of other shards; {_REFRESH}")
        else:
            infos[url] = ShardInfo(url, tuple(entry["keys"]), tuple(entry["lengths"]),
                                   entry.get("filesize", size))
    return infos


def check_shards(urls: str | Sequence[str], shard_index: str | None = None) -> None:
    """Fail fast, before a teacher is loaded: the shards match (`expand_urls`), and for streamed
    ones the index and the first shard can be read (wrong host, bucket, key or credentials).
    ValueError naming the pattern, index or URL."""
    expanded = expand_urls(urls, allow_remote=True)
    if is_remote(expanded[0]):
        shard_infos(expanded[:1], shard_index, need_lengths=False)
        next(read_samples(expanded[:1]), None)


# --- pipeline stages (each an iterator -> iterator function) ---------------------------------


def read_samples(urls: Sequence[str]) -> Iterator[dict]:
    """Shard paths or URLs -> raw samples `{"__key__", "__url__", "flac" | "wav": bytes,
    "json": bytes, ...}`, read with webdataset's tar iterators from `colld_ds.remote.open_stream`.

    A corrupt or truncated shard raises DataError naming it; a stream that fails (404, no such
    bucket or key, a connection dropped mid-shard) `RemoteReadError`, a DataError, naming it.
    """
    for url in urls:
        try:
            with open_stream(url) as stream:
                yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        except Exception as exc:  # webdataset appends streams and urls to args: keep the message
            first = exc.args[0] if exc.args else repr(exc)  # OSError's is its errno
            detail = getattr(exc, "message", None) or (first if isinstance(first, str)
                                                       else str(exc))
            detail = detail.removeprefix(f"cannot read {url}: ")
            error = RemoteReadError if isinstance(exc, RemoteReadError) else DataError
            raise error(f"cannot read shard {url}: {detail}") from exc


@dataclass(frozen=True)
class DamagedShard:
    """A shard that failed mid-read under `on_bad_shard="skip"`: its samples from the failure
    on (`skipped`, by its index) were left out; `reason`: the error."""

    url: str
    skipped: int
    reason: str


def read_indexed(shards: Sequence[ShardInfo], damaged: list[DamagedShard] | None = None
                 ) -> Iterator[dict]:
    """Shards -> raw samples (`read_samples`) plus `"__length__"` (16 kHz audio samples, from
    the index) when known. DataError naming the shard when it cannot be read or its keys differ
    from `ShardInfo`'s; with a `damaged` list, such a shard is recorded there instead and the
    next one read."""
    end = object()
    for shard in shards:
        read = 0
        try:
            pairs = itertools.zip_longest(read_samples([shard.url]), shard.keys, fillvalue=end)
            for position, (sample, key) in enumerate(pairs):
                found = end if sample is end else sample["__key__"]
                if found != key:
                    def show(x):
                        return "the end of the shard" if x is end else repr(x)

                    raise DataError(
                        f"shard {shard.url} holds {show(found)} at sample {position} where "
                        f"its index or header scan said {show(key)}: it is damaged (restore it, "
                        f"or set data.on_bad_shard skip) or was changed on purpose ({_REFRESH})"
                    )
                if shard.lengths is not None:
                    sample["__length__"] = shard.lengths[position]
                read += 1
                yield sample
        except DataError as exc:
            if damaged is None:
                raise
            damaged.append(DamagedShard(shard.url, len(shard.keys) - read, str(exc)))


def take_range(items: Iterator, start: int, stop: int) -> Iterator:
    """Same items; only items `start` .. `stop - 1` (skip consumed, drop the remainder)."""
    return itertools.islice(items, start, stop)


def decode_wave(sample: dict) -> np.ndarray:
    """Raw sample -> its (S,) float32 16 kHz mono waveform; ValueError naming key and shard
    when it has no audio or `json` member or another sample rate."""
    key, url = sample["__key__"], sample.get("__url__")
    audio = next((sample[ext] for ext in AUDIO_EXTS if ext in sample), None)
    if audio is None or "json" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"sample {key} in {url} needs a flac/wav and a json member: has {members}")
    wave, sr = sf.read(io.BytesIO(audio), dtype="float32")
    if sr != SAMPLE_RATE:
        raise DataError(f"sample {key} in {url} has sample rate {sr}, expected {SAMPLE_RATE}")
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def cached_frames(sample: dict, meta: dict, expect: dict, num_samples: int,
                  codebook_file: str | None, decode_codes: bool = True) -> list[np.ndarray]:
    """A raw sample's (T, D) float16 arrays of `expect["layers"]` (`meta`: its parsed json),
    checked against the cache identity and the audio length `num_samples` (T = frames of the
    whole utterance), decoded from the cache's codec (`colld_ds.codecs`; pq, rq: with the
    codebook `codebook_file`, else the one beside the shard). The loader's decode, which
    `benchmarks/train_throughput.py --codecs` times. pq and rq with `decode_codes` False: their
    (T, M) uint8 codes, undecoded (the codebook is not read)."""
    key, url = sample["__key__"], sample.get("__url__")
    if "teacher" not in meta:
        raise DataError(f"sample {key} in {url} has no teacher identity: not a teacher-cache shard")
    where = f"sample {key} in {url}"
    check_teacher_identity(meta["teacher"], expect, where)
    codec = cache_codec(meta["teacher"], where)
    num_frames = FrameGeometry.of(meta["teacher"]).num_frames(num_samples)
    cached_layers, codebooks = list(meta["teacher"]["layers"]), None
    undecoded = codec in QUANTISED and not decode_codes
    if codec in QUANTISED:  # (L, M, 256, D / M) for pq, (L, M, 256, D) for rq
        book = codebook_identity(meta["teacher"], where)
        if decode_codes:
            codebooks = read_codebook(codebook_path(url, codebook_file, book.file_name),
                                      book.sha256, len(cached_layers), book.num_codebooks, codec)
    frames = []
    for layer in expect["layers"]:
        names = layer_members(layer, expect["target_kind"], codec)
        for name in names:
            if name not in sample:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise DataError(
                    f"{where} has no member {name!r} (teacher layer {layer}): has {members}")
        try:
            arrays = [np.load(io.BytesIO(sample[n]), allow_pickle=False) for n in names]
            if undecoded:
                check_layer_arrays(arrays, codec, book.num_codebooks)
                array = arrays[0]
            else:
                array = decode(arrays, codec, None if codebooks is None
                               else codebooks[cached_layers.index(layer)])
        except ValueError as exc:
            raise DataError(f"{where}: {', '.join(names)}: {exc}") from exc
        if array.shape[0] != num_frames:
            raise DataError(
                f"{where}: {names[0]} has shape {array.shape}, expected ({num_frames}, D) "
                f"for {num_samples} audio samples"
            )
        frames.append(array)
    return frames


def _cached_front_end(sample: dict, meta: dict, num_frames: int) -> np.ndarray:
    """The (T, C) (`"utterance"`) or (W, D) (`"window"`) float16 front-end array of a sample
    whose identity was checked; ValueError naming the sample when it is missing or misshaped."""
    key, url, identity = sample["__key__"], sample.get("__url__"), meta["teacher"]
    if FRONT_END_MEMBER not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"sample {key} in {url} has no member {FRONT_END_MEMBER!r}: has {members}")
    array = np.load(io.BytesIO(sample[FRONT_END_MEMBER]), allow_pickle=False)
    if identity["front_end"] == "window":  # Whisper: all frames of its window
        num_frames = round(identity["window_seconds"] * identity["frame_rate"])
    if array.ndim != 2 or array.shape[0] != num_frames:
        raise DataError(f"sample {key} in {url}: {FRONT_END_MEMBER} has shape {array.shape}, "
                         f"expected ({num_frames}, C)")
    return array


def decode_audio(samples: Iterator[dict], expect_teacher: dict | None = None,
                 codebook_file: str | None = None, decode_codes: bool = True
                 ) -> Iterator[dict]:
    """Raw samples -> `{"key": str, "wave": (S,) float32 16 kHz mono, "lang": str}`, plus in
    cached mode `"frames"`: one (T, D_t) float16 array per expected layer (pq, rq caches:
    decoded with the codebook `codebook_file`, None: the one beside the shard; with
    `decode_codes` False their (T, M) uint8 codes instead) and `"geometry"`,
    and if `expect_teacher` has `"front_end"`, `"front_end"`: the (T, C) or (W, D) float16
    array and `"front_end_frames"`: `"utterance"` or `"window"`.

    A sample without an audio or `json` member, or whose audio length is not the
    `"__length__"` its shard index gave, raises ValueError naming its key and shard.
    """
    for sample in samples:
        wave, meta = decode_wave(sample), json.loads(sample["json"])
        if wave.shape[0] != sample.get("__length__", wave.shape[0]):
            raise DataError(
                f"sample {sample['__key__']} in {sample.get('__url__')} has {wave.shape[0]} audio "
                f"samples where its shard index says {sample['__length__']}: {_REFRESH}"
            )
        decoded = {"key": sample["__key__"], "wave": wave, "lang": meta["lang"]}
        if expect_teacher is not None:
            decoded["frames"] = cached_frames(sample, meta, expect_teacher, wave.shape[0],
                                              codebook_file, decode_codes)
            decoded["geometry"] = FrameGeometry.of(meta["teacher"])
            if expect_teacher.get("front_end"):
                num_frames = decoded["frames"][0].shape[0]
                decoded["front_end"] = _cached_front_end(sample, meta, num_frames)
                decoded["front_end_frames"] = meta["teacher"]["front_end"]
        yield decoded


def random_crop(
    samples: Iterator[dict], max_samples: int | None, seed: int, epoch: int
) -> Iterator[dict]:
    """Same schema; waves longer than `max_samples` cropped to it, starting at a whole frame
    `f0` drawn from `default_rng([seed, epoch, crc32(key)])` (None: no crop). Cached frames
    (and an `"utterance"` front end) are cut to `[f0, f0 + num_frames(max_samples))`, the frames
    of the cropped audio; a `"window"` front end cannot be cut (ValueError naming the sample)."""
    for sample in samples:
        wave = sample["wave"]
        if max_samples is not None and wave.shape[0] > max_samples:
            if sample.get("front_end_frames") == "window":
                raise DataError(
                    f"sample {sample['key']} ({wave.shape[0]} samples) would be cropped to "
                    f"{max_samples}, but its cached front end is Whisper's whole window, which a "
                    "crop changes: with data.cached_front_end set data.max_seconds to the window"
                )
            geometry = sample.get("geometry", FrameGeometry())
            rng = np.random.default_rng([seed, epoch, zlib.crc32(sample["key"].encode())])
            f0 = int(rng.integers(0, (wave.shape[0] - max_samples) // geometry.stride + 1))
            offset = f0 * geometry.stride
            sample = {**sample, "wave": wave[offset : offset + max_samples]}
            if "frames" in sample:
                end = f0 + geometry.num_frames(max_samples)
                sample["frames"] = [frames[f0:end] for frames in sample["frames"]]
                if "front_end" in sample:
                    sample["front_end"] = sample["front_end"][f0:end]
        yield sample


def _pad(arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """B arrays (L_b, ...) -> (B, max L_b, ...) zero padded."""
    longest = max(a.shape[0] for a in arrays)
    out = torch.zeros(len(arrays), longest, *arrays[0].shape[1:], dtype=dtype)
    for row, a in zip(out, arrays):
        row[: a.shape[0]] = torch.from_numpy(a)
    return out


def collate(samples: list[dict]) -> Batch:
    """Decoded (and cropped) samples -> one zero-padded `Batch` of B = len(samples)."""
    lengths = torch.tensor([s["wave"].shape[0] for s in samples], dtype=torch.int64)  # (B,)
    batch = Batch(_pad([s["wave"] for s in samples], torch.float32), lengths,  # (B, S)
                  [s["key"] for s in samples], [s["lang"] for s in samples])
    if "frames" in samples[0]:
        batch.frame_lengths = torch.tensor([s["frames"][0].shape[0] for s in samples])  # (B,)
        codes = samples[0]["frames"][0].dtype == np.uint8  # pq, rq undecoded
        padded = [_pad([s["frames"][i] for s in samples], torch.uint8 if codes else torch.float16)
                  for i in range(len(samples[0]["frames"]))]  # L_req x (B, T, M or D_t)
        if codes:
            batch.teacher_codes = padded
        else:
            batch.teacher_features = padded
    if "front_end" in samples[0]:  # (B, T, C), or Whisper's (B, W, D)
        batch.front_end_features = _pad([s["front_end"] for s in samples], torch.float16)
    return batch


# --- one epoch of one rank --------------------------------------------------------------------


class _EpochDataset(IterableDataset):
    """One rank's batches of one epoch; each DataLoader worker runs the stages on its shards.

    `worker_shards[l]`: shards of logical worker l; each yields `batches_per_worker` batches.
    `skip`: batches of this epoch already consumed; physical worker p plays logical worker
    `(p + skip) % W`, so the DataLoader's round robin continues exactly at batch `skip`.
    """

    def __init__(self, stream: AudioBatchStream, epoch: int, skip: int):
        self.stream, self.epoch, self.skip = stream, epoch, skip
        self.worker_shards = stream.planner.worker_shards(epoch, stream.rank)
        self.batches_per_worker = stream.batches_per_worker(epoch)

    def __iter__(self) -> Iterator[Batch]:
        s, num = self.stream, len(self.worker_shards)
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.skip) % num
        skipped = max(0, (self.skip - logical + num - 1) // num)  # batches i < skip with i % W == l
        shards = [s.shards[url] for url in self.worker_shards[logical]]
        key = s.planner.rng_key(self.epoch, s.rank, logical)
        damaged: list[DamagedShard] = []
        if s.on_bad_shard == "skip":
            batches = self._refilled(shards, key, damaged)
        else:
            batches = s.batching.batches(read_indexed(shards), key)
        for raw in take_range(batches, skipped, self.batches_per_worker):
            audio = decode_audio(raw, s.expect_teacher, s.codebook_file, s.decode_codes)
            decoded = random_crop(audio, s.max_samples, s.seed, self.epoch)
            batch = collate(list(decoded))
            batch.damaged, damaged[:] = list(damaged), []     # reported with the next batch
            yield batch

    def _refilled(self, shards: list[ShardInfo], key: str, damaged: list[DamagedShard]
                  ) -> Iterator[list[dict]]:
        """`on_bad_shard="skip"`: the worker's batches without the damaged shards' remaining
        samples, then, only if that left it short of its planned count, batches of its samples
        read again (reshuffled each pass): every worker still yields its count, so ranks step
        together. Damage is recorded in `damaged` on the first pass."""
        for attempt in itertools.count():
            made = 0
            samples = read_indexed(shards, damaged if attempt == 0 else [])
            rng_key = key if attempt == 0 else f"{key}:again{attempt}"
            for batch in self.stream.batching.batches(samples, rng_key):
                made += 1
                yield batch
            if made == 0:
                raise DataError(
                    f"rank {self.stream.rank}: every shard of one of its workers in epoch "
                    f"{self.epoch} is damaged "
                    f"({[d.url for d in damaged] or [s.url for s in shards]}): "
                    "nothing is left to keep the ranks in step; restore the shards and resume")


def _unwrapped(error: ColldError) -> ColldError:
    """A user error from a DataLoader worker with its own message again: torch puts the
    worker's traceback into the message, which the CLI prints alone (kept with --verbose)."""
    text, marker = str(error), f"{type(error).__module__}.{type(error).__qualname__}: "
    if verbose() or not text.startswith("Caught ") or marker not in text:
        return error
    return type(error)(text[text.rindex(marker) + len(marker):].rstrip())


class AudioBatchStream:
    """Infinite, deterministic, exactly resumable stream of `Batch`es for one rank.

    Args:
        urls: shards: a list, a directory (all `*.tar`) or a brace pattern
            (`data/train-{000000..000003}.tar`) of local paths or streamed URLs (`http(s)://`,
            `s3://`, `pipe:`; these need a shard index, see `docs/data.md`).
        batch_size: fixed batching: utterances per batch (B).
        max_seconds: crop longer utterances to this many seconds (random offset); None: no crop.
        seed: seeds shard order, sample shuffle, batch order and crops (with the epoch).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: torch DataLoader worker processes (0: read in this process).
        shuffle_buffer: sample shuffle buffer per worker (0: shard order only).
        expect_teacher: cached mode: the run's teacher identity (`Teacher.identity`: at least
            `config_hash`, `target_kind`, `layers`); the shards must be teacher-cache shards of
            that teacher holding those layers. With `"front_end"`
            (`Teacher.cache_identity(front_end=True)`) they must hold the front end's output
            too, and batches carry it (`Batch.front_end_features`). With `"target_norm"` (the
            run's `objective.target_norm`) a cache standardised per utterance is read only for
            `utterance` or `utterance_position` (`formats.check_teacher_identity`). None: audio
            mode (extra members are ignored).
        batch_seconds: dynamic batching instead of `batch_size`: padded audio seconds per batch
            (longest cropped utterance x B; B varies). Set exactly one of the two.
        bucket_buffer: dynamic batching: samples sorted by length together (per worker, raw
            samples held in memory at once).
        shard_index: the shards' index (path or URL); None: `shardindex.json` beside them.
        on_bad_shard: a shard that fails while streaming (truncated, corrupt, unreachable):
            `"stop"` raises; `"skip"` leaves out its remaining samples, reports it in
            `Batch.damaged` and refills the worker's batches (`_EpochDataset._refilled`).
        codebook_file: cached mode, pq caches: the codebook (path or URL) when it is not beside
            the shards, as for `pipe:` shards (`codecs.codebook_path`); None: beside them.
        decode_codes: cached mode, pq and rq caches: False ships their codes undecoded
            (`Batch.teacher_codes`), for `code_decoder` to decode on the training device.

    Raises ValueError when there are fewer shards than `world_size * max(1, num_workers)`, or
    some worker cannot fill one batch. Iterate one iterator at a time: `state_dict()`
    describes the batches that iterator has yielded.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        batch_size: int | None = None,
        max_seconds: float | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        expect_teacher: dict | None = None,
        batch_seconds: float | None = None,
        bucket_buffer: int = 256,
        shard_index: str | None = None,
        on_bad_shard: str = "stop",
        codebook_file: str | None = None,
        decode_codes: bool = True,
    ):
        if on_bad_shard not in ("stop", "skip"):
            raise ValueError(f"on_bad_shard {on_bad_shard!r}: choose stop or skip")
        self.on_bad_shard = on_bad_shard
        if not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"bad rank={rank} of world_size={world_size} "
                             f"or num_workers={num_workers}")
        self.max_samples = None if max_seconds is None else round(max_seconds * SAMPLE_RATE)
        self.batching = Batching(
            batch_size=batch_size, shuffle_buffer=shuffle_buffer, bucket_buffer=bucket_buffer,
            budget=None if batch_seconds is None else round(batch_seconds * SAMPLE_RATE),
            max_samples=self.max_samples,
        )
        self.urls = expand_urls(urls, allow_remote=True)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.expect_teacher = num_workers, expect_teacher
        self.codebook_file, self.decode_codes = codebook_file, decode_codes
        self.shards = shard_infos(self.urls, shard_index, need_lengths=batch_seconds is not None)
        self._first_identity: tuple[str, str | None, dict] | None = None  # (where, url, identity)
        if expect_teacher is not None:  # fail now, not in a worker, on a wrong or missing cache
            first = next(read_samples(self.urls[:1]), None)
            if first is not None:  # decoded whole: its codebook is checked too
                next(decode_audio(iter([first]), expect_teacher, codebook_file))
                self._first_identity = (f"sample {first['__key__']} in {first.get('__url__')}",
                                        first.get("__url__"), json.loads(first["json"])["teacher"])
        elif is_remote(self.urls[0]):  # and on a wrong host, bucket or credentials
            next(read_samples(self.urls[:1]), None)
        self.workers = max(1, num_workers)  # W: pipelines per rank
        groups = world_size * self.workers
        if len(self.urls) < groups:
            raise DataError(
                f"{len(self.urls)} shards cannot feed world_size {world_size} x {self.workers} "
                f"workers: write at least {groups} shards (smaller shard_size) "
                "or use fewer num_workers"
            )
        if len(self.urls) % groups:
            warnings.warn(
                f"{len(self.urls)} shards is not a multiple of world_size x workers = {groups}: "
                f"{len(self.urls) % groups} shards sit out each epoch (different ones each epoch)",
                stacklevel=2,
            )
        self.planner = EpochPlanner(self.urls, self.shards, self.batching, seed, world_size,
                                    self.workers)
        first = self.planner.accounting(0)  # fails now if a worker cannot fill one batch
        if rank == 0 and first.dropped:
            seconds = ("" if first.dropped_seconds is None
                       else f" ({first.dropped_seconds:.1f} s of audio)")
            warnings.warn(
                f"epoch 0: every worker yields {first.batches_per_worker} batches (equal steps on "
                f"all ranks), so {first.dropped} of {first.utterances} utterances{seconds} beyond "
                "them are not seen this epoch (each epoch orders them anew); shards of equal "
                "size, more samples per worker or fewer workers drop fewer",
                stacklevel=2,
            )
        self._epoch, self._consumed = 0, 0

    def code_decoder(self, device: torch.device | str) -> CodeDecoder | None:
        """Cached mode, a pq or rq cache: the `codecs.CodeDecoder` of its codebook (the one
        its first sample's identity names, checked against it) for the expected layers, on
        `device`, which decodes the `Batch.teacher_codes` of `decode_codes=False`. None for
        fp16 and int8 caches, whose loader always decodes."""
        if self._first_identity is None:
            return None
        where, url, identity = self._first_identity
        codec = cache_codec(identity, where)
        if codec not in QUANTISED:
            return None
        book = codebook_identity(identity, where)
        codebooks = read_codebook(codebook_path(url, self.codebook_file, book.file_name),
                                  book.sha256, len(identity["layers"]), book.num_codebooks, codec)
        rows = [identity["layers"].index(layer) for layer in self.expect_teacher["layers"]]
        return CodeDecoder(codec, codebooks[rows], device)

    def batches_per_worker(self, epoch: int) -> int:
        """Batches every worker of every rank yields in `epoch` (`docs/data.md`, step 4)."""
        return self.planner.accounting(epoch).batches_per_worker

    def epoch_length(self, epoch: int) -> int:
        """Batches this rank (and every rank) yields in `epoch`."""
        return self.batches_per_worker(epoch) * self.workers

    def state_dict(self) -> dict:
        """`{"epoch": int, "batches_in_epoch": int}` of the batches handed out so far."""
        if self._consumed == self.epoch_length(self._epoch):  # a finished epoch
            return {"epoch": self._epoch + 1, "batches_in_epoch": 0}
        return {"epoch": self._epoch, "batches_in_epoch": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state` (from `state_dict()` of a stream with the same settings)."""
        epoch, consumed = int(state["epoch"]), int(state["batches_in_epoch"])
        if epoch < 0 or not 0 <= consumed <= self.epoch_length(epoch):
            length = self.epoch_length(epoch)
            raise DataError(f"state {state} does not fit this stream "
                            f"({length} batches in epoch {epoch})")
        self._epoch, self._consumed = epoch, consumed

    def __iter__(self) -> Iterator[Batch]:
        while True:
            state = self.state_dict()
            epoch, consumed = state["epoch"], state["batches_in_epoch"]
            expected = self.epoch_length(epoch)
            dataset = _EpochDataset(self, epoch, consumed)  # fresh workers each epoch
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
            try:
                for batch in loader:
                    consumed += 1
                    self._epoch, self._consumed = epoch, consumed
                    yield batch
            except ColldError as error:
                raise _unwrapped(error) from None
            if consumed != expected:
                raise RuntimeError(
                    f"rank {self.rank} epoch {epoch}: got {consumed} batches, expected {expected} "
                    "(did shards change on disk?)"
                )
            self._epoch, self._consumed = epoch + 1, 0


class DamageReport:
    """The damaged shards one rank met under `data.on_bad_shard: skip`: each printed when met
    (`watch`), all ranks' summed in one line at the end (`summary`)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.shards: list[DamagedShard] = []

    def watch(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """The same batches; their `damaged` shards recorded and printed to stderr."""
        for batch in batches:
            for shard in batch.damaged:
                self.shards.append(shard)
                print(f"[colld] rank {self.rank}: skipped the {shard.skipped} remaining samples of "
                      f"damaged shard {shard.url} (data.on_bad_shard skip): {shard.reason}",
                      file=sys.stderr, flush=True)
            yield batch

    def summary(self) -> str | None:
        """One line over all ranks (collective when torch.distributed is initialised: every
        rank calls it), or None when no shard was damaged."""
        parts = [self.shards]
        if dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.shards)
        shards = [shard for part in parts for shard in part]
        if not shards:
            return None
        per_url: dict[str, int] = {}
        for shard in shards:
            per_url[shard.url] = per_url.get(shard.url, 0) + shard.skipped
        listed = ", ".join(f"{url} ({count})" for url, count in per_url.items())
        return (f"[colld] data.on_bad_shard skip: {sum(per_url.values())} samples of "
                f"{len(per_url)} damaged shard(s) were skipped: {listed}")
