"""Streaming audio batches from webdataset tar shards, deterministic and exactly resumable.

Shards are the audio shards of `data_prep.shards` (key `<utt_id>`, `flac` (or `wav`) 16 kHz
mono + `json` with `lang`). `AudioBatchStream` yields `Batch`es forever, epoch after epoch.

Cached mode (`expect_teacher=` a teacher identity): the shards are teacher-cache shards of
`data_prep.cache` (audio + one fp16 `(T, D)` array per teacher layer, whole utterance). Each
sample's cache identity must match (`check_teacher_identity`), and batches also carry the
cached frames. Crops start at a whole frame `f0` (audio offset `f0 * stride`) and keep frames
`[f0, f0 + num_frames(crop length))` of the whole-utterance features: exactly the frames the
student's front end produces for the cropped audio (`FrameGeometry`). Audio mode crops at whole
frames too (20 ms, all supported families), so both modes cut the same audio.

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
construction from the header scan, or while streaming), a sample without audio/json (its key),
a cache of another teacher (both identities), a sample missing a layer (its member name).
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

FRAME_STRIDE = 320  # samples per frame (20 ms) of every supported teacher family
_IDENTITY_KEYS = ("config_hash", "target_kind")  # must be equal; the run's layers must be cached


@dataclass
class Batch:
    """A batch of B zero-padded utterances.

    wave: (B, S) float32, S = longest utterance in the batch (after cropping).
    wave_lengths: (B,) int64, valid samples of each row.
    keys: B utterance ids; langs: B language tags.
    teacher_features: cached mode only: one (B, T, D_t) float16 tensor per expected teacher
        layer (in `expect_teacher["layers"]` order), zero at padded frames; T = frames of S.
    frame_lengths: cached mode only: (B,) int64 valid frames of each row.
    """

    wave: torch.Tensor
    wave_lengths: torch.Tensor
    keys: list[str]
    langs: list[str]
    teacher_features: list[torch.Tensor] | None = None
    frame_lengths: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the tensors on `device`."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        features = self.teacher_features
        return replace(
            self,
            wave=move(self.wave),
            wave_lengths=move(self.wave_lengths),
            teacher_features=None if features is None else [move(f) for f in features],
            frame_lengths=move(self.frame_lengths),
        )


@dataclass(frozen=True)
class FrameGeometry:
    """How a front end frames audio: frame t covers samples `[stride * t, stride * t + field)`.

    wav2vec2-like conv front ends: (320, 400); w2v-BERT stacked fbank: (320, 560).
    """

    stride: int = FRAME_STRIDE
    receptive_field: int = 400

    def num_frames(self, num_samples: int) -> int:
        """Frames of `num_samples` samples: `floor((S - field) / stride) + 1` (0 if too short)."""
        return max(0, (num_samples - self.receptive_field) // self.stride + 1)

    @classmethod
    def of(cls, identity: dict) -> FrameGeometry:
        """The geometry recorded in a cache identity (`frame_stride`, `receptive_field`)."""
        return cls(int(identity["frame_stride"]), int(identity["receptive_field"]))


def feature_member(layer: int, target_kind: str) -> str:
    """Cache member (extension after the key) of teacher `layer`: `l04.layer_output.npy`."""
    return f"l{layer:02d}.{target_kind}.npy"


def check_teacher_identity(found: dict, expected: dict, where: str) -> None:
    """Refuse a cache whose teacher differs from the run's: same config hash and target kind,
    and every expected layer cached. ValueError printing both identities otherwise."""
    same = all(found.get(k) == expected.get(k) for k in _IDENTITY_KEYS)
    if not same or not set(expected["layers"]) <= set(found.get("layers", ())):
        def show(identity):
            return json.dumps({k: v for k, v in identity.items() if k != "num_frames"}, sort_keys=True)

        raise ValueError(
            f"{where} was cached from a different teacher, layer list or target kind:\n"
            f"  cache: {show(found)}\n  run:   {show(expected)}\n"
            "re-run cache-teacher with the run's teacher, layers and target kind"
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


def decode_wave(sample: dict) -> np.ndarray:
    """Raw sample -> its (S,) float32 16 kHz mono waveform; ValueError naming key and shard
    when it has no audio or `json` member or another sample rate."""
    key, url = sample["__key__"], sample.get("__url__")
    audio = next((sample[ext] for ext in AUDIO_EXTS if ext in sample), None)
    if audio is None or "json" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample {key} in {url} needs a flac/wav and a json member: has {members}")
    wave, sr = sf.read(io.BytesIO(audio), dtype="float32")
    if sr != SAMPLE_RATE:
        raise ValueError(f"sample {key} in {url} has sample rate {sr}, expected {SAMPLE_RATE}")
    return wave.mean(axis=1) if wave.ndim == 2 else wave


def _cached_frames(sample: dict, meta: dict, expect: dict, num_samples: int) -> list[np.ndarray]:
    """The (T, D) float16 arrays of `expect["layers"]`, checked against the cache identity and
    the audio length (T = frames of the whole utterance)."""
    key, url = sample["__key__"], sample.get("__url__")
    if "teacher" not in meta:
        raise ValueError(f"sample {key} in {url} has no teacher identity: not a teacher-cache shard")
    check_teacher_identity(meta["teacher"], expect, f"sample {key} in {url}")
    num_frames = FrameGeometry.of(meta["teacher"]).num_frames(num_samples)
    frames = []
    for layer in expect["layers"]:
        name = feature_member(layer, expect["target_kind"])
        if name not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"sample {key} in {url} has no member {name!r} (teacher layer {layer}): has {members}")
        array = np.load(io.BytesIO(sample[name]), allow_pickle=False)
        if array.ndim != 2 or array.shape[0] != num_frames:
            raise ValueError(
                f"sample {key} in {url}: {name} has shape {array.shape}, expected ({num_frames}, D) "
                f"for {num_samples} audio samples"
            )
        frames.append(array)
    return frames


def decode_audio(samples: Iterator[dict], expect_teacher: dict | None = None) -> Iterator[dict]:
    """Raw samples -> `{"key": str, "wave": (S,) float32 16 kHz mono, "lang": str}`, plus in
    cached mode `"frames"`: one (T, D_t) float16 array per expected layer and `"geometry"`.

    A sample without an audio or `json` member raises ValueError naming its key and shard.
    """
    for sample in samples:
        wave, meta = decode_wave(sample), json.loads(sample["json"])
        decoded = {"key": sample["__key__"], "wave": wave, "lang": meta["lang"]}
        if expect_teacher is not None:
            decoded["frames"] = _cached_frames(sample, meta, expect_teacher, wave.shape[0])
            decoded["geometry"] = FrameGeometry.of(meta["teacher"])
        yield decoded


def random_crop(
    samples: Iterator[dict], max_samples: int | None, seed: int, epoch: int
) -> Iterator[dict]:
    """Same schema; waves longer than `max_samples` cropped to it, starting at a whole frame
    `f0` drawn from `default_rng([seed, epoch, crc32(key)])` (None: no crop). Cached frames are
    cut to `[f0, f0 + num_frames(max_samples))`, the frames of the cropped audio."""
    for sample in samples:
        wave = sample["wave"]
        if max_samples is not None and wave.shape[0] > max_samples:
            geometry = sample.get("geometry", FrameGeometry())
            rng = np.random.default_rng([seed, epoch, zlib.crc32(sample["key"].encode())])
            f0 = int(rng.integers(0, (wave.shape[0] - max_samples) // geometry.stride + 1))
            offset = f0 * geometry.stride
            sample = {**sample, "wave": wave[offset : offset + max_samples]}
            if "frames" in sample:
                end = f0 + geometry.num_frames(max_samples)
                sample["frames"] = [frames[f0:end] for frames in sample["frames"]]
        yield sample


def _pad(arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """B arrays (L_b, ...) -> (B, max L_b, ...) zero padded."""
    out = torch.zeros(len(arrays), max(a.shape[0] for a in arrays), *arrays[0].shape[1:], dtype=dtype)
    for row, a in zip(out, arrays):
        row[: a.shape[0]] = torch.from_numpy(a)
    return out


def collate(samples: Iterator[dict], batch_size: int) -> Iterator[Batch]:
    """Decoded samples -> `Batch`es of exactly `batch_size` (an incomplete tail is dropped)."""
    while chunk := list(itertools.islice(samples, batch_size)):
        if len(chunk) < batch_size:
            return
        lengths = torch.tensor([s["wave"].shape[0] for s in chunk], dtype=torch.int64)  # (B,)
        batch = Batch(_pad([s["wave"] for s in chunk], torch.float32), lengths,  # (B, S)
                      [s["key"] for s in chunk], [s["lang"] for s in chunk])
        if "frames" in chunk[0]:
            batch.frame_lengths = torch.tensor([s["frames"][0].shape[0] for s in chunk])  # (B,)
            batch.teacher_features = [  # L_req x (B, T, D_t)
                _pad([s["frames"][i] for s in chunk], torch.float16) for i in range(len(chunk[0]["frames"]))
            ]
        yield batch


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
        samples = decode_audio(samples, s.expect_teacher)
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
        expect_teacher: cached mode: the run's teacher identity (`Teacher.identity`: at least
            `config_hash`, `target_kind`, `layers`); the shards must be teacher-cache shards of
            that teacher holding those layers. None: audio mode (extra members are ignored).

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
        expect_teacher: dict | None = None,
    ):
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(
                f"bad batch_size={batch_size}, rank={rank} of world_size={world_size} or num_workers={num_workers}"
            )
        self.urls = expand_urls(urls)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.expect_teacher = expect_teacher
        if expect_teacher is not None:  # fail now, not in a worker, on a wrong or missing cache
            next(decode_audio(read_samples(self.urls[:1]), expect_teacher), None)
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
