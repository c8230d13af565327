"""``colld`` command line (fire): ``colld train``, ``colld demo``, ``colld eval``,
``colld compare``, ``colld export``, ``colld prep ...``.

Any config field can be overridden with a dotted flag: ``--objective.temperature 0.05``.
"""

from __future__ import annotations

import inspect

import fire

from colld_ds.config import describe_config, load_config
from colld_ds.errors import run_command


def train(config: str | None = None, **overrides):
    """Distil a student. ``config``: YAML file (see configs/); overrides: ``--section.field v``.

    Run it through ``./launch.sh`` (DeepSpeed launcher) for several ranks or nodes; run directly
    it trains on one process.
    """
    if overrides.keys() & {"help", "h"}:       # fire hands --help / -h to **overrides
        print(train_help())
        return
    from colld_ds.train import train as run_training
    run_training(load_config(config, overrides))


def train_help() -> str:
    """``colld train --help``: usage, the docstring of ``train`` and every config field."""
    return ("usage: colld train [--config FILE.yaml] [--section.field VALUE ...]\n"
            "       ./launch.sh [launcher options] --config FILE.yaml [--section.field VALUE ...]"
            f"\n\n{inspect.getdoc(train)}\n\nConfig fields (defaults <- the YAML file <- the "
            f"command line; colld_ds/config.py):\n{describe_config()}")


def demo(teacher: str = "whisper", out_dir: str | None = None, steps: int | None = None,
         ranks: int = 2, minutes_per_language: float = 2.0, langs: str | tuple | None = None,
         window_seconds: float = 8.0, probe: bool = False, num_utterances: int = 64,
         **overrides):
    """The embedded demo, end to end on ``ranks`` CPU processes through launch.sh; each stage is
    skipped when its output exists (see colld_ds/demo.py).

    ``--teacher whisper`` (default): Whisper base distilled with CoLLD on an espeak-ng corpus of
    ``minutes_per_language`` minutes per language (``--langs en,de,ru``; default all 12), the
    teacher on a ``window_seconds`` window, ``steps`` optimiser steps (default 200), evaluated
    on the test split (``--probe`` adds the CTC probe trained on the dev split: slow on CPU).
    ``--teacher tiny``: a tiny random wav2vec 2.0 teacher on ``num_utterances`` generated
    utterances (default 150 steps), the fast smoke test. ``out_dir`` defaults to
    ``demo_out/<teacher>``; ``--section.field v`` overrides the training config.
    """
    from colld_ds.demo import run_tiny_demo, run_whisper_demo

    if not isinstance(probe, bool):   # fire passes "--probe false" as the string "false"
        raise SystemExit(f"colld demo: --probe {probe!r}: write --probe or --noprobe")
    out_dir = out_dir or f"demo_out/{teacher}"
    if teacher == "tiny":
        run_tiny_demo(out_dir, num_utterances, steps or 150, ranks, overrides)
    elif teacher == "whisper":
        chosen = langs.split(",") if isinstance(langs, str) else langs
        run_whisper_demo(out_dir, minutes_per_language, chosen, steps or 200, ranks,
                         window_seconds, probe, overrides=overrides)
    else:
        raise SystemExit(f"colld demo: --teacher {teacher!r}: choose whisper or tiny")


def eval(checkpoint: str, shards: str, out_dir: str | None = None, batch_size: int = 4,
         max_seconds: float | None = None, max_utterances: int | None = None,
         teacher_path: str | None = None, threads: int | None = None,
         probe_train_shards: str | None = None, probe_steps: int | None = None,
         probe_lstm_hidden: int | None = None):
    """Fidelity of a trained student to its teacher on held-out ``shards`` (pattern, directory
    or list): cosine per layer pair, linear CKA for every (student layer, teacher layer), size
    and CPU real-time factor; a random-init student of the same shape is the floor.

    ``probe_train_shards`` (shards with ``phones`` and ``text``, e.g. the corpus' dev split):
    also a frozen-feature CTC probe (weighted sum of all layers + a linear head, or a BiLSTM of
    ``probe_lstm_hidden`` units per direction) trained there for ``probe_steps`` steps per
    model and task (unset: the ``colld_ds.probe.ProbeConfig`` defaults), scored as PER and CER
    per language on whole utterances of ``shards``, for the teacher (ceiling), trained, random
    and init.

    ``checkpoint``: a checkpoint directory or a run's out_dir (its newest complete checkpoint).
    Writes fidelity.json, fidelity.md, fidelity_cka.png, loss_curves.png (from the run's
    TensorBoard logs) and probe_per_language.png to ``out_dir`` (default:
    ``<run out_dir>/eval/<checkpoint tag>``) and prints the Markdown report.
    """
    from colld_ds.evaluate import evaluate
    from colld_ds.probe import ProbeConfig

    probe_overrides = {"steps": probe_steps, "lstm_hidden": probe_lstm_hidden}
    probe = ProbeConfig(**{k: v for k, v in probe_overrides.items() if v is not None})
    done = evaluate(checkpoint, shards, out_dir, batch_size=batch_size,
                    max_seconds=max_seconds, max_utterances=max_utterances,
                    teacher_path=teacher_path, threads=threads,
                    probe_train_shards=probe_train_shards, probe=probe)
    print((done.out_dir / "fidelity.md").read_text())
    print(f"[colld] fidelity report written to {done.out_dir}")


def compare(config: str, eval_shards: str, objectives: str = "colld,l2l,distilhubert",
            out_dir: str = "runs/compare", ranks: int | None = None,
            probe_train_shards: str | None = None, probe_steps: int | None = None,
            **overrides):
    """Distil with each objective on equal terms (same data, budget, student, seed, masking and
    teacher layers; only ``objective.name`` differs), evaluate each final checkpoint on
    ``eval_shards`` and write one table: ``out_dir/compare.md`` and ``compare.json`` (printed).

    Runs go to ``out_dir/<objective>``; re-running skips finished runs and resumes interrupted
    ones. ``ranks``: 1 trains in one process without a launcher, N > 1 through launch.sh
    (default: one per GPU, else 2 CPU ranks). ``probe_train_shards`` and ``probe_steps`` are
    passed to ``eval`` (its PER/CER probe).
    Overrides (``--optim.max_steps 6``) apply to every run.
    """
    from colld_ds.compare import CompareSettings, RunFailedError
    from colld_ds.compare import compare as run_compare

    try:
        run_compare(CompareSettings(config=config, eval_shards=eval_shards,
                                    objectives=objectives, out_dir=out_dir, ranks=ranks,
                                    probe_train_shards=probe_train_shards,
                                    probe_steps=probe_steps, overrides=overrides))
    except RunFailedError as error:       # the run's own traceback is already printed above
        raise SystemExit(str(error)) from None


def export(checkpoint: str, out_dir: str, onnx: bool = False, quantize: bool = False,
           teacher_path: str | None = None, threads: int | None = None):
    """Export a checkpoint's student: ``out_dir/hf`` (save_pretrained + feature extractor
    config: the teacher's, or the family defaults the student was trained with when the teacher
    has none; loads with the teacher's model class, checked to 1e-5), with ``--onnx``
    ``out_dir/onnx/model.onnx`` (checked with onnxruntime to 1e-4), with ``--quantize`` also a
    dynamic int8 ``model.int8.onnx`` (size and CPU latency reported). Nothing is left in
    ``out_dir`` unless every check passed."""
    from colld_ds.export import export as run_export
    from colld_ds.export import format_export_report

    print(format_export_report(run_export(checkpoint, out_dir, onnx=onnx, quantize=quantize,
                                          teacher_path=teacher_path, threads=threads)))


def main() -> None:
    """``colld``: a user error (``colld_ds.errors``) prints one line and exits 1; ``--verbose``
    or ``COLLD_VERBOSE=1`` shows its traceback."""
    from colld_ds.data_prep.cli import DataPrep
    run_command(lambda: fire.Fire({"train": train, "demo": demo, "eval": eval,
                                   "compare": compare, "export": export, "prep": DataPrep()}),
                "colld")


if __name__ == "__main__":
    main()
