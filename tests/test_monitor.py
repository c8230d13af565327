"""Training metrics after a resume: metrics.jsonl and the TensorBoard events hold each step once."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from colld_ds.monitor import MetricsMonitor


def log_steps(out_dir: Path, steps: range, start_step: int, offset: float) -> None:
    """A rank-0 monitor (no process group) logging `loss/total` = step + offset at `steps`."""
    monitor = MetricsMonitor(out_dir, rank=0, world_size=1, start_step=start_step)
    for step in steps:
        monitor.add({"loss/total": torch.tensor(step + offset)}, torch.tensor(10.0),
                    torch.tensor([16000]))
        monitor.log(step, lr=1e-3, grad_norm=1.0)
    monitor.close()


def test_resumed_run_logs_each_step_once_to_tensorboard_and_jsonl(tmp_path):
    log_steps(tmp_path, range(1, 7), start_step=0, offset=0.0)      # crashed after step 6
    log_steps(tmp_path, range(5, 9), start_step=4, offset=0.5)      # resumed from step 4
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("loss/total")
    assert [s.step for s in scalars] == list(range(1, 9))
    assert [s.value for s in scalars] == [1, 2, 3, 4, 5.5, 6.5, 7.5, 8.5]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
