"""``colld`` command line (fire): ``colld train``, ``colld demo``, ``colld prep ...``.

Any config field can be overridden with a dotted flag: ``--objective.temperature 0.05``.
"""

from __future__ import annotations

import fire

from colld_ds.config import load_config


def train(config: str | None = None, **overrides):
    """Distil a student. ``config``: YAML file (see configs/); overrides: ``--section.field v``.

    Run it through ``./launch.sh`` (DeepSpeed launcher) for several ranks or nodes; run directly
    it trains on one process.
    """
    from colld_ds.train import train as run_training
    run_training(load_config(config, overrides))


def demo(out_dir: str = "demo_out", num_utterances: int = 64, max_steps: int = 30,
         ranks: int = 2, **overrides):
    """The embedded default: a tiny teacher distilled with CoLLD on generated audio, end to end,
    on ``ranks`` CPU processes through launch.sh. Each stage is skipped when its output exists."""
    from colld_ds.demo import run_demo
    run_demo(out_dir, num_utterances=num_utterances, max_steps=max_steps, ranks=ranks,
             overrides=overrides)


def main() -> None:
    from data_prep.cli import DataPrep
    fire.Fire({"train": train, "demo": demo, "prep": DataPrep})


if __name__ == "__main__":
    main()
