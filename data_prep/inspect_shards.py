"""`inspect`: what audio or teacher-cache shards hold, with every member validated.

Prints the shard and sample counts, hours and utterances per language, the schema of the first
sample (each member's kind, shape and dtype), the teacher identity of cache shards with their
codec, whether their layers are standardised per utterance, the codec's bytes on disk per frame
per layer (pq, rq: the codebook beside the shards, its
file, sha256, M sub-vectors (rq: stages) of 256 centroids, dims and layers), and one line per
problem, most
`<shard>: <key>.<member>: <problem>`: audio that does not decode to finite 16 kHz mono, an
array that is not a finite float16 (T, D) with T = the json's `num_frames` (int8 caches: int8
(T, D) codes and finite float16 (1, D) scales; pq, rq caches: uint8 (T, M) codes, M the
identity's), bad json, a missing audio/json/layer member, a codec this colld cannot read, a
truncated or corrupt tar; and a codebook that is missing, not of the identity's shape or
not hashing to its `sha256` (`colld_ds.codecs.load_codebook`'s line: file and fix).
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile

import numpy as np
import soundfile as sf
from webdataset.tariterators import base_plus_ext

from colld_ds.codecs import codebook_path, load_codebook
from colld_ds.data import expand_urls
from colld_ds.errors import DataError
from colld_ds.formats import (AUDIO_EXTS, CODEBOOK_ENTRIES, QUANTISED, SAMPLE_RATE, cache_codec,
                              checked_members, codebook_identity, layer_members)
from colld_ds.data_prep.cache_size import member_bytes

CODEC_LAYOUT = {  # what a cache of each codec stores per layer and utterance
    "fp16": "float16 (T, D) features",
    "int8": "int8 (T, D) codes and float16 (1, D) per-channel scales",
    "pq": "uint8 (T, M) codes into the codebook beside the shards",
    "rq": "uint8 (T, M) codes into the M residual stages of the codebook beside the shards",
}


def describe_member(ext: str, data: bytes) -> str:
    """A schema line for member `ext` of a sample; ValueError saying what is wrong with it."""
    kind = ext.rsplit(".", 1)[-1]
    if kind in AUDIO_EXTS:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (S, C)
        if sr != SAMPLE_RATE or wave.shape[1] != 1 or not wave.size or not np.isfinite(wave).all():
            raise ValueError(f"audio must be finite non-empty 16 kHz mono: "
                             f"{sr} Hz, shape {wave.shape}")
        return f"{kind} audio, {sr} Hz mono"
    if kind == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if ext.endswith(".int8.npy"):
            if array.ndim != 2 or array.dtype != np.int8:
                raise ValueError(f"expected int8 (T, D) codes, got {array.dtype} {array.shape}")
            return f"int8 (T, {array.shape[1]}) codes"
        if ext.endswith((".pq.npy", ".rq.npy")):
            if array.ndim != 2 or array.dtype != np.uint8:
                raise ValueError(f"expected uint8 (T, M) codes, got {array.dtype} {array.shape}")
            return f"uint8 (T, {array.shape[1]}) {ext.split('.')[-2]} codes"
        if ext.endswith(".scale.npy"):
            if array.shape[:1] != (1,) or array.dtype != np.float16 or not np.isfinite(array).all():
                raise ValueError(f"expected finite float16 (1, D) scales, got {array.dtype} "
                                 f"{array.shape}")
            return f"float16 (1, {array.shape[1]}) scales"
        if array.ndim != 2 or array.dtype != np.float16 or not np.isfinite(array).all():
            raise ValueError(f"expected a finite float16 (T, D) array, "
                             f"got {array.dtype} {array.shape}")
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
    num_codebooks = (codebook_identity(teacher, f"{where}: {key}").num_codebooks
                     if codec in QUANTISED else None)  # cache_codec checked the block
    for layer in teacher["layers"] if teacher else ():
        exts = layer_members(layer, teacher["target_kind"], codec)  # first: (T, D) features/codes
        ext = exts[0]
        for absent in (e for e in exts if e not in members):
            problems.append(f"{where}: {key}.{absent}: missing (teacher layer {layer})")
        if ext not in valid:
            continue
        array = np.load(io.BytesIO(valid[ext]), allow_pickle=False)
        if array.shape[0] != teacher["num_frames"]:
            problems.append(f"{where}: {key}.{ext}: frames differ from num_frames "
                            f"{teacher['num_frames']}")
        if num_codebooks is not None and array.shape[1] != num_codebooks:
            problems.append(f"{where}: {key}.{ext}: {array.shape[1]} codes per frame, the json's "
                            f"codebook has M {num_codebooks} (teacher.codebook.num_codebooks)")
    return meta


def layer_disk_bytes(members: dict[str, bytes], teacher: dict) -> int:
    """Bytes on disk of the layer members of a cache sample (member extension -> bytes) with
    identity `teacher`: per member its tar headers and npy padded to whole tar blocks."""
    codec = teacher.get("codec", "fp16")
    return sum(member_bytes(len(members[ext])) for layer in teacher["layers"]
               for ext in layer_members(layer, teacher["target_kind"], codec) if ext in members)


def describe_codec(cache: dict, problems: list[str]) -> None:
    """Print the codec lines of one teacher identity's shards; `cache`: `{"teacher", "first",
    "frames", "bytes", "shards"}` (frames and layer bytes summed over its samples; `shards`:
    directory -> its first shard). pq, rq: the codebook beside each directory's shards, read
    and checked as the loader does; one that fails appends `load_codebook`'s line to
    `problems`."""
    teacher = cache["teacher"]
    try:
        codec = cache_codec(teacher, cache["first"])
    except DataError:  # already a problem of every sample
        return
    layers = teacher["layers"]
    per_frame = cache["bytes"] / max(1, cache["frames"] * len(layers))
    print(f"  codec {codec}: {CODEC_LAYOUT[codec]}; {per_frame:.1f} bytes per frame per layer on "
          f"disk (tar and npy headers included; {cache['frames']} frames x {len(layers)} layers)")
    if teacher.get("standardised"):
        print(f"  layers standardised per {teacher['standardised']} (teacher.standardised): "
              "read only by runs with objective.target_norm utterance or utterance_position")
    if codec not in QUANTISED:
        return
    identity = codebook_identity(teacher, cache["first"])
    for shard in cache["shards"].values():
        path = codebook_path(shard, None, identity.file_name)
        try:  # the file as it is now, not an earlier read of that path
            book = load_codebook(path, identity.sha256, len(layers), identity.num_codebooks,
                                 codec)
        except DataError as exc:
            problems.append(str(exc))
            continue
        num_sub, dims = book.shape[1], book.shape[3]
        parts = ("sub-vectors", num_sub * dims) if codec == "pq" else ("residual stages", dims)
        print(f"  {codec} codebook {path} (format {identity.version}): sha256 {identity.sha256} "
              f"(matches the json's), float32 {book.shape}: M {num_sub} {parts[0]} x "
              f"{CODEBOOK_ENTRIES} centroids of {dims} dims (D {parts[1]}), layers "
              f"{', '.join(map(str, layers))}")


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
    schema, caches = None, {}
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
                cache = caches.setdefault(json.dumps(identity, sort_keys=True), {
                    "teacher": identity, "first": f"{path}: {key}", "frames": 0, "bytes": 0,
                    "shards": {}})
                cache["frames"] += meta["teacher"].get("num_frames", 0)
                cache["bytes"] += layer_disk_bytes(members, identity)
                cache["shards"].setdefault(os.path.dirname(path), path)
    hours = sum(seconds.values()) / 3600
    print(f"{len(paths)} shards, {sum(utterances.values())} samples, {hours:.4f} hours")
    for lang in sorted(utterances):
        print(f"  {lang}: {utterances[lang]} samples, {seconds[lang] / 3600:.4f} hours")
    for ext, line in (schema or {}).items():
        print(f"  .{ext}: {line}")
    for identity, cache in caches.items():
        print(f"teacher: {identity} (first in {cache['first']})")
        describe_codec(cache, problems)
    if len(caches) > 1:
        problems.append(f"{len(caches)} different teacher identities (listed above)")
    print("\n".join(problems) or "all members valid")
    return problems
