"""How one DataLoader worker turns its shuffled samples into batches: fixed size, or by seconds.

Everything here is a pure function of sample metadata: the order of the samples and, per
sample, `"__key__"` and `"__length__"` (16 kHz audio samples of the whole utterance, from the
shard index). `AudioBatchStream` (`colld_ds.data`) runs `Batching.batches` on metadata records
to plan every (rank, worker) of an epoch up front without reading audio, and its workers run
the very same function on the raw samples they stream, so the plan and the run agree by
construction (and a test checks it on real shards).

Fixed batching (`batch_size`): consecutive groups of exactly B shuffled samples.

Dynamic batching (`budget`, padded audio per batch), per worker, after the sample shuffle:

1. take the next `bucket_buffer` samples (fewer at the end of the worker's shards);
2. sort them by cropped length `min(length, max_samples)` (stable: ties keep shuffled order);
3. cut the sorted run greedily into batches whose padded size, longest cropped length x
   number of utterances, fits the budget; an utterance longer than the budget (possible only
   when `max_samples` exceeds it) forms a batch alone: it is never dropped here;
4. shuffle the order of those batches with the worker's batch RNG and emit them.

Every sample of a worker lands in exactly one dynamic batch (fixed batching drops an
incomplete last group).

`EpochPlanner` lays out an epoch over all ranks and workers (shard split, per-worker plans,
the number of batches every worker yields, and where the other utterances go): steps 1-4 of
`docs/data.md`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from colld_ds.formats import SAMPLE_RATE


def shuffle_samples(samples: Iterable[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
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


def fixed_batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Samples -> lists of exactly `batch_size` consecutive samples (an incomplete tail is
    dropped)."""
    it = iter(samples)
    while len(chunk := list(itertools.islice(it, batch_size))) == batch_size:
        yield chunk


def cropped_length(length: int, max_samples: int | None) -> int:
    """Audio samples an utterance of `length` samples keeps after the crop to `max_samples`."""
    return length if max_samples is None else min(length, max_samples)


def bucket_batches(
    samples: Iterable[dict], budget: int, bucket_buffer: int, max_samples: int | None,
    rng: random.Random,
) -> Iterator[list[dict]]:
    """Samples with `"__length__"` -> length-bucketed lists whose padded size (longest cropped
    length x count) is at most `budget` samples, unless one utterance alone exceeds it (steps
    1-4 of the module docstring)."""
    it = iter(samples)
    while buffer := list(itertools.islice(it, bucket_buffer)):
        buffer.sort(key=lambda s: cropped_length(s["__length__"], max_samples))
        batches, batch = [], []
        for sample in buffer:
            longest = cropped_length(sample["__length__"], max_samples)  # sorted: the batch max
            if batch and longest * (len(batch) + 1) > budget:
                batches.append(batch)
                batch = []
            batch.append(sample)
        batches.append(batch)
        rng.shuffle(batches)
        yield from batches


@dataclass(frozen=True)
class Batching:
    """One worker's batching: a sample shuffle, then fixed (`batch_size`) or dynamic (`budget`)
    batches. Exactly one of `batch_size` and `budget` is set.

    batch_size: utterances per batch (B).
    budget: padded 16 kHz audio samples per batch (`batch_seconds * SAMPLE_RATE`).
    bucket_buffer: samples sorted by length together (dynamic batching).
    max_samples: the stream's crop length (None: no crop); the budget counts cropped lengths.
    shuffle_buffer: sample shuffle buffer (0: shard order).
    """

    batch_size: int | None = None
    budget: int | None = None
    bucket_buffer: int = 256
    max_samples: int | None = None
    shuffle_buffer: int = 0

    def __post_init__(self):
        if (self.batch_size is None) == (self.budget is None):
            raise ValueError(f"set exactly one of batch_size ({self.batch_size}) and batch_seconds")
        if (self.batch_size or 1) < 1 or (self.budget or 1) < 1 or self.bucket_buffer < 1:
            raise ValueError(
                f"batch_size, batch_seconds and bucket_buffer must be positive, got batch_size="
                f"{self.batch_size}, a budget of {self.budget} audio samples, "
                f"bucket_buffer={self.bucket_buffer}"
            )

    def batches(self, samples: Iterable[dict], rng_key: str) -> Iterator[list[dict]]:
        """A worker's samples (in shard order) -> its batches, each a list of those samples.

        `rng_key` (`"seed:epoch:rank:worker"`) seeds the sample shuffle and, with `:batches`
        appended, the order of dynamic batches: the result depends on nothing else."""
        shuffled = shuffle_samples(samples, self.shuffle_buffer, random.Random(rng_key))
        if self.budget is None:
            return fixed_batches(shuffled, self.batch_size)
        return bucket_batches(shuffled, self.budget, self.bucket_buffer, self.max_samples,
                              random.Random(f"{rng_key}:batches"))


@dataclass(frozen=True)
class ShardInfo:
    """What the loader knows of a shard before streaming it.

    url: the path or URL as given; keys: its sample keys in file order; lengths: 16 kHz audio
    samples of each (from the shard index or the json members), None when neither was read
    (local shards without an index, fixed batching); filesize: bytes of the shard file (the
    index's `filesize`, or the local file's), None when an index entry has none; left out of
    comparisons, so a shard scanned or indexed is the same `ShardInfo`.
    """

    url: str
    keys: tuple[str, ...]
    lengths: tuple[int, ...] | None
    filesize: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class EpochAccounting:
    """Where the utterances of all shards go in one epoch, over all ranks.

    batches_per_worker: n, the batches every worker yields. utterances: in all shards. used: in
    the yielded batches. sat_out: in shards sitting out the epoch. dropped: the others, in no
    yielded batch; dropped_seconds: their audio (None with fixed batches, not planned per key).
    """

    batches_per_worker: int
    utterances: int
    used: int
    sat_out: int
    dropped_seconds: float | None

    @property
    def dropped(self) -> int:
        return self.utterances - self.used - self.sat_out


class EpochPlanner:
    """The layout of every epoch over `world_size` ranks x `workers` workers, from metadata only.

    `shards`: `ShardInfo` of each of `urls`; `batching`: every worker's `Batching`.
    """

    def __init__(self, urls: Sequence[str], shards: dict[str, ShardInfo], batching: Batching,
                 seed: int, world_size: int, workers: int):
        self.urls, self.shards, self.batching = list(urls), shards, batching
        self.seed, self.world_size, self.workers = seed, world_size, workers
        self._accountings: dict[int, EpochAccounting] = {}

    def worker_shards(self, epoch: int, rank: int) -> list[list[str]]:
        """Shards of each of `rank`'s workers in `epoch`: all shards shuffled with
        `Random(seed:epoch)`, the last `len % (world_size * workers)` left out, then the
        explicit node split `[rank::world_size]` and the worker split `[w::workers]`."""
        order = list(self.urls)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        used = len(order) - len(order) % (self.world_size * self.workers)
        node = order[:used][rank :: self.world_size]
        return [node[w :: self.workers] for w in range(self.workers)]

    def rng_key(self, epoch: int, rank: int, worker: int) -> str:
        """Seed of (rank, worker)'s sample shuffle and batch order in `epoch`."""
        return f"{self.seed}:{epoch}:{rank}:{worker}"

    def worker_batches(self, epoch: int, rank: int, worker: int) -> Iterator[list[dict]]:
        """All batches (rank, worker) plans in `epoch`, as lists of metadata records
        `{"__key__", "__length__"?}`: what its `Batching.batches` does to the real samples."""
        def records():
            for url in self.worker_shards(epoch, rank)[worker]:
                shard = self.shards[url]
                for i, key in enumerate(shard.keys):
                    if shard.lengths is None:
                        yield {"__key__": key}
                    else:
                        yield {"__key__": key, "__length__": shard.lengths[i]}

        return self.batching.batches(records(), self.rng_key(epoch, rank, worker))

    def plan(self, epoch: int, rank: int) -> list[list[list[str]]]:
        """Keys of every batch each of `rank`'s workers plans in `epoch`, in order; a worker
        yields the first `accounting(epoch).batches_per_worker` of its list."""
        return [[[r["__key__"] for r in batch] for batch in self.worker_batches(epoch, rank, w)]
                for w in range(self.workers)]

    def accounting(self, epoch: int) -> EpochAccounting:
        """Utterances used, dropped and sitting out in `epoch` over all ranks (kept for the last
        few epochs asked). ValueError when some worker cannot fill one batch."""
        if epoch in self._accountings:
            return self._accountings[epoch]
        fixed = self.batching.budget is None
        batch_sizes, in_workers = [], 0  # per (rank, worker): (utterances, audio) of each batch
        for rank in range(self.world_size):
            for worker, urls in enumerate(self.worker_shards(epoch, rank)):
                count = sum(len(self.shards[u].keys) for u in urls)
                in_workers += count
                if fixed:  # closed form: no need to plan per key
                    size = self.batching.batch_size
                    batch_sizes.append([(size, 0)] * (count // size))
                else:
                    batch_sizes.append([(len(b), sum(r["__length__"] for r in b))
                                        for b in self.worker_batches(epoch, rank, worker)])
        n = min(len(sizes) for sizes in batch_sizes)
        if n == 0:
            least = f"batch_size={self.batching.batch_size}" if fixed else "one"
            raise ValueError(
                f"some worker's shards hold fewer than {least} samples in epoch {epoch}: use "
                f"{'a smaller batch_size, ' if fixed else ''}fewer num_workers or larger shards"
            )
        utterances = sum(len(shard.keys) for shard in self.shards.values())
        dropped_audio = sum(audio for sizes in batch_sizes for _, audio in sizes[n:])
        accounting = EpochAccounting(
            batches_per_worker=n, utterances=utterances,
            used=sum(size for sizes in batch_sizes for size, _ in sizes[:n]),
            sat_out=utterances - in_workers,
            dropped_seconds=None if fixed else dropped_audio / SAMPLE_RATE,
        )
        if len(self._accountings) >= 4:
            self._accountings.pop(min(self._accountings))
        self._accountings[epoch] = accounting
        return accounting
