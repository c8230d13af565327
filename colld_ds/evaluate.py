"""``colld eval``: fidelity of a distilled student to its teacher on held-out audio.

On valid (unpadded) frames of whole utterances (or their first ``max_seconds``): cosine per
layer pair through the pair's trained head, and linear CKA (Kornblith et al. 2019) of every
student layer against every teacher layer, exact over all frames from streamed float64
moments (memory O(K L D_s D_t), not O(frames)); sizes and CPU real-time factors. Rows:
``trained`` (the checkpoint), ``random`` (the floor: every weight random) and ``init`` (the
student at step 0). The teacher against itself is 1 by definition, so it is stated, not
computed. With ``probe_train_shards``, the CTC probe (``colld_ds.probe``) adds PER and CER.
Writes ``fidelity.json`` (``colld_ds.report``), ``fidelity.md`` and the plots; README,
"Evaluation and export", says more.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from colld_ds.atomic import write_atomic, write_text_atomic
from colld_ds.data import decode_audio, expand_urls, read_samples
from colld_ds.distill import DistillationModel, fresh_model, step0_init
from colld_ds.formats import SAMPLE_RATE
from colld_ds.layer_map import LayerPair
from colld_ds.models import Teacher
from colld_ds.probe import (
    Encoder,
    ProbeConfig,
    ProbeUnavailable,
    format_probe_markdown,
    plot_error_rates,
    read_probe_split,
    run_probe,
)
from colld_ds.report import EncoderSize, FidelityReport, LossCurves, ModelFidelity
from colld_ds.trained import load_student, resolve_checkpoint, torch_threads

# --- linear CKA ----------------------------------------------------------------------------------


@dataclass
class Moments:
    """Streamed first and second moments of one representation: n frames, sum (D,), X^T X."""

    n: int = 0
    total: Tensor | None = None
    gram: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.double()
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.gram += x.T @ x

    def centered(self) -> Tensor:
        return self.gram - torch.outer(self.total, self.total) / self.n


def cka_from_moments(x: Moments, y: Moments, cross: Tensor) -> float:
    """Linear CKA from the moments of X (n, D_x), Y (n, D_y) and cross = X^T Y:
    ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc column-centred."""
    if x.n != y.n or x.n < 2:
        raise ValueError(f"CKA needs the same >= 2 frames on both sides, got {x.n} and {y.n}")
    cross_c = cross - torch.outer(x.total, y.total) / x.n
    denominator = torch.linalg.matrix_norm(x.centered()) * torch.linalg.matrix_norm(y.centered())
    if denominator == 0:
        return float("nan")                  # a constant representation: CKA is undefined
    return float((cross_c**2).sum() / denominator)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same n examples: x (n, D_x), y (n, D_y)."""
    mx, my = Moments(), Moments()
    mx.add(x)
    my.add(y)
    return cka_from_moments(mx, my, x.double().T @ y.double())


# --- fidelity accumulation --------------------------------------------------------------------


@dataclass
class FidelityAccumulator:
    """Streams frames of one student (K layers) against the teacher's L layers."""

    pairs: list[LayerPair]
    student: list[Moments] = field(default_factory=list)
    cross: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    cos_sum: dict[str, float] = field(default_factory=dict)
    frames: int = 0

    def add(self, student_frames: list[Tensor], projected: dict[str, Tensor],
            teacher_frames: list[Tensor], head_targets: list[Tensor] | None = None) -> None:
        """student_frames K x (N, D_s), projected pair name -> (N, D_t) (head outputs),
        teacher_frames L x (N, D_t): the N valid frames of a batch; head_targets L x (N, D_t):
        what the heads were trained to predict, if not ``teacher_frames`` (normalised
        targets)."""
        if not self.student:
            self.student = [Moments() for _ in student_frames]
        for k, x in enumerate(student_frames):
            self.student[k].add(x)
            xd = x.double()
            for t, y in enumerate(teacher_frames):
                product = xd.T @ y.double()
                key = (k + 1, t + 1)
                self.cross[key] = self.cross[key] + product if key in self.cross else product
        for pair in self.pairs:
            target = (head_targets or teacher_frames)[pair.teacher_layer - 1].float()
            cos = torch.nn.functional.cosine_similarity(projected[pair.name].float(), target,
                                                        dim=-1, eps=1e-8)
            self.cos_sum[pair.name] = self.cos_sum.get(pair.name, 0.0) + float(cos.double().sum())
        self.frames += student_frames[0].shape[0]

    def result(self, teacher: list[Moments]) -> ModelFidelity:
        cka = [[cka_from_moments(self.student[k], teacher[t], self.cross[(k + 1, t + 1)])
                for t in range(len(teacher))] for k in range(len(self.student))]
        return ModelFidelity(
            cosine={p.name: self.cos_sum[p.name] / self.frames for p in self.pairs},
            cka_pairs={p.name: cka[p.student_layer - 1][p.teacher_layer - 1] for p in self.pairs},
            cka=cka)


def _valid_frames(tensors: list[Tensor], mask: Tensor) -> list[Tensor]:
    return [t[mask] for t in tensors]


@dataclass
class EvalBatch:
    wave: Tensor          # (B, S)
    wave_lengths: Tensor  # (B,)


def _target_norm_key(objective) -> tuple[str, str] | None:
    """What the targets of ``objective``'s heads depend on besides the teacher: None for the
    teacher states themselves (``target_norm: none``), else the normalisation and a SHA-256 of
    its position mean (fp32 bytes; "" without one)."""
    if objective.target_norm == "none":
        return None
    mean = getattr(objective, "position_mean", None)
    digest = "" if mean is None else hashlib.sha256(
        mean.float().cpu().numpy().tobytes()).hexdigest()
    return objective.target_norm, digest


def fidelity(models: dict[str, DistillationModel], teacher: Teacher, pairs: list[LayerPair],
             batches: Iterable[EvalBatch], timed: str | None = None) -> dict[str, Any]:
    """``{"models": name -> ModelFidelity, "seconds", "utterances", "frames"}``: cosine per
    pair and the K x L CKA matrix of each model (a DistillationModel: ``.student``
    and ``.objective.heads``) against ``teacher``, which must return all L layers in order.
    The cosine is to what the heads were trained on: the teacher states, or their
    normalisation under ``objective.target_norm`` (``PairwiseObjective.normalise_targets``).

    Also the forward seconds of the teacher and of ``models[timed]`` and the audio seconds."""
    if teacher.layers != list(range(1, teacher.num_layers + 1)):
        raise ValueError("fidelity needs a teacher returning all its layers, 1..L in order")
    teacher_moments = [Moments() for _ in teacher.layers]
    accumulators = {name: FidelityAccumulator(pairs) for name in models}
    # models that normalise targets alike share one normalisation per batch
    norm_keys = {name: _target_norm_key(model.objective) for name, model in models.items()}
    normalisers = {key: models[name].objective for name, key in norm_keys.items()
                   if key is not None}
    seconds = {"teacher": 0.0, "student": 0.0, "audio": 0.0}
    utterances = 0
    for batch in batches:
        start = time.perf_counter()
        target = teacher(batch.wave, batch.wave_lengths)
        seconds["teacher"] += time.perf_counter() - start
        seconds["audio"] += float(batch.wave_lengths.sum()) / SAMPLE_RATE
        utterances += batch.wave.shape[0]
        num_frames = target.features[0].shape[1]
        mask = torch.arange(num_frames) < target.frame_lengths.unsqueeze(1)   # (B, T)
        teacher_frames = _valid_frames([f.float() for f in target.features], mask)
        for moments, y in zip(teacher_moments, teacher_frames):
            moments.add(y)
        head_targets = {None: None}
        for key, objective in normalisers.items():
            normalised = objective.normalise_targets(dict(zip(teacher.layers, target.features)),
                                                     mask)
            head_targets[key] = _valid_frames([normalised[layer] for layer in teacher.layers],
                                              mask)
        for name, model in models.items():
            with torch.inference_mode():
                start = time.perf_counter()
                hidden = model.student(batch.wave, batch.wave_lengths).hidden
                if name == timed:
                    seconds["student"] += time.perf_counter() - start
                student_frames = _valid_frames(hidden, mask)
                projected = {p.name: model.objective.heads[p.name](
                    student_frames[p.student_layer - 1]) for p in pairs}
            accumulators[name].add(student_frames, projected, teacher_frames,
                                   head_targets[norm_keys[name]])
    if not utterances:
        raise ValueError("no utterances to evaluate")
    return {"models": {name: acc.result(teacher_moments) for name, acc in accumulators.items()},
            "seconds": seconds, "utterances": utterances,
            "frames": teacher_moments[0].n}


# --- held-out audio ----------------------------------------------------------------------------


def eval_batches(shards: str, batch_size: int = 4, max_seconds: float | None = None,
                 max_utterances: int | None = None) -> Iterator[EvalBatch]:
    """Held-out shards in order, every utterance once (its first ``max_seconds`` if set),
    batched by ``batch_size`` (the last batch may be smaller)."""
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    chunk: list[np.ndarray] = []
    count = 0

    def flush() -> EvalBatch:
        lengths = torch.tensor([w.shape[0] for w in chunk], dtype=torch.int64)
        wave = torch.zeros(len(chunk), int(lengths.max()))
        for row, w in zip(wave, chunk):
            row[: w.shape[0]] = torch.from_numpy(np.ascontiguousarray(w))
        return EvalBatch(wave, lengths)

    for sample in decode_audio(read_samples(expand_urls(shards))):
        if max_utterances is not None and count >= max_utterances:
            break
        chunk.append(sample["wave"][:limit] if limit else sample["wave"])
        count += 1
        if len(chunk) == batch_size:
            yield flush()
            chunk = []
    if chunk:
        yield flush()


# --- the command ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` wrote: the report, its directory and the plots in it."""

    report: FidelityReport
    out_dir: Path
    images: dict[str, Path]
    """``heatmap``, ``loss_curves_plot``, ``probe_plot`` -> file, for the plots written."""


def _size(layers: int, model: torch.nn.Module, rtf: float, path: str | None = None
          ) -> EncoderSize:
    parameters = sum(p.numel() for p in model.parameters())
    return EncoderSize(layers, parameters, parameters * 4 / 2**20, rtf, path)


def with_layers(teacher: Teacher, layers: list[int] | None = None) -> Teacher:
    """The same teacher returning ``layers`` (1-based, in that order; default: every
    transformer layer 1..L, as the probe reads it)."""
    layers = list(range(1, teacher.num_layers + 1)) if layers is None else list(layers)
    if not layers or not all(1 <= layer <= teacher.num_layers for layer in layers):
        raise ValueError(f"teacher layers {layers}: give layers in 1..{teacher.num_layers}")
    return Teacher(teacher.model, teacher.family, teacher.front_end, teacher.path, layers,
                   teacher.target_kind, dict(teacher.identity, layers=layers))


def student_encoder(model: DistillationModel) -> Encoder:
    """A DistillationModel's student as a probe Encoder: its K layers, (B, T, D_s) each."""
    def encode(wave: Tensor, wave_lengths: Tensor) -> tuple[list[Tensor], Tensor]:
        output = model.student(wave, wave_lengths)
        return output.hidden, output.frame_lengths
    return encode


def teacher_encoder(teacher: Teacher) -> Encoder:
    """The teacher (all L layers) as a probe Encoder."""
    def encode(wave: Tensor, wave_lengths: Tensor) -> tuple[list[Tensor], Tensor]:
        output = teacher(wave, wave_lengths)
        return output.features, output.frame_lengths
    return encode


def evaluate(checkpoint: str | Path, shards: str, out_dir: str | Path | None = None,
             batch_size: int = 4, max_seconds: float | None = None,
             max_utterances: int | None = None, teacher_path: str | None = None,
             threads: int | None = None, plot: bool = True,
             probe_train_shards: str | None = None,
             probe: ProbeConfig | None = None) -> Evaluation:
    """Fidelity, size and speed of the checkpoint's student vs its teacher on ``shards``, the
    CTC probe (PER/CER) when ``probe_train_shards`` is given, and the run's training curves.
    Writes ``fidelity.json``, ``fidelity.md``, ``fidelity_cka.png``, ``loss_curves.png`` and
    with the probe ``probe_per_language.png``, each atomically, to ``out_dir`` (default
    ``<run out_dir>/eval/<checkpoint tag>``).

    The probe scores whole utterances of ``shards`` (the first ``max_utterances``;
    ``max_seconds`` does not apply: a cut utterance would not match its transcript)."""
    checkpoint = resolve_checkpoint(checkpoint)
    probe_data = None
    probe_skipped = ("no probe-training split given (`--probe_train_shards`, shards with "
                     "`phones` and `text`, e.g. the corpus' dev split)")
    if probe_train_shards:
        try:   # read (and check) before the slow parts, so that a bad split fails early
            probe_data = (read_probe_split(probe_train_shards),
                          read_probe_split(shards, max_utterances))
        except ProbeUnavailable as error:
            probe_skipped = str(error)
    config, teacher, pairs, trained = load_student(checkpoint, teacher_path)
    full_teacher = with_layers(teacher)
    models = {"trained": trained,
              "random": fresh_model(config, teacher, pairs, None, random_front_end=True)}
    models["init"] = fresh_model(config, teacher, pairs, step0_init(config, teacher) or None)
    with torch_threads(threads) as used_threads:
        result = fidelity(models, full_teacher, pairs,
                          eval_batches(shards, batch_size, max_seconds, max_utterances),
                          timed="trained")
        probe_report: dict[str, Any] = {"probe_skipped": probe_skipped}
        if probe_data is not None:
            encoders = {"teacher": teacher_encoder(full_teacher),
                        **{name: student_encoder(model) for name, model in models.items()}}
            probe_report = run_probe(encoders, *probe_data, probe or ProbeConfig(),
                                     probe_train_shards, batch_size)
    seconds = result["seconds"]
    curves, curves_source = read_loss_curves(checkpoint.parent.parent)
    report = FidelityReport(
        checkpoint=str(checkpoint), shards=shards, utterances=result["utterances"],
        audio_seconds=seconds["audio"], frames=result["frames"],
        target_kind=teacher.target_kind, pairs=pairs,
        teacher=_size(teacher.num_layers, teacher.model, seconds["teacher"] / seconds["audio"],
                      teacher.path),
        student=_size(trained.student.num_layers, trained.student.model,
                      seconds["student"] / seconds["audio"]),
        cpu_threads=used_threads, models=result["models"],
        loss_curves=LossCurves(curves_source,
                               {tag: values[-1] for tag, (_, values) in curves.items()}),
        **probe_report)
    out = Path(out_dir) if out_dir else checkpoint.parent.parent / "eval" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    if plot:
        images["heatmap"] = write_atomic(out / "fidelity_cka.png",
                                         lambda path: plot_cka(report, path))
        if curves:
            images["loss_curves_plot"] = write_atomic(out / "loss_curves.png",
                                                      lambda path: plot_loss_curves(curves, path))
        if report.probe:
            images["probe_plot"] = write_atomic(
                out / "probe_per_language.png", lambda path: plot_error_rates(report.probe, path))
    write_text_atomic(out / "fidelity.json", json.dumps(report.to_json(), indent=2))
    write_text_atomic(out / "fidelity.md", format_markdown(report, {k: Path(v).name
                                                                    for k, v in images.items()}))
    return Evaluation(report, out, {key: Path(path) for key, path in images.items()})


# --- training curves -----------------------------------------------------------------------------

CURVE_KINDS = ("loss", "acc", "cos")   # tag prefixes the monitor writes per pair (+ loss/total)


def read_loss_curves(run_dir: Path) -> tuple[dict[str, tuple[list[int], list[float]]], str]:
    """The run's ``loss/…``, ``acc/…`` and ``cos/…`` scalars: tag -> (steps, values), sorted by
    step (a step logged twice, after a resume, keeps its last value), and where they were read:
    TensorBoard events under ``run_dir/tb``, else ``run_dir/metrics.jsonl``, else ({}, reason)."""
    tb, jsonl = run_dir / "tb", run_dir / "metrics.jsonl"
    by_step: dict[str, dict[int, float]] = {}
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        # tensorboard's reader: only for runs that logged to TensorBoard
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.split("/")[0] in CURVE_KINDS:
                by_step[tag] = {event.step: event.value for event in events.Scalars(tag)}
        source = f"TensorBoard events in {tb}"
    elif jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            row = json.loads(line)
            for tag, value in row.items():
                if tag.split("/")[0] in CURVE_KINDS:
                    by_step.setdefault(tag, {})[int(row["step"])] = value
        source = str(jsonl)
    else:
        return {}, f"no training logs found in {run_dir} (tb/ or metrics.jsonl)"
    curves = {tag: (sorted(values), [values[s] for s in sorted(values)])
              for tag, values in sorted(by_step.items())}
    return curves, source


def plot_loss_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    """Loss (total and per pair) and accuracy or cosine per pair vs step, one panel each."""
    import matplotlib     # plots only: --plot false never loads it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    kinds = [kind for kind in CURVE_KINDS if any(t.startswith(kind + "/") for t in curves)]
    fig, axes = plt.subplots(1, len(kinds), squeeze=False, figsize=(4.5 * len(kinds), 3.2),
                             layout="constrained")
    for ax, kind in zip(axes[0], kinds):
        for tag, (steps, values) in curves.items():
            if tag.startswith(kind + "/"):
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3,
                        label=tag.split("/", 1)[1], linewidth=2 if tag == "loss/total" else 1)
        ax.set_xlabel("step")
        ax.set_ylabel({"loss": "loss", "acc": "contrastive accuracy", "cos": "cosine"}[kind])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("training curves (averaged over ranks)")
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


# --- the Markdown report ---------------------------------------------------------------------


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


def _summary_rows(report: FidelityReport) -> list[str]:
    """One row per model: size, speed, mean fidelity over the pairs, probe error rates."""
    t, s = report.teacher, report.student
    probe = (report.probe or {}).get("models", {})

    def rates(name: str) -> str:
        if name not in probe:
            return "- | -"
        return " | ".join(f"{100 * probe[name][task]['overall']:.1f}" for task in ("per", "cer"))

    rows = [f"| teacher | {t.layers} | {t.parameters:,} | {t.fp32_mib:.2f} | "
            f"{t.rtf:.4f} | 1 (itself) | 1 (itself) | {rates('teacher')} |"]
    for name, values in report.models.items():
        size = (f"{s.layers} | {s.parameters:,} | {s.fp32_mib:.2f} | "
                + (f"{s.rtf:.4f}" if name == "trained" else "as trained"))
        mean_cos = float(np.mean(list(values.cosine.values())))
        mean_cka = float(np.nanmean(list(values.cka_pairs.values())))
        rows.append(f"| {name} | {size} | {_fmt(mean_cos)} | {_fmt(mean_cka)} | {rates(name)} |")
    return rows


def format_markdown(report: FidelityReport, images: dict[str, str] | None = None) -> str:
    """The report as Markdown; ``images``: key ("heatmap", "loss_curves_plot", "probe_plot") ->
    file name next to it, for the plots that were written."""
    images = images or {}
    names = [p.name for p in report.pairs]
    lines = [
        "# Fidelity of the student to its teacher", "",
        f"Checkpoint `{report.checkpoint}`, held-out shards `{report.shards}`: "
        f"{report.utterances} utterances, {report.audio_seconds:.1f} s of audio, "
        f"{report.frames} valid frames; teacher targets `{report.target_kind}`.", "",
        f"## Summary (CPU, {report.cpu_threads} thread(s))", "",
        "RTF: real-time factor = forward s / audio s. Cosine and CKA: means over the layer "
        "pairs (below); the teacher against itself is 1 by definition (not computed). PER/CER: "
        "the probe's overall error rates in % (below); `-`: no probe.", "",
        "| model | layers | parameters | fp32 MiB | RTF | cosine | CKA | PER % | CER % |",
        "|---|---|---|---|---|---|---|---|---|",
        *_summary_rows(report), "",
        "## Per layer pair (student layer -> teacher layer)", "",
        "Cosine: the pair's projection head on the student state vs the teacher feature, mean "
        "over frames. CKA: linear CKA of the raw student state vs the teacher feature. "
        "`random`: same shape and seed, every weight random (the floor); `init`: the run's "
        "student at step 0 (teacher front end, teacher layers where the run copies them). The "
        "teacher against itself would be 1 everywhere, so it has no row.", "",
        "| model | " + " | ".join(f"cos {n}" for n in names) + " | "
        + " | ".join(f"CKA {n}" for n in names) + " |",
        "|---|" + "---|" * (2 * len(names)),
    ]
    for name, values in report.models.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(values.cosine[n]) for n in names)
                     + " | " + " | ".join(_fmt(values.cka_pairs[n]) for n in names) + " |")
    lines += ["", "## Linear CKA, every student layer x teacher layer", ""]
    for name, values in report.models.items():
        cka = values.cka
        lines += [f"**{name}**", "",
                  "| student \\ teacher | " + " | ".join(f"t{j + 1}" for j in range(len(cka[0])))
                  + " |", "|---|" + "---|" * len(cka[0])]
        lines += [f"| s{k + 1} | " + " | ".join(_fmt(v) for v in row) + " |"
                  for k, row in enumerate(cka)]
        lines.append("")
    if "heatmap" in images:
        lines += [f"![CKA heatmaps]({images['heatmap']})", ""]
    lines += format_probe_markdown(report.to_json(), images.get("probe_plot"))
    lines += ["## Training curves", "", f"Read from {report.loss_curves.source}.", ""]
    if "loss_curves_plot" in images:
        lines.append(f"![loss curves]({images['loss_curves_plot']})")
    return "\n".join(lines) + "\n"


def plot_cka(report: FidelityReport, path: Path) -> None:
    import matplotlib     # plots only: --plot false never loads it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    models = report.models
    fig, axes = plt.subplots(1, len(models), squeeze=False,
                             figsize=(1.5 + 2.2 * len(models) * max(1, report.teacher.layers / 6),
                                      2.5))
    image = None
    for ax, (name, values) in zip(axes[0], models.items()):
        cka = np.array(values.cka, dtype=float)
        image = ax.imshow(cka, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(name)
        ax.set_xlabel("teacher layer")
        ax.set_ylabel("student layer")
        ax.set_xticks(range(cka.shape[1]), [str(j + 1) for j in range(cka.shape[1])])
        ax.set_yticks(range(cka.shape[0]), [str(k + 1) for k in range(cka.shape[0])])
        if cka.size <= 64:
            for (k, j), v in np.ndenumerate(cka):
                ax.text(j, k, _fmt(v), ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), label="linear CKA")
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


__all__ = ["EvalBatch", "Evaluation", "Moments", "cka_from_moments", "eval_batches", "evaluate",
           "fidelity", "format_markdown", "linear_cka", "plot_cka", "plot_loss_curves",
           "read_loss_curves"]
