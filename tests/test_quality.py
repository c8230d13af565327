"""The quality protocol (benchmarks/quality.py): its arithmetic on hand-made results, the probe's
held-out state selection, and the protocol end to end on a tiny teacher (then a re-run that
trains and probes nothing)."""

import json
import statistics
from pathlib import Path

import pytest
import torch

from benchmarks.probe_restarts import main as probe_restarts
from benchmarks.quality import (QualitySettings, format_markdown, main, run_configs,
                                save_interval, summarise)
from benchmarks.quality_corpus import mixed_shards
from colld_ds.config import ConfigError
from colld_ds.data import read_samples
from colld_ds.evaluate import with_layers
from colld_ds.models import load_teacher
from colld_ds.probe import ProbeConfig, train_probe
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from helpers import tiny_teacher_and_shards

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"


def _result(per, cer):
    return {"rates": {"per": {"overall": per}, "cer": {"overall": cer}},
            "final_train_loss": {"per": 1.5, "cer": 2.5}}


def test_summary_means_spreads_and_gaps_match_hand_computation():
    settings = QualitySettings(config="x", variants={"a": {}}, seeds=[0, 1], budgets=[5],
                               eval_shards="t", probe_train_shards="p")
    results = {("teacher", 0): _result(0.4, 0.5), ("teacher", 1): _result(0.6, 0.5),
               ("random", 0): _result(1.0, 0.9), ("random", 1): _result(0.9, 0.9),
               ("init", 0): _result(0.8, 0.7), ("init", 1): _result(0.7, 0.8),
               ("a@5", 0): _result(0.6, 0.6), ("a@5", 1): _result(0.5, 0.8)}
    results["a@5", 1]["restart_losses"] = {"per": [5.6, 3.1], "cer": [4.9, 4.8]}
    summary = summarise(results, settings)
    rows = summary["rows"]
    assert rows["a@5"]["per"]["probe_restart_losses"] == {"0": [], "1": [5.6, 3.1]}
    assert "| a@5 | 1 | 5.60 3.10 |" in format_markdown(summary)
    per = rows["a@5"]["per"]
    assert per["mean"] == pytest.approx(0.55)
    assert per["std"] == pytest.approx(statistics.stdev([0.6, 0.5]))      # sample std
    assert per["per_seed"] == {"0": 0.6, "1": 0.5} and (per["min"], per["max"]) == (0.5, 0.6)
    # gap closed of the means: random 0.95, teacher 0.5
    assert per["gap_closed"] == pytest.approx((0.95 - 0.55) / (0.95 - 0.5))
    assert rows["init"]["cer"]["gap_closed"] == pytest.approx((0.9 - 0.75) / (0.9 - 0.5))
    assert rows["teacher"]["per"]["gap_closed"] == pytest.approx(1.0)
    assert rows["random"]["per"]["gap_closed"] == pytest.approx(0.0)
    assert rows["a@5"]["cer"]["probe_final_train_loss"] == pytest.approx(2.5)


def test_goal_verdicts_match_hand_computation():
    settings = QualitySettings(config="x", variants={"a": {}, "b": {}}, seeds=[0, 1],
                               budgets=[5], eval_shards="t", probe_train_shards="p")
    results = {("teacher", 0): _result(0.2, 0.5), ("random", 0): _result(1.0, 0.9),
               ("init", 0): _result(0.4, 0.7),
               ("a@5", 0): _result(0.30, 0.6), ("a@5", 1): _result(0.32, 0.6),
               ("b@5", 0): _result(0.33, 0.6), ("b@5", 1): _result(0.41, 0.6)}
    goal = summarise(results, settings)["goal"]
    spread_a, spread_b = statistics.stdev([0.30, 0.32]), statistics.stdev([0.33, 0.41])
    a, b = goal["a@5"], goal["b@5"]
    assert a["ahead_of_init"] == pytest.approx(0.4 - 0.31) and a["beats_init"] is True
    assert a["seed_spread"] == pytest.approx(spread_a)
    # b: 0.37 is 0.03 ahead of the init, less than its spread of 0.057
    assert b["ahead_of_init"] == pytest.approx(0.03) and b["beats_init"] is False
    assert a["gap_closed"] == pytest.approx((1.0 - 0.31) / 0.8) and a["closes_goal_gap"] is True
    assert b["gap_closed"] == pytest.approx((1.0 - 0.37) / 0.8) and b["closes_goal_gap"] is False
    assert a["behind_best"] == 0 and a["level_with_best"] is True
    # b is 0.06 behind a, more than the larger spread (b's, 0.057)
    assert b["behind_best"] == pytest.approx(0.06) and 0.06 > spread_b
    assert b["level_with_best"] is False
    one_seed = QualitySettings(config="x", variants={"a": {}, "b": {}}, seeds=[0], budgets=[5],
                               eval_shards="t", probe_train_shards="p")
    goal = summarise({key: value for key, value in results.items() if key[1] == 0},
                     one_seed)["goal"]
    assert goal["a@5"]["beats_init"] is None and goal["b@5"]["level_with_best"] is None
    table = format_markdown(summarise(results, settings))
    assert "| b@5 | +0.030 | 0.057 | **no** | 0.79 | **no** | 0.060 | **no** |" in table
    # a row alone at its step is not judged level with itself
    alone = QualitySettings(config="x", variants={"b": {}}, seeds=[0, 1], budgets=[5],
                            eval_shards="t", probe_train_shards="p")
    only_b = {key: value for key, value in results.items() if not key[0].startswith("a@")}
    summary = summarise(only_b, alone)
    assert summary["goal"]["b@5"]["behind_best"] is None
    assert summary["goal"]["b@5"]["level_with_best"] is None
    assert "| b@5 | +0.030 | 0.057 | **no** | 0.79 | **no** | - | no other variant |" \
        in format_markdown(summary)


def test_runs_save_often_enough_to_resume_and_keep_every_budget():
    assert [save_interval(b) for b in ([3000], [250, 1000], [700], [1001], [100, 300])] \
        == [500, 250, 350, 143, 100]         # 1001 = 7 * 11 * 13: 143 is its largest <= 500
    settings = QualitySettings(config=str(CONFIG), variants={"a": {}}, seeds=[0],
                               budgets=[1000, 3000], eval_shards="t", probe_train_shards="p")
    run = run_configs(settings)["a", 0].run
    assert run.save_every == 500 and run.keep_checkpoints == 6     # steps 500, 1000, ..., 3000


def test_bad_settings_name_the_flag():
    common = dict(config="x", eval_shards="t", probe_train_shards="p")
    with pytest.raises(ConfigError, match="--budgets"):
        QualitySettings(variants={"a": {}}, seeds=[0], budgets=[10, 5], **common)
    with pytest.raises(ConfigError, match="--seeds"):
        QualitySettings(variants={"a": {}}, seeds=[1, 1], budgets=[5], **common)
    with pytest.raises(ConfigError, match="'init'"):
        QualitySettings(variants={"init": {}}, seeds=[0], budgets=[5], **common)


def test_probe_keeps_the_state_with_the_best_held_out_score():
    torch.manual_seed(0)
    features = [torch.randn(1, 12, 4) for _ in range(6)]
    targets = [torch.tensor([1, 2]) for _ in range(6)]
    scores = iter([0.5, 0.2, 0.9])              # checks at steps 3, 6 and 8 (the end)
    states = []

    def select(probe):
        assert not probe.training
        states.append({k: v.clone() for k, v in probe.state_dict().items()})
        return next(scores)

    config = ProbeConfig(steps=8, select_every=3, batch_size=2, lr=0.1, restarts=1)
    probe, losses, selection, _ = train_probe(features, targets, 2, config, select)
    assert selection == [(3, 0.5), (6, 0.2), (8, 0.9)] and len(losses) == 8
    assert not probe.training
    for key, value in probe.state_dict().items():       # the state scored 0.2, not the last
        assert torch.equal(value, states[1][key])
    assert not torch.equal(states[1]["out.weight"], states[2]["out.weight"])
    # without a selection split, the last state
    last, _, none, _ = train_probe(features, targets, 2,
                                   ProbeConfig(steps=8, batch_size=2, lr=0.1, restarts=1))
    assert none == [] and torch.equal(last.out.weight, states[2]["out.weight"])


def test_restarts_continue_the_probe_with_the_lowest_early_loss():
    """Against probes trained alone (restarts=1) from the restarts' seeds: the same early
    losses, and the chosen one continued is the same probe (no dropout: nothing else draws
    from the global generator)."""
    torch.manual_seed(0)
    features = [torch.randn(2, 10, 4) for _ in range(8)]
    targets = [torch.randint(1, 4, (3,)) for _ in range(8)]
    single = dict(batch_size=2, lr=0.05, dropout=0.0, restarts=1)
    early = [train_probe(features, targets, 3, ProbeConfig(steps=6, seed=3 + r, **single))
             for r in range(3)]                  # seeds seed * restarts + r, seed 1
    means = [sum(run.losses[3:]) / 3 for run in early]
    chosen = min(range(3), key=means.__getitem__)
    alone = train_probe(features, targets, 3, ProbeConfig(steps=20, seed=3 + chosen, **single))
    restarted = train_probe(features, targets, 3, ProbeConfig(
        steps=20, seed=1, batch_size=2, lr=0.05, dropout=0.0, restarts=3, restart_steps=6))
    assert restarted.restart_losses == pytest.approx(means)
    assert restarted.losses == pytest.approx(alone.losses)
    assert torch.equal(restarted.probe.out.weight, alone.probe.out.weight)
    assert len(set(means)) == 3            # the choice was not a tie
    with pytest.raises(ValueError, match="restart_steps"):
        ProbeConfig(steps=20, restarts=2, restart_steps=0)


def test_protocol_end_to_end_then_a_rerun_does_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    teacher, train, heldout = tiny_teacher_and_shards(tmp_path)
    variants = tmp_path / "variants.yaml"
    variants.write_text("colld_all: {objective.anchor_frames: all}\nl2l: {objective.name: l2l}\n")
    out = tmp_path / "quality"
    argv = ["--config", str(CONFIG), "--variants", str(variants), "--seeds", "0,1",
            "--budgets", "2,4", "--eval_shards", heldout, "--probe_train_shards", train,
            "--probe_dev_shards", heldout, "--out_dir", str(out), "--ranks", "1",
            "--probe_steps", "6", "--probe_select_every", "3", "--probe_restarts", "1",
            "--teacher.path", teacher, "--data.train_shards", train, "--optim.warmup_steps", "1",
            "--data.num_workers", "0", "--teacher_layer_sets", "2;1,3"]
    summary = main(argv)
    rows = summary["rows"]
    assert set(rows) == {"teacher", "random", "init", "teacher[2]", "teacher[1,3]",
                         "colld_all@2", "colld_all@4", "l2l@2", "l2l@4"}
    for name in ("colld_all", "l2l"):
        for seed in (0, 1):
            run = out / name / f"seed{seed}"
            assert (run / "checkpoints" / "step00000002" / "complete.json").is_file()
            assert (run / "checkpoints" / "step00000004" / "complete.json").is_file()
            config = (run / "config.yaml").read_text()
            assert f"seed: {seed}" in config
            probed = json.loads((out / "probe" / f"{name}@4" / f"seed{seed}.json").read_text())
            assert probed["rates"]["per"]["overall"] == \
                rows[f"{name}@4"]["per"]["per_seed"][str(seed)]
            assert [step for step, _ in probed["selection"]["per"]] == [3, 6]
    assert "anchor_frames: all" in (out / "colld_all" / "seed0" / "config.yaml").read_text()
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (out / name).stat().st_size > 0
    markdown = (out / "quality.md").read_text()
    assert "| init | 0 |" in markdown and "| l2l | 4 |" in markdown
    assert "| teacher[1,3] | - |" in markdown
    assert [len(weights) for weights in (summary["probe_layer_weights"]["rows"][row]["per"]
                                         for row in ("teacher[2]", "teacher[1,3]"))] == [1, 2]
    assert "## Probe convergence (seed 0)" in markdown
    weights = summary["probe_layer_weights"]
    probed = json.loads((out / "probe" / "l2l@4" / "seed0.json").read_text())
    assert weights["seed"] == 0 and weights["rows"]["l2l@4"] == probed["layer_weights"]
    assert len(weights["rows"]["init"]["per"]) == 2                    # the student's 2 layers
    assert sum(weights["rows"]["teacher"]["cer"]) == pytest.approx(1)
    teacher_per = " ".join(f"{w:.2f}" for w in weights["rows"]["teacher"]["per"])
    assert f"| teacher | {teacher_per} |" in markdown
    capfd.readouterr()

    probes = {p: p.stat().st_mtime_ns for p in (out / "probe").rglob("*.json")}
    again = main(argv)
    log = capfd.readouterr().out
    assert log.count("training skipped") == 4 and "[quality] probe" not in log
    assert {p: p.stat().st_mtime_ns for p in (out / "probe").rglob("*.json")} == probes
    assert again["rows"] == rows


def test_probe_restarts_benchmark_plumbing(tmp_path, monkeypatch, capfd):
    """benchmarks/probe_restarts.py on the tiny teacher: one row per (restarts, seed), the
    restart losses only where there were restarts, both files written, and a re-run with one
    more seed probes only that seed's rows."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    teacher, train, heldout = tiny_teacher_and_shards(tmp_path)
    out = tmp_path / "restarts"

    def run(seeds):
        return probe_restarts([
            "--config", str(CONFIG), "--probe_train_shards", f"{train}/*.tar",
            "--probe_dev_shards", f"{heldout}/*.tar", "--eval_shards", f"{heldout}/*.tar",
            "--seeds", seeds, "--restarts", "1,2", "--probe_steps", "4", "--out", str(out),
            "--teacher.path", teacher, "--data.train_shards", train])

    report = run("0,1")
    assert [(r["restarts"], r["seed"]) for r in report["rows"]] == [(1, 0), (1, 1), (2, 0),
                                                                     (2, 1)]
    assert all(len(r["restart_losses"]["per"]) == (2 if r["restarts"] == 2 else 0)
               for r in report["rows"])
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == report["rows"]
    assert "| 2 | 1 |" in out.with_suffix(".md").read_text()
    capfd.readouterr()
    again = run("0,1,2")
    probed = [json.loads(line) for line in capfd.readouterr().out.splitlines()
              if line.startswith("{")]
    assert [(r["restarts"], r["seed"]) for r in probed] == [(1, 2), (2, 2)]
    assert [r for r in again["rows"] if r["seed"] < 2] == report["rows"]
    assert [(r["restarts"], r["seed"]) for r in again["rows"]] == [
        (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


def test_teacher_with_layers_returns_those_layers_of_the_full_forward(tmp_path):
    teacher_dir, train, _ = tiny_teacher_and_shards(tmp_path)
    teacher = load_teacher(teacher_dir, [1])
    wave = torch.randn(2, 8000)
    wave_lengths = torch.tensor([8000, 6000])
    full = with_layers(teacher)(wave, wave_lengths).features
    subset = with_layers(teacher, [3, 1])(wave, wave_lengths).features
    assert len(full) == teacher.num_layers and len(subset) == 2
    torch.testing.assert_close(subset[0], full[2])
    torch.testing.assert_close(subset[1], full[0])
    with pytest.raises(ValueError, match=f"1..{teacher.num_layers}"):
        with_layers(teacher, [teacher.num_layers + 1])


def test_quality_corpus_mixes_equal_shards_without_the_utterances_too_long(tmp_path, capsys):
    """benchmarks/quality_corpus.py's shard mix: 11 utterances of 1-3 s, those over 2 s left out
    and listed, the rest cut to a multiple of 3 shards, members copied byte for byte."""
    utterances = list(generate_utterances(11, seed=3))
    write_audio_shards(iter(utterances), str(tmp_path / "corpus"), max_count=6, progress=False)
    long = {u["utt_id"] for u in utterances if len(u["wave"]) > 2.0 * 16000}
    assert 0 < len(long) < 8
    shards = mixed_shards(tmp_path / "corpus", tmp_path / "shards", 3, 2.0, seed=0)
    per_shard = (11 - len(long)) // 3
    counts = [sum(1 for _ in read_samples([shard])) for shard in shards]
    assert counts == [per_shard] * 3
    originals = {s["__key__"]: s for s in read_samples(sorted(
        map(str, (tmp_path / "corpus").glob("train-*.tar"))))}
    for sample in read_samples(shards):
        assert sample["__key__"] not in long
        assert sample["flac"] == originals[sample["__key__"]]["flac"]
    printed = capsys.readouterr().out
    assert f"left out: {len(long)} longer than 2 s" in printed
    assert all(utt_id in printed for utt_id in long)
