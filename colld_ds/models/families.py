"""Everything colld knows about each supported Hugging Face speech-encoder family, in one place.

A family (dispatched on ``config.model_type``) gives: the model class, where its transformer
layers live, the FFN module of a layer, the front end that turns 16 kHz waveforms into model
inputs, and the config field names for depth / width / heads / FFN width.

| model_type      | class              | input                          | FFN target            |
|-----------------|--------------------|--------------------------------|-----------------------|
| wav2vec2        | Wav2Vec2Model      | waveform (conv, 320 samples)   | ``layer.feed_forward``|
| hubert          | HubertModel        | waveform (conv, 320 samples)   | ``layer.feed_forward``|
| data2vec-audio  | Data2VecAudioModel | waveform (conv, 320 samples)   | ``layer.feed_forward``|
| wav2vec2-bert   | Wav2Vec2BertModel  | 160-dim stacked fbank (2x10 ms) | ``layer.ffn2``       |

XLS-R / MMS are ``wav2vec2`` with ``do_stable_layer_norm=True``. All families run at 50 Hz.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import (
    Data2VecAudioModel,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertModel,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

SAMPLE_RATE = 16000
# SeamlessM4TFeatureExtractor: 25 ms Povey window, 10 ms hop (fixed in its code).
_FBANK_WINDOW, _FBANK_HOP = 400, 160

ModelInputs = dict[str, Tensor | None]


@dataclass(frozen=True)
class Family:
    """Per-family knowledge. Field names of the config are the same for all four families today,
    but live here so a new family states its own."""

    model_type: str
    model_class: type[PreTrainedModel]
    input_kind: Literal["waveform", "fbank"]
    ffn_attr: str
    layers_field: str = "num_hidden_layers"
    width_field: str = "hidden_size"
    heads_field: str = "num_attention_heads"
    ffn_field: str = "intermediate_size"

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The transformer layers, in order (layer i, 1-based, is ``layers(model)[i - 1]``)."""
        return model.encoder.layers

    def ffn(self, layer: nn.Module) -> nn.Module:
        """The FFN whose output (before the residual add) is the "ffn" target of ``layer``."""
        return getattr(layer, self.ffn_attr)


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("wav2vec2", Wav2Vec2Model, "waveform", "feed_forward"),
        Family("hubert", HubertModel, "waveform", "feed_forward"),
        Family("data2vec-audio", Data2VecAudioModel, "waveform", "feed_forward"),
        # Conformer layer: ffn1 -> attention -> conv -> ffn2 (half-step residuals); the
        # layer's last FFN, like a transformer layer's only one.
        Family("wav2vec2-bert", Wav2Vec2BertModel, "fbank", "ffn2"),
    )
}


def family_of(model_type: str) -> Family:
    """The :class:`Family` of a ``config.model_type``; ValueError listing the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported teacher model_type {model_type!r}; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


class WaveformFrontEnd:
    """wav2vec2 / HuBERT / data2vec: waveform -> ``input_values`` (+ ``attention_mask``).

    Padded samples are zeroed; with ``do_normalize`` each utterance is scaled to zero mean and
    unit variance over its valid samples only (Wav2Vec2FeatureExtractor's formula). Models
    with ``feat_extract_norm == "group"`` (wav2vec2-base, HuBERT-base) get no attention mask,
    as the HF docs prescribe: their valid frames then see the zero padding, as in training.
    """

    def __init__(
        self,
        output_lengths: Callable[[Tensor], Tensor],
        frame_stride: int,
        extractor: Wav2Vec2FeatureExtractor,
    ):
        self._output_lengths = output_lengths
        self.frame_stride = frame_stride
        self.feature_extractor = extractor

    def num_frames(self, wave_lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) int64 frame counts (the model's conv length formula)."""
        return self._output_lengths(wave_lengths).long()

    def __call__(self, wave: Tensor, wave_lengths: Tensor) -> tuple[ModelInputs, Tensor]:
        """wave (B, S) float, wave_lengths (B,) -> (model kwargs, frame_lengths (B,))."""
        samples = torch.arange(wave.shape[1], device=wave.device)
        valid = samples < wave_lengths.unsqueeze(1)  # (B, S)
        wave = wave.float().masked_fill(~valid, 0.0)
        if self.feature_extractor.do_normalize:
            count = wave_lengths.unsqueeze(1).clamp(min=1).to(wave.dtype)  # (B, 1)
            mean = wave.sum(1, keepdim=True) / count
            var = ((wave - mean).masked_fill(~valid, 0.0) ** 2).sum(1, keepdim=True) / count
            wave = ((wave - mean) / torch.sqrt(var + 1e-7)).masked_fill(~valid, 0.0)
        mask = valid.long() if self.feature_extractor.return_attention_mask else None
        return {"input_values": wave, "attention_mask": mask}, self.num_frames(wave_lengths)


class FbankFrontEnd:
    """w2v-BERT 2.0: waveform -> 80-dim Kaldi log-mel fbank (10 ms hop), normalised per
    utterance and mel bin, two frames stacked -> ``input_features`` (B, T, 160) at 50 Hz.

    Runs the real SeamlessM4TFeatureExtractor (numpy, on the host) per utterance, then pads or
    trims to T = ``num_frames(S)`` so T depends only on the padded length S, as for the conv
    families.
    """

    def __init__(self, extractor: SeamlessM4TFeatureExtractor):
        self.feature_extractor = extractor
        self.frame_stride = _FBANK_HOP * extractor.stride

    def num_frames(self, wave_lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) int64 frame counts (stacked fbank frames)."""
        fbank_frames = ((wave_lengths - _FBANK_WINDOW) // _FBANK_HOP + 1).clamp(min=0)
        return (fbank_frames // self.feature_extractor.stride).long()

    def __call__(self, wave: Tensor, wave_lengths: Tensor) -> tuple[ModelInputs, Tensor]:
        """wave (B, S) float, wave_lengths (B,) -> (model kwargs, frame_lengths (B,))."""
        num_frames = int(self.num_frames(torch.tensor(wave.shape[1])))
        utterances = [
            w[:n].float().cpu().numpy() for w, n in zip(wave, wave_lengths.tolist(), strict=True)
        ]
        out = self.feature_extractor(
            utterances,
            sampling_rate=SAMPLE_RATE,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        features, mask = out["input_features"], out["attention_mask"]  # (B, T', 160), (B, T')
        pad = num_frames - features.shape[1]
        features = (
            nn.functional.pad(features, (0, 0, 0, pad)) if pad > 0 else features[:, :num_frames]
        )
        mask = nn.functional.pad(mask, (0, pad)) if pad > 0 else mask[:, :num_frames]
        inputs = {"input_features": features, "attention_mask": mask}
        inputs = {name: tensor.to(wave.device) for name, tensor in inputs.items()}
        return inputs, mask.sum(1).to(wave.device)


FrontEnd = WaveformFrontEnd | FbankFrontEnd


def build_front_end(family: Family, model: PreTrainedModel, model_dir: str) -> FrontEnd:
    """The front end of ``model``, with the feature-extractor settings saved in ``model_dir``
    (``preprocessor_config.json``) or the family's defaults when there are none."""
    has_extractor = os.path.isfile(os.path.join(model_dir, "preprocessor_config.json"))
    if family.input_kind == "fbank":
        extractor = (
            SeamlessM4TFeatureExtractor.from_pretrained(model_dir)
            if has_extractor
            else SeamlessM4TFeatureExtractor()
        )
        return FbankFrontEnd(extractor)
    config = model.config
    if has_extractor:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    else:  # data2vec-audio has no feat_extract_norm: its conv always uses layer norm
        layer_norm_conv = getattr(config, "feat_extract_norm", "layer") == "layer"
        extractor = Wav2Vec2FeatureExtractor(
            do_normalize=True, return_attention_mask=layer_norm_conv
        )
    # Frames of the encoder layers: an adapter (fine-tuning only) comes after them.
    lengths = model._get_feat_extract_output_lengths
    if "add_adapter" in inspect.signature(lengths).parameters:  # HuBERT's has no adapter
        lengths = functools.partial(lengths, add_adapter=False)
    return WaveformFrontEnd(lengths, int(torch.tensor(config.conv_stride).prod()), extractor)


def frame_mask(frame_lengths: Tensor, num_frames: int) -> Tensor:
    """(B,) valid frame counts -> (B, T) bool, True at valid frames."""
    return torch.arange(num_frames, device=frame_lengths.device) < frame_lengths.unsqueeze(1)


@contextlib.contextmanager
def record_outputs(modules: list[nn.Module]) -> Iterator[list[Tensor]]:
    """Record the output of each module (a forward hook) during the ``with`` block.

    Yields a list that, after the block, holds one tensor per entry of ``modules`` (a module
    may appear twice). Hooks are removed on exit, so gradient-checkpointing recomputation in
    the backward pass never writes here.
    """
    seen: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        seen[module] = output[0] if isinstance(output, tuple) else output  # transformers 4.x: tuple

    handles = [module.register_forward_hook(hook) for module in dict.fromkeys(modules)]
    outputs: list[Tensor] = []
    try:
        yield outputs
        outputs.extend(seen[module] for module in modules)
    finally:
        for handle in handles:
            handle.remove()


def layer_config(family: Family, config: PretrainedConfig) -> dict[str, int]:
    """The depth / width / heads / FFN width of ``config`` under uniform names."""
    return {
        "num_layers": getattr(config, family.layers_field),
        "hidden_size": getattr(config, family.width_field),
        "num_attention_heads": getattr(config, family.heads_field),
        "intermediate_size": getattr(config, family.ffn_field),
    }
