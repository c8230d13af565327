"""The one training recipe: DeepSpeed runs it on 1 CPU or 512 GPUs alike.

Per micro-batch (``train_step``): teacher targets on the unmasked audio (no grad), a span mask
on the student's frames, the masked student forward, the objective, ``engine.backward``,
``engine.step`` (DeepSpeed steps the optimiser at accumulation boundaries).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from colld_ds.checkpoint import load_checkpoint, resume_candidates, save_checkpoint
from colld_ds.config import ConfigError, TrainConfig, save_config
from colld_ds.data import AudioBatchStream, Batch
from colld_ds.ds_config import build_ds_config
from colld_ds.layer_map import LayerPair, resolve_layer_map
from colld_ds.models import Student, Teacher, build_student, compute_span_mask, load_teacher
from colld_ds.models import read_num_layers
from colld_ds.monitor import MetricsMonitor
from colld_ds.objectives import ObjectiveOutput, PairwiseObjective, build_objective

SAMPLE_RATE = 16000
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DistillationModel(nn.Module):
    """What DeepSpeed trains: the student and the objective's projection heads."""

    def __init__(self, student: Student, objective: PairwiseObjective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, wave: torch.Tensor, wave_lengths: torch.Tensor, mask_time: torch.Tensor,
                teacher_features: dict[int, torch.Tensor], frame_mask: torch.Tensor
                ) -> ObjectiveOutput:
        """wave (B, S), wave_lengths (B,), mask_time and frame_mask (B, T) bool,
        teacher_features: teacher layer -> (B, T, D_t)."""
        hidden = self.student(wave, wave_lengths, mask_time).hidden      # K x (B, T, D_s)
        return self.objective(hidden, teacher_features, frame_mask, mask_time)


def frames_mask(frame_lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B,) valid frame counts -> (B, T) bool, True at valid frames."""
    return torch.arange(num_frames, device=frame_lengths.device) < frame_lengths.unsqueeze(1)


def step_seed(config: TrainConfig, rank: int, micro_step: int) -> int:
    """Masking, negatives and dropout are seeded from (seed, rank, micro-step): a resumed run
    draws exactly what an uninterrupted one would, with no RNG state to save."""
    return (config.run.seed * 1_000_003 + rank * 7_919 + micro_step * 104_729) % (2**63)


def distillation_loss(model, teacher: Teacher | None, batch: Batch, config: TrainConfig,
                      teacher_layers: list[int]) -> ObjectiveOutput:
    """Forward of one micro-batch. ``model``: the DeepSpeed engine or the DistillationModel.

    Teacher targets come from the batch in cached mode, else from the teacher run on the
    unmasked audio without grad."""
    if batch.teacher_features is not None:           # cached mode: fp16 frames from the shards
        features, frame_lengths = batch.teacher_features, batch.frame_lengths
    else:
        with torch.no_grad():
            targets = teacher(batch.wave, batch.wave_lengths)
        features, frame_lengths = targets.features, targets.frame_lengths
    teacher_features = {layer: f.float() for layer, f in zip(teacher_layers, features)}
    num_frames = features[0].shape[1]                                     # layer -> (B, T, D_t)
    frame_mask = frames_mask(frame_lengths, num_frames)                   # (B, T)
    mask_time = compute_span_mask(frame_lengths.cpu(), num_frames, config.masking.mask_prob,
                                  config.masking.span_length, min_masks=config.masking.min_masks)
    wave = batch.wave.to(_DTYPES[config.run.precision])
    return model(wave, batch.wave_lengths, mask_time.to(frame_mask.device), teacher_features,
                 frame_mask)


def train_step(engine, teacher: Teacher | None, batch: Batch, config: TrainConfig,
               teacher_layers: list[int], seed: int) -> ObjectiveOutput:
    torch.manual_seed(seed)
    output = distillation_loss(engine, teacher, batch, config, teacher_layers)
    engine.backward(output.loss)
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
                           dtype=_teacher_dtype(config, device), device=device)
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

    teacher, pairs, model = build_run(config, device)
    teacher_layers = list(teacher.layers)            # the order of the targets' features
    cached = bool(config.data.teacher_cache)
    stream = AudioBatchStream(config.data.teacher_cache or config.data.train_shards,
                              batch_size=config.data.batch_size,
                              max_seconds=config.data.max_seconds, seed=config.run.seed,
                              rank=rank, world_size=world_size,
                              num_workers=config.data.num_workers,
                              shuffle_buffer=config.data.shuffle_buffer,
                              expect_teacher=teacher.identity if cached else None)
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
        budget = config.data.batch_size * accumulation * world_size * config.data.max_seconds
        print(f"[colld] {world_size} rank(s) on {device.type}; pairs "
              f"{[p.name for p in pairs]}; at most {budget:.0f} s of audio per optimiser step; "
              f"{'resuming from ' + str(resume_from) if resume_from else 'starting'} at step "
              f"{step}", flush=True)

    monitor = MetricsMonitor(out_dir, rank, world_size, SAMPLE_RATE)
    progress = tqdm(total=config.optim.max_steps, initial=step, disable=rank != 0,
                    desc="distil", dynamic_ncols=True)
    batches = iter(stream)
    row: dict[str, float] = {}
    checkpoint = resume_from
    last_step = config.run.stop_at_step or config.optim.max_steps
    try:
        while step < last_step:
            for micro in range(accumulation):
                batch = next(batches).to(device)
                output = train_step(engine, teacher, batch, config, teacher_layers,
                                    step_seed(config, rank, step * accumulation + micro))
                monitor.add(output.metrics, batch.wave_lengths)
            step += 1
            progress.update(1)
            if step % config.run.log_every == 0 or step == last_step:
                row = monitor.log(step, engine.get_lr()[0], engine.get_global_grad_norm())
                progress.set_postfix(loss=f"{row['loss/total']:.4f}")
            if step % config.run.save_every == 0 or step == last_step:
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
        progress.close()
        monitor.close()
    if rank == 0:
        print(f"[colld] done at step {step}: checkpoint {checkpoint}, TensorBoard logs "
              f"{out_dir / 'tb'}, metrics {out_dir / 'metrics.jsonl'}", flush=True)
    return TrainResult(step=step, last_metrics=row, checkpoint=checkpoint)
