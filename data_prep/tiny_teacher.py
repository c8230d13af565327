"""Tiny, randomly initialised teachers built from the real Hugging Face config classes.

Tests and the CPU demo use them in place of hub checkpoints (no hub access here): each one is
written with the real ``save_pretrained`` (safetensors + ``config.json``) together with its
feature extractor config, so it loads back through exactly the code path users take
(:func:`colld_ds.models.load_teacher`).

Wav2vec2-like families keep the real 7-layer conv front end (kernels 10,3,3,3,3,2,2; strides
5,2,2,2,2,2,2 = 320 samples = 20 ms per frame) with only 16 channels; w2v-BERT keeps the real
160-dim stacked fbank input (also 20 ms per frame). Whisper keeps the real front end (80-bin
log-mel over a 30 s window, conv1 + stride-2 conv2, 1500 positions) and saves a full
``WhisperForConditionalGeneration`` (one tiny decoder layer, 64-token vocabulary), as the
converted checkpoints are, so the teacher loads its encoder out of it.

CLI: ``python -m colld_ds.data_prep.tiny_teacher --family xlsr --out_dir /tmp/tiny_xlsr``.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

TINY_FAMILIES = ("wav2vec2", "xlsr", "hubert", "data2vec", "w2v-bert")
"""The wav2vec2-like families (waveform / fbank input, ``num_hidden_layers`` configs)."""
TINY_TEACHERS = (*TINY_FAMILIES, "whisper")
"""Everything :func:`make_tiny_teacher` builds."""

# The real wav2vec 2.0 conv front end: 400-sample receptive field, 320-sample stride.
_CONV = dict(
    conv_dim=(16,) * 7,
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
)


def _config(
    family: str, num_layers: int, hidden_size: int
) -> tuple[type[PreTrainedModel], PretrainedConfig]:
    size = dict(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
    )
    if family == "wav2vec2":
        return Wav2Vec2Model, Wav2Vec2Config(
            **size,
            **_CONV,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            feat_extract_norm="group",
        )
    if family == "xlsr":
        return Wav2Vec2Model, Wav2Vec2Config(
            **size,
            **_CONV,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
        )
    if family == "hubert":
        return HubertModel, HubertConfig(
            **size,
            **_CONV,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            feat_extract_norm="group",
        )
    if family == "data2vec":
        return Data2VecAudioModel, Data2VecAudioConfig(
            **size,
            **_CONV,
            num_conv_pos_embeddings=2,
            conv_pos_kernel_size=5,
            num_conv_pos_embedding_groups=4,
        )
    if family == "w2v-bert":
        return Wav2Vec2BertModel, Wav2Vec2BertConfig(
            **size,
            conv_depthwise_kernel_size=5,
            left_max_position_embeddings=8,
            right_max_position_embeddings=4,
        )
    if family == "whisper":
        return WhisperForConditionalGeneration, WhisperConfig(
            d_model=hidden_size,
            encoder_layers=num_layers,
            encoder_attention_heads=2,
            encoder_ffn_dim=2 * hidden_size,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=2 * hidden_size,
            num_mel_bins=80,
            max_source_positions=1500,
            max_target_positions=16,
            vocab_size=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=3,
            begin_suppress_tokens=None,
        )
    raise ValueError(
        f"unknown tiny teacher family {family!r}; choose one of {', '.join(TINY_TEACHERS)}"
    )


def make_tiny_teacher(
    family: str, out_dir: str, seed: int = 0, num_layers: int = 4, hidden_size: int = 32
) -> str:
    """Build a tiny random ``family`` model, save it (and its feature extractor) to ``out_dir``.

    Returns ``out_dir``. The same ``seed`` gives the same weights.
    """
    model_class, config = _config(family, num_layers, hidden_size)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(out_dir)
    if family == "w2v-bert":
        extractor = SeamlessM4TFeatureExtractor()
    elif family == "whisper":
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    else:
        # As on the hub: "layer"-norm conv models (XLS-R, data2vec) take an attention mask,
        # "group" ones don't.
        layer_norm_conv = getattr(config, "feat_extract_norm", "layer") == "layer"
        extractor = Wav2Vec2FeatureExtractor(
            do_normalize=True, return_attention_mask=layer_norm_conv
        )
    extractor.save_pretrained(out_dir)
    return os.path.abspath(out_dir)


if __name__ == "__main__":
    import fire

    fire.Fire(make_tiny_teacher)
