"""A reader of CTranslate2's `model.bin`, independent of the `ctranslate2` package.

Layout (little-endian; written by `ctranslate2/specs/model_spec.py` `ModelSpec._serialize`,
read by `src/models/model.cc` `Model::load`). A *string* is a uint16 byte count n (including a
trailing NUL) followed by n bytes.

    uint32 binary_version                    (1..6 are known)
    string spec_name; uint32 spec_revision   (binary_version >= 2; else no name, revision 1)
    uint32 num_variables, then per variable:
        string name
        uint8 rank; uint32 dims[rank]
        binary_version >= 4: uint8 dtype_id (0 float32, 1 int8, 2 int16, 3 int32,
                                             4 float16, 5 bfloat16); uint32 num_bytes
        binary_version <  4: uint8 item_size (4 float32, 2 int16, 1 int8); uint32 num_items
        num_bytes raw bytes (C order)
    binary_version >= 3: uint32 num_aliases, then per alias: string alias, string target

Quantized weights are stored as int8/int16 with a float variable `<name>_scale` beside them;
an alias also aliases the target's `_scale`, as CTranslate2 does. Variables whose name has a
scope stored as a scalar (e.g. `encoder/num_heads`) come back as 0-d arrays.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

MAX_BINARY_VERSION = 6
# Order of the DataType enum in include/ctranslate2/types.h. numpy has no bfloat16: those
# variables are widened to float32 (exactly), see `_bfloat16_to_float32`.
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_LEGACY_ITEM_DTYPES = {4: "float32", 2: "int16", 1: "int8"}


@dataclass
class CT2Model:
    """The contents of a `model.bin`: header fields, variables (aliases resolved) and aliases.

    `variables[name]` is a numpy array with the stored shape and dtype (bfloat16 widened to
    float32); `stored_dtypes[name]` is the dtype name as written in the file.
    """

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    stored_dtypes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class _Stream:
    """Little-endian reads with an error naming the position of a truncated file."""

    def __init__(self, f: BinaryIO, path: str):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError(f"{self.path}: truncated, wanted {n} bytes at offset {pos}")
        return data

    def unpack(self, fmt: str):
        (value,) = struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))
        return value

    def string(self) -> str:
        raw = self.read(self.unpack("H"))
        return raw.split(b"\0", 1)[0].decode("utf-8")


def _bfloat16_to_float32(raw: bytes) -> np.ndarray:
    """bfloat16 bytes -> float32: bfloat16 is the upper half of a float32."""
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def read_model_bin(path: str) -> CT2Model:
    """Read a CTranslate2 `model.bin` into a :class:`CT2Model` (see module docstring).

    Raises ValueError on an unknown binary version or dtype, or a truncated file.
    """
    with open(path, "rb") as f:
        s = _Stream(f, path)
        version = s.unpack("I")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise ValueError(f"{path}: unsupported CTranslate2 binary version {version}")
        spec_name, revision = (s.string(), s.unpack("I")) if version >= 2 else ("", 1)
        model = CT2Model(version, spec_name, revision)
        for _ in range(s.unpack("I")):
            name = s.string()
            shape = tuple(s.unpack("I") for _ in range(s.unpack("B")))
            if version >= 4:
                type_id, num_bytes = s.unpack("B"), s.unpack("I")
                if type_id >= len(DTYPES):
                    raise ValueError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
                dtype = DTYPES[type_id]
            else:
                item_size, num_items = s.unpack("B"), s.unpack("I")
                dtype, num_bytes = _LEGACY_ITEM_DTYPES[item_size], num_items * item_size
            raw = s.read(num_bytes)
            if dtype == "bfloat16":
                array = _bfloat16_to_float32(raw)
            else:
                array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).copy()
            model.variables[name] = array.reshape(shape)
            model.stored_dtypes[name] = dtype
        if version >= 3:
            for _ in range(s.unpack("I")):
                alias, target = s.string(), s.string()
                model.aliases[alias] = target
                for suffix in ("", "_scale"):
                    if target + suffix in model.variables:
                        model.variables[alias + suffix] = model.variables[target + suffix]
                        model.stored_dtypes[alias + suffix] = model.stored_dtypes[target + suffix]
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after the alias table")
    return model
