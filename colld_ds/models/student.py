"""The student: the teacher's own HF architecture with a smaller config.

Export is ``student.model.save_pretrained(dir)``; the result loads wherever the teacher does.
Initialisation copies, where shapes match, the teacher's front end (conv feature encoder,
feature projection, positional conv embedding, encoder LayerNorm, mask embedding; w2v-BERT's
fbank projection) and the chosen teacher layers; everything else keeps the random init.

Whisper: the student is a smaller ``WhisperEncoder`` (same ``WhisperConfig`` class; conv1 / conv2,
``embed_positions`` and the final LayerNorm copied where shapes match). HF Whisper has no mask
embedding, so the :class:`Student` owns one, ``Student.mask_embed`` (d_model, uniform init like
HF's ``masked_spec_embed``). It is training-only: export stays ``student.model.save_pretrained``
(the encoder alone), and the exported encoder loads as a Whisper teacher. The student runs the
teacher's window (its config's ``max_source_positions``, shortened or not).

Cached front end (``data.cached_front_end``): a student whose convolutional front end is frozen
and an exact copy of the teacher's computes, on the unmasked audio, exactly what the teacher's
front end computed (masking comes after it). ``forward(..., front_end_features=...)`` then takes
that output from the teacher cache and skips the convolutions;
:meth:`Student.check_cached_front_end` checks the premise at the start of a run.
"""

from __future__ import annotations

import logging
import operator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from colld_ds.models.families import (
    Family,
    build_front_end,
    frame_mask,
    layer_config,
    record_outputs,
    set_whisper_window,
)
from colld_ds.models.teacher import Teacher

logger = logging.getLogger(__name__)

# Only used when the teacher's config has no time masking: it makes HF create the learned mask
# embedding. The masks themselves come from masking.compute_span_mask (HF's default value).
_FALLBACK_MASK_TIME_PROB = 0.05


class StudentOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 must find the tensors a module returns to hook
    its backward."""

    hidden: list[Tensor]
    """(B, T, D_s) outputs of student layers 1..K, zero at padded frames."""
    frame_lengths: Tensor
    """(B,) int64 valid frames per utterance."""


class Student(nn.Module):
    """Trainable student (a plain ``nn.Module``, so DeepSpeed can wrap it)."""

    def __init__(self, model: PreTrainedModel, family: Family, teacher_dir: str):
        super().__init__()
        self.model = model
        self.family = family
        self.front_end = build_front_end(family, model, teacher_dir)
        if not family.hf_time_masking:
            # Whisper: HF has no mask embedding; ours is not part of the exported model.
            width = getattr(model.config, family.width_field)
            param = next(model.parameters())
            self.mask_embed = nn.Parameter(
                torch.empty(width, device=param.device, dtype=param.dtype).uniform_()
            )

    @property
    def hidden_size(self) -> int:
        """D_s."""
        return getattr(self.model.config, self.family.width_field)

    @property
    def num_layers(self) -> int:
        """K."""
        return getattr(self.model.config, self.family.layers_field)

    def freeze_front_end(self) -> None:
        """Stop training the convolutional front end (wav2vec 2.0-style feature encoder, or
        Whisper's conv1/conv2): its backward is a large share of a CPU step."""
        modules = self._conv_front_end()
        if not modules:
            raise ValueError(f"student.freeze_front_end: a {self.family.model_type} student has "
                             "no convolutional front end to freeze; set it to false")
        for module in modules:
            if hasattr(module, "_freeze_parameters"):  # HF's feature encoder (what
                module._freeze_parameters()            # `freeze_feature_encoder` calls; HuBERT's
            else:                                      # model class lacks that method)
                module.requires_grad_(False)

    def freeze_layers(self, layers: list[int]) -> None:
        """Stop training student transformer layers ``layers`` (1-based): they keep their
        current weights (``student.frozen_layers``)."""
        modules = self.family.layers(self.model)
        for layer in layers:
            modules[layer - 1].requires_grad_(False)

    def num_frames(self, wave_lengths: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) valid frames; the same values as the teacher's.

        For a padded length S, T = ``num_frames(torch.tensor(S))``: lets a caller draw a time
        mask before the forward.
        """
        return self.front_end.num_frames(wave_lengths)

    def _conv_front_end(self) -> list[nn.Module]:
        """The convolutional front end's modules (``Family.conv_front_end``); [] if none."""
        return [operator.attrgetter(name)(self.model) for name in self.family.conv_front_end]

    @property
    def front_end_frozen(self) -> bool:
        """Whether the student has a convolutional front end and none of its parameters trains."""
        modules = self._conv_front_end()
        return bool(modules) and not any(p.requires_grad for m in modules for p in m.parameters())

    def check_cached_front_end(self, teacher: Teacher, max_seconds: float) -> None:
        """Start-of-run check of ``data.cached_front_end``: the teacher has a convolutional
        front end, the student's is frozen and equal to the teacher's, weight by weight (at
        the teacher's dtype: the student keeps an fp32 copy), and, for Whisper, no crop can
        happen (the cache holds the front end of the whole window, which a crop changes).
        ValueError naming the field and the fix otherwise."""
        whole_window = teacher.front_end_frames == "window"  # ValueError without a conv front end
        if not self.front_end_frozen:
            raise ValueError(
                "data.cached_front_end: the student skips its convolutional front end, so the "
                "front end must not train; set student.freeze_front_end true"
            )
        for name in self.family.conv_front_end:
            mine = operator.attrgetter(name)(self.model).state_dict()
            theirs = operator.attrgetter(name)(teacher.model).state_dict()
            differing = sorted(
                key for key in mine.keys() | theirs.keys()
                if key not in mine or key not in theirs or mine[key].shape != theirs[key].shape
                or not torch.equal(mine[key].to(theirs[key]), theirs[key])
            )
            if differing:
                raise ValueError(
                    f"data.cached_front_end: the student's front end is not the teacher's "
                    f"({name}: {differing[:4]} differ), so the cached teacher front end is not "
                    "what it would compute; build the student from this teacher at the teacher's "
                    "width (student.hidden_size null: the front end is copied) or set "
                    "data.cached_front_end false"
                )
        if whole_window and max_seconds < teacher.front_end.max_seconds:
            window = teacher.front_end.max_seconds
            raise ValueError(
                f"data.cached_front_end: data.max_seconds {max_seconds:g} is shorter than the "
                f"Whisper window ({window:g} s), so longer utterances would be cropped, and the "
                f"cache holds the front end of each whole window (a crop changes its log-mel); "
                f"set data.max_seconds to {window:g}"
            )

    def forward(
        self,
        wave: Tensor,
        wave_lengths: Tensor,
        mask_time: Tensor | None = None,
        front_end_features: Tensor | None = None,
    ) -> StudentOutput:
        """wave (B, S) 16 kHz, wave_lengths (B,), mask_time (B, T) bool or None -> K x (B, T, D_s).

        Frames where ``mask_time`` is True are replaced by the learned ``masked_spec_embed``
        after the feature projection (HF's ``mask_time_indices``). ``None`` masks nothing, also
        in training mode (HF would otherwise draw its own SpecAugment masks).

        Whisper: masked frames of the conv front end's output (after conv2's GELU) are replaced
        by ``mask_embed`` *before* the sinusoidal positions are added, so a masked frame still
        carries its position; see :meth:`_whisper_layers`.

        ``front_end_features``: the teacher's front-end output on this (unmasked) audio, from
        the cache (``Batch.front_end_features``): (B, T, C), or for Whisper (B, W, D) over the
        whole window. The convolutional front end is then skipped (the wave only gives the
        lengths); only allowed when it is frozen (``student.freeze_front_end``).
        """
        num_frames = int(self.front_end.num_frames(torch.tensor(wave.shape[1])))
        mask_time = self._check_mask(mask_time, wave, num_frames)
        if front_end_features is not None:
            return self._forward_from_front_end(front_end_features, wave_lengths, mask_time)
        inputs, frame_lengths = self.front_end(wave, wave_lengths)
        if not self.family.hf_time_masking:
            conv_output = self._whisper_conv(inputs["input_features"].to(self.mask_embed.dtype))
            return self._whisper_forward(conv_output, frame_lengths, mask_time)
        dtype = self.model.masked_spec_embed.dtype
        if not self.family.conv_front_end:  # w2v-BERT: the fbank frames are the features
            return self._hf_forward(inputs["input_features"].to(dtype), frame_lengths, mask_time,
                                    inputs["attention_mask"])
        # HF's Wav2Vec2Model.forward up to `extract_features` (B, T, C)
        features = self.model.feature_extractor(inputs["input_values"].to(dtype)).transpose(1, 2)
        return self._hf_forward(features, frame_lengths, mask_time,
                                self._frame_attention_mask(frame_lengths, num_frames))

    def _forward_from_front_end(
        self, features: Tensor, wave_lengths: Tensor, mask_time: Tensor
    ) -> StudentOutput:
        """``forward`` from the front end's output: features (B, T, C) (Whisper (B, W, D)),
        mask_time (B, T) bool -> K x (B, T, D_s)."""
        if not self.front_end_frozen:
            raise ValueError(
                "front_end_features given to a student whose convolutional front end trains: "
                "set student.freeze_front_end true (data.cached_front_end needs it)"
            )
        batch, num_frames = mask_time.shape
        frame_lengths = self.front_end.num_frames(wave_lengths)
        if not self.family.hf_time_masking:
            expected = (batch, self.front_end.num_encoder_frames, self.hidden_size)
        else:
            expected = (batch, num_frames, self.model.config.conv_dim[-1])
        if tuple(features.shape) != expected:
            raise ValueError(
                f"front_end_features has shape {tuple(features.shape)}, expected {expected} "
                "(the cached front end of this batch's audio)"
            )
        if not self.family.hf_time_masking:
            features = features.to(self.mask_embed.dtype)
            return self._whisper_forward(features, frame_lengths, mask_time)
        return self._hf_forward(features.to(self.model.masked_spec_embed.dtype), frame_lengths,
                                mask_time, self._frame_attention_mask(frame_lengths, num_frames))

    def _frame_attention_mask(self, frame_lengths: Tensor, num_frames: int) -> Tensor | None:
        """HF's `_get_feature_vector_attention_mask`: bool (B, T), True at frames t <
        frame_lengths (the conv length formula on the valid samples), only when the extractor
        gives a sample mask (layer-norm conv models); else None."""
        if not self.front_end.feature_extractor.return_attention_mask:
            return None
        return frame_mask(frame_lengths, num_frames)

    def _hf_forward(self, features: Tensor, frame_lengths: Tensor, mask_time: Tensor,
                    attention_mask: Tensor | None) -> StudentOutput:
        """HF's Wav2Vec2Model.forward (HuBERT's, data2vec-audio's and w2v-BERT's alike) from
        its `extract_features`: features (B, T, C) (conv output, transposed; w2v-BERT the
        fbank frames), mask_time (B, T) bool, attention_mask (B, T) or None -> K x (B, T, D_s).

        Feature projection, then the mask embedding at masked frames, then the encoder. The
        mask is applied with ``torch.where``, not HF's boolean-mask assignment, which reads the
        mask back to the host (a GPU sync each step). Submodules are called, so ZeRO-3's gather
        hooks fire; ``masked_spec_embed`` is read directly (one vector: below ZeRO-3's
        persistence threshold, never partitioned)."""
        model = self.model
        projected = model.feature_projection(features)
        hidden = projected[0] if isinstance(projected, tuple) else projected  # HuBERT: no tuple
        hidden = torch.where(mask_time.unsqueeze(-1), model.masked_spec_embed.to(hidden.dtype),
                             hidden)                                          # (B, T, D_s)
        with record_outputs(list(self.family.layers(model))) as hidden_states:
            model.encoder(hidden, attention_mask=attention_mask)
        return self._output(hidden_states, frame_lengths, mask_time.shape[1])

    @staticmethod
    def _output(hidden: list[Tensor], frame_lengths: Tensor, num_frames: int) -> StudentOutput:
        """K x (B, >= T, D_s) layer outputs -> their first T frames, zero at padded frames."""
        valid = frame_mask(frame_lengths, num_frames).unsqueeze(-1).to(hidden[0].dtype)  # (B, T, 1)
        return StudentOutput([h[:, :num_frames] * valid for h in hidden], frame_lengths)

    def _check_mask(self, mask_time: Tensor | None, wave: Tensor, num_frames: int) -> Tensor:
        """mask_time (B, T) or None (nothing masked) -> (B, T) bool; ValueError on a bad shape."""
        if mask_time is None:
            return torch.zeros(wave.shape[0], num_frames, dtype=torch.bool, device=wave.device)
        if mask_time.shape != (wave.shape[0], num_frames):
            raise ValueError(
                f"mask_time has shape {tuple(mask_time.shape)}, expected (B, T) = "
                f"{(wave.shape[0], num_frames)} (T from Student.num_frames)"
            )
        return mask_time.bool()

    def _whisper_forward(
        self, conv_output: Tensor, frame_lengths: Tensor, mask_time: Tensor
    ) -> StudentOutput:
        """conv_output (B, W, D) after conv2's GELU, mask_time (B, T) -> K x (B, T, D)."""
        # The encoder always runs on its whole window (as when the export is a teacher).
        num_frames = mask_time.shape[1]
        window = self.front_end.num_encoder_frames
        mask_window = nn.functional.pad(mask_time, (0, window - num_frames))  # (B, W)
        hidden = self._whisper_layers(conv_output, mask_window)
        return self._output(hidden, frame_lengths, num_frames)

    def _whisper_conv(self, features: Tensor) -> Tensor:
        """Whisper's conv front end: log-mel (B, n_mels, 2 W) -> (B, W, D) after conv2's GELU."""
        x = nn.functional.gelu(self.model.conv1(features))
        return nn.functional.gelu(self.model.conv2(x)).permute(0, 2, 1)

    def _whisper_layers(self, x: Tensor, mask: Tensor) -> list[Tensor]:
        """``WhisperEncoder.forward`` from the conv front end's output, run piece by piece
        with the mask embedding inserted: x (B, W, D) (:meth:`_whisper_conv`, or its cached
        copy), mask (B, W) bool -> the K layer outputs (B, W, D), W the window's frames (1500
        for 30 s).

        Same operations as HF's forward (checked by the tests against ``output_hidden_states``
        with no mask), minus the final LayerNorm (no layer output needs it) and layerdrop (the
        student has none). Submodules are called, never their weights read directly, so
        DeepSpeed ZeRO-3's gather hooks fire.
        """
        encoder = self.model
        x = torch.where(mask.unsqueeze(-1), self.mask_embed.to(x.dtype), x)
        positions = torch.arange(encoder.embed_positions.num_embeddings, device=x.device)
        x = x + encoder.embed_positions(positions)
        x = nn.functional.dropout(x, p=encoder.dropout, training=encoder.training)
        hidden = []
        for layer in self.family.layers(encoder):
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x  # transformers 4.x: tuple
            hidden.append(x)
        return hidden


def _student_config(teacher: Teacher, sizes: dict[str, int]) -> PretrainedConfig:
    family = teacher.family
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    setattr(config, family.layers_field, sizes["num_layers"])
    setattr(config, family.width_field, sizes["hidden_size"])
    setattr(config, family.heads_field, sizes["num_attention_heads"])
    setattr(config, family.ffn_field, sizes["intermediate_size"])
    if not family.hf_time_masking:  # Whisper: the Student masks; HF's SpecAugment stays off
        config.encoder_layerdrop = 0.0
        config.apply_spec_augment = False
        return config
    config.layerdrop = 0.0
    config.apply_spec_augment = True
    config.mask_feature_prob = 0.0
    if not config.mask_time_prob > 0:
        config.mask_time_prob = _FALLBACK_MASK_TIME_PROB
    # Fine-tuning leftovers sized by the teacher (where the family has them): no adapter.
    for name, value in (
        ("add_adapter", False),
        ("use_intermediate_ffn_before_adapter", False),
        ("output_hidden_size", sizes["hidden_size"]),
    ):
        if hasattr(config, name):
            setattr(config, name, value)
    return config


def _resolve_sizes(
    teacher: Teacher,
    num_layers: int,
    hidden_size: int | None,
    num_attention_heads: int | None,
    intermediate_size: int | None,
    init: list[int] | None,
) -> dict[str, int]:
    """Student sizes with defaults (teacher's head size and FFN ratio), validated."""
    t = layer_config(teacher.family, teacher.config)
    width = hidden_size or t["hidden_size"]
    if num_layers < 1:
        raise ValueError(f"student.num_layers: must be >= 1, got {num_layers}")
    if width > t["hidden_size"]:
        raise ValueError(
            f"student.hidden_size {width} is wider than the teacher ({t['hidden_size']}): "
            f"a student must not be wider than its teacher"
        )
    if init is not None:
        if width != t["hidden_size"]:
            raise ValueError(
                f"student.init_from_teacher_layers copies teacher layers, which needs "
                f"student.hidden_size == teacher width {t['hidden_size']} (got {width}); set "
                f"student.hidden_size to {t['hidden_size']} or drop "
                f"student.init_from_teacher_layers"
            )
        if len(init) != num_layers:
            raise ValueError(
                f"student.init_from_teacher_layers: needs one teacher layer per student layer "
                f"({num_layers}), got {init}"
            )
        for layer in init:
            if not 1 <= layer <= t["num_layers"]:
                raise ValueError(
                    f"student.init_from_teacher_layers: teacher layer {layer} is out of range "
                    f"1..{t['num_layers']}"
                )
    head_size = t["hidden_size"] // t["num_attention_heads"]
    heads = num_attention_heads or max(1, width // head_size)
    if width % heads:
        raise ValueError(
            f"student.num_attention_heads {heads} does not divide student.hidden_size {width}"
        )
    groups = getattr(teacher.config, "num_conv_pos_embedding_groups", 1)
    if width % groups:
        raise ValueError(
            f"student.hidden_size {width} must be a multiple of the teacher's "
            f"num_conv_pos_embedding_groups ({groups}) to keep its positional conv"
        )
    ffn = intermediate_size or width * t["intermediate_size"] // t["hidden_size"]
    return {
        "num_layers": num_layers,
        "hidden_size": width,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
    }


def _teacher_state_fp32(teacher: Teacher) -> dict[str, Tensor]:
    """The teacher's weights in fp32: from memory, or re-read from disk when the teacher runs
    in fp16/bf16 (so the student's init is not rounded)."""
    if teacher.dtype == torch.float32:
        return teacher.model.state_dict()
    config = AutoConfig.from_pretrained(teacher.path, trust_remote_code=False)
    fp32 = teacher.family.load(teacher.path, config).float()
    if teacher.family.model_type == "whisper":  # the teacher's window, maybe shortened
        set_whisper_window(fp32, teacher.front_end.max_seconds)
    return fp32.state_dict()


def _copy_from_teacher(student: PreTrainedModel, teacher: Teacher, init: list[int] | None) -> None:
    """Copy the front end and teacher layer ``init[k]`` -> student layer k + 1, where shapes
    match."""
    layers = teacher.family.layers(student)
    prefix = next(name for name, module in student.named_modules() if module is layers) + "."
    source = _teacher_state_fp32(teacher)
    copied, random = 0, []
    with torch.no_grad():
        for key, value in student.state_dict().items():
            src = key
            if key.startswith(prefix):
                index, rest = key[len(prefix) :].split(".", 1)
                src = f"{prefix}{init[int(index)] - 1}.{rest}" if init else None
            if src in source and source[src].shape == value.shape:
                value.copy_(source[src])
                copied += 1
            elif not key.startswith(prefix):
                random.append(key)
    logger.info(
        "student init: %d tensors copied from the teacher; layers from teacher layers %s; "
        "front-end tensors left random (shape mismatch): %s",
        copied,
        init or "none (random)",
        random,
    )


def build_student(
    teacher: Teacher,
    num_layers: int,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    init_from_teacher_layers: list[int] | None = None,
) -> Student:
    """A ``num_layers``-layer student of ``teacher``'s architecture, in fp32.

    Unset sizes keep the teacher's width, its head size (so heads = width / head size) and its
    FFN/width ratio. ``init_from_teacher_layers[k]`` (1-based) initialises student layer k + 1;
    it needs the teacher's width. Random parts use torch's global RNG (seed it first).
    """
    init = init_from_teacher_layers
    sizes = _resolve_sizes(
        teacher, num_layers, hidden_size, num_attention_heads, intermediate_size, init
    )
    model = teacher.family.model_class(_student_config(teacher, sizes)).float()
    model.to(next(teacher.model.parameters()).device)
    _copy_from_teacher(model, teacher, init)
    return Student(model.train(), teacher.family, teacher.path)
