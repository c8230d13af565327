"""The one training recipe: DeepSpeed runs it on 1 CPU or 512 GPUs alike.

Per optimiser step: the span masks of all its micro-batches, and the frames the objective scores
there (with CoLLD's negatives), are drawn first on the CPU (``mask_batch``), so the number of
frames scored over the whole step, all micro-batches and ranks, is known before any backward (one
all-reduce of a scalar) and the forward never waits on the device to learn it. Then per micro-batch (``train_step``):
teacher targets on the unmasked audio (no grad), the masked student forward, the objective,
``engine.backward`` of the micro-batch's loss *sum* scaled so that the accumulated, rank-averaged
gradient is that of the mean over all scored frames of the step, ``engine.step`` (DeepSpeed
steps the optimiser at accumulation boundaries). Hence (micro-batch 8 x accumulation 1) and
(2 x 4) give the same loss and gradients, and so do ranks with different frame counts.

Randomness: an utterance's span mask and negatives are drawn from its own seed, a hash of
(run seed, optimiser step, utterance key) (``utterance_seeds``): they do not depend on the
batch split, the rank or the padding, and a resumed run draws exactly what an uninterrupted one
would. Dropout is seeded per (seed, rank, micro-step) (``step_seed``).

Stopping: SIGTERM / SIGUSR1 on any rank ends the run after the current step with a checkpoint
of it (``StopRequest``); the ranks learn of it from the all-reduce every step makes anyway.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from colld_ds.checkpoint import load_checkpoint, resume_candidates, save_checkpoint
from colld_ds.config import ConfigError, TrainConfig, check_num_negatives, save_config
from colld_ds.data import AudioBatchStream, Batch, DamageReport, check_shards
from colld_ds.ds_config import build_ds_config
from colld_ds.errors import DataError
from colld_ds.layer_map import LayerPair, resolve_layer_map
from colld_ds.models import Student, Teacher, build_student, load_teacher, read_num_layers
from colld_ds.models import frame_mask, utterance_span_masks
from colld_ds.monitor import MetricsMonitor
from colld_ds.objectives import ObjectiveOutput, PairwiseObjective, build_objective
from colld_ds.objectives.base import FrameSelection

SAMPLE_RATE = 16000
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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

    def to(self, device: torch.device | str) -> MaskedBatch:
        """The batch, mask and selection on ``device`` (lengths and seeds stay on the CPU)."""
        return MaskedBatch(self.batch.to(device), self.frame_lengths, self.num_frames,
                           self.mask_time.to(device), self.seeds, self.selection.to(device),
                           self.train_student)


def mask_batch(batch: Batch, teacher: Teacher | None, config: TrainConfig, step: int,
               objective: PairwiseObjective) -> MaskedBatch:
    """Draw the span mask of a (CPU) batch for optimiser ``step``, and the frames ``objective``
    scores. The frame layout comes from the cache (cached mode) or from the teacher's front-end
    formula, without running it."""
    if batch.teacher_features is not None:
        frame_lengths = batch.frame_lengths.cpu()
        num_frames = batch.teacher_features[0].shape[1]
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
    wave = batch.wave.to(_DTYPES[config.run.precision])
    return model(wave, batch.wave_lengths, masked.mask_time.to(device), teacher_features,
                 masked.selection.to(device), batch.front_end_features, masked.train_student)


def step_loss_scale(micro_batches: list[MaskedBatch], world_size: int, device: torch.device,
                    stop_requested: bool = False, data_failed: bool = False
                    ) -> tuple[float, bool, bool]:
    """(accumulation x world size) / frames scored by the whole step on all ranks, whether any
    rank was asked to stop (``StopRequest``) and whether any rank's data failed (a damaged
    shard under ``data.on_bad_shard: stop``); one all-reduce carries all three (collective).

    DeepSpeed divides each backward by the accumulation steps and averages gradients over
    ranks; backward of ``loss * count * scale`` then yields the gradient of the mean over every
    scored frame of the step."""
    count = sum(m.selection.count for m in micro_batches)
    totals = torch.tensor([float(count), float(stop_requested), float(data_failed)], device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    total, stops, failures = totals.tolist()
    return len(micro_batches) * world_size / max(total, 1.0), stops > 0, failures > 0


class StopRequest:
    """SIGTERM or SIGUSR1 (a scheduler preempting the job, or SLURM's ``--signal=USR1@90``
    time-limit warning) asks the run to stop: it finishes the optimiser step, all ranks agree
    (``step_loss_scale``), save a checkpoint of that step and exit with 128 + the signal. The
    previous handlers come back on ``restore``."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():   # signal.signal's rule
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train_step(engine, teacher: Teacher | None, masked: MaskedBatch, config: TrainConfig,
               teacher_layers: list[int], seed: int, loss_scale: float) -> ObjectiveOutput:
    torch.manual_seed(seed)
    output = distillation_loss(engine, teacher, masked, config, teacher_layers)
    engine.backward(output.loss * output.count * loss_scale)
    engine.step()
    output.metrics["loss/total"] = output.loss.detach()
    return output


@dataclass
class TrainResult:
    step: int
    last_metrics: dict[str, float]
    checkpoint: Path | None


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _single_process_defaults() -> None:
    """Run without a launcher (``colld train`` directly): one rank on this machine."""
    if "RANK" not in os.environ:
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # DeepSpeed's CPU all-reduce maps a /dev/shm segment per rank and never unlinks it
        shm = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0")
        atexit.register(shm.unlink, missing_ok=True)


def _teacher_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.teacher.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.teacher.dtype]


def build_run(config: TrainConfig, device: torch.device
              ) -> tuple[Teacher, list[LayerPair], DistillationModel]:
    """Teacher, layer pairs and the trainable model, all validated before any long work."""
    if not (config.data.train_shards or config.data.teacher_cache):
        raise ConfigError("data.train_shards: set it to audio shards (or data.teacher_cache to "
                          "teacher-cache shards)")
    pairs = resolve_layer_map(config, read_num_layers(config.teacher.path))
    teacher_layers = sorted({pair.teacher_layer for pair in pairs})
    teacher = load_teacher(config.teacher.path, teacher_layers, config.teacher.target_kind,
                           dtype=_teacher_dtype(config, device), device=device,
                           window_seconds=config.teacher.window_seconds)
    crop = torch.tensor(round(config.data.max_seconds * SAMPLE_RATE))
    check_num_negatives(config, int(teacher.num_frames(crop)))
    torch.manual_seed(config.run.seed)          # identical initial weights on every rank
    init = config.student.init_from_teacher_layers
    width = config.student.hidden_size
    if init is None:
        same_width = width is None or width == teacher.hidden_size
        init = list(range(1, config.student.num_layers + 1)) if same_width else []
    student = build_student(teacher, config.student.num_layers, width,
                            config.student.num_attention_heads, config.student.intermediate_size,
                            init_from_teacher_layers=init or None)
    if config.student.freeze_front_end:
        student.freeze_front_end()
    if config.data.cached_front_end:
        student.check_cached_front_end(teacher, config.data.max_seconds)
    objective = build_objective(config.objective, pairs, student.hidden_size,
                                teacher.hidden_size, config.layer_map.weights)
    return teacher, pairs, DistillationModel(student, objective)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a distillation. Every rank calls it; rank 0 logs and reports."""
    _single_process_defaults()
    device = _device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out_dir = Path(config.run.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    candidates = resume_candidates(config.run.resume, checkpoint_dir)   # checked before long work

    if config.data.teacher_cache or config.data.train_shards:   # shard URLs before the teacher
        check_shards(config.data.teacher_cache or config.data.train_shards, config.data.shard_index or None)
    teacher, pairs, model = build_run(config, device)
    teacher_layers = list(teacher.layers)            # the order of the targets' features
    cached = bool(config.data.teacher_cache)
    dynamic = config.data.batch_seconds is not None
    stream = AudioBatchStream(config.data.teacher_cache or config.data.train_shards,
                              batch_size=None if dynamic else config.data.batch_size,
                              batch_seconds=config.data.batch_seconds,
                              bucket_buffer=config.data.bucket_buffer,
                              shard_index=config.data.shard_index or None,
                              max_seconds=config.data.max_seconds, seed=config.run.seed,
                              rank=rank, world_size=world_size,
                              num_workers=config.data.num_workers,
                              shuffle_buffer=config.data.shuffle_buffer,
                              on_bad_shard=config.data.on_bad_shard,
                              expect_teacher=(teacher.cache_identity(config.data.cached_front_end)
                                              if cached else None))
    if cached:
        teacher = None    # it built the student; the cache holds its targets, free its memory
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=build_ds_config(config))

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    step = 0
    resume_from = None
    loaded = load_checkpoint(engine, candidates)    # newest first, past unloadable ones
    if loaded is not None:
        resume_from, client_state = loaded
        step = client_state["step"]
        stream.load_state_dict(client_state["data"])
    accumulation = config.optim.gradient_accumulation_steps
    if rank == 0:
        budget = (config.data.batch_seconds if dynamic else  # padded audio per micro-batch
                  config.data.batch_size * config.data.max_seconds) * accumulation * world_size
        print(f"[colld] {world_size} rank(s) on {device.type}; pairs "
              f"{[p.name for p in pairs]}; at most {budget:.0f} s of audio per optimiser step; "
              f"{'resuming from ' + str(resume_from) if resume_from else 'starting'} at step "
              f"{step}", flush=True)

    monitor = MetricsMonitor(out_dir, rank, world_size, SAMPLE_RATE, start_step=step)
    progress = tqdm(total=config.optim.max_steps, initial=step, disable=rank != 0,
                    desc="distil", dynamic_ncols=True)
    damage = DamageReport(rank)
    batches = damage.watch(iter(stream))
    row: dict[str, float] = {}
    checkpoint = resume_from
    last_step = config.run.stop_at_step or config.optim.max_steps
    stop_request = StopRequest()
    stop = False
    try:
        while step < last_step and not stop:
            data_error = None
            try:
                micro_batches = [mask_batch(next(batches), teacher, config, step, model.objective)
                                 for _ in range(accumulation)]
            except DataError as error:       # all ranks learn of it below and stop together
                micro_batches, data_error = [], error
            loss_scale, stop, data_failed = step_loss_scale(
                micro_batches, world_size, device, stop_request.requested, data_error is not None)
            if data_failed:
                raise data_error or DataError(
                    f"rank {rank} stops with the rank whose data failed (its error is above)")
            for micro, masked in enumerate(micro_batches):
                output = train_step(engine, teacher, masked.to(device), config, teacher_layers,
                                    step_seed(config, rank, step * accumulation + micro),
                                    loss_scale)
                monitor.add(output.metrics, output.count, masked.batch.wave_lengths)
            step += 1
            progress.update(1)
            if step % config.run.log_every == 0 or step == last_step or stop:
                row = monitor.log(step, engine.get_lr()[0], engine.get_global_grad_norm())
                progress.set_postfix(loss=f"{row['loss/total']:.4f}")
            if step % config.run.save_every == 0 or step == last_step or stop:
                client_state = {"step": step, "data": stream.state_dict(),
                                "config": config.to_dict()}
                checkpoint = save_checkpoint(engine, checkpoint_dir, step, client_state,
                                             config.run.keep_checkpoints)
    except KeyboardInterrupt:
        if rank == 0:
            progress.close()
            print(f"\n[colld] interrupted at step {step}. Last complete checkpoint: "
                  f"{checkpoint or 'none'}. Resume with --run.resume auto.", file=sys.stderr)
        raise SystemExit(130)
    finally:
        stop_request.restore()
        progress.close()
        monitor.close()
    damage_summary = damage.summary()            # collective: every rank gets here
    if rank == 0 and damage_summary:
        print(damage_summary, file=sys.stderr, flush=True)
    if stop:
        signum = stop_request.signum or signal.SIGTERM    # the signal may have reached another rank
        if rank == 0:
            print(f"[colld] stopped on request ({signal.Signals(signum).name} on a rank) after "
                  f"step {step}: checkpoint {checkpoint}. Resume with --run.resume auto.",
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    if rank == 0:
        print(f"[colld] done at step {step}: checkpoint {checkpoint}, TensorBoard logs "
              f"{out_dir / 'tb'}, metrics {out_dir / 'metrics.jsonl'}", flush=True)
    return TrainResult(step=step, last_metrics=row, checkpoint=checkpoint)
