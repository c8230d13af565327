"""The one training loop (``colld train``): DeepSpeed runs it on 1 CPU or 512 GPUs alike.

Per optimiser step: the span masks of all its micro-batches, and the frames the objective scores
there, are drawn first on the CPU (``colld_ds.distill.mask_batch``), so the number of frames
scored by the whole step, all micro-batches and ranks, is known before any backward (one
all-reduce of a scalar). Then per micro-batch (``train_step``): the forward
(``distill.distillation_loss``), ``engine.backward`` of the micro-batch's loss *sum* scaled so
that the accumulated, rank-averaged gradient is that of the mean over all scored frames of the
step, ``engine.step``. Hence (micro-batch 8 x accumulation 1) and (2 x 4) give the same loss and
gradients, and so do ranks with different frame counts.

Stopping: SIGTERM / SIGUSR1 on any rank ends the run after the current step with a checkpoint
of it (``StopRequest``); the ranks learn of it from the all-reduce every step makes anyway.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from colld_ds.checkpoint import load_checkpoint, resume_candidates, save_checkpoint
from colld_ds.config import TrainConfig, save_config
from colld_ds.data import AudioBatchStream, DamageReport, check_shards
from colld_ds.distill import (MaskedBatch, build_run, crop_frames, distillation_loss, mask_batch,
                              position_mean, step_seed, teacher_targets)
from colld_ds.ds_config import build_ds_config
from colld_ds.ds_ops import prepare_op_builds
from colld_ds.errors import DataError
from colld_ds.formats import SAMPLE_RATE
from colld_ds.models import Teacher
from colld_ds.monitor import MetricsMonitor
from colld_ds.objectives import ObjectiveOutput


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
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # DeepSpeed's CPU all-reduce maps a /dev/shm segment per rank and never unlinks it
        shm = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0")
        atexit.register(shm.unlink, missing_ok=True)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a distillation. Every rank calls it; rank 0 logs and reports."""
    _single_process_defaults()
    device = _device()
    prepare_op_builds()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out_dir = Path(config.run.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    candidates = resume_candidates(config.run.resume, checkpoint_dir)   # checked before long work

    train_shards = config.data.teacher_cache or config.data.train_shards
    if train_shards:                                  # shard URLs checked before the teacher
        check_shards(train_shards, config.data.shard_index or None)
    teacher, pairs, model = build_run(config, device)
    teacher_layers = list(teacher.layers)            # the order of the targets' features
    cached = bool(config.data.teacher_cache)
    dynamic = config.data.batch_seconds is not None
    decode_on_device = cached and (config.data.decode_codes == "device" or (
        config.data.decode_codes == "auto" and device.type == "cuda"))
    def new_stream(decode_codes: bool = True) -> AudioBatchStream:
        return AudioBatchStream(
            config.data.teacher_cache or config.data.train_shards,
            batch_size=None if dynamic else config.data.batch_size,
            batch_seconds=config.data.batch_seconds, bucket_buffer=config.data.bucket_buffer,
            shard_index=config.data.shard_index or None, max_seconds=config.data.max_seconds,
            seed=config.run.seed, rank=rank, world_size=world_size,
            num_workers=config.data.num_workers, shuffle_buffer=config.data.shuffle_buffer,
            on_bad_shard=config.data.on_bad_shard, codebook_file=config.data.codebook_file or None,
            decode_codes=decode_codes,
            expect_teacher=({**teacher.cache_identity(config.data.cached_front_end),
                             "target_norm": config.objective.target_norm} if cached else None))

    stream = new_stream(decode_codes=not decode_on_device)
    decoder = stream.code_decoder(device) if decode_on_device else None  # pq, rq codes
    position_frames = crop_frames(config, teacher)  # the longest crop's teacher frames
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
    elif config.objective.target_norm == "utterance_position":
        # a fresh run estimates the mean; a resumed one loaded it with the module's buffers
        engine.module.objective.set_position_mean(position_mean(
            teacher_targets(new_stream(), teacher, device), position_frames,
            config.objective.position_stats_utterances, device))
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
                output = train_step(engine, teacher, masked.to(device, decoder), config,
                                    teacher_layers,
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
