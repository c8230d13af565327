"""How big a teacher cache will be, computed before any of it is written (`cache-teacher
--estimate`), and `check_free_space`, which `cache-teacher` runs before it starts.

A cache shard holds its audio shard's members (the audio shard's file size stands for them)
plus, per utterance of S samples and T = `FrameGeometry.num_frames(S)` frames: per cached
layer one tar member per array of `colld_ds.formats.layer_arrays` (`.npy` header and data,
padded to `TAR_BLOCK`, after `TAR_MEMBER_HEADER`), the front end's float16 array if cached
((T, C), or Whisper's whole window (W, D)), and the teacher identity added to its json; a pq
cache adds its codebook once (`CODEBOOK_FILE`, float32 (L, M, 256, D / M), and its json). Exact
but for the json (its growth is counted without the block padding) and the end-of-archive
padding of each tar (under 10 KiB).
"""

from __future__ import annotations

import errno
import io
import json
import shutil
from dataclasses import dataclass

import numpy as np

from colld_ds.batching import ShardInfo
from colld_ds.errors import DataError
from colld_ds.formats import (CODEBOOK_ENTRIES, SAMPLE_RATE, TAR_BLOCK, TAR_MEMBER_HEADER,
                              FrameGeometry, layer_arrays)
from colld_ds.data_prep.shards import ShardWriteError

CODEBOOK_META_BYTES = 512  # about what colld_ds.data_prep.codebook's codebook.json takes

def npy_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of `np.save` of an array of `shape` and `dtype` (format 1.0 header + data)."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape})
    return len(header.getvalue()) + int(np.prod(shape)) * np.dtype(dtype).itemsize


def member_bytes(payload: int) -> int:
    """Bytes a tar member of `payload` data bytes takes in a shard written by webdataset."""
    return TAR_MEMBER_HEADER + -(-payload // TAR_BLOCK) * TAR_BLOCK


@dataclass(frozen=True)
class CacheShape:
    """What a cache stores per utterance: `identity` (the teacher identity its json gains, with
    `codec` and `layers`), the width D of each cached layer, the framing, and the front end's
    float16 array if cached: `(None, C)` for (T, C) per utterance, `(W, D)` for a whole window."""

    identity: dict
    widths: tuple[int, ...]
    geometry: FrameGeometry
    front_end: tuple[int | None, int] | None = None

    @property
    def num_codebooks(self) -> int:
        """pq, rq: the M codes of a frame (0 for the other codecs)."""
        return self.identity.get("codebook", {}).get("num_codebooks", 0)

    def layer_bytes(self, num_frames: int) -> int:
        """Bytes of the members of all cached layers of an utterance of `num_frames` frames."""
        arrays = [array for width in self.widths for array in layer_arrays(
            self.identity["codec"], num_frames, width, self.num_codebooks)]
        return sum(member_bytes(npy_bytes(shape, dtype)) for shape, dtype in arrays)

    def codebook_bytes(self) -> int:
        """Bytes of the pq or rq codebook files beside the shards (0 for the other codecs)."""
        if not self.num_codebooks:
            return 0
        width = self.widths[0]
        shape = (len(self.widths), self.num_codebooks, CODEBOOK_ENTRIES,
                 width // self.num_codebooks if self.identity["codec"] == "pq" else width)
        return npy_bytes(shape, "float32") + CODEBOOK_META_BYTES

    def added_bytes(self, num_samples: int) -> int:
        """Bytes a cache shard adds to an audio shard for an utterance of `num_samples` samples."""
        num_frames = self.geometry.num_frames(num_samples)
        total = self.layer_bytes(num_frames)
        if self.front_end is not None:
            rows, width = self.front_end
            total += member_bytes(npy_bytes((rows or num_frames, width), "float16"))
        teacher = json.dumps({**self.identity, "num_frames": num_frames})
        return total + len(', "teacher": ') + len(teacher)


@dataclass(frozen=True)
class CacheEstimate:
    """The projected size of a cache over some audio shards."""

    shape: CacheShape
    shards: int
    utterances: int
    audio_seconds: float
    frames: int
    audio_bytes: int  # the audio shards' files, whose members the cache copies
    layer_bytes: int  # the cached layers' members
    total_bytes: int  # the shards and the pq codebook

    def per_hour(self, nbytes: int) -> float:
        """`nbytes` per hour of audio."""
        return nbytes * 3600 / max(self.audio_seconds, 1e-9)

    def report(self) -> str:
        """The lines `cache-teacher --estimate` prints."""
        identity, per_hour = self.shape.identity, self.per_hour(self.total_bytes)
        per_frame = self.layer_bytes / max(self.frames * len(self.shape.widths), 1)
        return "\n".join([
            f"cache estimate: teacher {identity.get('name')}, layers {identity['layers']} "
            f"(D {', '.join(map(str, self.shape.widths))}), codec {identity['codec']}, "
            f"front end {'yes' if self.shape.front_end else 'no'}",
            f"  {self.shards} shards, {self.utterances} utterances, "
            f"{self.audio_seconds / 3600:.4f} h of audio, {self.frames} frames",
            f"  layers: {per_frame:.1f} bytes per frame per layer (tar and npy headers included), "
            f"{human(self.per_hour(self.layer_bytes))} per hour of audio"
            + (f"; {identity['codec']} codebook {human(self.shape.codebook_bytes())} once"
               if self.shape.codebook_bytes() else ""),
            f"  whole cache: {human(per_hour)} per hour of audio (audio "
            f"{human(self.per_hour(self.audio_bytes))}); these shards: {human(self.total_bytes)} "
            f"({self.total_bytes:,} bytes)",
            f"  projected: 1,000 h {human(1000 * per_hour)}, 10,000 h {human(10000 * per_hour)}",
        ])


def human(nbytes: float) -> str:
    """Decimal units: `368.6 MB`, `11.06 TB`."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}" if unit == "TB" else f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


def estimate_cache(shards: list[ShardInfo], shape: CacheShape) -> CacheEstimate:
    """The size of the cache of audio `shards` (their index entries or scans: lengths and file
    sizes, so streamed shards are never opened) stored as `shape` says. DataError naming the
    shard when its size is unknown (an index entry without `filesize`)."""
    unsized = next((shard.url for shard in shards if shard.filesize is None), None)
    if unsized is not None:
        raise DataError(f"the shard index gives no filesize for {unsized}: rewrite the index "
                        "with `colld prep index <shard directory>` and copy it beside the shards")
    lengths = [length for shard in shards for length in shard.lengths]
    audio_bytes = sum(shard.filesize for shard in shards)
    frames = sum(shape.geometry.num_frames(s) for s in lengths)
    layer_bytes = sum(shape.layer_bytes(shape.geometry.num_frames(s)) for s in lengths)
    added = sum(shape.added_bytes(s) for s in lengths)
    return CacheEstimate(shape, len(shards), len(lengths), sum(lengths) / SAMPLE_RATE, frames,
                         audio_bytes, layer_bytes, audio_bytes + added + shape.codebook_bytes())


def check_free_space(out_dir: str, needed: CacheEstimate) -> None:
    """ShardWriteError (ENOSPC) naming `out_dir`, both sizes and the fixes when the estimated
    shards do not fit in its free space."""
    free = shutil.disk_usage(out_dir).free
    if needed.total_bytes > free:
        error = ShardWriteError(
            f"cache-teacher: the {needed.shards} shards still to cache need about "
            f"{human(needed.total_bytes)} (estimate, codec {needed.shape.identity['codec']}) but "
            f"{out_dir} has {human(free)} free: free space, choose another --out_dir, cache fewer "
            "--layers or use --codec int8 (--estimate prints the sizes)"
        )
        error.errno = errno.ENOSPC
        raise error
