"""Teacher-cache codecs: a layer's (T, D) features <-> the arrays stored for them.

The members, shapes and dtypes are ``colld_ds.formats.layer_members`` and ``layer_arrays``; the
codec is recorded in the cache's teacher identity (``formats.cache_codec``).

- ``fp16``: the float16 (T, D) features as they are (2 D bytes per frame).
- ``int8``: symmetric, one float16 scale per channel over the utterance:
  ``scale_d = fp16(max_t |x_td| / 127)``, ``code_td = clip(round(x_td / scale_d), -127, 127)``
  (D bytes per frame plus 2 D per utterance), so ``|decoded - x| <= scale_d / 2`` before the
  float16 rounding of the decoded value. Per channel rather than per frame: a few channels of a
  transformer layer are much larger than the rest (on a Whisper-base layer-6 utterance the
  largest channel peaks at 5x the median channel's peak), and a per-frame scale spends its 255
  levels on them. On the Whisper-base demo cache
  (``benchmarks/results/cache_codecs_whisper_demo.json``, ``docs/cache_codecs.md``) per-channel
  scales give a 1.6-1.9x lower relative L2 error (0.0051 vs 0.0080 at layer 3, 0.0138 vs 0.0268 at
  layer 6) at the same mean cosine (within 2e-5; lowest frame 0.9980 vs 0.9988 at layer 6) and 1 %
  more bytes: one int8 codec, per channel.
- ``pq``: product quantisation. A layer's D channels are cut into M sub-vectors of D / M
  (``x_t = [x_t^1 ... x_t^M]``); each is stored as the uint8 index of its nearest centroid
  (squared L2) in that sub-space's codebook of 256: ``code_tm = argmin_k ||x_t^m - C[m, k]||``,
  features ``[C[1, code_t1] ... C[M, code_tM]]`` (M bytes per frame). The per-layer codebooks
  (M, 256, D / M) are learned by k-means before caching (``colld_ds.data_prep.codebook``, faiss)
  and stored once per cache, float32 (L, M, 256, D / M) in ``formats.CODEBOOK_FILE`` beside the
  shards (or where ``data.codebook_file`` says: ``pipe:`` shards have no directory;
  ``codebook_path``), read
  without pickle and checked against the sha256 the identity records (``load_codebook``;
  ``read_codebook`` caches it per process).
- ``rq``: residual quantisation, with the same uint8 (T, M) codes, identity fields and codebook
  file as pq, but M stages over the whole D: stage m's codebook (256, D) quantises what stages
  1..m-1 left, ``x_t ~ sum_m C[m, code_tm]``, so every byte refines all channels (per layer
  (M, 256, D), ``colld_ds.data_prep.codebook`` learns it with faiss's ``ResidualQuantizer``).
  Encoding is a beam search (``rq_encode``, ``RQ_BEAM`` candidates kept per stage), the one
  faiss runs, written here in torch so that it runs on the teacher's GPU while caching (M x beam
  x 256 distances of D values per frame: 34M multiply-adds at M = 32, D = 1024) and encodes from
  the stored codebook alone; tests check its codes against faiss's. On the demo cache's target
  space rq keeps as much with 32 bytes as pq with 64 (``docs/cache_codecs.md``,
  ``benchmarks/results/cache_codecs_whisper_demo_l14.json``, faiss rows). Decoding (the sum of
  M gathered rows, ``rq_decode``) runs in the loader, as pq's does.

Any codec can store a layer standardised per utterance (``cache-teacher --standardise
utterance``, identity ``"standardised"``; ``standardise_utterance``): each dimension of the
whole utterance's (T, D) frames shifted and scaled to mean 0 and variance 1 before encoding.
A run with ``objective.target_norm: utterance`` standardises its targets per utterance (or
crop) anyway, and that undoes any per-dimension shift and scale, so it reads the same targets
from such a cache as from the plain one (up to the float16 rounding and the 1e-5 of
``utterance_norm``), while a pq or rq codebook spends no centroid on what the objective
discards (a dimension's offset and spread across utterances) and weighs every dimension as the
objective does. Runs with ``target_norm: none`` refuse such a cache
(``formats.check_teacher_identity``).

Where decoding runs (``data.decode_codes``). int8 and fp16 are decoded in the loader
(``colld_ds.data``): one multiply per value (about 2 us per 512-d frame on the loaded 2-core
development CPU) in the DataLoader workers, which overlap the step; in the step it would only
halve the host-to-device copy. pq and rq are decoded in the loader too on a CPU run, but on a
GPU run the loader ships their (B, T, M) uint8 codes and ``CodeDecoder`` decodes them in the
training step, on the device, with the codebook held there (``data.decode_codes: auto``). rq's
decode is the sum of M gathered D-wide rows per frame: at XLS-R's 1024-d with M = 64, three
layers, one CPU loader worker decodes only 145 audio seconds per second
(``benchmarks/results/code_decode_cpu.json``), while the device does it as one
``embedding_bag`` per layer; and the codes cross the worker-to-process queue and the
host-to-device copy at M bytes per frame instead of 2 D.
Every consumer still reads float16 (B, T, D) ``Batch.teacher_features``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from colld_ds.errors import DataError
from colld_ds.formats import CODEBOOK_ENTRIES, CODEBOOK_FILE, QUANTISED, layer_arrays
from colld_ds.objectives.base import utterance_norm
from colld_ds.remote import open_stream

INT8_MAX = 127  # symmetric: codes in [-127, 127]
RQ_BEAM = 4  # rq encoding: candidates kept per stage (faiss's max_beam_size)


def standardise_utterance(x: np.ndarray) -> np.ndarray:
    """(T, D) features of one whole utterance -> float32 (T, D), each dimension standardised
    over its T frames, exactly as ``objective.target_norm: utterance`` standardises a run's
    targets (``utterance_norm``)."""
    features = torch.from_numpy(np.asarray(x, np.float32))[None]
    return utterance_norm(features, torch.ones(features.shape[:2], dtype=torch.bool))[0].numpy()


def quantise_int8(x: np.ndarray, per: Literal["channel", "frame"] = "channel"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(T, D) float features -> int8 codes (T, D) and float16 scales, (1, D) ``per`` channel or
    (T, 1) ``per`` frame (module docstring); an all-zero channel or frame gets scale 0, codes 0."""
    x = np.asarray(x, np.float32)
    axis = 0 if per == "channel" else 1
    scale = (np.abs(x).max(axis=axis, keepdims=True) / INT8_MAX).astype(np.float16)
    wide = scale.astype(np.float32)
    ratio = np.divide(x, wide, out=np.zeros_like(x), where=wide > 0)
    codes = np.clip(np.rint(ratio), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scale


def dequantise_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes (T, D) and float16 scales broadcasting to them -> float16 (T, D) features."""
    return (codes.astype(np.float32) * scale.astype(np.float32)).astype(np.float16)


def pq_encode(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(T, D) float features and a layer's float32 codebook (M, 256, D / M) -> uint8 codes
    (T, M): per sub-vector the nearest centroid, ``argmin_k ||c_k||^2 - 2 x . c_k``."""
    num_sub, _, sub = codebook.shape
    parts = np.asarray(x, np.float32).reshape(-1, num_sub, sub).transpose(1, 0, 2)  # (M, T, d)
    dots = parts @ codebook.transpose(0, 2, 1)  # (M, T, 256)
    dist = (codebook**2).sum(-1)[:, None, :] - 2 * dots
    return dist.argmin(-1).T.astype(np.uint8)


def pq_decode(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """uint8 codes (T, M) and a layer's codebook (M, 256, D / M) -> float16 (T, D): the gather
    ``codebook[m, codes[t, m]]`` concatenated over m."""
    rows = codebook[np.arange(codebook.shape[0]), codes]  # (T, M, D / M)
    return rows.reshape(codes.shape[0], -1).astype(np.float16)


def rq_encode(x: np.ndarray, codebook: np.ndarray | torch.Tensor, beam: int = RQ_BEAM
              ) -> np.ndarray:
    """(T, D) float features and a layer's float32 rq codebook (M, 256, D) -> uint8 codes (T, M)
    by beam search: per stage, each of the ``beam`` best partial codes so far is extended by
    every entry, and the ``beam`` extensions with the smallest squared error ``||r - c||^2``
    (r: what the partial code leaves) are kept; the best after stage M is returned. Runs where
    ``codebook`` is: a tensor on the teacher's GPU encodes there (``cache_teacher``)."""
    book = torch.as_tensor(codebook)
    num_codes, entries, _ = book.shape
    frames = torch.arange(x.shape[0], device=book.device)[:, None]
    residual = torch.as_tensor(np.asarray(x, np.float32), device=book.device)[:, None, :]
    codes = torch.zeros((x.shape[0], 1, 0), dtype=torch.long, device=book.device)
    norms = (book**2).sum(-1)  # (M, 256)
    for stage in range(num_codes):  # residual (T, B, D), codes (T, B, stages so far)
        errors = ((residual**2).sum(-1, keepdim=True) + norms[stage]
                  - 2 * residual @ book[stage].T)  # (T, B, 256)
        flat = errors.reshape(x.shape[0], -1)
        best = torch.topk(flat, min(beam, flat.shape[1]), dim=1, largest=False).indices
        parent, entry = best // entries, best % entries
        residual = residual[frames, parent] - book[stage][entry]
        codes = torch.cat([codes[frames, parent], entry[..., None]], dim=2)
    return codes[:, 0].to(torch.uint8).cpu().numpy()


def rq_decode(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """uint8 codes (T, M) and a layer's rq codebook (M, 256, D) -> float16 (T, D): the sum over
    m of the gathered rows ``codebook[m, codes[t, m]]``."""
    features = np.zeros((codes.shape[0], codebook.shape[2]), np.float32)
    for stage in range(codebook.shape[0]):
        features += codebook[stage, codes[:, stage]]
    return features.astype(np.float16)


def encode(features: np.ndarray, codec: str, codebook: np.ndarray | None = None
           ) -> list[np.ndarray]:
    """float16 (T, D) features -> the arrays of ``formats.layer_members(..., codec)``, in order
    (pq, rq: with the layer's ``codebook``, (M, 256, D / M) or (M, 256, D))."""
    if codec == "fp16":
        return [features]
    if codec in QUANTISED:
        return [(pq_encode if codec == "pq" else rq_encode)(features, codebook)]
    return list(quantise_int8(features))


def decode(arrays: list[np.ndarray], codec: str, codebook: np.ndarray | None = None
           ) -> np.ndarray:
    """The arrays of one layer's members (``encode``'s) -> float16 (T, D) features (pq, rq: with
    the layer's ``codebook``, (M, 256, D / M) or (M, 256, D)); ValueError naming the array that
    breaks ``formats.layer_arrays``."""
    check_layer_arrays(arrays, codec, 0 if codebook is None else codebook.shape[0])
    if codec in QUANTISED:
        return (pq_decode if codec == "pq" else rq_decode)(arrays[0], codebook)
    return arrays[0] if codec == "fp16" else dequantise_int8(*arrays)


def check_layer_arrays(arrays: list[np.ndarray], codec: str, num_codebooks: int = 0) -> None:
    """ValueError naming the array of one layer's members (``encode``'s) that breaks
    ``formats.layer_arrays``: T (and fp16's and int8's D) read from the first, pq's and rq's M
    is ``num_codebooks``."""
    first = arrays[0].shape if arrays[0].ndim == 2 else (0, 0)
    expected = layer_arrays(codec, first[0], first[1], num_codebooks)
    for array, (shape, dtype) in zip(arrays, expected, strict=True):
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"expected {dtype} {shape}, got {array.dtype} {array.shape}")


def codebook_path(shard_url: str, given: str | None = None, file_name: str = CODEBOOK_FILE
                  ) -> str:
    """Where the pq (or rq) codebook of the cache holding ``shard_url`` is: ``given``
    (``data.codebook_file``) when set, else ``file_name`` (``formats.CodebookIdentity
    .file_name``) beside the shard; DataError naming the shard, the option and the fix for a
    ``pipe:`` shard without ``given`` (a command has no directory)."""
    if given:
        return given
    if shard_url.startswith("pipe:"):
        raise DataError(f"pq cache shard {shard_url} is a pipe: command, which has no directory "
                        f"to find its {file_name} in: set data.codebook_file to the codebook's "
                        f"path or URL (e.g. --data.codebook_file /mnt/cache/{file_name})")
    return os.path.join(os.path.dirname(shard_url), file_name)


def load_codebook(path: str, sha256: str, num_layers: int, num_codebooks: int,
                  codec: str = "pq") -> np.ndarray:
    """The float32 codebook of a ``codec`` cache at ``path`` (a path or a URL), pq (L, M, 256,
    D / M) or rq (L, M, 256, D), read without pickle, from the file on every call
    (``read_codebook``: once per process); DataError naming ``teacher.codebook.sha256`` and
    the fix when it cannot be read, is not that shape, or its bytes do not hash to ``sha256``."""
    fix = (f"copy the {os.path.basename(path)} the cache was written with beside its shards (or "
           f"name it in data.codebook_file), or re-cache with `colld prep cache-teacher --codec "
           f"{codec}` into a new out_dir")
    try:
        with open_stream(path) as stream:
            data = stream.read()
    except OSError as exc:
        raise DataError(f"cannot read the {codec} codebook {path} (teacher.codebook.sha256 "
                        f"{sha256[:12]}...): {exc}: {fix}") from exc
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise DataError(f"{codec} codebook {path} has sha256 {found[:12]}..., the cache's json "
                        f"records teacher.codebook.sha256 {sha256[:12]}...: {fix}")
    codebook = np.load(io.BytesIO(data), allow_pickle=False)
    if codebook.ndim != 4 or codebook.shape[:3] != (num_layers, num_codebooks, CODEBOOK_ENTRIES):
        raise DataError(f"{codec} codebook {path} has shape {codebook.shape}, expected "
                        f"({num_layers}, {num_codebooks}, {CODEBOOK_ENTRIES}, "
                        f"{'D / M' if codec == 'pq' else 'D'}): {fix}")
    return codebook.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def read_codebook(path: str, sha256: str, num_layers: int, num_codebooks: int,
                  codec: str = "pq") -> np.ndarray:
    """``load_codebook``, cached: the loader reads each codebook once per process."""
    return load_codebook(path, sha256, num_layers, num_codebooks, codec)


class CodeDecoder:
    """pq or rq decoding in the training step (``data.decode_codes``): a batch's uint8 codes
    (B, T, M) per layer -> float16 (B, T, D), zero at padded frames, on the codebook's device.

    ``codebooks``: float32 (L, M, 256, D / M) for pq, (L, M, 256, D) for rq, of the L layers
    in the order of ``Batch.teacher_codes``. Each layer's M codebooks are stacked into one
    (M * 256, w) table and code m of a frame indexes row ``m * 256 + code``: pq gathers the M
    rows and concatenates them (``embedding``), rq sums them (``embedding_bag``, summing in
    float32 as ``rq_decode`` does)."""

    def __init__(self, codec: str, codebooks: np.ndarray, device: torch.device | str):
        if codec not in QUANTISED:
            raise ValueError(f"CodeDecoder decodes {' and '.join(QUANTISED)} codes, not {codec}")
        num_layers, num_codebooks, entries, width = codebooks.shape
        self.codec = codec
        self.tables = torch.as_tensor(codebooks, dtype=torch.float32, device=device).reshape(
            num_layers, num_codebooks * entries, width)        # (L, M * 256, w)
        self.offsets = torch.arange(num_codebooks, device=device) * entries  # (M,)

    def __call__(self, codes: list[torch.Tensor], frame_lengths: torch.Tensor
                 ) -> list[torch.Tensor]:
        """L uint8 (B, T, M) code tensors on the decoder's device and (B,) valid frames ->
        L float16 (B, T, D) features, zero at frames t >= frame_lengths[b]."""
        batch, frames, num_codebooks = codes[0].shape
        valid = (torch.arange(frames, device=codes[0].device)[None, :]
                 < frame_lengths.to(codes[0].device)[:, None])            # (B, T)
        features = []
        for table, layer_codes in zip(self.tables, codes, strict=True):
            rows = layer_codes.long() + self.offsets                      # (B, T, M)
            if self.codec == "pq":
                decoded = F.embedding(rows, table).reshape(batch, frames, -1)
            else:
                decoded = F.embedding_bag(rows.reshape(-1, num_codebooks), table, mode="sum"
                                          ).reshape(batch, frames, -1)
            features.append((decoded * valid[..., None]).half())
        return features
