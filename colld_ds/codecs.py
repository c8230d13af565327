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
  levels on them. On the Whisper-base demo cache (``benchmarks/cache_codecs.py``, README "Cache
  codecs") per-channel scales give a 1.6-1.9x lower relative L2 error (0.0051 vs 0.0080 at
  layer 3, 0.0138 vs 0.0268 at layer 6) at the same mean cosine (within 2e-5; lowest frame
  0.9980 vs 0.9988 at layer 6) and 1 % more bytes: one int8 codec, per channel.

Decoding runs in the loader (``colld_ds.data``), not in the training step: it is one multiply
per value (about 2 us per 512-d frame, 0.8 ms per layer of an 8 s utterance, on the loaded
2-core development CPU) in the DataLoader workers, which overlap the step; every consumer keeps
reading float16 (B, T, D) ``Batch.teacher_features``. In the step it would only halve the
host-to-device copy of the targets, a small part of a step that runs a student forward and
backward.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from colld_ds.formats import layer_arrays

INT8_MAX = 127  # symmetric: codes in [-127, 127]


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


def encode(features: np.ndarray, codec: str) -> list[np.ndarray]:
    """float16 (T, D) features -> the arrays of ``formats.layer_members(..., codec)``, in order."""
    if codec == "fp16":
        return [features]
    return list(quantise_int8(features))


def decode(arrays: list[np.ndarray], codec: str) -> np.ndarray:
    """The arrays of one layer's members (``encode``'s) -> float16 (T, D) features; ValueError
    naming the array that breaks ``formats.layer_arrays``."""
    first = arrays[0].shape if arrays[0].ndim == 2 else (0, 0)
    expected = layer_arrays(codec, *first)
    for array, (shape, dtype) in zip(arrays, expected, strict=True):
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"expected {dtype} {shape}, got {array.dtype} {array.shape}")
    return arrays[0] if codec == "fp16" else dequantise_int8(*arrays)
