"""The CTranslate2 `model.bin` reader, on files written by this test (our own writer that
follows `ModelSpec._serialize`) and by the `ctranslate2` package's own spec serializer."""

from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from colld_ds.data_prep.whisper.convert import ct2_to_hf_state_dict
from colld_ds.data_prep.whisper.ctranslate2_reader import DTYPES, read_model_bin


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path,
    variables: dict,
    aliases: dict,
    version: int = 6,
    spec: str = "TestSpec",
    revision: int = 7,
) -> None:
    """Writer following ctranslate2/specs/model_spec.py `_serialize` (and, for version < 4,
    the older item-size header that src/models/model.cc still reads).
    `variables`: name -> (dtype name, raw bytes, shape)."""
    out = struct.pack("<I", version)
    if version >= 2:
        out += _string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    for name, (dtype, raw, shape) in variables.items():
        out += _string(name) + struct.pack("<B", len(shape))
        out += b"".join(struct.pack("<I", d) for d in shape)
        if version >= 4:
            out += struct.pack("<BI", DTYPES.index(dtype), len(raw))
        else:
            item = np.dtype(dtype).itemsize
            out += struct.pack("<BI", item, len(raw) // item)
        out += raw
    if version >= 3:
        out += struct.pack("<I", len(aliases))
        out += b"".join(_string(a) + _string(t) for a, t in aliases.items())
    with open(path, "wb") as f:
        f.write(out)


def _var(array: np.ndarray):
    return array.dtype.name, array.tobytes(), array.shape


def test_reader_layout_dtypes_names_aliases(tmp_path):
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    arrays = {
        "encoder/layer_0/ffn/linear_0/weight": rng.integers(-127, 128, (4, 3)).astype(np.int8),
        "encoder/layer_0/ffn/linear_0/weight_scale": rng.random(4).astype(np.float32) + 1,
        "encoder/layer_0/ffn/linear_0/bias": rng.standard_normal(4).astype(np.float16),
        "encoder/conv1/weight": f32.reshape(3, 5, 1),
        "encoder/int16": rng.integers(-1000, 1000, (2, 2)).astype(np.int16),
        "encoder/int32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "encoder/num_heads": np.array(6, dtype=np.int16),  # a scalar: rank 0
        "décodeur/ünïcode": np.ones((1,), np.float32),  # names are UTF-8
    }
    variables = {name: _var(a) for name, a in arrays.items()}
    bf16 = (f32.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bfloat16
    variables["encoder/bf16"] = ("bfloat16", bf16.tobytes(), (3, 5))
    aliases = {"encoder/layer_1/ffn/linear_0/weight": "encoder/layer_0/ffn/linear_0/weight"}
    path = tmp_path / "model.bin"
    write_model_bin(path, variables, aliases)

    model = read_model_bin(str(path))
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "TestSpec", 7)
    for name, array in arrays.items():
        got = model.variables[name]
        assert got.dtype == array.dtype and got.shape == array.shape, name
        np.testing.assert_array_equal(got, array)
        assert model.stored_dtypes[name] == array.dtype.name
    assert model.stored_dtypes["encoder/bf16"] == "bfloat16"
    np.testing.assert_array_equal(
        model.variables["encoder/bf16"], (bf16.astype(np.uint32) << 16).view(np.float32)
    )
    assert np.abs(model.variables["encoder/bf16"] - f32).max() <= np.abs(f32).max() / 128
    # an alias also aliases the target's quantization scale, as CTranslate2 does
    assert model.aliases == aliases
    for suffix in ("", "_scale"):
        np.testing.assert_array_equal(
            model.variables["encoder/layer_1/ffn/linear_0/weight" + suffix],
            arrays["encoder/layer_0/ffn/linear_0/weight" + suffix],
        )


@pytest.mark.parametrize("version", [1, 3])
def test_reader_legacy_versions(tmp_path, version):
    """Versions < 4 store an item size instead of a dtype; < 2 has no spec name; < 3 no aliases."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_model_bin(tmp_path / "model.bin", {"w": _var(array)}, {}, version=version)
    model = read_model_bin(str(tmp_path / "model.bin"))
    assert model.binary_version == version and model.spec_revision == (1 if version < 2 else 7)
    np.testing.assert_array_equal(model.variables["w"], array)


def test_reader_rejects_truncated_and_unknown(tmp_path):
    path = tmp_path / "model.bin"
    write_model_bin(path, {"w": _var(np.ones((4, 4), np.float32))}, {})
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(ValueError, match="truncated"):
        read_model_bin(str(path))
    path.write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(ValueError, match="binary version 99"):
        read_model_bin(str(path))


# --- files written by the ctranslate2 package itself -------------------------------------


def _tiny_whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=96,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=24,
        decoder_ffn_dim=40,
        max_source_positions=20,
        max_target_positions=12,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=1,
    )
    return WhisperForConditionalGeneration(config).eval()


# (CTranslate2 quantization, dtype of linear weights in the file, max error relative to the
# largest magnitude of the tensor)
_QUANT = [
    (None, "float32", 0.0),
    ("float16", "float16", 1e-3),
    ("int8", "int8", 1 / 127),
    ("int16", "int16", 1 / 1024),
]


@pytest.mark.parametrize("quantization,weight_dtype,rel_err", _QUANT)
def test_reader_on_ctranslate2_serializer(tmp_path, quantization, weight_dtype, rel_err):
    """ctranslate2's Whisper spec from a tiny HF model -> `spec.save` -> our reader + key map
    gives back the HF state dict (exactly in fp32, within quantisation error otherwise)."""
    ct2 = pytest.importorskip(
        "ctranslate2", reason="ctranslate2 (requirements-extra.txt) not installed"
    )
    from ctranslate2.converters.transformers import WhisperLoader

    model = _tiny_whisper()
    reference = copy.deepcopy(model.state_dict())  # ct2's int8 quantiser scales in place
    spec = WhisperLoader().get_model_spec(model)
    spec.register_vocabulary([f"tok{i}" for i in range(model.config.vocab_size)])
    spec.validate()
    spec.optimize(quantization=quantization)
    spec.save(str(tmp_path))

    read = read_model_bin(str(tmp_path / "model.bin"))
    assert (read.binary_version, read.spec_name) == (
        ct2.specs.model_spec.CURRENT_BINARY_VERSION,
        "WhisperSpec",
    )
    assert read.stored_dtypes["encoder/layer_1/ffn/linear_0/weight"] == weight_dtype
    assert read.variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (
        48,
        16,
    )  # q;k;v
    assert int(read.variables["decoder/num_heads"]) == 4
    assert ("encoder/layer_0/ffn/linear_0/weight_scale" in read.variables) == (
        weight_dtype.startswith("int")
    )
    assert read.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"

    state = ct2_to_hf_state_dict(read.variables)
    assert set(state) == set(reference)
    for key, ref in reference.items():
        err = (state[key].float() - ref).abs().max().item()
        assert err <= rel_err * ref.abs().max().item() + 1e-7, (key, err)
