"""DeepSpeed JSON from a template in ``ds_configs/`` and the training config.

The template holds what is DeepSpeed's alone (bucket sizes, offload, overlap); every value the
training config also owns is ``"auto"`` in the template and filled in here, so the two can never
disagree. A template with a concrete value in one of those places is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from colld_ds.config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def template_path(config: TrainConfig) -> Path:
    if config.run.ds_config is not None:
        path = Path(config.run.ds_config)
    else:
        offload = "_offload" if config.run.offload_optimizer else ""
        path = DS_CONFIG_DIR / f"zero{config.run.zero_stage}{offload}.json"
    if not path.is_file():
        raise ConfigError(f"run.ds_config: DeepSpeed template {path} does not exist")
    return path


def _scheduler(config: TrainConfig) -> dict[str, Any]:
    optim = config.optim
    if optim.decay == "linear":
        return {"type": "WarmupDecayLR",
                "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr,
                           "warmup_num_steps": optim.warmup_steps,
                           "total_num_steps": optim.max_steps, "warmup_type": "linear"}}
    return {"type": "WarmupCosineLR",
            "params": {"warmup_min_ratio": 0.0, "cos_min_ratio": 0.0,
                       "warmup_num_steps": optim.warmup_steps,
                       "total_num_steps": optim.max_steps}}


def owned_values(config: TrainConfig) -> dict[str, Any]:
    """Dotted DeepSpeed keys -> the value the training config gives them."""
    optim, run, data = config.optim, config.run, config.data
    return {
        # dynamic batching (data.batch_seconds): B varies and DeepSpeed only uses this for its
        # throughput timer and its own data loader (unused): a batch of full-length crops
        "train_micro_batch_size_per_gpu": data.batch_size if data.batch_seconds is None
        else max(1, int(data.batch_seconds // data.max_seconds)),
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "gradient_clipping": optim.grad_clip,
        "optimizer.params.lr": optim.lr,
        "optimizer.params.betas": list(optim.betas),
        "optimizer.params.weight_decay": optim.weight_decay,
        "scheduler": _scheduler(config),
        "fp16": {"enabled": run.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        "bf16": {"enabled": run.precision == "bf16"},
        "zero_optimization.stage": run.zero_stage,
    }


def build_ds_config(config: TrainConfig) -> dict[str, Any]:
    path = template_path(config)
    try:
        ds_config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"run.ds_config: {path} is not valid JSON: {error}") from error
    for dotted, value in owned_values(config).items():
        *parents, leaf = dotted.split(".")
        node = ds_config
        for part in parents:
            node = node.setdefault(part, {})
        if node.get(leaf, "auto") != "auto":
            raise ConfigError(
                f"{path}: '{dotted}' is {node[leaf]!r}; the training config owns it. Set it to "
                f'"auto" in the template and choose the value in the training config')
        node[leaf] = value
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer")
    if offload and config.run.zero_stage < 2:
        raise ConfigError(f"{path}: offload_optimizer needs run.zero_stage 2 or 3")
    return ds_config

