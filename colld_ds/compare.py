"""``colld compare``: distil with several objectives on equal terms and write one table.

Every objective's run gets the same resolved config: data, budget (steps, batch, schedule),
student shape and initialisation, seed, masking and the same *teacher layers* as targets; only
``objective.name`` differs (objective-specific fields such as ``objective.temperature`` only act
on their objective). The layer map is resolved once and written into every run's config:
``colld`` and ``l2l`` pair student layer k with its teacher layers, ``distilhubert`` puts one head
per teacher layer of that same list on the last student layer (its own method), so all three
predict the same teacher layers.

Layout of ``out_dir``::

    <objective>/train_config.yaml   the config compare gives the run (train writes config.yaml)
    <objective>/checkpoints/...     the run (colld train); <objective>/eval/ its fidelity report
    compare.md, compare.json        the table (written atomically, also printed)

Resumable: a run whose final checkpoint (step ``optim.max_steps``) is complete is not trained
again, an interrupted one continues with ``--run.resume auto``, and an evaluation is reused when
it is of the same checkpoint, shards and probe settings.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from colld_ds.atomic import write_text_atomic
from colld_ds.checkpoint import COMPLETE_MARKER, checkpoint_tag, complete_checkpoints
from colld_ds.config import ConfigError, TrainConfig, load_config
from colld_ds.errors import ColldError
from colld_ds.evaluate import evaluate
from colld_ds.layer_map import resolve_layer_map
from colld_ds.models import read_num_layers
from colld_ds.probe import ProbeConfig
from colld_ds.report import FidelityReport, ModelFidelity

REPO = Path(__file__).resolve().parent.parent
OBJECTIVES = ("colld", "l2l", "distilhubert")
_OWNED_BY_COMPARE = {"objective.name": "--objectives", "run.out_dir": "--out_dir",
                     "run.resume": "nothing (compare always resumes: run.resume auto)",
                     "run.stop_at_step": "nothing (compare evaluates the final checkpoint)"}
# run fields that change where a run writes and how often it stops, saves or logs, never
# what it computes
_NOT_RESULTS = ("resume", "stop_at_step", "save_every", "keep_checkpoints", "log_every",
                "out_dir")
# objective fields that an objective never reads
_CONTRASTIVE = ("temperature", "num_negatives", "contrastive_backend", "anchor_frames",
                "position_negatives")
_UNREAD = {"colld": ("distance", "cosine_weight"), "l2l": _CONTRASTIVE,
           "distilhubert": (*_CONTRASTIVE, "distance")}
# Launcher variables of an enclosing job: a child `colld train` must start its own.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


class RunFailedError(ColldError, RuntimeError):
    """A run's training process failed; the finished runs are kept and it can resume."""


@dataclass(kw_only=True)
class CompareSettings:
    config: str
    """Training config (YAML) shared by every objective's run."""
    eval_shards: str
    """Held-out audio shards for ``colld eval``."""
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES))
    out_dir: str = "runs/compare"
    ranks: int | None = None
    """Processes per run: 1 runs ``colld train`` directly (no launcher); N > 1 runs launch.sh
    with N ranks; ``None``: one per GPU, else 2 CPU ranks (launch.sh's default)."""
    probe_train_shards: str | None = None
    """Passed to ``evaluate`` (its phone probe's training shards) when set."""
    probe_steps: int | None = None
    """Probe optimiser steps (``ProbeConfig.steps``); ``None``: the probe's default."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config overrides applied to every run (``{"optim.max_steps": 6}``)."""

    def __post_init__(self) -> None:
        if isinstance(self.objectives, str):
            self.objectives = [name for name in self.objectives.split(",") if name]
        self.objectives = list(self.objectives)
        unknown = [name for name in self.objectives if name not in OBJECTIVES]
        if unknown or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ConfigError(f"--objectives: {self.objectives!r}; give distinct names out of "
                              f"{list(OBJECTIVES)}, comma-separated")
        for flag in ("ranks", "probe_steps"):
            value = getattr(self, flag)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"--{flag}: {value!r}; give a whole number >= 1")
        if self.probe_steps is not None and self.probe_train_shards is None:
            raise ConfigError("--probe_steps: there is no probe without --probe_train_shards")
        for key in self.overrides:
            if key.replace("-", "_") in _OWNED_BY_COMPARE:
                raise ConfigError(f"--{key}: compare sets it for every run; use "
                                  f"{_OWNED_BY_COMPARE[key.replace('-', '_')]} instead")

    def world_size(self) -> int:
        """Ranks per run: ``ranks``, else what launch.sh starts (one per GPU, else
        ``COLLD_CPU_RANKS`` or 2 CPU ranks)."""
        if self.ranks is not None:
            return self.ranks
        return torch.cuda.device_count() or int(os.environ.get("COLLD_CPU_RANKS", 2))

    def command(self) -> str:
        """The ``colld compare`` command line that gives these settings."""
        parts = ["colld", "compare", "--config", self.config, "--eval_shards", self.eval_shards,
                 "--objectives", ",".join(self.objectives), "--out_dir", self.out_dir]
        if self.ranks is not None:
            parts += ["--ranks", str(self.ranks)]
        if self.probe_train_shards is not None:
            parts += ["--probe_train_shards", self.probe_train_shards]
        if self.probe_steps is not None:
            parts += ["--probe_steps", str(self.probe_steps)]
        for key, value in self.overrides.items():
            parts += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict, bool))
                      or value is None else str(value)]
        return " ".join(shlex.quote(part) for part in parts)


# --- the runs' configs ---------------------------------------------------------------------------


def absolute_path(path: str) -> str:
    """A local path made absolute (the runs start in the repository); URLs and '' left alone."""
    return path if not path or "://" in path or os.path.isabs(path) else os.path.abspath(path)


def make_paths_absolute(config: TrainConfig) -> None:
    """In place: the config's local paths made absolute (``absolute_path``)."""
    config.teacher.path = absolute_path(config.teacher.path)
    config.data.train_shards = absolute_path(config.data.train_shards)
    config.data.teacher_cache = absolute_path(config.data.teacher_cache)
    if config.run.ds_config:
        config.run.ds_config = absolute_path(config.run.ds_config)


def objective_configs(settings: CompareSettings) -> dict[str, TrainConfig]:
    """One validated config per objective, identical but for ``objective.name`` and
    ``run.out_dir``, with the same explicit teacher layers and absolute paths (relative ones are
    taken from the current directory: the runs start in the repository).

    Raises ConfigError (naming the field) before anything is trained."""
    base = load_config(settings.config, {**settings.overrides, "objective.name": "l2l"})
    base.teacher.path = absolute_path(base.teacher.path)
    num_teacher_layers = read_num_layers(base.teacher.path)
    teacher_layers: list[list[int]] = [[] for _ in range(base.student.num_layers)]
    for pair in resolve_layer_map(base, num_teacher_layers):
        teacher_layers[pair.student_layer - 1].append(pair.teacher_layer)
    out_dir = Path(settings.out_dir).resolve()
    configs = {}
    for name in settings.objectives:
        config = load_config(settings.config, {
            **settings.overrides, "objective.name": name,
            "layer_map.teacher_layers": teacher_layers,
            "run.out_dir": str(out_dir / name), "run.resume": "auto"})
        make_paths_absolute(config)
        resolve_layer_map(config, num_teacher_layers)      # e.g. a pair listed twice
        configs[name] = config
    return configs


def _differences(earlier: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted fields whose values differ between two config dicts."""
    found = []
    for key in sorted(set(earlier) | set(now)):
        old, new = earlier.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {old!r} there, {new!r} now")
    return found


def check_earlier_run(config: TrainConfig) -> None:
    """Refuse to continue a run in ``run.out_dir`` that was started with other settings."""
    resolved = Path(config.run.out_dir) / "config.yaml"
    if not resolved.is_file():
        return
    # read through load_config, so that a field added since then compares as its default
    earlier = load_config(resolved).to_dict()
    now = config.to_dict()
    for section in (earlier, now):     # what changes where a run stops or saves, not its result
        for key in _NOT_RESULTS:
            section.get("run", {}).pop(key, None)
        for key in _UNREAD.get(config.objective.name, ()):
            section.get("objective", {}).pop(key, None)
    differences = _differences(earlier, now)
    if differences:
        raise ConfigError(
            f"{resolved}: that run was started with other settings ({'; '.join(differences[:3])}"
            f"{'; ...' if len(differences) > 3 else ''}). Use another --out_dir, or delete "
            f"{resolved.parent} to train it afresh")


# --- training and evaluation ---------------------------------------------------------------------


def final_checkpoint(config: TrainConfig) -> Path:
    return Path(config.run.out_dir) / "checkpoints" / checkpoint_tag(config.optim.max_steps)


def train_run(name: str, config: TrainConfig, ranks: int | None) -> Path:
    """Train (or resume) one objective's run unless its final checkpoint is complete; returns
    the final checkpoint. ``ranks`` 1: ``colld train`` in one process; more: launch.sh with
    that many; None: launch.sh's own count. A run started with other settings is refused."""
    check_earlier_run(config)
    final = final_checkpoint(config)
    done = complete_checkpoints(final.parent)
    if final in done:
        print(f"[compare] {name}: finished run found ({final}); training skipped", flush=True)
        return final
    run_dir = Path(config.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "train_config.yaml"
    write_text_atomic(config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    print(f"[compare] {name}: {'resuming from ' + done[-1].name if done else 'training'}",
          flush=True)
    env = {key: value for key, value in os.environ.items() if key not in _LAUNCHER_ENV}
    if ranks == 1:
        command = [sys.executable, "-m", "colld_ds.cli", "train", "--config", str(config_path)]
    else:
        count = ["--num_accelerators", str(ranks)] if ranks else []
        command = [str(REPO / "launch.sh"), *count, "--config", str(config_path)]
        env["COLLD_PYTHON"] = sys.executable
    finished = subprocess.run(command, env=env, cwd=REPO)
    if finished.returncode != 0 or final not in complete_checkpoints(final.parent):
        raise RunFailedError(
            f"[compare] {name}: training ended with exit status {finished.returncode} and no "
            f"complete final checkpoint {final} (its log is above). Re-run the same command: "
            "finished runs are skipped and this one resumes from its last checkpoint")
    return final


def evaluate_run(name: str, checkpoint: Path, eval_shards: str,
                 probe_train_shards: str | None, probe_steps: int | None) -> FidelityReport:
    """``evaluate`` of ``checkpoint`` into ``<run>/eval``; an earlier report of the same
    checkpoint (not older than it), shards and probe settings is reused."""
    probe_config = ProbeConfig() if probe_steps is None else ProbeConfig(steps=probe_steps)
    out = checkpoint.parent.parent / "eval"
    cached = out / "fidelity.json"
    try:
        report = FidelityReport.from_json(json.loads(cached.read_text()))
        fresh = cached.stat().st_mtime >= (checkpoint / COMPLETE_MARKER).stat().st_mtime
        probe = report.probe or {}
        same_probe = (probe.get("train_shards") == probe_train_shards
                      and (not probe or probe.get("steps") == probe_config.steps))
        if (fresh and report.checkpoint == str(checkpoint) and report.shards == eval_shards
                and same_probe):
            print(f"[compare] {name}: evaluation of {checkpoint.name} found ({cached}); reused",
                  flush=True)
            return report
    except (OSError, ValueError, KeyError, TypeError):   # none yet, half written, or not one
        pass
    print(f"[compare] {name}: evaluating {checkpoint} on {eval_shards}", flush=True)
    return evaluate(checkpoint, eval_shards, out, probe_train_shards=probe_train_shards,
                    probe=probe_config).report


def final_training_loss(run_dir: Path, step: int) -> float | None:
    """``loss/total`` of the last metrics.jsonl row logged at ``step`` (the only one since a
    resumed run drops the rows after its checkpoint; runs of older versions appended them)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    at_step = [row for row in rows if row.get("step") == step and "loss/total" in row]
    return at_step[-1]["loss/total"] if at_step else None


# --- the table -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunOutcome:
    report: FidelityReport
    """The run's ``evaluate`` report."""
    final_loss: float | None
    """``loss/total`` at the last step (each objective's own loss)."""


METRICS = ("per", "cer")
NOTES = [
    "Fidelity on the held-out shards, mean over each run's own layer pairs: cosine through "
    "the pair's trained projection head, linear CKA of the raw student state vs the teacher "
    "feature. `distilhubert`'s pairs are its heads on the last student layer, predicting the "
    "same teacher layers as the others.",
    "Gap closed = (student - random) / (teacher - random); for error rates (PER, CER) = "
    "(random - student) / (random - teacher). 0 = no better than the random floor, 1 = the "
    "teacher. For fidelity the teacher ceiling is 1 by definition (the teacher against "
    "itself: cosine through an identity head and CKA are both 1).",
    "`random`: a student of the same shape and seed with every weight random and random "
    "heads (colld eval's floor). `init`: the student every run starts from (step 0: front "
    "end and, where widths match, layers copied from the teacher; untrained heads), so a "
    "high `init` CKA is the copy, not training. One row of each per pair layout, as the "
    "heads differ.",
    "Final training loss: `loss/total` at the last step. Each objective has its own loss "
    "(InfoNCE for colld, L1 + cosine terms for l2l and distilhubert): compare it within "
    "an objective, not across rows.",
]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean(values) -> float | None:
    """None when empty or when a value is missing or not finite (e.g. CKA of a constant)."""
    values = list(values)
    return math.fsum(values) / len(values) if values and all(map(_finite, values)) else None


def gap_closed(student: float | None, floor: float | None,
               ceiling: float | None) -> float | None:
    """Fraction of the floor-to-ceiling gap the student closes, (student - floor) /
    (ceiling - floor): 0 at the floor, 1 at the ceiling. For error rates it is the same number
    as (floor - student) / (floor - ceiling). None when a value is missing or not finite, or
    when the floor equals the ceiling."""
    if not (_finite(student) and _finite(floor) and _finite(ceiling)) or floor == ceiling:
        return None
    return (student - floor) / (ceiling - floor)


def _fidelity(model: ModelFidelity, pairs: list[str]) -> dict[str, float | None]:
    return {"cosine": _mean(model.cosine[p] for p in pairs),
            "cka": _mean(model.cka_pairs[p] for p in pairs)}


def build_table(outcomes: dict[str, RunOutcome], settings: dict[str, Any] | None = None,
                command: str = "") -> dict[str, Any]:
    """The comparison from each objective's eval report: rows per objective, ``init`` (the
    student at step 0; with probe rates when its report probed it) and ``random`` (the floor),
    both once per pair layout since cosine goes through the pairs' heads, and ``teacher`` (the
    ceiling: fidelity 1 by definition; probe error rates from the reports).

    Fidelity gaps use the random row of the objective's pair layout; probe gaps use the
    random and teacher probe rows of the first report with a probe, so every gap can be
    recomputed from the rows shown."""
    probes = {name: o.report.probe for name, o in outcomes.items() if o.report.probe}
    probe = next(iter(probes.values()), None)
    languages = list(dict.fromkeys(lang for p in probes.values() for lang in p["languages"]))

    def rates(model: str, section: dict[str, Any] | None = probe) -> dict[str, dict]:
        """PER and CER of ``model`` in a probe section, {} if it has none."""
        if section is None or model not in section["models"]:
            return {}
        values = section["models"][model]
        return {m: {key: values.get(m, {}).get(key) for key in ["overall", *languages]}
                for m in METRICS}

    floor_rates, ceiling_rates = rates("random"), rates("teacher")

    def with_gaps(row: dict[str, Any], row_rates: dict[str, dict], floor: dict[str, Any]
                  ) -> dict[str, Any]:
        gaps = {key: gap_closed(row[key], floor[key], 1.0) for key in ("cosine", "cka")}
        gaps |= {m: {key: gap_closed(value, floor_rates[m][key], ceiling_rates[m][key])
                     for key, value in values.items()} for m, values in row_rates.items()}
        return {**row, "gap_closed": gaps, **row_rates}

    trained, starts, floors = [], {}, {}
    for name, outcome in outcomes.items():
        report = outcome.report
        pairs = [p.name for p in report.pairs]
        size = report.student.parameters
        if tuple(pairs) not in floors:
            floor = floors[tuple(pairs)] = {
                "row": "random", "pairs": pairs, "floor_of": [], "parameters": size,
                **_fidelity(report.models["random"], pairs), "final_loss": None, **floor_rates}
            if "init" in report.models:     # the probe does not depend on the heads
                starts[tuple(pairs)] = with_gaps(
                    {"row": "init", "pairs": pairs, "parameters": size,
                     **_fidelity(report.models["init"], pairs), "final_loss": None},
                    rates("init", probes.get(name)), floor)
        floors[tuple(pairs)]["floor_of"].append(name)
        trained.append(with_gaps(
            {"row": name, "pairs": pairs, "parameters": size,
             **_fidelity(report.models["trained"], pairs), "final_loss": outcome.final_loss,
             "checkpoint": report.checkpoint},
            rates("trained", probes.get(name)), floors[tuple(pairs)]))
    teacher = {"row": "teacher", "pairs": [],
               "parameters": next(iter(outcomes.values())).report.teacher.parameters,
               "cosine": 1.0, "cka": 1.0, "final_loss": None, **ceiling_rates}

    notes = list(NOTES)
    if probes and len(probes) < len(outcomes):
        notes.append("Only " + ", ".join(probes) + " have a probe in their eval report.")
    skipped = {o.report.probe_skipped for o in outcomes.values() if o.report.probe_skipped}
    if not probes and skipped:
        notes.append("No probe: " + "; ".join(sorted(skipped)))
    return {"command": command, "settings": settings or {}, "languages": languages,
            "probe": ({"train_shards": probe["train_shards"], "steps": probe["steps"]}
                      if probe else None),
            "rows": [*trained, *starts.values(), *floors.values(), teacher], "notes": notes}


def _fmt(value: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def format_markdown(table: dict[str, Any]) -> str:
    """``compare.md``: the fidelity table, the probe's PER and CER tables when there is a probe
    (one column per language), and the notes."""
    lines = ["# Distillation objectives compared on equal terms", "",
             "## Fidelity to the teacher on held-out audio", "",
             "| model | student parameters | pairs | cosine | CKA | cosine gap closed | "
             "CKA gap closed | final training loss |", "|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        gaps = row.get("gap_closed") or {}
        if row["row"] == "random":
            gaps = {"cosine": 0.0, "cka": 0.0}
        elif row["row"] == "teacher":
            gaps = {"cosine": 1.0, "cka": 1.0}
        lines.append(
            f"| {row['row']} | {row['parameters']:,} | {', '.join(row['pairs']) or '-'} | "
            f"{_fmt(row['cosine'])} | {_fmt(row['cka'])} | {_fmt(gaps.get('cosine'), 2)} | "
            f"{_fmt(gaps.get('cka'), 2)} | {_fmt(row['final_loss'], 4)} |")
    if table["probe"]:
        columns = ["overall", *table["languages"]]
        probe_rows = [r for r in table["rows"] if "per" in r]
        for metric in ("per", "cer"):
            lines += ["", f"## Probe {metric.upper()} (gap closed in parentheses)", "",
                      "| model | " + " | ".join(columns) + " |",
                      "|---|" + "---|" * len(columns)]
            seen_random = False
            for row in probe_rows:
                if row["row"] == "random":
                    if seen_random:
                        continue                 # the same random student for every layout
                    seen_random = True
                gaps = (row.get("gap_closed") or {}).get(metric, {})
                cells = [_fmt(row[metric][key]) + (f" ({_fmt(gaps[key], 2)})"
                                                   if key in gaps else "") for key in columns]
                lines.append(f"| {row['row']} | " + " | ".join(cells) + " |")
    lines += ["", "## Notes", ""]
    if table["command"]:
        lines.append(f"- Made by: `{table['command']}`")
    for key, value in table["settings"].items():
        lines.append(f"- {key}: {value}")
    if table["probe"]:
        lines.append(f"- Probe: trained {table['probe']['steps']} steps on "
                     f"`{table['probe']['train_shards']}`; error rates are fractions.")
    lines += [f"- {note}" for note in table["notes"]]
    return "\n".join(lines) + "\n"


def describe_settings(config: TrainConfig, world_size: int, report: FidelityReport,
                      eval_shards: str) -> dict[str, str]:
    """What every run shared, for the table's notes (``config``: any of the runs')."""
    s, d, o = config.student, config.data, config.optim
    per_step = d.batch_size * o.gradient_accumulation_steps * world_size
    init = s.init_from_teacher_layers
    return {
        "Steps": f"{o.max_steps} (warm-up {o.warmup_steps}, {o.decay} decay, lr {o.lr})",
        "Batch": f"{d.batch_size} utterances per rank x {o.gradient_accumulation_steps} "
                 f"accumulation x {world_size} rank(s) = {per_step} per step, crops of "
                 f"{d.max_seconds} s",
        "Seed": str(config.run.seed),
        "Student": f"{s.num_layers} layers, width {s.hidden_size or 'as teacher'}, heads "
                   f"{s.num_attention_heads or 'as teacher'}, FFN "
                   f"{s.intermediate_size or 'as teacher'}, init from teacher layers "
                   f"{init if init is not None else 'first K when widths match'}, front end "
                   f"{'frozen' if s.freeze_front_end else 'trained'}, frozen layers "
                   f"{s.frozen_layers or 'none'}",
        "Teacher": f"`{config.teacher.path}` ({report.teacher.layers} layers, targets "
                   f"`{config.teacher.target_kind}`); teacher layers predicted per student "
                   f"layer {config.layer_map.teacher_layers}",
        "Corpus": f"`{d.teacher_cache or d.train_shards}`"
                  f"{' (teacher cache)' if d.teacher_cache else ''}",
        "Masking": f"mask_prob {config.masking.mask_prob}, span {config.masking.span_length}, "
                   "the same for every objective (colld scores masked frames, l2l and "
                   "distilhubert every valid frame)",
        "Objective fields": f"head {config.objective.head}; colld temperature "
                            f"{config.objective.temperature}, {config.objective.num_negatives} "
                            f"negatives; l2l distance {config.objective.distance}; cosine "
                            f"weight {config.objective.cosine_weight}",
        "Held-out": f"`{eval_shards}`: {report.utterances} utterances, "
                    f"{report.audio_seconds:.1f} s, {report.frames} frames",
    }


def compare(settings: CompareSettings) -> dict[str, Any]:
    """Train (or resume, or skip) and evaluate every objective, then write and print the
    table; returns it (``compare.json``'s content)."""
    configs = objective_configs(settings)
    world_size = settings.world_size()
    outcomes = {}
    for name, config in configs.items():
        checkpoint = train_run(name, config, settings.ranks)
        report = evaluate_run(name, checkpoint, settings.eval_shards,
                              settings.probe_train_shards, settings.probe_steps)
        outcomes[name] = RunOutcome(report=report, final_loss=final_training_loss(
            Path(config.run.out_dir), config.optim.max_steps))
    first = next(iter(configs.values()))
    table = build_table(outcomes, describe_settings(first, world_size,
                                                    outcomes[first.objective.name].report,
                                                    settings.eval_shards),
                        settings.command())
    out = Path(settings.out_dir)
    markdown = format_markdown(table)
    write_text_atomic(out / "compare.json", json.dumps(table, indent=2))
    write_text_atomic(out / "compare.md", markdown)
    print(markdown)
    print(f"[compare] table written to {out / 'compare.md'} and {out / 'compare.json'}")
    return table


__all__ = ["CompareSettings", "RunFailedError", "RunOutcome", "build_table", "compare",
           "final_training_loss", "format_markdown", "gap_closed", "objective_configs"]
