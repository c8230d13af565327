"""Teacher-cache shards: the frozen teacher's per-layer features stored next to the audio.

Format: one cache shard per audio shard, with the same file name, in another directory. Each
sample keeps the audio shard's members as they are (`flac`/`wav`, `json`) and adds, per cached
teacher layer i, `<key>.l{i:02d}.{target_kind}.npy` (`colld_ds.data.feature_member`): the
float16 (T, D_t) features of the whole utterance, T = frames of its S samples. The json gains
`"teacher"`: `{name, model_type, config_hash, layers, target_kind, frame_rate, frame_stride,
receptive_field, num_frames}` (`frame_stride`, `receptive_field`: `colld_ds.data.FrameGeometry`).

The teacher sees each utterance exactly as alone and unpadded: utterances run one at a time,
or (`batch_size > 1`) padded in batches only if the teacher passes a padding check (features
of an utterance alone == the same utterance padded with 1 s of zeros). Group-norm wav2vec2 /
HuBERT models fail it and fall back to one at a time, with a warning.

Shards are written to `<name>.tar.tmp` and renamed when complete; a re-run skips complete
shards (after checking their teacher identity), so a killed job resumes. The shard list is
split across processes by `rank`/`world_size` (default: `RANK`/`WORLD_SIZE` as set by torchrun
or DeepSpeed): process r caches shards r, r + world_size, ... Each process refreshes the
directory's shard index when it finishes (`data_prep.shards.write_shard_index`, locked).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from colld_ds.data import FrameGeometry, check_teacher_identity, decode_wave, expand_urls
from colld_ds.data import feature_member, read_samples
from colld_ds.models import Teacher, load_teacher, read_num_layers
from data_prep.shards import SAMPLE_RATE, atomic_shard, count_samples, write_shard_index

_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_layers(layers: int | str | Sequence[int], teacher_dir: str) -> list[int]:
    """`all`, `4`, `"2,4"` or `[2, 4]` -> 1-based teacher layers."""
    if layers == "all":
        return list(range(1, read_num_layers(teacher_dir) + 1))
    if isinstance(layers, str):
        return [int(x) for x in layers.split(",")]
    return [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]


def frame_geometry(teacher: Teacher) -> FrameGeometry:
    """The teacher front end's framing, probed from `num_frames`; ValueError if it is not
    `floor((S - field) / stride) + 1` (the cropping in `colld_ds.data` relies on it)."""
    stride = int(teacher.front_end.frame_stride)
    lengths = torch.arange(0, 20 * stride)
    frames = teacher.num_frames(lengths).clamp(min=0)
    geometry = FrameGeometry(stride, int(lengths[frames >= 1][0]))
    if frames.tolist() != [geometry.num_frames(int(s)) for s in lengths]:
        raise ValueError(f"teacher {teacher.path}: front end frames are not {geometry}")
    return geometry


def features(teacher: Teacher, waves: list[np.ndarray]) -> list[list[np.ndarray]]:
    """B waves (S_b,) -> per wave, one float16 (T_b, D_t) array per teacher layer (one padded
    batch: call it with one wave unless the teacher is padding invariant)."""
    device = next(teacher.model.parameters()).device
    lengths = torch.tensor([w.shape[0] for w in waves])  # (B,)
    batch = torch.zeros(len(waves), int(lengths.max()))  # (B, S)
    for row, w in zip(batch, waves):
        row[: w.shape[0]] = torch.from_numpy(w)
    out = teacher(batch.to(device), lengths.to(device))  # L_req x (B, T, D_t)
    frames = out.frame_lengths.tolist()
    layers = [h.to(torch.float16).cpu().numpy() for h in out.features]
    return [[h[b, : frames[b]] for h in layers] for b in range(len(waves))]


def padding_invariant(teacher: Teacher, wave: np.ndarray) -> bool:
    """Whether `wave`'s features alone equal those with 1 s of zero padding after it."""
    (alone,) = features(teacher, [wave])
    (padded, _) = features(teacher, [wave, np.zeros(wave.shape[0] + SAMPLE_RATE, np.float32)])
    tol = 1e-3 if teacher.dtype == torch.float32 else 3e-2
    return all(
        np.allclose(a, p, rtol=tol, atol=tol * float(np.abs(a).max()))
        for a, p in zip(alone, padded)
    )


def _cache_sample(sample: dict, frames: list[np.ndarray], identity: dict) -> dict:
    """Raw audio sample + its per-layer frames -> the cache sample (module docstring)."""
    key, url = sample["__key__"], sample["__url__"]
    meta = json.loads(sample["json"])
    meta["teacher"] = {**identity, "num_frames": frames[0].shape[0]}
    out = {k: v for k, v in sample.items() if not k.startswith("__")}
    out.update(__key__=key, json=json.dumps(meta).encode())
    for layer, array in zip(identity["layers"], frames):
        if not np.isfinite(array).all():
            raise ValueError(f"sample {key} in {url}: teacher layer {layer} overflows float16")
        buf = io.BytesIO()
        np.save(buf, array)
        out[feature_member(layer, identity["target_kind"])] = buf.getvalue()
    return out


def cache_shard(teacher: Teacher, identity: dict, url: str, path: str, batch_size: int,
                bar: tqdm) -> float:
    """Write the cache shard of audio shard `url` to `path` atomically; return audio seconds."""
    seconds, samples = 0.0, read_samples([url])
    with atomic_shard(path) as writer:
        while chunk := list(itertools.islice(samples, batch_size)):
            waves = [decode_wave(s) for s in chunk]
            order = sorted(range(len(waves)), key=lambda i: waves[i].shape[0])  # less padding
            frames = dict(zip(order, features(teacher, [waves[i] for i in order])))
            for i, sample in enumerate(chunk):
                writer.write(_cache_sample(sample, frames[i], identity))
                seconds += waves[i].shape[0] / SAMPLE_RATE
            bar.update(len(chunk))
    return seconds


def _is_complete(path: str, identity: dict) -> bool:
    """Whether `path` is a finished cache shard of this teacher (ValueError: of another)."""
    if not os.path.exists(path):
        return False
    first = next(read_samples([path]), None)
    found = json.loads(first["json"]).get("teacher", {}) if first else {}
    check_teacher_identity(found, identity, f"existing cache shard {path}")
    return True


def cache_teacher(
    shards: str | Sequence[str],
    teacher: str,
    layers: int | str | Sequence[int],
    out_dir: str,
    target_kind: str = "layer_output",
    dtype: str = "auto",
    batch_size: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    window_seconds: float | None = None,
) -> list[str]:
    """Cache `teacher`'s `layers` (`all`, `4`, `2,4`) over this process's share of the audio
    `shards`; return the cache paths of that share. `dtype`: `auto` (fp16 on CUDA, fp32 on
    CPU), `fp32`, `fp16`, `bf16`. `window_seconds`: a Whisper teacher's window
    (`teacher.window_seconds`; None: 30 s), part of the cache's teacher identity. Prints audio
    seconds per second at the end."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    urls = expand_urls(shards)[rank::world_size]
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    model = load_teacher(teacher, parse_layers(layers, teacher), target_kind, _DTYPES[dtype], device,
                         window_seconds)
    geometry = frame_geometry(model)
    identity = {**model.identity, "frame_stride": geometry.stride,
                "receptive_field": geometry.receptive_field}
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, os.path.basename(url)) for url in urls]
    todo = [(u, p) for u, p in zip(urls, paths) if not _is_complete(p, identity)]
    if batch_size > 1 and todo:
        first = decode_wave(next(read_samples([todo[0][0]])))
        if not padding_invariant(model, first):
            warnings.warn(f"teacher {teacher} is not padding invariant: caching one utterance at a time")
            batch_size = 1
    bar = tqdm(total=sum(count_samples(u) for u, _ in todo), unit="utt", disable=not progress,
               desc=f"cache rank {rank}")
    start, seconds = time.perf_counter(), 0.0
    for url, path in todo:
        seconds += cache_shard(model, identity, url, path, batch_size, bar)
    bar.close()
    write_shard_index(out_dir)
    elapsed = time.perf_counter() - start
    print(
        f"rank {rank}/{world_size}: cached {len(todo)} shards ({len(urls) - len(todo)} already "
        f"done), {seconds / 3600:.4f} h of audio in {elapsed:.1f} s = "
        f"{seconds / max(elapsed, 1e-9):.1f} audio s/s"
    )
    return paths
