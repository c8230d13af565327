"""Fidelity metrics (linear CKA, cosine per pair), training curves and ``colld eval`` end to end
(with and without the CTC probe)."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from colld_ds import cli
from colld_ds.config import load_config
from colld_ds.distill import fresh_model
from colld_ds.evaluate import (EvalBatch, FidelityAccumulator, Moments, cka_from_moments,
                               eval_batches, fidelity, linear_cka, read_loss_curves)
from colld_ds.formats import SAMPLE_RATE
from colld_ds.layer_map import LayerPair
from colld_ds.models import load_teacher
from colld_ds.report import FidelityReport
from colld_ds.trained import torch_threads
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards


def test_cka_of_itself_and_of_a_rotation_is_one_and_of_noise_is_small():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 3.0 * x + 5.0) == pytest.approx(1.0, abs=1e-9)   # scale and shift
    assert linear_cka(x, torch.randn(2000, 8, generator=generator)) < 0.05
    # Not 1 for a non-orthogonal, non-isotropic map of x.
    assert linear_cka(x, x * torch.linspace(0.01, 10, 16)) < 0.99


def test_streamed_cka_equals_the_one_shot_value():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=generator)
    y = x[:, :4] ** 2 + 0.5 * torch.randn(300, 4, generator=generator)
    mx, my, cross = Moments(), Moments(), torch.zeros(6, 4, dtype=torch.float64)
    for rows in torch.split(torch.arange(300), 37):
        mx.add(x[rows])
        my.add(y[rows])
        cross += x[rows].double().T @ y[rows].double()
    assert cka_from_moments(mx, my, cross) == pytest.approx(linear_cka(x, y), abs=1e-12)
    # The Gram-matrix form of Kornblith et al.: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
    h = torch.eye(300, dtype=torch.float64) - 1.0 / 300
    k, l_ = h @ x.double() @ x.double().T @ h, h @ y.double() @ y.double().T @ h
    gram_form = (k * l_).sum() / torch.sqrt((k * k).sum() * (l_ * l_).sum())
    assert linear_cka(x, y) == pytest.approx(float(gram_form), abs=1e-10)


def test_a_student_that_is_the_teacher_scores_above_random(trained_run):
    teacher = load_teacher(trained_run["teacher"], [1, 2, 3, 4])
    config = load_config(None, {"teacher.path": trained_run["teacher"], "data.train_shards": "x",
                                "student.num_layers": 2, "objective.target_norm": "none"})
    pairs = [LayerPair(1, 1), LayerPair(2, 2)]
    copy = fresh_model(config, teacher, pairs, [1, 2])      # student layer k = teacher layer k
    with torch.no_grad():
        for head in copy.objective.heads.values():           # identity projection
            head.weight.copy_(torch.eye(head.weight.shape[0]))
            head.bias.zero_()
    random = fresh_model(config, teacher, pairs, None, random_front_end=True)
    batches = list(eval_batches(trained_run["heldout"], batch_size=4))
    assert [b.wave.shape[0] for b in batches] == [4, 2]      # every utterance, tail included
    with torch_threads(1):
        result = fidelity({"copy": copy, "random": random}, teacher, pairs, batches)["models"]
    for name in ("s1_t1", "s2_t2"):
        assert result["copy"].cosine[name] == pytest.approx(1.0, abs=1e-5)
        assert result["copy"].cka_pairs[name] == pytest.approx(1.0, abs=1e-6)
        assert result["random"].cosine[name] < 0.5
        assert result["random"].cka_pairs[name] < result["copy"].cka_pairs[name] - 0.3
    assert len(result["copy"].cka) == 2 and len(result["copy"].cka[0]) == 4


def test_each_model_is_scored_against_its_own_normalised_targets(trained_run):
    """``target_norm: utterance_position``: two copies of the teacher's layers with identity
    heads, one with a position mean of 0 and one of 2; each one's cosine is to its own targets
    (numpy: each utterance standardised per dimension, minus the mean), averaged over frames."""
    teacher = load_teacher(trained_run["teacher"], [1, 2, 3, 4])
    config = load_config(None, {"teacher.path": trained_run["teacher"], "data.train_shards": "x",
                                "student.num_layers": 2,
                                "objective.target_norm": "utterance_position"})
    pairs = [LayerPair(1, 1), LayerPair(2, 2)]
    shifts = {"zero": 0.0, "two": 2.0}
    models = {}
    for name, shift in shifts.items():
        models[name] = fresh_model(config, teacher, pairs, [1, 2])
        with torch.no_grad():
            for head in models[name].objective.heads.values():
                head.weight.copy_(torch.eye(head.weight.shape[0]))
                head.bias.zero_()
        models[name].objective.position_mean.fill_(shift)
    batches = list(eval_batches(trained_run["heldout"], batch_size=4))
    with torch_threads(1):
        result = fidelity(models, teacher, pairs, batches)["models"]
        outputs = [teacher(b.wave, b.wave_lengths) for b in batches]
    for name, shift in shifts.items():
        for layer in (1, 2):
            cosines = []
            for output in outputs:
                for b, length in enumerate(output.frame_lengths.tolist()):
                    x = output.features[layer - 1][b, :length].double().numpy()
                    target = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) - shift
                    cosines += list((x * target).sum(1) / np.linalg.norm(x, axis=1)
                                    / np.linalg.norm(target, axis=1))
            assert result[name].cosine[f"s{layer}_t{layer}"] == pytest.approx(
                np.mean(cosines), abs=1e-4)
    assert abs(result["zero"].cosine["s1_t1"] - result["two"].cosine["s1_t1"]) > 0.01


def test_eval_command_writes_table_json_and_heatmap(trained_run, tmp_path, capsys):
    cli.eval(str(trained_run["root"] / "run"), trained_run["heldout"], out_dir=str(tmp_path),
             threads=1)
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert set(report["models"]) == {"trained", "random", "init"}
    assert FidelityReport.from_json(report).to_json() == report          # the typed report
    assert report["utterances"] == 6 and report["frames"] > 100
    for values in report["models"].values():
        assert set(values["cosine"]) == {"s1_t2", "s2_t4"}
        assert len(values["cka"]) == 2 and len(values["cka"][0]) == 4
        assert all(-1e-9 <= v <= 1 + 1e-9 for row in values["cka"] for v in row
                   if not math.isnan(v))
    assert report["models"]["trained"]["cka_pairs"]["s2_t4"] > \
        report["models"]["random"]["cka_pairs"]["s2_t4"]
    assert report["student"]["parameters"] < report["teacher"]["parameters"]
    assert report["student"]["rtf"] > 0 and report["teacher"]["rtf"] > 0
    assert (tmp_path / "fidelity_cka.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "fidelity.md").read_text()
    assert "| trained |" in markdown and "| random |" in markdown and markdown in printed
    assert "| teacher | 4 |" in markdown and "1 (itself)" in markdown
    # No probe-training split: no probe section in the JSON, and the report says why.
    assert "probe" not in report and "No probe: no probe-training split given" in markdown
    # The run's TensorBoard curves: its one logged step (3), plotted.
    assert report["loss_curves"]["source"].startswith("TensorBoard events in")
    assert set(report["loss_curves"]["final"]) >= {"loss/total", "loss/s1_t2", "acc/s2_t4"}
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "![loss curves](loss_curves.png)" in markdown
    assert not list(tmp_path.glob("*.tmp")) + list(tmp_path.glob(".*.tmp"))


def test_eval_with_a_probe_split_writes_per_and_cer_per_language(trained_run, tmp_path):
    # Generated audio with made-up CV-syllable phones and text, in two languages.
    write_audio_shards(generate_utterances(8, seed=3, langs=("aa", "bb")),
                       str(tmp_path / "dev"), prefix="dev", progress=False)
    write_audio_shards(generate_utterances(6, seed=4, langs=("aa", "bb")),
                       str(tmp_path / "test"), prefix="test", progress=False)
    out = tmp_path / "eval"
    cli.eval(str(trained_run["root"] / "run"), str(tmp_path / "test"), out_dir=str(out), threads=1,
             probe_train_shards=str(tmp_path / "dev"), probe_steps=20)
    report = json.loads((out / "fidelity.json").read_text())
    probe = report["probe"]
    assert set(probe) == {"train_shards", "steps", "languages", "models"}
    assert probe["train_shards"] == str(tmp_path / "dev") and probe["steps"] == 20
    assert probe["languages"] == ["aa", "bb"]
    assert list(probe["models"]) == ["teacher", "trained", "random", "init"]
    for rates in probe["models"].values():
        assert set(rates) == {"per", "cer"}
        for task in ("per", "cer"):
            assert set(rates[task]) == {"overall", "aa", "bb"}
            assert all(0 <= v < 10 and not math.isnan(v) for v in rates[task].values())
            low, high = sorted([rates[task]["aa"], rates[task]["bb"]])
            assert low - 1e-12 <= rates[task]["overall"] <= high + 1e-12   # a pooled rate
    details = report["probe_details"]
    assert details["test_utterances"] == {"aa": 3, "bb": 3}
    assert len(details["layer_weights"]["teacher"]["per"]) == 4
    assert len(details["layer_weights"]["trained"]["cer"]) == 2
    assert sum(details["layer_weights"]["random"]["per"]) == pytest.approx(1.0)
    assert (out / "probe_per_language.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "fidelity.md").read_text()
    assert "**PER (%)**" in markdown and "| model | overall | aa | bb |" in markdown
    assert "![PER and CER per language](probe_per_language.png)" in markdown


def test_loss_curves_from_tensorboard_after_a_resume_and_from_jsonl(tmp_path):
    for steps, losses in (([1, 2, 3], [3.0, 2.0, 1.0]), ([3, 4], [0.5, 0.25])):  # resumed at 2
        writer = SummaryWriter(str(tmp_path / "run" / "tb"))
        for step, loss in zip(steps, losses):
            writer.add_scalar("loss/total", loss, step)
            writer.add_scalar("acc/s1_t2", 1 / loss, step)
            writer.add_scalar("train/lr", 0.1, step)
        writer.close()
    curves, source = read_loss_curves(tmp_path / "run")
    assert source == f"TensorBoard events in {tmp_path / 'run' / 'tb'}"
    assert set(curves) == {"loss/total", "acc/s1_t2"}
    assert curves["loss/total"] == ([1, 2, 3, 4], [3.0, 2.0, 0.5, 0.25])
    assert curves["acc/s1_t2"][1] == pytest.approx([1 / 3, 0.5, 2.0, 4.0])

    rows = [{"step": 5, "loss/total": 2.0, "cos/s1_t1": 0.5, "lr": 1.0},
            {"step": 10, "loss/total": 1.5, "cos/s1_t1": 0.75, "lr": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curves, source = read_loss_curves(tmp_path)
    assert source == str(tmp_path / "metrics.jsonl")
    assert curves == {"cos/s1_t1": ([5, 10], [0.5, 0.75]), "loss/total": ([5, 10], [2.0, 1.5])}
    assert read_loss_curves(tmp_path / "nothing") == (
        {}, f"no training logs found in {tmp_path / 'nothing'} (tb/ or metrics.jsonl)")


def test_fidelity_refuses_a_teacher_without_all_layers(trained_run):
    teacher = load_teacher(trained_run["teacher"], [2, 4])
    with pytest.raises(ValueError, match="all its layers"):
        silence = EvalBatch(torch.zeros(1, SAMPLE_RATE), torch.tensor([SAMPLE_RATE]))
        fidelity({}, teacher, [], [silence])


def test_head_cosine_is_to_what_the_heads_were_trained_on():
    torch.manual_seed(0)
    teacher = torch.randn(20, 4) + 3.0
    normalised = (teacher - teacher.mean(0)) / teacher.std(0, unbiased=False)
    student = torch.randn(20, 4)
    plain, with_norm = (FidelityAccumulator([LayerPair(1, 1)]),
                        FidelityAccumulator([LayerPair(1, 1)]))
    plain.add([student], {"s1_t1": normalised}, [teacher])
    with_norm.add([student], {"s1_t1": normalised}, [teacher], head_targets=[normalised])
    moments = Moments()
    moments.add(teacher)
    assert with_norm.result([moments]).cosine["s1_t1"] == pytest.approx(1.0)
    assert plain.result([moments]).cosine["s1_t1"] < 0.5
    # CKA reads the states themselves, whatever the heads' targets
    assert with_norm.result([moments]).cka == plain.result([moments]).cka
