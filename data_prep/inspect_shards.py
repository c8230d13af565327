"""`inspect`: what audio or teacher-cache shards hold, with every member validated.

Prints the shard and sample counts, hours and utterances per language, the schema of the first
sample (each member's kind, shape and dtype), the teacher identity of cache shards, and one
line per invalid member `<shard>: <key>.<member>: <problem>`: audio that does not decode to
finite 16 kHz mono, an array that is not a finite float16 (T, D) with T = the json's
`num_frames` (int8 caches: int8 (T, D) codes and finite float16 (1, D) scales; pq caches: uint8
(T, M) codes; their codebook is checked by the loader), bad json, a
missing audio/json/layer member, a codec this colld cannot read, a truncated or corrupt tar.
"""

from __future__ import annotations

import collections
import io
import json
import tarfile

import numpy as np
import soundfile as sf
from webdataset.tariterators import base_plus_ext

from colld_ds.data import expand_urls
from colld_ds.errors import DataError
from colld_ds.formats import AUDIO_EXTS, SAMPLE_RATE, cache_codec, checked_members, layer_members


def describe_member(ext: str, data: bytes) -> str:
    """A schema line for member `ext` of a sample; ValueError saying what is wrong with it."""
    kind = ext.rsplit(".", 1)[-1]
    if kind in AUDIO_EXTS:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (S, C)
        if sr != SAMPLE_RATE or wave.shape[1] != 1 or not wave.size or not np.isfinite(wave).all():
            raise ValueError(f"audio must be finite non-empty 16 kHz mono: {sr} Hz, shape {wave.shape}")
        return f"{kind} audio, {sr} Hz mono"
    if kind == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if ext.endswith(".int8.npy"):
            if array.ndim != 2 or array.dtype != np.int8:
                raise ValueError(f"expected int8 (T, D) codes, got {array.dtype} {array.shape}")
            return f"int8 (T, {array.shape[1]}) codes"
        if ext.endswith(".pq.npy"):
            if array.ndim != 2 or array.dtype != np.uint8:
                raise ValueError(f"expected uint8 (T, M) codes, got {array.dtype} {array.shape}")
            return f"uint8 (T, {array.shape[1]}) pq codes"
        if ext.endswith(".scale.npy"):
            if array.shape[:1] != (1,) or array.dtype != np.float16 or not np.isfinite(array).all():
                raise ValueError(f"expected finite float16 (1, D) scales, got {array.dtype} "
                                 f"{array.shape}")
            return f"float16 (1, {array.shape[1]}) scales"
        if array.ndim != 2 or array.dtype != np.float16 or not np.isfinite(array).all():
            raise ValueError(f"expected a finite float16 (T, D) array, got {array.dtype} {array.shape}")
        return f"float16 (T, {array.shape[1]})"
    if kind == "json":
        return f"json {sorted(json.loads(data))}"
    return f"{len(data)} bytes"


def _check_sample(key: str, members: dict[str, bytes], problems: list[str], where: str) -> dict:
    """Validate one sample's members (appending problems); return its parsed json ({} if bad)."""
    valid = {}
    for ext, data in members.items():
        try:
            describe_member(ext, data)
            valid[ext] = data
        except Exception as exc:  # any decoding error is the member's problem
            problems.append(f"{where}: {key}.{ext}: {exc}")
    meta = json.loads(valid["json"]) if "json" in valid else {}
    if not meta or not any(ext in members for ext in AUDIO_EXTS):
        problems.append(f"{where}: {key}: needs an audio and a json member, has {sorted(members)}")
    teacher = meta.get("teacher")
    try:
        codec = cache_codec(teacher or {}, f"{where}: {key}")
    except DataError as exc:
        problems.append(str(exc))
        return meta
    for layer in teacher["layers"] if teacher else ():
        exts = layer_members(layer, teacher["target_kind"], codec)  # first: (T, D) features/codes
        ext = exts[0]
        for absent in (e for e in exts if e not in members):
            problems.append(f"{where}: {key}.{absent}: missing (teacher layer {layer})")
        if ext in valid and np.load(io.BytesIO(valid[ext]),
                                      allow_pickle=False).shape[0] != teacher["num_frames"]:
            problems.append(f"{where}: {key}.{ext}: frames differ from num_frames {teacher['num_frames']}")
    return meta


def _samples(path: str) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes} of a local tar, in file order (ValueError if corrupt)."""
    members = checked_members(path)
    samples: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    with tarfile.open(path, "r:") as tar:
        for member in members:
            key, ext = base_plus_ext(member.name)
            samples[key][ext] = tar.extractfile(member).read()
    return samples


def inspect_shards(shards: str) -> list[str]:
    """Print the report (module docstring) of `shards` (a path, directory or brace pattern);
    return the problems found, one line each (empty: all valid)."""
    paths = expand_urls(shards)
    problems: list[str] = []
    seconds: collections.Counter = collections.Counter()
    utterances: collections.Counter = collections.Counter()
    schema, identities = None, {}
    for path in paths:
        try:
            samples = _samples(path)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        for key, members in samples.items():
            meta = _check_sample(key, members, problems, path)
            if schema is None and meta:
                schema = {ext: describe_member(ext, data) for ext, data in members.items()}
            utterances[meta.get("lang", "?")] += 1
            seconds[meta.get("lang", "?")] += meta.get("duration", 0.0)
            if "teacher" in meta:
                identity = {k: v for k, v in meta["teacher"].items() if k != "num_frames"}
                identities.setdefault(json.dumps(identity, sort_keys=True), f"{path}: {key}")
    print(f"{len(paths)} shards, {sum(utterances.values())} samples, {sum(seconds.values()) / 3600:.4f} hours")
    for lang in sorted(utterances):
        print(f"  {lang}: {utterances[lang]} samples, {seconds[lang] / 3600:.4f} hours")
    for ext, line in (schema or {}).items():
        print(f"  .{ext}: {line}")
    for identity, first in identities.items():
        print(f"teacher: {identity} (first in {first})")
    if len(identities) > 1:
        problems.append(f"{len(identities)} different teacher identities (listed above)")
    print("\n".join(problems) or "all members valid")
    return problems
