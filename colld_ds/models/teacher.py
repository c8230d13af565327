"""The frozen teacher: a local Hugging Face speech encoder returning its mapped layers' features.

Layer numbering is 1-based: layer i is transformer layer i (``model.encoder.layers[i - 1]``).

- ``layer_output``: the output of layer i as the layer returns it, read with a forward hook.
  This equals transformers 5's ``output_hidden_states=True`` entry ``hidden_states[i]`` for every
  i. Stable-layer-norm models (XLS-R, MMS, HuBERT-large) apply the encoder's final LayerNorm
  after the last layer; we do NOT apply it to layer L either, so all layers are alike
  (transformers 4.x put the normalised state in ``hidden_states[-1]``).
- ``ffn``: the output of layer i's FFN module before the residual add (data2vec-style targets;
  w2v-BERT: ``ffn2``, before its 0.5 half-step scaling; Whisper: ``fc2``).

Whisper: as for stable-layer-norm models, HF's ``hidden_states[L]`` is the encoder's final
LayerNorm applied to layer L's output (the ``last_hidden_state`` the decoder sees); our layer L
is the un-normalised output, like every other layer (``hidden_states[i]`` for i < L).
The encoder always runs on its whole window (30 s: its attention spans all 1500 frames,
padding included, as in Whisper's training; ``window_seconds`` shortens it, see
:func:`~colld_ds.models.families.set_whisper_window`); the features of its first
T = ``num_frames(S)`` frames are returned, zero past each utterance's ``frame_lengths``. The
window is part of the teacher's identity: ``config_hash`` is the hash of the config with the
window's ``max_source_positions``, so a teacher cache made with one window is refused by a run
with another (a 30 s window and ``None`` are the same teacher).

Hooks keep only the requested layers, not all L + 1 hidden states.

Front end (``teacher(wave, lengths, front_end=True)``, for ``data.cached_front_end``): the same
forward also records the output of the convolutional front end (``Family.conv_front_end``):
wav2vec2-like (B, T, C) ``extract_features`` (C = ``conv_dim[-1]``, 512 for released models),
zero at padded frames; Whisper (B, W, D) conv2's GELU output over the whole window (W frames, the
silence padding included: the encoder attends to all of it), what the student masks.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from colld_ds.errors import TeacherError, TeacherFilesError
from colld_ds.formats import SAMPLE_RATE
from colld_ds.models.families import (
    Family,
    FrontEnd,
    build_front_end,
    family_of,
    frame_mask,
    record_outputs,
    set_whisper_window,
)

TARGET_KINDS = ("layer_output", "ffn")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # what from_pretrained reads, any one
# Written by save_pretrained but not part of the architecture: excluded from the config hash.
_VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "architectures",
    "torch_dtype",
    "dtype",
)


@dataclass
class TeacherOutput:
    features: list[Tensor]
    """One (B, T, D_t) tensor per requested layer, in the requested order; zero at padded frames."""
    frame_lengths: Tensor
    """(B,) int64 valid frames per utterance; T = frame count of the padded length S."""
    front_end: Tensor | None = None
    """With ``front_end=True``: the conv front end's output, (B, T, C) zero at padded frames,
    or for Whisper (B, W, D) over the whole window (module docstring); else None."""


def _read_config_json(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise TeacherFilesError(
            f"teacher path {path!r} is not a local Hugging Face model directory: expected "
            f"{config_file} (config.json + weights, as written by save_pretrained)"
        )
    with open(config_file) as f:
        return json.load(f)


def _config_and_family(path: str) -> tuple[dict[str, Any], Family]:
    raw = _read_config_json(path)
    return raw, family_of(str(raw.get("model_type")))


def check_weight_files(path: str) -> None:
    """TeacherFilesError naming ``path`` and the files expected when it holds no weights
    (transformers' own OSError would not say what colld reads)."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise TeacherFilesError(
            f"teacher path {path!r} has a config.json but no weights: expected one of "
            f"{', '.join(WEIGHT_FILES)} beside it (what save_pretrained writes); copy the "
            "model's weights there")


def read_num_layers(path: str) -> int:
    """Number of transformer layers of the teacher at ``path``, without loading its weights."""
    raw, family = _config_and_family(path)
    if family.layers_field not in raw:
        raise TeacherError(
            f"teacher config {os.path.join(path, 'config.json')} (model_type "
            f"{family.model_type!r}) has no {family.layers_field!r}: not a complete "
            f"{family.model_class.__name__} config"
        )
    return int(raw[family.layers_field])


def config_hash(raw_config: dict[str, Any]) -> str:
    """Short sha256 of the canonical (sorted-key) config json, library-version independent."""
    canonical = {k: v for k, v in raw_config.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Teacher:
    """Frozen, ``eval()`` teacher. Call it: ``teacher(wave, wave_lengths) -> TeacherOutput``.

    Not an ``nn.Module`` on purpose: it must never be handed to DeepSpeed or an optimiser.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        family: Family,
        front_end: FrontEnd,
        path: str,
        layers: list[int],
        target_kind: str,
        identity: dict[str, Any],
    ):
        self.model = model
        self.family = family
        self.front_end = front_end
        self.path = path
        self.layers = list(layers)
        self.target_kind = target_kind
        self.identity = identity
        transformer_layers = family.layers(model)
        modules = [transformer_layers[i - 1] for i in self.layers]
        self._modules = (
            modules if target_kind == "layer_output" else [family.ffn(m) for m in modules]
        )

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        """D_t."""
        return getattr(self.config, self.family.width_field)

    @property
    def num_layers(self) -> int:
        """L, the teacher's transformer layers."""
        return getattr(self.config, self.family.layers_field)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def num_frames(self, wave_lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) valid frame counts (also T for the padded length S)."""
        return self.front_end.num_frames(wave_lengths)

    @property
    def front_end_frames(self) -> str:
        """What a cached front-end array spans: ``"utterance"`` (T frames, wav2vec2-like) or
        ``"window"`` (W frames, Whisper's whole window). ValueError for a family without a
        convolutional front end (w2v-BERT)."""
        if not self.family.conv_front_end:
            raise TeacherError(
                f"teacher {self.path} ({self.family.model_type}) has no convolutional front end "
                "whose output could be cached (its fbank input is computed from the audio): drop "
                "cache-teacher's --front_end and data.cached_front_end"
            )
        return "utterance" if self.family.hf_time_masking else "window"

    def cache_identity(self, front_end: bool = False) -> dict[str, Any]:
        """``identity``, plus with ``front_end`` ``"front_end": front_end_frames``: what a
        teacher cache holding the front end's output records, and what a run that reads it
        (``data.cached_front_end``) expects of the cache."""
        return {**self.identity, "front_end": self.front_end_frames} if front_end else self.identity

    def __call__(
        self, wave: Tensor, wave_lengths: Tensor, front_end: bool = False
    ) -> TeacherOutput:
        """wave (B, S) float 16 kHz, wave_lengths (B,) int64 -> features L_req x (B, T, D_t)
        (and, with ``front_end``, the conv front end's output from the same forward)."""
        modules = list(self._modules)
        front_end_frames = self.front_end_frames if front_end else None
        if front_end:
            modules.append(operator.attrgetter(self.family.conv_front_end[-1])(self.model))
        with torch.inference_mode():
            inputs, frame_lengths = self.front_end(wave, wave_lengths)
            inputs = {
                k: v.to(self.dtype) if v is not None and v.is_floating_point() else v
                for k, v in inputs.items()
            }
            with record_outputs(modules) as outputs:
                self.model(**inputs)
            front = self.family.front_end_features(outputs.pop()) if front_end else None
        # Outside inference mode, so the results are ordinary tensors that a loss may save for
        # backward (inference tensors cannot be).
        # T = frames of the padded length S. Whisper computes its whole window (1500 frames
        # for 30 s); only the first T are returned, the rest being padding for every utterance.
        num_frames = int(self.front_end.num_frames(torch.tensor(wave.shape[1])))
        valid = frame_mask(frame_lengths, num_frames).unsqueeze(-1)  # (B, T, 1)
        if front_end_frames == "utterance":
            front = front * valid  # (B, T, C)
        elif front_end_frames == "window":
            front = front.clone()  # (B, W, D), the whole window; clone: not an inference tensor
        return TeacherOutput([h[:, :num_frames] * valid for h in outputs], frame_lengths, front)


def load_teacher(
    path: str,
    layers: list[int],
    target_kind: str = "layer_output",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    window_seconds: float | None = None,
) -> Teacher:
    """Load a frozen teacher from a local HF directory, returning ``layers`` (1-based) as targets.

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere; bf16 is allowed. ``window_seconds``
    (Whisper only): run the encoder on a window this long instead of 30 s (``None``: Whisper's
    own window). Everything but the window is validated before the weights are read.
    """
    raw, family = _config_and_family(path)
    num_layers = read_num_layers(path)
    if target_kind not in TARGET_KINDS:
        raise TeacherError(
            f"teacher.target_kind {target_kind!r}: choose one of {', '.join(TARGET_KINDS)}"
        )
    if not layers:
        raise TeacherError("layer_map: no teacher layers requested")
    for layer in layers:
        if not 1 <= layer <= num_layers:
            raise TeacherError(
                f"layer_map: teacher layer {layer} is out of range; the teacher at {path!r} has "
                f"{num_layers} layers ({family.layers_field}), so use layers 1..{num_layers}"
            )
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if dtype not in _DTYPES:
        raise TeacherError(f"teacher dtype {dtype}: choose one of {_DTYPES}")
    if window_seconds is not None and family.model_type != "whisper":
        raise TeacherError(
            f"teacher.window_seconds is {window_seconds}, but the teacher at {path!r} is a "
            f"{family.model_type} model: the window applies to Whisper teachers only; set it to "
            "null"
        )

    check_weight_files(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # no code from it
    model = family.load(path, config).to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    if window_seconds is not None:
        set_whisper_window(model, window_seconds)
        raw = dict(raw, max_source_positions=model.config.max_source_positions)
    front_end = build_front_end(family, model, path)
    identity = {
        "name": os.path.basename(os.path.normpath(path)),
        "model_type": family.model_type,
        "config_hash": config_hash(raw),
        "layers": list(layers),
        "target_kind": target_kind,
        "frame_rate": SAMPLE_RATE / front_end.frame_stride,
    }
    if family.model_type == "whisper":  # shown when a cache is refused (the hash decides)
        identity["window_seconds"] = front_end.max_seconds
    return Teacher(model, family, front_end, path, layers, target_kind, identity)
