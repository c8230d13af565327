"""Training metrics: averaged over the frames each metric scores, across micro-batches and ranks
(weighted by ``ObjectiveOutput.count``), every ``log_every`` steps, written by rank 0 to
TensorBoard (``out_dir/tb``) and to ``out_dir/metrics.jsonl`` (one JSON object per logged step;
a resumed run first drops the rows, and TensorBoard the events, after its checkpoint's step, so
each step appears once).

Metrics accumulate on the device between logs, so the hot path has no host sync.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from colld_ds.atomic import write_text_atomic
from colld_ds.formats import SAMPLE_RATE


def keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite ``path`` (a metrics.jsonl) atomically with only its rows of steps <= ``step``:
    a run resumed from the checkpoint of ``step`` logs the later ones again. A row cut short
    by a killed run is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class MetricsMonitor:
    def __init__(self, out_dir: Path, rank: int, world_size: int, sample_rate: int = SAMPLE_RATE,
                 start_step: int = 0):
        """``start_step``: the step the run starts from (its checkpoint's, 0 when fresh); rank 0
        drops the metrics.jsonl rows and TensorBoard events after it."""
        self.rank = rank
        self.world_size = world_size
        self.sample_rate = sample_rate
        self.writer = None
        self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            # a resumed run logs from start_step + 1 again: TensorBoard drops the crashed
            # run's events from there on (purge_step), as keep_rows_up_to does for the jsonl
            self.writer = SummaryWriter(str(out_dir / "tb"),
                                        purge_step=start_step + 1 if start_step else None)
            keep_rows_up_to(out_dir / "metrics.jsonl", start_step)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: torch.Tensor | float = 0.0
        self.samples = 0
        self.audio_samples: torch.Tensor | int = 0
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], count: torch.Tensor,
            wave_lengths: torch.Tensor) -> None:
        """One micro-batch: 0-d metric tensors (means over its ``count`` scored frames) and its
        (B,) wave lengths."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float() * count
        self.count = self.count + count
        self.samples += wave_lengths.shape[0]
        self.audio_samples = self.audio_samples + wave_lengths.sum()

    def log(self, step: int, lr: float, grad_norm: float | None) -> dict[str, float]:
        """Collective: average metrics over the scored frames of all micro-batches and ranks;
        rank 0 writes them."""
        keys = sorted(self.sums)
        device = self.sums[keys[0]].device
        packed = torch.stack([self.sums[k] for k in keys]
                             + [torch.as_tensor(self.count, device=device).float(),
                                torch.as_tensor(self.audio_samples, device=device).float()])
        if dist.is_initialized():
            dist.all_reduce(packed)
        packed[:-2] /= packed[-2].clamp(min=1.0)
        values = packed[:-2].tolist() + packed[-1:].tolist()
        elapsed = time.perf_counter() - self.started
        row = {"step": step, **dict(zip(keys, values[:-1])), "lr": lr,
               "samples_per_s": self.samples * self.world_size / elapsed,
               "audio_seconds_per_s": values[-1] / self.sample_rate / elapsed}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        self._reset()
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
