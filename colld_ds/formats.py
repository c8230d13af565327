"""The on-disk contract between the data tools (``colld_ds.data_prep``) and the loader
(``colld_ds.data``).

Audio shards: webdataset tars ``{prefix}-{index:06d}.tar``, one sample per utterance, key
``<utt_id>`` (no ``.`` or ``/``: webdataset splits member names at the first dot), members
``<utt_id>.flac`` (or ``.wav``: ``AUDIO_EXTS``; ``SAMPLE_RATE`` Hz mono, 16-bit) and
``<utt_id>.json`` ``{"utt_id", "lang", "text", "phones" (optional), "duration" (s),
"sample_rate"}``.

Teacher-cache shards: an audio shard's samples plus, per cached teacher layer, the members
``layer_members(layer, target_kind, codec)`` holding its (T, D) features of the whole utterance
(and optionally ``FRONT_END_MEMBER``, float16 whatever the codec); the json gains
``"teacher"``, the cache's teacher identity (``check_teacher_identity``), which records the front
end's ``FrameGeometry`` and the ``codec`` (``CODECS``; absent in caches written before codecs:
fp16), with ``pq`` and ``rq`` (``QUANTISED``) also ``"codebook": {"version", "num_codebooks",
"sha256"}`` (M: pq's sub-vectors, rq's stages): the codebook ``CODEBOOK_FILE`` beside the shards
(``codebook_identity``, ``colld_ds.codecs.read_codebook``; caches written before
``CODEBOOK_VERSION`` 2 hold ``"pq": {"version": 1, "subvectors", "codebook_sha256"}`` and
``LEGACY_CODEBOOK_FILE``, and are read the same way). A cache written with ``cache-teacher
--standardise utterance`` records ``"standardised": "utterance"``: its layers hold each
utterance's frames standardised per dimension (``colld_ds.codecs.standardise_utterance``), which
only runs whose targets are standardised per utterance read as they would read the plain cache
(``check_teacher_identity``). Every tar member costs
``TAR_MEMBER_HEADER`` bytes plus its data padded to ``TAR_BLOCK``.

Shard index (``SHARD_INDEX`` beside the shards): webdataset's wids format ``{"__kind__":
SHARD_INDEX_KIND, "wids_version": 1, "shardlist": [{"url", "nsamples", "filesize"}, ...]}``,
``url`` the shard's file name, extended per shard with ``"keys"`` (file order), ``"lengths"``
(audio samples of each utterance, from its json ``duration``) and ``"mtime_ns"``.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass

from webdataset.tariterators import base_plus_ext

from colld_ds.errors import DataError
from colld_ds.remote import open_stream

SAMPLE_RATE = 16000  # Hz, every waveform colld reads or writes
FRAME_STRIDE = 320  # samples per frame (20 ms) of every supported teacher family
AUDIO_EXTS = ("flac", "wav")  # members holding audio; we write flac, readers accept both
FRONT_END_MEMBER = "front_end.npy"  # cache member: the teacher's conv front-end output
SHARD_INDEX = "shardindex.json"  # wids' default index name
SHARD_INDEX_KIND = "wids-shard-index-v1"
IDENTITY_KEYS = ("config_hash", "target_kind")  # equal in cache and run; the run's layers cached
CODECS = ("fp16", "int8", "pq", "rq")  # how a cache stores layers: ``layer_members``, ``codecs``
QUANTISED = ("pq", "rq")  # uint8 (T, M) codes into a learned codebook, identity "codebook"
STANDARDISE = ("none", "utterance")  # cache-teacher --standardise; identity "standardised"
TARGET_NORMS_OF_STANDARDISED = ("utterance", "utterance_position")  # runs that read such a cache
CODEBOOK_VERSION = 2  # of a codebook and its identity block; 1 ("pq" block) is still read
CODEBOOK_ENTRIES = 256  # per sub-vector codebook (rq: per stage): one uint8 code
CODEBOOK_FILE = "codebook.npy"  # beside the shards: float32 (L, M, 256, D / M); rq (L, M, 256, D)
LEGACY_CODEBOOK_FILE = "pq_codebook.npy"  # CODEBOOK_FILE of version 1 caches
TAR_BLOCK = 512  # tar data is padded to whole blocks
TAR_MEMBER_HEADER = 3 * TAR_BLOCK  # webdataset's TarWriter: pax header (float mtime) + ustar header


@dataclass(frozen=True)
class FrameGeometry:
    """How a front end frames audio: frame t covers samples ``[stride * t, stride * t + field)``.

    wav2vec2-like conv front ends: (320, 400); w2v-BERT stacked fbank: (320, 560).
    """

    stride: int = FRAME_STRIDE
    receptive_field: int = 400

    def num_frames(self, num_samples: int) -> int:
        """Frames of ``num_samples`` samples: ``floor((S - field) / stride) + 1`` (0 if too
        short)."""
        return max(0, (num_samples - self.receptive_field) // self.stride + 1)

    @classmethod
    def of(cls, identity: dict) -> FrameGeometry:
        """The geometry recorded in a cache identity (``frame_stride``, ``receptive_field``)."""
        return cls(int(identity["frame_stride"]), int(identity["receptive_field"]))


def feature_member(layer: int, target_kind: str) -> str:
    """Cache member (extension after the key) of teacher ``layer``: ``l04.layer_output.npy``."""
    return f"l{layer:02d}.{target_kind}.npy"


def layer_members(layer: int, target_kind: str, codec: str) -> tuple[str, ...]:
    """Cache members of teacher ``layer`` stored with ``codec``, each one ``.npy`` array:

    - ``fp16``: ``(l04.layer_output.npy,)``, the float16 (T, D) features (``feature_member``).
    - ``int8``: ``(l04.layer_output.int8.npy, l04.layer_output.scale.npy)``: int8 codes (T, D)
      and float16 scales (1, D), one per channel; features = codes * scales.
    - ``pq``: ``(l04.layer_output.pq.npy,)``: uint8 codes (T, M), one centroid per sub-vector of
      the layer's codebook in ``CODEBOOK_FILE``.
    - ``rq``: ``(l04.layer_output.rq.npy,)``: uint8 codes (T, M), one entry per residual stage.
    """
    member = feature_member(layer, target_kind)
    if codec == "fp16":
        return (member,)
    stem = member.removesuffix(".npy")
    if codec in QUANTISED:
        return (f"{stem}.{codec}.npy",)
    return (f"{stem}.int8.npy", f"{stem}.scale.npy")


def layer_arrays(codec: str, num_frames: int, width: int, num_codebooks: int = 0
                 ) -> tuple[tuple[tuple[int, int], str], ...]:
    """(shape, dtype) of each ``layer_members`` array of a layer of width D over T frames: fp16
    ``((T, D), float16)``; int8 ``((T, D), int8), ((1, D), float16)``; pq and rq with M
    ``num_codebooks`` ``((T, M), uint8)``."""
    if codec == "fp16":
        return (((num_frames, width), "float16"),)
    if codec in QUANTISED:
        return (((num_frames, num_codebooks), "uint8"),)
    return (((num_frames, width), "int8"), ((1, width), "float16"))


@dataclass(frozen=True)
class CodebookIdentity:
    """The codebook fields of a pq or rq cache identity: ``version`` (``CODEBOOK_VERSION``, or 1
    for a cache written before it), ``num_codebooks`` M (pq's sub-vectors, rq's stages),
    ``sha256`` of the codebook file, and that file's name beside the shards (``file_name``)."""

    version: int
    num_codebooks: int
    sha256: str

    @property
    def file_name(self) -> str:
        return CODEBOOK_FILE if self.version == CODEBOOK_VERSION else LEGACY_CODEBOOK_FILE


def codebook_identity(identity: dict, where: str) -> CodebookIdentity:
    """The ``"codebook"`` block of a pq or rq cache identity (version 1: its ``"pq"`` block,
    ``{"version": 1, "subvectors", "codebook_sha256"}``); DataError naming the field, the file
    and the fix when this colld cannot read it."""
    if "codebook" not in identity and isinstance(identity.get("pq"), dict):
        block, name, fields = identity["pq"], "pq", ("version", "subvectors", "codebook_sha256")
        version = 1
    else:
        block, name, fields = identity.get("codebook"), "codebook", ("version", "num_codebooks",
                                                                     "sha256")
        version = CODEBOOK_VERSION
    if not isinstance(block, dict) or any(k not in block for k in fields):
        problem = f"has no teacher.{name} {{{', '.join(fields)}}}"
    elif block["version"] != version:
        problem = (f"has teacher.{name}.version {block['version']!r}, this colld reads "
                   f"{version}")
    else:
        return CodebookIdentity(version, *(block[k] for k in fields[1:]))
    raise DataError(f"{where}: its json {problem}: re-cache with `colld prep cache-teacher --codec "
                    f"{identity.get('codec')}` into a new out_dir, or read it with the colld "
                    "version that wrote it")


def cache_codec(identity: dict, where: str) -> str:
    """The ``codec`` of a cache identity (``fp16`` when absent); DataError naming the field, the
    file and the fix when this colld cannot read it (pq, rq: ``codebook_identity`` too)."""
    codec = identity.get("codec", "fp16")
    if codec in QUANTISED:
        codebook_identity(identity, where)
    elif codec not in CODECS:
        raise DataError(
            f"{where}: teacher.codec {codec!r} in its json is not a codec this colld reads "
            f"({', '.join(CODECS)}): re-cache with `colld prep cache-teacher --codec fp16` (or "
            "int8, pq, rq) into a new out_dir, or read it with the colld version that wrote it"
        )
    return codec


def check_teacher_identity(found: dict, expected: dict, where: str,
                           fix: str = "re-run cache-teacher with the run's teacher, layers and "
                                      "target kind") -> None:
    """Refuse a cache whose teacher differs from the run's: same config hash and target kind,
    every expected layer cached, the front end's output cached if ``expected`` has
    ``"front_end"``, and a cache standardised per utterance (``"standardised"``) only for a run
    whose ``expected["target_norm"]`` (its ``objective.target_norm``; absent: ``none``) is in
    ``TARGET_NORMS_OF_STANDARDISED``. DataError printing both identities and ``fix`` otherwise;
    a codec this colld cannot read: ``cache_codec``'s one-line DataError."""
    def show(identity):
        return json.dumps({k: v for k, v in identity.items() if k != "num_frames"}, sort_keys=True)

    same = all(found.get(k) == expected.get(k) for k in IDENTITY_KEYS)
    if not same or not set(expected["layers"]) <= set(found.get("layers", ())):
        raise DataError(
            f"{where} was cached from a different teacher, layer list or target kind:\n"
            f"  cache: {show(found)}\n  run:   {show(expected)}\n{fix}"
        )
    if expected.get("front_end") and found.get("front_end") != expected["front_end"]:
        raise DataError(
            f"{where} holds no front-end features of the teacher, which data.cached_front_end "
            f"reads:\n  cache: {show(found)}\n  run:   {show(expected)}\n"
            "re-run cache-teacher with --front_end true into a new directory, or set "
            "data.cached_front_end false"
        )
    target_norm = expected.get("target_norm", "none")
    if found.get("standardised") and target_norm not in TARGET_NORMS_OF_STANDARDISED:
        raise DataError(
            f"{where} holds teacher layers standardised per utterance (teacher.standardised "
            f"{found['standardised']!r} in its json: cache-teacher --standardise), which only "
            f"a run with objective.target_norm {' or '.join(TARGET_NORMS_OF_STANDARDISED)} reads "
            f"as it would the plain teacher states; this run has objective.target_norm "
            f"{target_norm!r}: set objective.target_norm utterance, or re-cache without "
            "--standardise into a new out_dir"
        )
    cache_codec(found, where)


# --- local shards and the shard index ------------------------------------------------------------


def checked_members(path: str) -> list[tarfile.TarInfo]:
    """Regular-file members of a local tar; raises ValueError naming a corrupt/truncated shard."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            # a complete tar ends with two zero blocks; tarfile silently stops without them
            end = members[-1].offset_data + -(-members[-1].size // 512) * 512 if members else 0
            tar.fileobj.seek(end)
            if tar.fileobj.read(1024) != bytes(1024):
                raise tarfile.ReadError(f"no end-of-archive marker after byte {end}")
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"corrupt or truncated shard {path}: {exc}") from exc
    return [m for m in members if m.isreg()]


def shard_keys(path: str) -> list[str]:
    """Sample keys of the local tar shard ``path`` in file order, from its headers only."""
    keys = dict.fromkeys(base_plus_ext(m.name)[0] for m in checked_members(path))
    keys.pop(None, None)
    return list(keys)


def shard_index_entry(path: str) -> dict:
    """The shard index entry of the local shard ``path`` (module docstring), from its headers
    and json members; ValueError naming the shard and key when a sample has no json
    ``duration``."""
    members = checked_members(path)
    keys, lengths = {}, {}
    with open(path, "rb") as f:
        for member in members:
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            keys.setdefault(key, None)
            if ext == "json":
                f.seek(member.offset_data)
                duration = json.loads(f.read(member.size)).get("duration")
                if isinstance(duration, (int, float)):
                    lengths[key] = round(duration * SAMPLE_RATE)
    missing = [k for k in keys if k not in lengths]
    if missing:
        raise ValueError(
            f"sample {missing[0]} in {path} has no json member with a numeric 'duration' "
            f"({len(missing)} such samples): write the shards with `colld prep make_shards`"
        )
    return {"url": os.path.basename(path), "nsamples": len(keys), "filesize": os.path.getsize(path),
            "keys": list(keys), "lengths": [lengths[k] for k in keys]}


def read_shard_index(url: str) -> dict[str, dict]:
    """Entries of the shard index at ``url`` (a path or a URL ``colld_ds.remote`` streams), by
    shard file name. DataError naming the index when it cannot be read or is not a wids
    shard index with colld's ``keys`` and ``lengths``."""
    try:
        with open_stream(url) as stream:
            index = json.load(stream)
    except (OSError, ValueError) as exc:
        detail = str(getattr(exc, "message", exc)).removeprefix(f"cannot read {url}: ")
        raise DataError(f"cannot read shard index {url}: {detail}") from exc
    fix = "rewrite it with `colld prep index <shard directory>`"
    if (not isinstance(index, dict) or index.get("__kind__") != SHARD_INDEX_KIND
            or index.get("wids_version") != 1):
        raise DataError(f"{url} is not a {SHARD_INDEX_KIND} shard index with wids_version 1: {fix}")
    entries = {}
    for entry in index.get("shardlist", []):
        name = os.path.basename(str(entry.get("url", "")))
        keys, lengths = entry.get("keys"), entry.get("lengths")
        if not isinstance(keys, list) or not isinstance(lengths, list) or not (
            len(keys) == len(lengths) == entry.get("nsamples")
        ):
            raise DataError(f"shard index {url}: entry {name!r} needs 'nsamples' "
                            f"and as many 'keys' and 'lengths': {fix}")
        if name in entries:
            raise DataError(f"shard index {url} lists two shards named {name!r}: "
                            "one index per shard directory")
        entries[name] = entry
    return entries
