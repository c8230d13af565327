"""Streaming audio batches from webdataset tar shards, deterministic and exactly resumable.

Shards are the audio shards of `data_prep.shards` (key `<utt_id>`, `flac` (or `wav`) 16 kHz
mono + `json` with `lang`). `AudioBatchStream` yields `Batch`es forever, epoch after epoch.

How one epoch is laid out, for rank `r` of `R` with `W = max(1, num_workers)` workers:

1. All shards are shuffled with `Random(seed, epoch)` (identical on every rank). If their
   number is not a multiple of `R * W`, the last `len % (R * W)` shards of this order sit out
   the epoch (a warning says so once; the order changes every epoch, so none is lost for good).
2. Explicit node split `shards[r::R]`, then worker split `[w::W]`: every (rank, worker) gets
   the same number of shards, and no shard is read by two of them.
3. Equal step counts: shards may hold different numbers of samples, so each worker yields
   exactly `n = min over all (rank, worker) of (its samples // batch_size)` batches. The sample
   counts come from the tar headers, read once at construction (local files only). Every rank
   therefore yields `epoch_length(epoch) = n * W` batches, and DeepSpeed ranks step together.
   Samples beyond a worker's `n * batch_size` are dropped for this epoch (`drop_last` style).
4. Per worker, a pipeline of named stages (`read_samples` -> `shuffle_samples` -> `take_range`
   -> `decode_audio` -> `random_crop` -> `collate`); the DataLoader returns worker batches in
   round-robin order (worker 0, 1, ..., W-1, 0, ...), so batch `i` of the epoch is batch
   `i // W` of worker `i % W`. Sample shuffling uses `Random(seed, epoch, rank, worker)`, the
   crop offset `default_rng(seed, epoch, crc32(key))`: nothing depends on timing.

Exact resume: `state_dict()` is `{"epoch", "batches_in_epoch"}` of the batches handed to the
caller. A stream loaded with it restarts epoch `e` with each worker skipping the samples of
its batches already consumed (after the shuffle, before decoding) and with the worker roles
rotated so that the DataLoader's round robin starts at the worker that owns batch `k`. Cost of
a resume: each worker re-reads (tar read + shuffle, no FLAC decode) up to `k / W` batches of
samples of the current epoch.

Each epoch starts a fresh DataLoader (workers fork again, a fraction of a second). Errors name
their source: no shards matched (the pattern), a corrupt or truncated shard (its path, at
construction from the header scan, or while streaming), a sample without audio/json (its key).
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
import random
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import braceexpand
import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from data_prep.shards import AUDIO_EXTS, SAMPLE_RATE, count_samples


@dataclass
class Batch:
    """A batch of B zero-padded utterances.

    wave: (B, S) float32, S = longest utterance in the batch (after cropping).
    wave_lengths: (B,) int64, valid samples of each row.
    keys: B utterance ids; langs: B language tags.
    """

    wave: torch.Tensor
    wave_lengths: torch.Tensor
    keys: list[str]
    langs: list[str]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the tensors on `device`."""
        return replace(
            self,
            wave=self.wave.to(device, non_blocking=non_blocking),
            wave_lengths=self.wave_lengths.to(device, non_blocking=non_blocking),
        )


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from a list, a directory (its `*.tar`, sorted) or a brace pattern.

    Raises ValueError naming the pattern when nothing matches or a listed shard is missing.
    """
    if isinstance(urls, str):
        pattern = urls
        if os.path.isdir(urls):
            paths = sorted(glob.glob(os.path.join(urls, "*.tar")))
        else:
            paths = list(braceexpand.braceexpand(urls))
    else:
        pattern, paths = repr(list(urls)), list(urls)
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        detail = f" (missing: {missing[:3]})" if missing else ""
        raise ValueError(f"no shards matched {pattern}{detail}")
    return paths


# --- pipeline stages (each an iterator -> iterator function) ---------------------------------


def read_samples(urls: Sequence[str]) -> Iterator[dict]:
    """Shard paths -> raw samples `{"__key__", "__url__", "flac" | "wav": bytes, "json": bytes}`.

    A corrupt or truncated shard raises ValueError naming it.
    """
    for url in urls:
        try:
            yield from tarfile_samples([{"url": url}])
        except Exception as exc:  # webdataset appends streams and urls to args: keep the message
            detail = exc.args[0] if exc.args else repr(exc)
            raise ValueError(f"cannot read shard {url}: {detail}") from exc


def shuffle_samples(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Same schema; order shuffled through a buffer of `bufsize` samples (0: unchanged)."""
    if bufsize <= 0:
        yield from samples
        return
    buf = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def take_range(samples: Iterator[dict], start: int, stop: int) -> Iterator[dict]:
    """Same schema; only samples `start` .. `stop - 1` (skip consumed, drop the remainder)."""
    return itertools.islice(samples, start, stop)


def decode_audio(samples: Iterator[dict]) -> Iterator[dict]:
    """Raw samples -> `{"key": str, "wave": (S,) float32 16 kHz mono, "lang": str}`.

    A sample without an audio or `json` member raises ValueError naming its key and shard.
    """
    for sample in samples:
        key, url = sample["__key__"], sample.get("__url__")
        audio = next((sample[ext] for ext in AUDIO_EXTS if ext in sample), None)
        if audio is None or "json" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"sample {key} in {url} needs a flac/wav and a json member: has {members}")
        wave, sr = sf.read(io.BytesIO(audio), dtype="float32")
        if sr != SAMPLE_RATE:
            raise ValueError(f"sample {key} in {url} has sample rate {sr}, expected {SAMPLE_RATE}")
        if wave.ndim == 2:
            wave = wave.mean(axis=1)
        yield {"key": key, "wave": wave, "lang": json.loads(sample["json"])["lang"]}


def random_crop(
    samples: Iterator[dict], max_samples: int | None, seed: int, epoch: int
) -> Iterator[dict]:
    """Same schema; waves longer than `max_samples` cropped to it at an offset drawn from
    `default_rng([seed, epoch, crc32(key)])` (None: no crop)."""
    for sample in samples:
        wave = sample["wave"]
        if max_samples is not None and wave.shape[0] > max_samples:
            rng = np.random.default_rng([seed, epoch, zlib.crc32(sample["key"].encode())])
            offset = int(rng.integers(0, wave.shape[0] - max_samples + 1))
            sample = {**sample, "wave": wave[offset : offset + max_samples]}
        yield sample


def collate(samples: Iterator[dict], batch_size: int) -> Iterator[Batch]:
    """Decoded samples -> `Batch`es of exactly `batch_size` (an incomplete tail is dropped)."""
    while chunk := list(itertools.islice(samples, batch_size)):
        if len(chunk) < batch_size:
            return
        lengths = torch.tensor([s["wave"].shape[0] for s in chunk], dtype=torch.int64)  # (B,)
        wave = torch.zeros(batch_size, int(lengths.max()), dtype=torch.float32)  # (B, S)
        for row, s in zip(wave, chunk):
            row[: s["wave"].shape[0]] = torch.from_numpy(s["wave"])
        yield Batch(wave, lengths, [s["key"] for s in chunk], [s["lang"] for s in chunk])


# --- one epoch of one rank --------------------------------------------------------------------


class _EpochDataset(IterableDataset):
    """One rank's batches of one epoch; each DataLoader worker runs the stages on its shards.

    `worker_shards[l]`: shards of logical worker l; each yields `batches_per_worker` batches.
    `skip`: batches of this epoch already consumed; physical worker p plays logical worker
    `(p + skip) % W`, so the DataLoader's round robin continues exactly at batch `skip`.
    """

    def __init__(self, stream: AudioBatchStream, epoch: int, skip: int):
        self.stream, self.epoch, self.skip = stream, epoch, skip
        self.worker_shards = stream.worker_shards(epoch, stream.rank)
        self.batches_per_worker = stream.batches_per_worker(epoch)

    def __iter__(self) -> Iterator[Batch]:
        s, num = self.stream, len(self.worker_shards)
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.skip) % num
        skipped = max(0, (self.skip - logical + num - 1) // num)  # batches i < skip with i % W == l
        rng = random.Random(f"{s.seed}:{self.epoch}:{s.rank}:{logical}")
        samples = read_samples(self.worker_shards[logical])
        samples = shuffle_samples(samples, s.shuffle_buffer, rng)
        samples = take_range(samples, skipped * s.batch_size, self.batches_per_worker * s.batch_size)
        samples = decode_audio(samples)
        samples = random_crop(samples, s.max_samples, s.seed, self.epoch)
        return collate(samples, s.batch_size)


class AudioBatchStream:
    """Infinite, deterministic, exactly resumable stream of `Batch`es for one rank.

    Args:
        urls: shard paths: a list, a directory (all `*.tar`) or a brace pattern
            (`data/train-{000000..000003}.tar`). Local files (sample counts are read up front).
        batch_size: utterances per batch (B).
        max_seconds: crop longer utterances to this many seconds (random offset); None: no crop.
        seed: seeds shard order, sample shuffle and crops (together with the epoch).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: torch DataLoader worker processes (0: read in this process).
        shuffle_buffer: sample shuffle buffer per worker (0: shard order only).

    Raises ValueError when there are fewer shards than `world_size * max(1, num_workers)`, or
    too few samples per worker for one batch. Iterate one iterator at a time: `state_dict()`
    describes the batches that iterator has yielded.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        batch_size: int,
        max_seconds: float | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
    ):
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(
                f"bad batch_size={batch_size}, rank={rank} of world_size={world_size} or num_workers={num_workers}"
            )
        self.urls = expand_urls(urls)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.workers = max(1, num_workers)  # W: pipelines per rank
        self.max_samples = None if max_seconds is None else round(max_seconds * SAMPLE_RATE)
        self.counts = {url: count_samples(url) for url in self.urls}  # samples per shard
        groups = world_size * self.workers
        if len(self.urls) < groups:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed world_size {world_size} x {self.workers} "
                f"workers: write at least {groups} shards (smaller shard_size) or use fewer num_workers"
            )
        if len(self.urls) % groups:
            warnings.warn(
                f"{len(self.urls)} shards is not a multiple of world_size x workers = {groups}: "
                f"{len(self.urls) % groups} shards sit out each epoch (different ones each epoch)",
                stacklevel=2,
            )
        self.batches_per_worker(0)  # fail now if a worker cannot fill one batch
        self._epoch, self._consumed = 0, 0

    def worker_shards(self, epoch: int, rank: int) -> list[list[str]]:
        """Shards of each of `rank`'s W workers in `epoch` (module docstring, steps 1-2)."""
        order = list(self.urls)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        used = len(order) - len(order) % (self.world_size * self.workers)
        node = order[:used][rank :: self.world_size]  # explicit node split
        return [node[w :: self.workers] for w in range(self.workers)]

    def batches_per_worker(self, epoch: int) -> int:
        """Batches every worker of every rank yields in `epoch` (module docstring, step 3)."""
        n = min(
            sum(self.counts[u] for u in shards) // self.batch_size
            for rank in range(self.world_size)
            for shards in self.worker_shards(epoch, rank)
        )
        if n == 0:
            raise ValueError(
                f"some worker's shards hold fewer than batch_size={self.batch_size} samples in epoch "
                f"{epoch}: use a smaller batch_size, fewer num_workers or larger shards"
            )
        return n

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
            raise ValueError(f"state {state} does not fit this stream ({length} batches in epoch {epoch})")
        self._epoch, self._consumed = epoch, consumed

    def __iter__(self) -> Iterator[Batch]:
        while True:
            state = self.state_dict()
            epoch, consumed = state["epoch"], state["batches_in_epoch"]
            expected = self.epoch_length(epoch)
            dataset = _EpochDataset(self, epoch, consumed)  # fresh workers each epoch
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
            for batch in loader:
                consumed += 1
                self._epoch, self._consumed = epoch, consumed
                yield batch
            if consumed != expected:
                raise RuntimeError(
                    f"rank {self.rank} epoch {epoch}: got {consumed} batches, expected {expected} "
                    "(did shards change on disk?)"
                )
            self._epoch, self._consumed = epoch + 1, 0
