"""Teacher-cache shards: the frozen teacher's per-layer features stored next to the audio.

Format: one cache shard per audio shard, with the same file name, in another directory. Each
sample keeps the audio shard's members as they are (`flac`/`wav`, `json`) and adds, per cached
teacher layer i, the (T, D_t) features of the whole utterance (T = frames of its S samples)
stored with the cache's `codec` (`colld_ds.codecs`): `fp16` (default) as the float16 array
`<key>.l{i:02d}.{target_kind}.npy`, `int8` as int8 codes and float16 per-channel scales, `pq`
and `rq` as uint8 (T, M) codes into the cache's codebook (`colld_ds.formats.layer_members`).
The json gains `"teacher"`: `{name, model_type, config_hash, layers, target_kind, frame_rate,
frame_stride, receptive_field, codec, num_frames}` (pq, rq: and `codebook`,
`formats.codebook_identity`; `frame_stride`, `receptive_field`:
`colld_ds.formats.FrameGeometry`).

`--standardise utterance` stores each layer standardised per dimension over the utterance's
frames (`colld_ds.codecs.standardise_utterance`), before any codec: the identity records
`"standardised": "utterance"`, pq and rq codebooks are learned on standardised frames too, and
only runs with `objective.target_norm: utterance` or `utterance_position` read the cache (which
give them the targets the plain cache would). With pq or rq this spends the codebook on what
those runs compare, not on each dimension's offset and spread.

`--codec pq` (and `rq`) first learns the codebook (`colld_ds.data_prep.codebook`:
`--num_codebooks` M, `--codebook_train_frames`, `--seed`) into `out_dir`, or reuses the one
there; with several ranks it must be there already (`train_codebook`, `colld prep
train-codebook`), so that they all share it. M is pq's sub-vectors and rq's stages: one codebook
of 256 centroids each, one byte per frame and layer each.

With `front_end=True` (for `data.cached_front_end`), the same teacher forward also gives the
output of its convolutional front end (`colld_ds.models.teacher`), stored as
`<key>.front_end.npy` (`colld_ds.formats.FRONT_END_MEMBER`): float16 (T, C) for wav2vec2-like
teachers (C = 512 for released models), (W, D) for Whisper (conv2's GELU output over the whole
window of W frames). The identity then records `"front_end": "utterance"` or `"window"`; a
re-run with the other setting refuses the existing shards (a cache is all with or all without).

The teacher sees each utterance exactly as alone and unpadded: utterances run one at a time,
or (`batch_size > 1`) padded in batches only if the teacher passes a padding check (features
of an utterance alone == the same utterance padded with 1 s of zeros). Group-norm wav2vec2 /
HuBERT models fail it and fall back to one at a time, with a warning.

Before it starts, `cache_teacher` estimates the size of the shards still missing (of all ranks,
`colld_ds.data_prep.cache_size`) and refuses when `shutil.disk_usage` of `out_dir` says it will not
fit; `estimate=True` prints that estimate for all the shards and writes nothing. Shards are written
to `<name>.tar.tmp` and renamed when complete; a re-run skips complete shards (after checking their
teacher identity, codec and codebook), so a killed job resumes. The shard list is split across
processes by `rank`/`world_size` (default: `RANK`/`WORLD_SIZE` as set by torchrun or DeepSpeed):
process r caches shards r, r + world_size, ... Each process refreshes the directory's shard index
when it finishes (`colld_ds.data_prep.shards.write_shard_index`, locked).

The audio shards may be streamed (`colld_ds.remote`: `https://`, `s3://`, `pipe:`). Their shard
index (beside them, or `shard_index`) is read before the teacher loads and gives the counts,
lengths and file sizes for the estimate and the free-space check; the cache shard of
`https://host/dir/train-000001.tar` is `out_dir/train-000001.tar`. A stream that fails (404, no
such bucket or key, a connection dropped mid-shard) raises `RemoteReadError` naming the URL,
and the shard's `.tmp` is removed. `out_dir` itself is a local or shared directory: the
renames, the resume and the locked index need a filesystem (copy a cache to s3 afterwards).
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from colld_ds.codecs import encode, standardise_utterance
from colld_ds.batching import ShardInfo
from colld_ds.data import decode_wave, expand_urls, read_samples, shard_infos, shard_name
from colld_ds.errors import DataError, TeacherError
from colld_ds.formats import (CODEBOOK_FILE, CODEBOOK_VERSION, CODECS, FRONT_END_MEMBER, QUANTISED,
                              SAMPLE_RATE, STANDARDISE, FrameGeometry, check_teacher_identity,
                              layer_members)
from colld_ds.models import Teacher, load_teacher, read_num_layers
from colld_ds.remote import is_remote
from colld_ds.data_prep.cache_size import CacheShape, check_free_space, estimate_cache
from colld_ds.data_prep.codebook import codebook_for
from colld_ds.data_prep.shards import atomic_shard, write_shard_index

_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """The settings `cache_teacher` and `train_codebook` share (their docstrings say what each
    means): the teacher (`teacher` directory, `layers`, `target_kind`, `dtype` name, Whisper
    `window_seconds`) and how its cache stores it (`front_end`, `codec`, `standardise`; pq and
    rq: `num_codebooks` M, `codebook_train_frames`, `seed` of the codebook). DataError for an
    unknown `codec` or `standardise`."""

    teacher: str
    layers: int | str | Sequence[int]
    target_kind: str
    dtype: str
    window_seconds: float | None
    front_end: bool
    codec: str
    standardise: str
    num_codebooks: int
    codebook_train_frames: int
    seed: int

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise DataError(f"--codec {self.codec!r}: use one of {', '.join(CODECS)}")
        if self.standardise not in STANDARDISE:
            raise DataError(f"--standardise {self.standardise!r}: use one of "
                            f"{', '.join(STANDARDISE)}")


def parse_layers(layers: int | str | Sequence[int], teacher_dir: str) -> list[int]:
    """`all`, `4`, `"2,4"` or `[2, 4]` -> 1-based teacher layers; TeacherError naming
    `--layers` when one is not a layer of the teacher."""
    num_layers = read_num_layers(teacher_dir)
    if layers == "all":
        return list(range(1, num_layers + 1))
    fix = f"the teacher at {teacher_dir!r} has layers 1..{num_layers}: give --layers all, 4 or 2,4"
    try:
        items = layers.split(",") if isinstance(layers, str) else (
            [layers] if isinstance(layers, int) else list(layers))
        parsed = [int(x) for x in items]
    except (TypeError, ValueError):
        raise TeacherError(f"--layers {layers!r} is not a list of layer numbers; {fix}") from None
    bad = [layer for layer in parsed if not 1 <= layer <= num_layers]
    if bad or not parsed:
        raise TeacherError(f"--layers {layers!r}: no teacher layer {bad or ''}; {fix}")
    return parsed


def frame_geometry(teacher: Teacher) -> FrameGeometry:
    """The teacher front end's framing, probed from `num_frames`; ValueError if it is not
    `floor((S - field) / stride) + 1` (the cropping in `colld_ds.data` relies on it)."""
    stride = int(teacher.front_end.frame_stride)
    lengths = torch.arange(0, 20 * stride)
    frames = teacher.num_frames(lengths).clamp(min=0)
    geometry = FrameGeometry(stride, int(lengths[frames >= 1][0]))
    if frames.tolist() != [geometry.num_frames(int(s)) for s in lengths]:
        raise TeacherError(f"teacher {teacher.path}: front end frames are not {geometry}")
    return geometry


def features(teacher: Teacher, waves: list[np.ndarray], front_end: bool = False
             ) -> list[list[np.ndarray]]:
    """B waves (S_b,) -> per wave, one float16 (T_b, D_t) array per teacher layer, then with
    `front_end` the front end's (T_b, C) array (Whisper: (W, D), the whole window), all from
    one forward (one padded batch: call it with one wave unless the teacher is padding
    invariant)."""
    device = next(teacher.model.parameters()).device
    lengths = torch.tensor([w.shape[0] for w in waves])  # (B,)
    batch = torch.zeros(len(waves), int(lengths.max()))  # (B, S)
    for row, w in zip(batch, waves):
        row[: w.shape[0]] = torch.from_numpy(w)
    out = teacher(batch.to(device), lengths.to(device), front_end)  # L_req x (B, T, D_t)
    frames = out.frame_lengths.tolist()
    layers = [h.to(torch.float16).cpu().numpy() for h in out.features]
    per_wave = [[h[b, : frames[b]] for h in layers] for b in range(len(waves))]
    if front_end:
        front = out.front_end.to(torch.float16).cpu().numpy()  # (B, T, C) or (B, W, D)
        whole_window = teacher.front_end_frames == "window"
        for b, arrays in enumerate(per_wave):
            arrays.append(front[b] if whole_window else front[b, : frames[b]])
    return per_wave


def padding_invariant(teacher: Teacher, wave: np.ndarray, front_end: bool = False) -> bool:
    """Whether `wave`'s features (and front end) alone equal those with 1 s of zero padding
    after it."""
    (alone,) = features(teacher, [wave], front_end)
    silence = np.zeros(wave.shape[0] + SAMPLE_RATE, np.float32)
    (padded, _) = features(teacher, [wave, silence], front_end)
    tol = 1e-3 if teacher.dtype == torch.float32 else 3e-2
    return all(
        np.allclose(a, p, rtol=tol, atol=tol * float(np.abs(a).max()))
        for a, p in zip(alone, padded)
    )


def _cache_sample(sample: dict, frames: list[np.ndarray], identity: dict,
                  codebook: np.ndarray | None) -> dict:
    """Raw audio sample + its per-layer float16 frames (+ front end, last) -> the cache sample
    (module docstring), the layers standardised if `identity` says so and encoded with
    `identity["codec"]` (pq, rq: with `codebook` (L, M, 256, D / M) or (L, M, 256, D); rq's a
    tensor on the teacher's device)."""
    key, url = sample["__key__"], sample["__url__"]
    meta = json.loads(sample["json"])
    meta["teacher"] = {**identity, "num_frames": frames[0].shape[0]}
    out = {k: v for k, v in sample.items() if not k.startswith("__")}
    out.update(__key__=key, json=json.dumps(meta).encode())
    codec, kind = identity["codec"], identity["target_kind"]
    layers = [(layer_members(layer, kind, codec), f"teacher layer {layer}", codec,
               None if codebook is None else codebook[i])
              for i, layer in enumerate(identity["layers"])]
    if identity.get("standardised"):  # the front end, last, stays as it is
        frames = [standardise_utterance(array).astype(np.float16) if i < len(layers) else array
                  for i, array in enumerate(frames)]
    if identity.get("front_end"):
        layers.append(((FRONT_END_MEMBER,), "the teacher's front end", "fp16", None))
    for (members, what, stored_as, book), array in zip(layers, frames, strict=True):
        if not np.isfinite(array).all():
            raise DataError(f"sample {key} in {url}: {what} overflows float16")
        for member, encoded in zip(members, encode(array, stored_as, book), strict=True):
            buf = io.BytesIO()
            np.save(buf, encoded, allow_pickle=False)
            out[member] = buf.getvalue()
    return out


def cache_shard(teacher: Teacher, identity: dict, url: str, path: str, batch_size: int,
                bar: tqdm, codebook: np.ndarray | None = None) -> float:
    """Write the cache shard of audio shard `url` to `path` atomically (pq, rq: with
    `codebook`); return audio seconds."""
    seconds, samples = 0.0, read_samples([url])
    with atomic_shard(path) as writer:
        while chunk := list(itertools.islice(samples, batch_size)):
            waves = [decode_wave(s) for s in chunk]
            order = sorted(range(len(waves)), key=lambda i: waves[i].shape[0])  # less padding
            front_end = bool(identity.get("front_end"))
            frames = dict(zip(order, features(teacher, [waves[i] for i in order], front_end)))
            for i, sample in enumerate(chunk):
                writer.write(_cache_sample(sample, frames[i], identity, codebook))
                seconds += waves[i].shape[0] / SAMPLE_RATE
            bar.update(len(chunk))
    return seconds


def _is_complete(path: str, identity: dict) -> bool:
    """Whether `path` is a finished cache shard of this teacher (ValueError: of another)."""
    if not os.path.exists(path):
        return False
    first = next(read_samples([path]), None)
    found = json.loads(first["json"]).get("teacher", {}) if first else {}
    settings = ("front_end", "codec", "codebook", "pq", "standardised")  # each compared below
    check_teacher_identity({k: v for k, v in found.items() if k != "standardised"},
                           {k: v for k, v in identity.items() if k not in settings},
                           f"existing cache shard {path}",
                           fix=f"write this cache to another out_dir, or delete the cache shards "
                               f"in {os.path.dirname(path) or '.'} to replace them")
    if found.get("front_end") != identity.get("front_end"):
        raise DataError(
            f"existing cache shard {path} was written with "
            f"front_end={bool(found.get('front_end'))}, this run has "
            f"front_end={bool(identity.get('front_end'))}: a cache is all with or "
            "all without the front end's output; use the same --front_end or another out_dir"
        )
    for field, flag, absent in (("codec", "--codec", "fp16"),  # absent in older caches
                                ("standardised", "--standardise", "none")):
        was, now = found.get(field, absent), identity.get(field, absent)
        if was != now:
            raise DataError(f"existing cache shard {path} was written with {flag} {was}, this "
                            f"run has {flag} {now}: a cache is all one {flag}; use the same "
                            f"{flag} or another out_dir")
    if "pq" in found:  # codebook format 1 (formats.codebook_identity)
        raise DataError(
            f"existing cache shard {path} was written by a colld before codebook format 2 (its "
            "json has teacher.pq): this colld reads such caches but does not extend them; "
            "finish it with the colld that began it, or cache into another out_dir")
    if found.get("codebook") != identity.get("codebook"):
        raise DataError(
            f"existing cache shard {path} was written with the codebook {found.get('codebook')}, "
            f"this run's codebook is {identity.get('codebook')}: a cache is all one codebook; "
            f"restore the {CODEBOOK_FILE} and codebook.json it was written with, or use another "
            "out_dir"
        )
    return True


def _check_out_dir(out_dir: str) -> None:
    """DataError for an `out_dir` URL: a cache is written to `.tmp` files renamed when complete,
    resumed from the shards that exist and indexed under a file lock, all filesystem steps."""
    if is_remote(out_dir):
        raise DataError(
            f"--out_dir {out_dir}: caches are written to a local or shared filesystem; copy them "
            "with aws s3 sync (or to an https server) afterwards; training reads s3:// and "
            "https:// caches through data.teacher_cache")


def _cache_names(urls: list[str]) -> dict[str, str]:
    """Each audio shard's cache shard name in `out_dir`: its own file name (`train-000001.tar`
    for `https://host/dir/train-000001.tar`); DataError when two shards share one."""
    counts = collections.Counter(shard_name(url) for url in urls)
    twice = next((name for name, count in counts.items() if count > 1), None)
    if twice is not None:
        raise DataError(f"two audio shards are named {twice}: a cache shard takes its audio "
                        "shard's file name, so cache each directory into its own --out_dir")
    return {url: shard_name(url) for url in urls}


def cache_shape(teacher: Teacher, identity: dict) -> CacheShape:
    """What a cache of `teacher` with `identity` stores per utterance, its widths probed with
    one forward of 10 frames of silence."""
    geometry = FrameGeometry.of(identity)
    probe = np.zeros(geometry.receptive_field + 9 * geometry.stride, np.float32)
    (arrays,) = features(teacher, [probe], bool(identity.get("front_end")))
    widths = tuple(a.shape[1] for a in arrays[: len(identity["layers"])])
    front_end = None
    if identity.get("front_end"):
        rows, width = arrays[-1].shape
        front_end = (rows if identity["front_end"] == "window" else None, width)
    return CacheShape(identity, widths, geometry, front_end)


def _load(settings: CacheSettings) -> Teacher:
    """The teacher on this process's device (`LOCAL_RANK`'s GPU, else the CPU)."""
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    layers = parse_layers(settings.layers, settings.teacher)
    return load_teacher(settings.teacher, layers, settings.target_kind, _DTYPES[settings.dtype],
                        device, settings.window_seconds)


def _cache_shape(model: Teacher, settings: CacheSettings) -> CacheShape:
    """The `CacheShape` of a cache of `model` with `settings` (identity included; pq, rq: with
    a placeholder `sha256` until the codebook is known); DataError when pq's sub-vectors do
    not divide a cached layer's width."""
    geometry = frame_geometry(model)
    codec, num_codebooks = settings.codec, settings.num_codebooks
    identity = {**model.cache_identity(settings.front_end), "frame_stride": geometry.stride,
                "receptive_field": geometry.receptive_field, "codec": codec}
    if settings.standardise != "none":
        identity["standardised"] = settings.standardise
    if codec in QUANTISED:
        identity["codebook"] = {"version": CODEBOOK_VERSION, "num_codebooks": num_codebooks,
                                "sha256": "0" * 64}
    shape = cache_shape(model, identity)
    if codec == "pq" and any(width % num_codebooks for width in shape.widths):
        raise DataError(f"--num_codebooks {num_codebooks} does not divide the teacher's width "
                        f"{shape.widths[0]}: use a divisor of it (e.g. 16, 32, 64)")
    return shape


def check_fits_window(infos: dict[str, ShardInfo], window_seconds: float) -> None:
    """Before any work: DataError naming the longest utterance of the shards `infos` (keys and
    lengths) and the fix when it is longer than a Whisper teacher's `window_seconds`, on which
    the teacher would otherwise fail mid-run."""
    url, key, length = max(((info.url, key, length) for info in infos.values()
                            for key, length in zip(info.keys, info.lengths, strict=True)),
                           key=lambda item: item[2], default=("", "", 0))
    if length > round(window_seconds * SAMPLE_RATE):
        seconds = length / SAMPLE_RATE
        raise DataError(f"utterance {key} is {seconds:.2f} s (in {url}), longer than the Whisper "
                        f"teacher's {window_seconds:g} s window: re-run with --window_seconds "
                        f"{math.ceil(seconds)} (at most 30), or crop or split the utterances "
                        "longer than the window (no teacher output was written yet)")


def check_window(model: Teacher, infos: dict[str, ShardInfo]) -> None:
    """`check_fits_window` for a teacher with a bounded window (Whisper's); others take any
    length."""
    max_samples = getattr(model.front_end, "max_samples", None)
    if max_samples is not None:
        check_fits_window(infos, max_samples / SAMPLE_RATE)


def teacher_and_shape(settings: CacheSettings) -> tuple[Teacher, CacheShape]:
    """The teacher of `settings` on this process's device, and the shape of its cache."""
    model = _load(settings)
    return model, _cache_shape(model, settings)


def train_codebook(
    shards: str | Sequence[str],
    teacher: str,
    layers: int | str | Sequence[int],
    out_dir: str,
    target_kind: str = "layer_output",
    dtype: str = "auto",
    window_seconds: float | None = None,
    num_codebooks: int = 32,
    codebook_train_frames: int = 65536,
    seed: int = 0,
    codec: str = "pq",
    progress: bool = True,
    standardise: str = "none",
    shard_index: str | None = None,
) -> str:
    """Learn the codebook of a `--codec pq` (or `rq`) cache of `teacher`'s `layers` over the
    audio `shards` into `out_dir` (`colld_ds.data_prep.codebook`), before `cache-teacher --codec pq`
    (or `rq`) with the same arguments caches into it: once for all ranks. Reuses a complete
    codebook of the same settings there; returns its path. `progress`: bars of the sampled
    frames and the layers learned. `standardise`: as `cache_teacher`'s (the codebook of a
    standardised cache is learned on standardised frames). `shard_index`: as `cache_teacher`'s
    (streamed shards need one); a Whisper teacher's window is checked against every
    utterance's length before the teacher runs (`check_window`)."""
    if codec not in QUANTISED:
        raise DataError(f"--codec {codec!r}: train-codebook learns the codebook of a pq or rq "
                        "cache")
    settings = CacheSettings(teacher=teacher, layers=layers, target_kind=target_kind,
                             dtype=dtype, window_seconds=window_seconds, front_end=False,
                             codec=codec, standardise=standardise, num_codebooks=num_codebooks,
                             codebook_train_frames=codebook_train_frames, seed=seed)
    _check_out_dir(out_dir)
    urls = expand_urls(shards, allow_remote=True)
    infos = shard_infos(urls, shard_index, True)  # a wrong host or missing index fails at once
    model, _ = teacher_and_shape(settings)
    check_window(model, infos)
    codebook_for(model, urls, out_dir, num_codebooks, codebook_train_frames, seed, learn=True,
                 codec=codec, progress=progress, standardise=standardise)
    return os.path.join(out_dir, CODEBOOK_FILE)


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
    front_end: bool = False,
    codec: str = "fp16",
    estimate: bool = False,
    num_codebooks: int = 32,
    codebook_train_frames: int = 65536,
    seed: int = 0,
    shard_index: str | None = None,
    standardise: str = "none",
) -> list[str]:
    """Cache `teacher`'s `layers` (`all`, `4`, `2,4`) over this process's share of the audio
    `shards`; return the cache paths of that share. `dtype`: `auto` (fp16 on CUDA, fp32 on
    CPU), `fp32`, `fp16`, `bf16`. `window_seconds`: a Whisper teacher's window
    (`teacher.window_seconds`; None: 30 s), part of the cache's teacher identity. `front_end`:
    also store the teacher's conv front-end output (module docstring), for runs with
    `data.cached_front_end`. `codec`: how the layers are stored, `fp16`, `int8`, `pq` or `rq`
    (`colld_ds.codecs`; the front end is float16 either way). `num_codebooks` (M bytes per frame
    and layer; pq: dividing the teacher's width), `codebook_train_frames`, `seed`: the pq or rq
    codebook (`train_codebook`), learned here first when `out_dir` has none and `world_size` is 1.
    `standardise`: `none`, or `utterance` to store every layer standardised per utterance
    (module docstring), for runs with `objective.target_norm: utterance` or
    `utterance_position` only. `estimate`: print the size of the whole cache and per hour of
    audio, write nothing and return []. Refuses to start when the
    shards still missing will not fit in `out_dir`'s free space. Prints audio seconds per second
    at the end. `shards` may be streamed URLs (`colld_ds.remote`: http(s)://, s3://, pipe:),
    which need their shard index (beside them, or `shard_index`, a path or URL): the sizes and
    counts come from it; `out_dir` is a local or shared directory (`_check_out_dir`). A Whisper
    teacher's window is checked against every utterance still to cache before the teacher runs
    (`check_window`)."""
    settings = CacheSettings(teacher=teacher, layers=layers, target_kind=target_kind,
                             dtype=dtype, window_seconds=window_seconds, front_end=front_end,
                             codec=codec, standardise=standardise, num_codebooks=num_codebooks,
                             codebook_train_frames=codebook_train_frames, seed=seed)
    _check_out_dir(out_dir)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    all_urls = expand_urls(shards, allow_remote=True)
    urls = all_urls[rank::world_size]
    names = _cache_names(all_urls)
    missing = all_urls if estimate else [  # of all ranks: they share out_dir
        u for u in all_urls if not os.path.exists(os.path.join(out_dir, names[u]))]
    # before the teacher loads: a wrong host, bucket or missing index fails at once
    infos = shard_infos(missing, shard_index, True) if missing else {}
    model, shape = teacher_and_shape(settings)
    check_window(model, infos)
    identity = shape.identity
    if estimate:
        print(estimate_cache(list(infos.values()), shape).report())
        return []
    os.makedirs(out_dir, exist_ok=True)
    if missing:
        check_free_space(out_dir, estimate_cache(list(infos.values()), shape))
    codebook = None
    if codec in QUANTISED:  # the placeholder hash becomes the codebook's (same length)
        identity["codebook"], codebook = codebook_for(
            model, all_urls, out_dir, num_codebooks, codebook_train_frames, seed,
            learn=world_size == 1, codec=codec, progress=progress, standardise=standardise)
    if codec == "rq":  # its beam search runs where the teacher does (codecs.rq_encode)
        codebook = torch.from_numpy(codebook).to(next(model.model.parameters()).device)
    paths = [os.path.join(out_dir, names[url]) for url in urls]
    todo = [(u, p) for u, p in zip(urls, paths) if not _is_complete(p, identity)]
    if batch_size > 1 and todo:
        first = decode_wave(next(read_samples([todo[0][0]])))
        if not padding_invariant(model, first, front_end):
            warnings.warn(f"teacher {teacher} is not padding invariant: "
                          "caching one utterance at a time")
            batch_size = 1
    bar = tqdm(total=sum(len(infos[u].keys) for u, _ in todo), unit="utt", disable=not progress,
               desc=f"cache rank {rank}")
    start, seconds = time.perf_counter(), 0.0
    for url, path in todo:
        seconds += cache_shard(model, identity, url, path, batch_size, bar, codebook)
    bar.close()
    write_shard_index(out_dir)
    elapsed = time.perf_counter() - start
    print(
        f"rank {rank}/{world_size}: cached {len(todo)} shards ({len(urls) - len(todo)} already "
        f"done), {seconds / 3600:.4f} h of audio in {elapsed:.1f} s = "
        f"{seconds / max(elapsed, 1e-9):.1f} audio s/s"
    )
    return paths
