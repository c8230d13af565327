"""Distillation quality protocol: probe PER/CER of students distilled by several variants, over
seeds and budgets, against the teacher (ceiling), a random student (floor) and the step-0 init.

    python benchmarks/quality.py --config configs/whisper-base_to_2l_colld.yaml \\
        --variants configs/quality/objectives.yaml --seeds 0,1,2 --budgets 100,300 \\
        --probe_train_shards 'corpus/train-*.tar' --probe_dev_shards 'corpus/dev-*.tar' \\
        --eval_shards 'corpus/test-*.tar' --out_dir runs/quality [--section.field value ...]

A variant is a name and dotted config overrides (``l2l: {objective.name: l2l}``), read from a
YAML file; every variant and seed is one ``colld train`` run (``compare.train_run``: resumable,
refused if started with other settings) of ``max(budgets)`` steps with a checkpoint at every
budget, so a learning curve is one run probed along its schedule. Each checkpoint, and the
reference rows (teacher, random and init, once: with the first seed's config), are probed with
``colld_ds.probe`` (its state chosen on the dev split every ``--probe_select_every`` steps), all
with the same probe seed (``--probe_seed``), so the spread over seeds is the distillation's; each
probe is the best early loss of ``--probe_restarts`` restarts (``ProbeConfig.restarts``: a CTC
probe can stall near the all-blank loss from its initial state alone; a probe's final training
loss is reported). Results are cached per row under ``out_dir/probe`` (a re-run only probes what is
new) and summarised in ``quality.json``, ``quality.md`` and ``quality.png``: mean and sample
standard deviation over seeds, gap closed = (random - student) / (random - teacher) of the
means, and issue 17's goal judged for each student row (``goal_verdicts``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from colld_ds.atomic import write_atomic, write_text_atomic
from colld_ds.checkpoint import checkpoint_tag
from colld_ds.compare import make_paths_absolute, train_run
from colld_ds.config import ConfigError, TrainConfig, load_config
from colld_ds.distill import build_run, fresh_model, step0_init
from colld_ds.evaluate import student_encoder, teacher_encoder, with_layers
from colld_ds.probe import (TASKS, ProbeConfig, ProbeSplits, ProbeTasks, extract_splits,
                            read_probe_split, score_model)
from colld_ds.trained import load_student

REFERENCE_ROWS = ("teacher", "random", "init")


@dataclass(kw_only=True)
class QualitySettings:
    config: str
    """Training config shared by every run."""
    variants: dict[str, dict[str, Any]]
    """Variant name -> dotted overrides of the config."""
    seeds: list[int]
    """Run seeds."""
    budgets: list[int]
    """Optimiser steps at which every run is probed (ascending; the last is the run length)."""
    eval_shards: str
    probe_train_shards: str
    probe_dev_shards: str | None = None
    """Held-out split that picks each probe's state (early stopping); None: the last state."""
    out_dir: str = "runs/quality"
    ranks: int | None = None
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher_layer_sets: list[list[int]] = field(default_factory=list)
    """More reference rows: the teacher probed on only these layers (``teacher[3,6]``), the
    ceiling of a student whose layers matched those teacher layers exactly."""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("--variants: the file names no variant")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: {self.seeds!r}; give distinct seeds, comma-separated")
        if not self.budgets or self.budgets != sorted(set(self.budgets)) or self.budgets[0] < 1:
            raise ConfigError(f"--budgets: {self.budgets!r}; give increasing step counts >= 1")
        for name in self.variants:
            if not name.replace("_", "").replace("-", "").isalnum() or name in REFERENCE_ROWS:
                raise ConfigError(f"variant {name!r}: use letters, digits, _ and -, and none of "
                                  f"{list(REFERENCE_ROWS)}")


MAX_STEPS_BETWEEN_SAVES = 500
"""A killed run resumes from a checkpoint at most this many steps back."""


def save_interval(budgets: list[int]) -> int:
    """Steps between a run's checkpoints: the largest divisor of every budget that is at most
    ``MAX_STEPS_BETWEEN_SAVES``, so that every budget has its checkpoint and a killed run loses
    little (``[3000]``: 500; ``[250, 1000]``: 250)."""
    common = math.gcd(*budgets)
    return max(d for d in range(1, min(common, MAX_STEPS_BETWEEN_SAVES) + 1) if common % d == 0)


def run_configs(settings: QualitySettings) -> dict[tuple[str, int], TrainConfig]:
    """The validated config of every (variant, seed) run, before anything long starts. Every
    checkpoint is kept: the probes read each budget's after all runs are trained."""
    save_every = save_interval(settings.budgets)
    configs = {}
    for name, overrides in settings.variants.items():
        for seed in settings.seeds:
            config = load_config(settings.config, {
                **settings.overrides, **overrides, "run.seed": seed,
                "optim.max_steps": settings.budgets[-1], "run.save_every": save_every,
                "run.keep_checkpoints": settings.budgets[-1] // save_every,
                "run.out_dir": str(Path(settings.out_dir).resolve() / name / f"seed{seed}"),
                "run.resume": "auto"})
            make_paths_absolute(config)
            configs[name, seed] = config
    return configs


def read_splits(train_shards: str, dev_shards: str | None, test_shards: str):
    """The probe's (train, dev or None, test) splits and the tasks (vocabularies) of train."""
    train = read_probe_split(train_shards)
    dev = read_probe_split(dev_shards) if dev_shards else None
    test = read_probe_split(test_shards)
    return train, dev, test, ProbeTasks.from_split(train)


class ProbeRows:
    """Probe results per row, cached as ``out_dir/probe/<row>/seed<k>.json`` together with
    the probe settings they were made with (other settings: probed again)."""

    def __init__(self, settings: QualitySettings):
        self.settings = settings
        self.root = Path(settings.out_dir) / "probe"
        self.stamp = {"probe": asdict(settings.probe),
                      "train": settings.probe_train_shards, "dev": settings.probe_dev_shards,
                      "test": settings.eval_shards}
        self._splits = None

    def path(self, row: str, seed: int) -> Path:
        return self.root / row / f"seed{seed}.json"

    def cached(self, row: str, seed: int) -> dict[str, Any] | None:
        try:
            found = json.loads(self.path(row, seed).read_text())
        except (OSError, ValueError):
            return None
        stamp = found.get("stamp")
        if isinstance(stamp, dict) and isinstance(stamp.get("probe"), dict):
            try:     # a probe field added since takes its default, so older results stay valid
                stamp = {**stamp, "probe": asdict(ProbeConfig(**stamp["probe"]))}
            except (TypeError, ValueError):
                return None
        return found if stamp == self.stamp else None

    def splits(self):
        if self._splits is None:
            s = self.settings
            self._splits = read_splits(s.probe_train_shards, s.probe_dev_shards, s.eval_shards)
        return self._splits

    def probe(self, row: str, seeds: list[int], encoder) -> None:
        """Probe ``row`` for every seed not cached yet (features extracted once)."""
        missing = [seed for seed in seeds if self.cached(row, seed) is None]
        if not missing:
            return
        train, dev, test, tasks = self.splits()
        start = time.perf_counter()
        features: ProbeSplits = extract_splits(encoder, train, test, dev)
        for seed in missing:
            result = score_model(features, tasks, test, self.settings.probe, dev)
            result.update(stamp=self.stamp, row=row, seed=seed,
                          seconds=time.perf_counter() - start)
            self.path(row, seed).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path(row, seed), json.dumps(result, indent=1))
            rates = result["rates"]
            print(f"[quality] probe {row} seed {seed}: PER {rates['per']['overall']:.3f} "
                  f"CER {rates['cer']['overall']:.3f}", flush=True)


def checkpoint_path(config: TrainConfig, step: int) -> Path:
    return Path(config.run.out_dir) / "checkpoints" / checkpoint_tag(step)


def run_protocol(settings: QualitySettings, train_only: bool = False) -> dict[str, Any]:
    """Train what is missing, then (unless ``train_only``) probe what is missing and write
    the summary."""
    configs = run_configs(settings)
    started = time.perf_counter()
    for (name, seed), config in configs.items():
        train_run(f"{name} seed {seed}", config, settings.ranks)
    train_seconds = time.perf_counter() - started
    if train_only:
        return {"trained": [f"{name} seed {seed}" for name, seed in configs],
                "train_seconds_this_call": train_seconds}
    rows = ProbeRows(settings)
    first = next(iter(configs.values()))
    teacher, pairs, _ = build_run(first, torch.device("cpu"))
    reference_seed = [settings.seeds[0]]
    rows.probe("teacher", reference_seed, teacher_encoder(with_layers(teacher)))
    for layers in settings.teacher_layer_sets:
        rows.probe(subset_row(layers), reference_seed,
                   teacher_encoder(with_layers(teacher, layers)))
    rows.probe("random", reference_seed, student_encoder(
        fresh_model(first, teacher, pairs, None, random_front_end=True)))
    rows.probe("init", reference_seed, student_encoder(
        fresh_model(first, teacher, pairs, step0_init(first, teacher) or None)))
    for (name, seed), config in configs.items():
        for step in settings.budgets:
            row = f"{name}@{step}"
            if rows.cached(row, seed) is None:
                _, _, _, model = load_student(checkpoint_path(config, step))
                rows.probe(row, [seed], student_encoder(model))
    results = {(row, settings.seeds[0]): rows.cached(row, settings.seeds[0])
               for row in reference_rows(settings)}
    results |= {(f"{n}@{s}", seed): rows.cached(f"{n}@{s}", seed) for n in settings.variants
                for s in settings.budgets for seed in settings.seeds}
    summary = summarise(results, settings)
    summary["train_seconds_this_call"] = train_seconds
    out = Path(settings.out_dir)
    write_text_atomic(out / "quality.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "quality.md", format_markdown(summary))
    write_atomic(out / "quality.png", lambda path: plot_learning_curves(summary, path))
    print(format_markdown(summary))
    return summary


def subset_row(layers: list[int]) -> str:
    return f"teacher[{','.join(map(str, layers))}]"


def reference_rows(settings: QualitySettings) -> list[str]:
    """teacher, random, init and the teacher-subset rows."""
    return [*REFERENCE_ROWS, *map(subset_row, settings.teacher_layer_sets)]


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(results: dict[tuple[str, int], dict[str, Any]],
              settings: QualitySettings) -> dict[str, Any]:
    """Mean/std/min/max over seeds of every row's overall error rates, and gap closed of the
    means: (random - row) / (random - teacher)."""
    rows: dict[str, dict[str, Any]] = {}
    for (row, seed), result in results.items():
        entry = rows.setdefault(row, {task: {} for task in TASKS} | {"loss": {}, "restarts": {}})
        for task in TASKS:
            entry[task][str(seed)] = result["rates"][task]["overall"]
            entry["loss"].setdefault(task, []).append(result["final_train_loss"][task])
            entry["restarts"].setdefault(task, {})[str(seed)] = \
                result.get("restart_losses", {}).get(task, [])
    table = {}
    for row, entry in rows.items():
        table[row] = {task: _stats(list(entry[task].values())) | {
            "per_seed": entry[task],
            "probe_final_train_loss": statistics.fmean(entry["loss"][task]),
            "probe_restart_losses": entry["restarts"][task]}
            for task in TASKS}
    for row, entry in table.items():
        for task in TASKS:
            floor, ceiling = table["random"][task]["mean"], table["teacher"][task]["mean"]
            entry[task]["gap_closed"] = ((floor - entry[task]["mean"]) / (floor - ceiling)
                                         if floor != ceiling else None)
    first_seed = min(seed for _, seed in results)
    goal = goal_verdicts(table, list(settings.variants), settings.budgets)
    convergence = {row: results[row, first_seed].get("selection", {}) for row in REFERENCE_ROWS
                   if (row, first_seed) in results}
    layer_weights = {row: result["layer_weights"] for (row, seed), result in results.items()
                     if seed == first_seed and "layer_weights" in result}
    return {"command": " ".join(sys.argv), "settings": asdict(settings), "rows": table,
            "variants": list(settings.variants), "budgets": settings.budgets, "goal": goal,
            "probe_convergence": {"seed": first_seed, "rows": convergence},
            "probe_layer_weights": {"seed": first_seed, "rows": layer_weights}}


def _cell(stats: dict[str, Any]) -> str:
    spread = f" ± {stats['std']:.3f}" if stats["std"] is not None else ""
    return f"{stats['mean']:.3f}{spread}"


GOAL_GAP_CLOSED = 0.8
"""Issue 17's goal: a student closes at least this share of the random-to-teacher PER gap."""


def goal_verdicts(table: dict[str, Any], variants: list[str],
                  budgets: list[int]) -> dict[str, dict[str, Any]]:
    """Issue 17's goal on PER for each ``variant@step`` row, from the means and sample standard
    deviations of ``table`` (``summarise``'s rows):

    - ``ahead_of_init``: init PER - row PER; ``beats_init``: ahead by more than the row's seed
      spread (None with one seed: no spread to judge by);
    - ``gap_closed`` and ``closes_goal_gap``: at least ``GOAL_GAP_CLOSED`` of the gap;
    - ``behind_best``: row PER - the lowest PER of the variants at the same step (0 for the
      best); ``level_with_best``: behind by no more than the larger seed spread of the two
      rows (None where a spread is missing). Both None where the row is the only variant:
      a row is not judged level with itself."""
    verdicts = {}
    for step in budgets:
        peers = [table[f"{variant}@{step}"]["per"] for variant in variants]
        best = min(peers, key=lambda stats: stats["mean"]) if len(peers) > 1 else None
        verdicts |= {f"{variant}@{step}": _verdict(per, best, table["init"]["per"])
                     for variant, per in zip(variants, peers)}
    return verdicts


def _verdict(per: dict[str, Any], best: dict[str, Any] | None,
             init: dict[str, Any]) -> dict[str, Any]:
    """``goal_verdicts`` of one row's PER statistics against the best at its step (None: no
    other variant) and the init."""
    ahead = init["mean"] - per["mean"]
    verdict = {
        "ahead_of_init": ahead, "seed_spread": per["std"],
        "beats_init": None if per["std"] is None else ahead > per["std"],
        "gap_closed": per["gap_closed"],
        "closes_goal_gap": per["gap_closed"] is not None
        and per["gap_closed"] >= GOAL_GAP_CLOSED,
        "behind_best": None, "level_with_best": None}
    if best is not None:
        behind = per["mean"] - best["mean"]
        spreads = [per["std"], best["std"]]
        verdict |= {"behind_best": behind, "level_with_best": behind == 0 or (
            None if None in spreads else behind <= max(spreads))}
    return verdict


def _verdict_lines(goal: dict[str, dict[str, Any]]) -> list[str]:
    def mark(value: bool | None) -> str:
        return {True: "yes", False: "**no**", None: "one seed"}[value]

    lines = ["", "## Goal (issue 17), on PER", "",
             "Ahead of init by more than the row's seed spread; at least "
             f"{GOAL_GAP_CLOSED:.0%} of the random-to-teacher gap closed; behind the best variant "
             "at the same step by no more than the larger seed spread of the two.", "",
             "| row | ahead of init | seed spread | beats init | gap closed | "
             f">= {GOAL_GAP_CLOSED:.0%} | behind best | level with best |",
             "|---|---|---|---|---|---|---|---|"]
    for row, verdict in goal.items():
        spread, behind = verdict["seed_spread"], verdict["behind_best"]
        level = ("- | no other variant" if behind is None
                 else f"{behind:.3f} | {mark(verdict['level_with_best'])}")
        lines.append(f"| {row} | {verdict['ahead_of_init']:+.3f} | "
                     f"{'-' if spread is None else f'{spread:.3f}'} | "
                     f"{mark(verdict['beats_init'])} | {verdict['gap_closed']:.2f} | "
                     f"{mark(verdict['closes_goal_gap'])} | {level} |")
    return lines


def format_markdown(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    lines = ["# Distillation quality: probe error rates over seeds and budgets", "",
             f"Distillation seeds {settings['seeds']} (teacher, random and init: once), one probe "
             f"seed ({settings['probe']['seed']}); mean ± sample standard deviation over seeds; "
             "gap closed = (random - row) / (random - teacher) of the means; probe train loss: "
             "the probe's mean CTC loss over its last 10 % of steps (a stalled probe stays "
             "near 4-5).", "",
             "| row | step | PER | PER per seed | PER gap closed | CER | CER gap closed | "
             "probe train loss PER / CER |", "|---|---|---|---|---|---|---|---|"]
    table = summary["rows"]

    def line(name: str, step: str, row: dict[str, Any]) -> str:
        seeds = ", ".join(f"{value:.3f}" for value in row["per"]["per_seed"].values())
        return (f"| {name} | {step} | {_cell(row['per'])} | {seeds} | "
                f"{row['per']['gap_closed']:.2f} | "
                f"{_cell(row['cer'])} | {row['cer']['gap_closed']:.2f} | "
                f"{row['per']['probe_final_train_loss']:.2f} / "
                f"{row['cer']['probe_final_train_loss']:.2f} |")

    subsets = map(subset_row, settings.get("teacher_layer_sets", []))   # older summaries: none
    lines += [line(name, "-" if name != "init" else "0", table[name])
              for name in [*REFERENCE_ROWS, *subsets]]
    for variant in summary["variants"]:
        for step in summary["budgets"]:
            lines.append(line(variant, str(step), table[f"{variant}@{step}"]))
    if summary.get("goal"):     # older summaries: none
        lines += _verdict_lines(summary["goal"])
    convergence = summary.get("probe_convergence", {})
    checks = {row: dict((str(step), rate) for step, rate in selection.get("per", []))
              for row, selection in convergence.get("rows", {}).items()}
    steps = next((list(c) for c in checks.values() if c), [])
    if steps:
        lines += ["", f"## Probe convergence (seed {convergence['seed']}): held-out PER at "
                  "each check; the probe keeps its best state", "",
                  "| row | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
        lines += [f"| {row} | " + " | ".join(f"{checks[row].get(step, float('nan')):.3f}"
                                             for step in steps) + " |" for row in checks]
    restarted = [(name, row) for name, row in table.items()
                 if any(row["per"]["probe_restart_losses"].values())]
    if restarted:
        lines += ["", "## Probe restarts: each restart's early PER-probe loss (the lowest goes "
                  "on; a stalled start stays above 5)", "", "| row | seed | restart losses |",
                  "|---|---|---|"]
        lines += [f"| {name} | {seed} | " + " ".join(f"{x:.2f}" for x in losses) + " |"
                  for name, row in restarted
                  for seed, losses in row["per"]["probe_restart_losses"].items()]
    weights = summary.get("probe_layer_weights", {})
    if weights.get("rows"):
        lines += ["", f"## Probe layer weights (seed {weights['seed']}): the softmax weights the "
                  "PER / CER probes learnt for each layer, layer 1 first", "",
                  "| row | PER probe | CER probe |", "|---|---|---|"]
        lines += [f"| {row} | " + " | ".join(" ".join(f"{w:.2f}" for w in by_task[task])
                                             for task in TASKS) + " |"
                  for row, by_task in weights["rows"].items()]
    lines += ["", "## Variants", ""]
    lines += [f"- `{name}`: {json.dumps(overrides) if overrides else 'the config as it is'}"
              for name, overrides in settings["variants"].items()]
    lines += ["", "## Settings", "", f"- Command: `{summary['command']}`",
              f"- Config: `{settings['config']}`, overrides {json.dumps(settings['overrides'])}",
              f"- Probe: {json.dumps(settings['probe'])}; train `{settings['probe_train_shards']}`"
              f", selection `{settings['probe_dev_shards']}`, test `{settings['eval_shards']}`"]
    return "\n".join(lines) + "\n"


def plot_learning_curves(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["rows"]
    figure, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4))
    for axis, task in zip(axes, TASKS):
        for reference, style in (("teacher", "--"), ("random", ":")):
            axis.axhline(table[reference][task]["mean"], color="grey", linestyle=style,
                         label=reference)
        for variant in summary["variants"]:
            points = [table["init"][task]] + [table[f"{variant}@{s}"][task]
                                              for s in summary["budgets"]]
            axis.errorbar([0, *summary["budgets"]], [p["mean"] for p in points],
                          yerr=[p["std"] or 0 for p in points], marker="o", capsize=3,
                          label=variant)
        axis.set_xlabel("distillation steps")
        axis.set_ylabel(f"probe {task.upper()} (lower is better)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--section.field", "value", ...]`` -> ``{"section.field": value}`` (values read as
    YAML: ``5e-4``, ``true``, ``[[3], [6]]``)."""
    if len(args) % 2 or not all(key.startswith("--") for key in args[::2]):
        raise ConfigError(f"config overrides {args!r}: give --section.field value pairs")
    return {key[2:]: yaml.safe_load(value) for key, value in zip(args[::2], args[1::2])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--variants", required=True,
                        help="YAML file: variant name -> {dotted.field: value}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", required=True, help="comma-separated optimiser steps")
    parser.add_argument("--eval_shards", required=True)
    parser.add_argument("--probe_train_shards", required=True)
    parser.add_argument("--probe_dev_shards")
    parser.add_argument("--out_dir", default="runs/quality")
    parser.add_argument("--ranks", type=int)
    parser.add_argument("--probe_steps", type=int, default=ProbeConfig.steps)
    parser.add_argument("--probe_select_every", type=int, default=100)
    parser.add_argument("--probe_patience", type=int, default=0,
                        help="stop a probe after this many held-out checks without a lower rate "
                             "(--probe_steps is then its most); 0: train all --probe_steps")
    parser.add_argument("--probe_seed", type=int, default=0)
    parser.add_argument("--probe_restarts", type=int, default=ProbeConfig.restarts)
    parser.add_argument("--teacher_layer_sets", default="",
                        help="more teacher rows on only these layers: '3,6;1,2'")
    parser.add_argument("--train_only", action="store_true",
                        help="train the missing runs and stop (probe them in a later call)")
    args, rest = parser.parse_known_args(argv)
    variants = yaml.safe_load(Path(args.variants).read_text()) or {}
    settings = QualitySettings(
        config=args.config, variants={k: v or {} for k, v in variants.items()},
        seeds=[int(s) for s in args.seeds.split(",")],
        budgets=[int(s) for s in args.budgets.split(",")], eval_shards=args.eval_shards,
        probe_train_shards=args.probe_train_shards, probe_dev_shards=args.probe_dev_shards,
        out_dir=args.out_dir, ranks=args.ranks,
        probe=ProbeConfig(steps=args.probe_steps, seed=args.probe_seed,
                          patience=args.probe_patience,
                          restarts=args.probe_restarts,
                          select_every=args.probe_select_every if args.probe_dev_shards else 0),
        overrides=parse_overrides(rest),
        teacher_layer_sets=[[int(layer) for layer in group.split(",")]
                            for group in args.teacher_layer_sets.split(";") if group])
    return run_protocol(settings, args.train_only)


if __name__ == "__main__":
    main()
