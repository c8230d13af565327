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
| whisper         | WhisperEncoder     | 80/128-bin log-mel, one window  | ``layer.fc2``         |

XLS-R / MMS are ``wav2vec2`` with ``do_stable_layer_norm=True``. All families run at 50 Hz.

Whisper: only the encoder of a ``WhisperModel`` / ``WhisperForConditionalGeneration`` (or an
exported ``WhisperEncoder``) directory is loaded (decoder weights are never built). Its input is
one window of ``config.max_source_positions`` encoder frames (1500 = 30 s for every released
Whisper; the HF encoder refuses any other length), so every utterance is zero-padded to the
window before the log-mel (the padding is the log-mel of silence, exactly as
``WhisperFeatureExtractor`` does) and longer utterances are an error. conv1 (stride 1) and conv2
(stride 2) give one frame per 20 ms; of those, the first ``num_frames(S)``
(= ceil(ceil(S / 160) / 2)) are returned and the ones past an utterance's length are padding,
excluded through ``frame_lengths`` like the other families.

:func:`set_whisper_window` shortens the window (``teacher.window_seconds``): the encoder then
runs ``window_seconds * 50`` positions with the first rows of its positional table, which is
cheaper in proportion. Whisper was trained on 30 s windows only, so this is an approximation;
measured in :func:`set_whisper_window`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import re
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
    WhisperFeatureExtractor,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

from colld_ds.errors import TeacherError
from colld_ds.formats import SAMPLE_RATE

# SeamlessM4TFeatureExtractor: 25 ms Povey window, 10 ms hop (fixed in its code).
_FBANK_WINDOW, _FBANK_HOP = 400, 160
WHISPER_MEL_HOP = 160
"""Whisper's log-mel hop (10 ms): fixed by its training, as in every released checkpoint."""

ModelInputs = dict[str, Tensor | None]


@dataclass(frozen=True)
class Family:
    """Per-family knowledge. Field names of the config are the same for all four families today,
    but live here so a new family states its own."""

    model_type: str
    model_class: type[PreTrainedModel]
    input_kind: Literal["waveform", "fbank", "logmel"]
    ffn_attr: str
    layers_field: str = "num_hidden_layers"
    width_field: str = "hidden_size"
    heads_field: str = "num_attention_heads"
    ffn_field: str = "intermediate_size"
    layers_attr: str = "encoder.layers"
    """Dotted path of the transformer layers (a ModuleList) inside the model."""
    weight_prefixes: tuple[str, ...] = ()
    """State-dict prefixes stripped when loading ``model_class`` from a checkpoint of a larger
    model (Whisper: the encoder out of ``WhisperForConditionalGeneration`` / ``WhisperModel``).
    Non-empty: every weight of ``model_class`` must be found, or loading fails."""
    hf_time_masking: bool = True
    """The HF model takes ``mask_time_indices`` and owns ``masked_spec_embed``. False
    (Whisper): the :class:`~colld_ds.models.student.Student` owns the mask embedding."""
    conv_front_end: tuple[str, ...] = ("feature_extractor",)
    """Submodules of the convolutional front end, in order; the last one's output (see
    :meth:`front_end_features`) is what a teacher cache may hold so that a frozen student skips
    them (``data.cached_front_end``). Empty: no convolutional front end (w2v-BERT's fbank)."""

    def front_end_features(self, recorded: Tensor) -> Tensor:
        """The recorded output of the last ``conv_front_end`` module -> the features the model
        continues from: wav2vec2-like (B, C, T) -> (B, T, C) (HF's ``extract_features``);
        Whisper conv2's (B, D, W) -> GELU (HF applies it functionally) -> (B, W, D)."""
        if self.model_type == "whisper":
            return nn.functional.gelu(recorded).permute(0, 2, 1)
        return recorded.transpose(1, 2)

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The transformer layers, in order (layer i, 1-based, is ``layers(model)[i - 1]``)."""
        return operator.attrgetter(self.layers_attr)(model)

    def load(self, path: str, config: PretrainedConfig) -> PreTrainedModel:
        """``model_class`` with the weights at ``path`` (in the checkpoint's stored dtype):
        safetensors, or a ``.bin`` loaded weights-only (no code from the file runs)."""
        if not self.weight_prefixes:
            return self.model_class.from_pretrained(path, config=config, weights_only=True)
        mapping = {f"^{re.escape(prefix)}": "" for prefix in self.weight_prefixes}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the (expected) unused decoder weights: a huge table
        try:
            model, info = self.model_class.from_pretrained(
                path, config=config, key_mapping=mapping, output_loading_info=True,
                weights_only=True,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if info["missing_keys"] or info["mismatched_keys"]:
            raise TeacherError(
                f"{path!r}: the {self.model_class.__name__} weights are not all in the checkpoint "
                f"(looked for them with the prefixes {self.weight_prefixes} or none); missing: "
                f"{sorted(info['missing_keys'])[:8]}, shape mismatch: "
                f"{list(info['mismatched_keys'])[:8]}"
            )
        return model

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
        Family("wav2vec2-bert", Wav2Vec2BertModel, "fbank", "ffn2", conv_front_end=()),
        # Pre-LN transformer layer: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x)))).
        Family(
            "whisper",
            WhisperEncoder,
            "logmel",
            "fc2",
            layers_field="encoder_layers",
            width_field="d_model",
            heads_field="encoder_attention_heads",
            ffn_field="encoder_ffn_dim",
            layers_attr="layers",
            weight_prefixes=("model.encoder.", "encoder."),
            hf_time_masking=False,
            conv_front_end=("conv1", "conv2"),
        ),
    )
}


def family_of(model_type: str) -> Family:
    """The :class:`Family` of a ``config.model_type``; ValueError listing the supported ones."""
    if model_type not in FAMILIES:
        raise TeacherError(
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


def _conv_output_lengths(lengths: Tensor, convs: list[nn.Conv1d]) -> Tensor:
    """Output lengths of a stack of 1-d convolutions (PyTorch's formula, floor division)."""
    for conv in convs:
        (kernel,), (stride,), (padding,), (dilation,) = (
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
        )
        lengths = (lengths + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return lengths.clamp(min=0)


class LogMelFrontEnd:
    """Whisper: waveform -> ``input_features`` (B, n_mels, M), the log-mel of one window.

    The window is the encoder's: M = 2 x ``config.max_source_positions`` log-mel frames of 10 ms
    (3000 = 30 s for released Whisper; fewer after :func:`set_whisper_window`), so the teacher
    and a student built from its config always agree on it.

    A torch re-implementation of ``WhisperFeatureExtractor`` (its torch path, ``dither=0``)
    that runs on the wave's device: each utterance's valid samples, zero-padded to the window
    (``max_samples``), Hann-window STFT (n_fft 400, hop 160, centred), the last STFT frame
    dropped, mel filters of the extractor, log10 clamped at 1e-10, floor at (utterance max - 8),
    then (x + 4) / 4. The padding therefore is the log-mel of silence of *that* utterance, so
    features do not depend on the batch's padding.

    Valid mel frames of an utterance of n samples: ceil(n / hop) (the extractor's attention
    mask); encoder frames: the conv1 / conv2 length formula on those (ceil(mel / 2) for Whisper's
    k=3, s=2, p=1 conv2). Utterances or padded batches longer than the window raise ValueError.
    """

    def __init__(self, extractor: WhisperFeatureExtractor, model: PreTrainedModel):
        self.feature_extractor = extractor
        self.hop_length = int(extractor.hop_length)
        self.n_fft = int(extractor.n_fft)
        self._convs = [model.conv1, model.conv2]
        self.frame_stride = self.hop_length * int(
            torch.tensor([c.stride[0] for c in self._convs]).prod()
        )
        config = model.config
        if extractor.feature_size != config.num_mel_bins:
            raise ValueError(
                f"WhisperFeatureExtractor ({extractor.feature_size} mel bins) does not fit the "
                f"encoder ({config.num_mel_bins} mel bins)"
            )
        self.max_samples = config.max_source_positions * self.frame_stride
        self.num_mel_frames = self.max_samples // self.hop_length
        self._mel_filters = torch.from_numpy(extractor.mel_filters).float()  # (n_freq, n_mels)

    @property
    def max_seconds(self) -> float:
        """The window in seconds (30 unless shortened by :func:`set_whisper_window`)."""
        return self.max_samples / SAMPLE_RATE

    def num_mel_frames_valid(self, wave_lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) valid log-mel frames, ceil(n / hop)."""
        return (wave_lengths + self.hop_length - 1) // self.hop_length

    def num_frames(self, wave_lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) int64 encoder frame counts (50 Hz)."""
        return _conv_output_lengths(self.num_mel_frames_valid(wave_lengths), self._convs).long()

    @property
    def num_encoder_frames(self) -> int:
        """Frames of the whole window (1500 for 30 s): what the encoder always computes."""
        return int(self.num_frames(torch.tensor(self.max_samples)))

    def __call__(self, wave: Tensor, wave_lengths: Tensor) -> tuple[ModelInputs, Tensor]:
        """wave (B, S) float, wave_lengths (B,) -> ({input_features (B, n_mels, M)},
        frame_lengths (B,)); M = ``num_mel_frames`` (3000 for a 30 s window)."""
        batch, num_samples = wave.shape
        if num_samples > self.max_samples:  # (shapes only on the happy path: no GPU sync)
            longest = int(wave_lengths.max()) if batch else 0
            if longest > self.max_samples:
                raise ValueError(
                    f"an utterance is {longest / SAMPLE_RATE:.2f} s long ({longest} samples); "
                    f"this Whisper encoder takes at most one {self.max_seconds:g} s window "
                    f"({self.max_samples} samples at {SAMPLE_RATE} Hz): crop or split "
                    f"utterances to <= {self.max_seconds:g} s, or raise teacher.window_seconds "
                    "(at most 30)"
                )
            raise ValueError(
                f"padded batch length {num_samples} samples ({num_samples / SAMPLE_RATE:.2f} s) is "
                f"over the Whisper encoder's {self.max_seconds:g} s window ({self.max_samples} "
                f"samples): pad batches to at most {self.max_seconds:g} s"
            )
        samples = torch.arange(num_samples, device=wave.device)
        valid = samples < wave_lengths.unsqueeze(1)  # (B, S)
        audio = wave.float().masked_fill(~valid, 0.0)
        audio = nn.functional.pad(audio, (0, self.max_samples - num_samples))  # (B, window)
        window = torch.hann_window(self.n_fft, device=wave.device)
        stft = torch.stft(audio, self.n_fft, self.hop_length, window=window, return_complex=True)
        magnitudes = (stft[..., :-1].abs() ** 2).contiguous()  # (B, n_freq, M)
        mel = self._mel_filters.to(wave.device).T @ magnitudes  # (B, n_mels, M)
        log_spec = torch.clamp(mel, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)  # per utterance
        log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        return {"input_features": log_spec}, self.num_frames(wave_lengths)


def set_whisper_window(encoder: WhisperEncoder, window_seconds: float) -> None:
    """Make ``encoder`` run on a window of ``window_seconds`` instead of its 30 s, in place.

    Sets ``config.max_source_positions`` to W = ``window_seconds`` x 50 frames (HF checks the
    input length against it) and keeps the first W rows of the (W_0, D) positional table, so the
    encoder is Whisper's on the first W positions; its attention then spans W frames (the
    utterance and its silence padding up to the window) instead of 1500. A student built from
    this config inherits the window (:class:`LogMelFrontEnd` reads it from the config).

    This is an approximation: Whisper only ever saw 30 s windows. Cosine of the trimmed
    window's layer outputs to the 30 s window's, per valid frame, Whisper base on 24 test
    utterances of the demo corpus (4166 frames; ``benchmarks/results/whisper_window_cpu.json``):

    | layer               | 1     | 2     | 3     | 4     | 5     | 6     |
    |---------------------|-------|-------|-------|-------|-------|-------|
    | 8 s, mean cosine    | 0.999 | 0.997 | 0.994 | 0.985 | 0.975 | 0.960 |
    | 8 s, lowest frame   | 0.994 | 0.985 | 0.756 | 0.246 | 0.379 | 0.315 |
    | 10 s, mean cosine   | 1.000 | 0.998 | 0.996 | 0.989 | 0.980 | 0.968 |

    The forward on CPU is 5.5x (8 s) and 4.3x (10 s) faster than on the 30 s window.

    ValueError (naming ``teacher.window_seconds``) unless the window is a whole number of 20 ms
    frames between one frame and the encoder's current window.
    """
    strides = encoder.conv1.stride[0] * encoder.conv2.stride[0]
    frame_seconds = WHISPER_MEL_HOP * strides / SAMPLE_RATE  # 0.02
    frames = round(window_seconds / frame_seconds)
    current = encoder.config.max_source_positions
    if not 1 <= frames <= current or abs(frames * frame_seconds - window_seconds) > 1e-6:
        raise ValueError(
            f"teacher.window_seconds {window_seconds!r}: must be a multiple of "
            f"{frame_seconds:g} s (one encoder frame) between {frame_seconds:g} and "
            f"{current * frame_seconds:g} s (this encoder's window); null keeps "
            f"{current * frame_seconds:g} s"
        )
    table = encoder.embed_positions
    trimmed = nn.Embedding(frames, table.embedding_dim, device=table.weight.device,
                           dtype=table.weight.dtype)
    with torch.no_grad():
        trimmed.weight.copy_(table.weight[:frames])
    trimmed.requires_grad_(table.weight.requires_grad)
    encoder.embed_positions = trimmed
    encoder.config.max_source_positions = encoder.max_source_positions = frames


FrontEnd = WaveformFrontEnd | FbankFrontEnd | LogMelFrontEnd


def build_front_end(family: Family, model: PreTrainedModel, model_dir: str) -> FrontEnd:
    """The front end of ``model``, with the feature-extractor settings saved in ``model_dir``
    (``preprocessor_config.json``) or the family's defaults when there are none."""
    has_extractor = os.path.isfile(os.path.join(model_dir, "preprocessor_config.json"))
    if family.input_kind == "logmel":
        extractor = (
            WhisperFeatureExtractor.from_pretrained(model_dir)
            if has_extractor
            else WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        )
        return LogMelFrontEnd(extractor, model)
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
