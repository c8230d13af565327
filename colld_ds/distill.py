"""One distillation run as objects: the teacher, the layer pairs, the model DeepSpeed trains, and
the forward of one masked micro-batch. ``colld_ds.train`` loops over it; ``evaluate``,
``export`` and the benchmarks build the same run from a config.

Randomness: an utterance's span mask and negatives are drawn from its own seed, a hash of
(run seed, optimiser step, utterance key) (``utterance_seeds``): they do not depend on the batch
split, the rank or the padding, and a resumed run draws exactly what an uninterrupted one would.
Dropout is seeded per (seed, rank, micro-step) (``step_seed``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from colld_ds.codecs import CodeDecoder
from colld_ds.config import ConfigError, TrainConfig, check_num_negatives
from colld_ds.data import Batch
from colld_ds.formats import SAMPLE_RATE
from colld_ds.layer_map import LayerPair, resolve_layer_map
from colld_ds.models import Student, Teacher, build_student, load_teacher, read_num_layers
from colld_ds.models import frame_mask, utterance_span_masks
from colld_ds.objectives import ObjectiveOutput, PairwiseObjective, build_objective
from colld_ds.objectives.base import FrameSelection, utterance_norm

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DistillationModel(nn.Module):
    """What DeepSpeed trains: the student and the objective's projection heads."""

    def __init__(self, student: Student, objective: PairwiseObjective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, wave: torch.Tensor, wave_lengths: torch.Tensor, mask_time: torch.Tensor,
                teacher_features: dict[int, torch.Tensor], selection: FrameSelection,
                front_end_features: torch.Tensor | None = None,
                train_student: bool = True) -> ObjectiveOutput:
        """wave (B, S), wave_lengths (B,), mask_time (B, T) bool, teacher_features: teacher
        layer -> (B, T, D_t), selection: the frames the objective scores (on the device),
        front_end_features: cached teacher front end (``Batch.front_end_features``) or None;
        train_student False: the loss reaches the heads only (``optim.head_warmup_steps``)."""
        with torch.set_grad_enabled(train_student and torch.is_grad_enabled()):
            hidden = self.student(wave, wave_lengths, mask_time,
                                  front_end_features).hidden              # K x (B, T, D_s)
        return self.objective(hidden, teacher_features, selection)


# --- building a run --------------------------------------------------------------------------


def step0_init(config: TrainConfig, teacher: Teacher) -> list[int]:
    """The teacher layers copied into the student at step 0 ([]: random layers):
    ``student.init_from_teacher_layers``, else layers 1..K when the widths match."""
    init = config.student.init_from_teacher_layers
    if init is None:
        width = config.student.hidden_size
        same_width = width is None or width == teacher.hidden_size
        init = list(range(1, config.student.num_layers + 1)) if same_width else []
    return init


def _new_model(config: TrainConfig, teacher: Teacher, pairs: list[LayerPair],
               init: list[int] | None, random_front_end: bool) -> DistillationModel:
    torch.manual_seed(config.run.seed)          # identical initial weights on every rank
    student = build_student(teacher, config.student.num_layers, config.student.hidden_size,
                            config.student.num_attention_heads,
                            config.student.intermediate_size, init_from_teacher_layers=init)
    if random_front_end:
        torch.manual_seed(config.run.seed)
        hf_config = student.model.config.__class__.from_dict(student.model.config.to_dict())
        student = Student(teacher.family.model_class(hf_config).float(), teacher.family,
                          teacher.path)
    objective = build_objective(config.objective, pairs, student.hidden_size,
                                teacher.hidden_size, config.layer_map.weights,
                                position_frames=crop_frames(config, teacher))
    return DistillationModel(student, objective)


def crop_frames(config: TrainConfig, teacher: Teacher) -> int:
    """Teacher frames of the longest crop (``data.max_seconds``)."""
    crop = torch.tensor(round(config.data.max_seconds * SAMPLE_RATE))
    return int(teacher.num_frames(crop))


def fresh_model(config: TrainConfig, teacher: Teacher, pairs: list[LayerPair],
                init: list[int] | None, random_front_end: bool = False) -> DistillationModel:
    """The run's model as ``build_run`` makes it at step 0 (same seed), in eval mode, with the
    student's transformer layers copied from teacher layers ``init`` (None: random layers).
    ``random_front_end``: nothing at all copied from the teacher (the fully random floor)."""
    return _new_model(config, teacher, pairs, init, random_front_end).eval()


def _teacher_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.teacher.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[config.teacher.dtype]


def build_run(config: TrainConfig, device: torch.device
              ) -> tuple[Teacher, list[LayerPair], DistillationModel]:
    """Teacher, layer pairs and the trainable model at step 0 on ``device``, all validated
    before any long work (ConfigError or ValueError naming the field)."""
    if not (config.data.train_shards or config.data.teacher_cache):
        raise ConfigError("data.train_shards: set it to audio shards (or data.teacher_cache to "
                          "teacher-cache shards)")
    pairs = resolve_layer_map(config, read_num_layers(config.teacher.path))
    teacher_layers = sorted({pair.teacher_layer for pair in pairs})
    teacher = load_teacher(config.teacher.path, teacher_layers, config.teacher.target_kind,
                           dtype=_teacher_dtype(config, device), device=device,
                           window_seconds=config.teacher.window_seconds)
    check_num_negatives(config, crop_frames(config, teacher))
    model = _new_model(config, teacher, pairs, step0_init(config, teacher) or None,
                       random_front_end=False).to(device)   # the heads start on the CPU
    if config.student.freeze_front_end:
        model.student.freeze_front_end()
    model.student.freeze_layers(config.student.frozen_layers)
    if config.data.cached_front_end:
        model.student.check_cached_front_end(teacher, config.data.max_seconds)
    return teacher, pairs, model


def teacher_targets(batches: Iterable[Batch], teacher: Teacher | None, device: torch.device
                    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Each batch's teacher targets: (L of (B, T, D_t) features, (B,) CPU frame lengths), from
    the cache (cached mode) or ``teacher`` run on the audio without grad."""
    for batch in batches:
        if batch.teacher_features is not None:
            yield batch.teacher_features, batch.frame_lengths.cpu()
        else:
            with torch.no_grad():
                output = teacher(batch.wave.to(device), batch.wave_lengths.to(device))
            yield output.features, output.frame_lengths.cpu()


def position_mean(targets: Iterable[tuple[list[torch.Tensor], torch.Tensor]], num_frames: int,
                  num_utterances: int, device: torch.device) -> torch.Tensor:
    """(L, T, D_t) fp32, T = ``num_frames``: for each of the L target layers, the mean over
    utterances of the per-utterance standardised targets at each frame index (0 where no
    utterance reaches it), for ``objective.target_norm: utterance_position``.

    ``targets``: (L of (B, T', D_t) features, (B,) frame lengths) per batch
    (``teacher_targets``). Reads this rank's first ``num_utterances / world size`` utterances
    and sums over ranks (one all-reduce on ``device``), so every rank gets the same mean, and a
    run started again gets it again."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    wanted = -(-num_utterances // world_size)
    sums, counts, seen = None, torch.zeros(num_frames, dtype=torch.float64), 0
    for features, lengths in targets:
        take = min(len(lengths), wanted - seen)
        frames = min(features[0].shape[1], num_frames)
        valid = frame_mask(lengths[:take], features[0].shape[1])
        if sums is None:
            sums = torch.zeros(len(features), num_frames, features[0].shape[-1],
                               dtype=torch.float64)
        for index, layer_features in enumerate(features):
            standardised = utterance_norm(layer_features[:take].float().cpu(), valid)
            sums[index, :frames] += standardised[:, :frames].sum(0).double()
        counts[:frames] += valid[:, :frames].sum(0).double()
        seen += take
        if seen >= wanted:
            break
    if sums is None:
        raise ValueError("objective.target_norm utterance_position: no training utterance to "
                         "estimate the mean per frame index from")
    if dist.is_initialized():
        totals = torch.cat([sums.flatten(), counts]).to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
        sums, counts = totals[:sums.numel()].view_as(sums), totals[sums.numel():]
    return (sums / counts.clamp_min(1)[None, :, None]).float()


# --- one masked micro-batch ------------------------------------------------------------------


def step_seed(config: TrainConfig, rank: int, micro_step: int) -> int:
    """Dropout is seeded from (seed, rank, micro-step): a resumed run draws exactly what an
    uninterrupted one would, with no RNG state to save."""
    return (config.run.seed * 1_000_003 + rank * 7_919 + micro_step * 104_729) % (2**63)


def utterance_seeds(seed: int, step: int, keys: Sequence[str]) -> torch.Tensor:
    """(B,) int64 seeds of each utterance's span mask and negatives at optimiser ``step``: a
    hash of (run seed, step, key), independent of the batch, the rank and the padding."""
    return torch.tensor([
        int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest(),
                       "little") >> 1
        for key in keys], dtype=torch.int64)


@dataclass
class MaskedBatch:
    """A batch and what was drawn for it before the forward: the student's span mask and the
    frames the objective scores (with CoLLD's negatives). All drawn on the CPU, where the
    lengths are, and moved to the device once by ``to``: the step never waits on the device."""

    batch: Batch
    frame_lengths: torch.Tensor
    """(B,) valid frames of each utterance (teacher and student frames are the same)."""
    num_frames: int
    """T, frames of the padded batch."""
    mask_time: torch.Tensor
    """(B, T) bool, True where the student's input frame is masked."""
    seeds: torch.Tensor
    """(B,) int64, ``utterance_seeds`` (the mask used them; the objective's negatives too)."""
    selection: FrameSelection
    """The frames the objective scores (``PairwiseObjective.select_frames``)."""
    train_student: bool = True
    """False during ``optim.head_warmup_steps``: only the projection heads learn."""

    def to(self, device: torch.device | str, decoder: CodeDecoder | None = None) -> MaskedBatch:
        """The batch, mask and selection on ``device`` (lengths and seeds stay on the CPU),
        a batch of pq or rq codes (``Batch.teacher_codes``) decoded there by ``decoder``."""
        batch = self.batch.to(device)
        if batch.teacher_codes is not None:
            if decoder is None:
                raise ValueError("the batch holds pq or rq codes: pass the stream's "
                                 "code_decoder to decode them")
            batch = replace(batch, teacher_features=decoder(batch.teacher_codes,
                                                            self.frame_lengths),
                            teacher_codes=None)
        return MaskedBatch(batch, self.frame_lengths, self.num_frames,
                           self.mask_time.to(device), self.seeds, self.selection.to(device),
                           self.train_student)


def mask_batch(batch: Batch, teacher: Teacher | None, config: TrainConfig, step: int,
               objective: PairwiseObjective) -> MaskedBatch:
    """Draw the span mask of a (CPU) batch for optimiser ``step``, and the frames ``objective``
    scores. The frame layout comes from the cache (cached mode) or from the teacher's front-end
    formula, without running it."""
    if batch.frame_lengths is not None:              # cached mode
        frame_lengths = batch.frame_lengths.cpu()
        num_frames = batch.num_cached_frames
    else:
        frame_lengths = teacher.num_frames(batch.wave_lengths.cpu())
        num_frames = int(teacher.num_frames(torch.tensor(batch.wave.shape[1])))
    seeds = utterance_seeds(config.run.seed, step, batch.keys)
    mask_time = utterance_span_masks(frame_lengths, num_frames, config.masking.mask_prob,
                                     config.masking.span_length, seeds,
                                     min_masks=config.masking.min_masks)
    selection = objective.select_frames(frame_mask(frame_lengths, num_frames), mask_time, seeds)
    return MaskedBatch(batch, frame_lengths, num_frames, mask_time, seeds, selection,
                       train_student=step >= config.optim.head_warmup_steps)


def distillation_loss(model, teacher: Teacher | None, masked: MaskedBatch, config: TrainConfig,
                      teacher_layers: list[int]) -> ObjectiveOutput:
    """Forward of one micro-batch. ``model``: the DeepSpeed engine or the DistillationModel;
    ``masked`` on the CPU or already moved to the model's device (``MaskedBatch.to``).

    Teacher targets come from the batch in cached mode, else from the teacher run on the
    unmasked audio without grad."""
    batch = masked.batch
    if batch.teacher_features is not None:           # cached mode: fp16 frames from the shards
        features = batch.teacher_features
        if config.data.cached_front_end and batch.front_end_features is None:
            raise ValueError("data.cached_front_end: the batch holds no front-end features; "
                             "read the cache with teacher.cache_identity(front_end=True)")
    else:
        with torch.no_grad():
            features = teacher(batch.wave, batch.wave_lengths).features
    teacher_features = {layer: f.float() for layer, f in zip(teacher_layers, features)}
    device = features[0].device                                           # layer -> (B, T, D_t)
    wave = batch.wave.to(DTYPES[config.run.precision])
    return model(wave, batch.wave_lengths, masked.mask_time.to(device), teacher_features,
                 masked.selection.to(device), batch.front_end_features, masked.train_student)
