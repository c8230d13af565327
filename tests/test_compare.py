"""``colld compare``: the table and its gaps on hand-made reports, and the command end to end
(three objectives on a tiny teacher, one process each, then a re-run that trains nothing and
one that resumes an interrupted run)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from colld_ds.compare import (CompareSettings, RunOutcome, build_table, check_earlier_run, compare,
                              final_training_loss, format_markdown, objective_configs)
from colld_ds.config import ConfigError
from colld_ds.report import ModelFidelity
from helpers import fidelity_report, tiny_teacher_and_shards

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"


def report(pairs, trained, random, probe=None, init=None):
    """A hand-made eval report: ``trained``/``random``/``init`` map pair -> (cosine, CKA)."""
    def model(values):
        return ModelFidelity({p: values[p][0] for p in pairs}, {p: values[p][1] for p in pairs},
                             cka=[])

    probe = probe and {"train_shards": "dev", "steps": 50, "languages": ["en", "de"],
                       "models": probe}
    return fidelity_report(pairs, {"trained": model(trained), "random": model(random),
                                   "init": model(init or random)}, probe=probe)


def rates(per, cer):
    """PER and CER as {"overall", "en", "de"} from two (overall, en, de) triples."""
    return {"per": dict(zip(["overall", "en", "de"], per)),
            "cer": dict(zip(["overall", "en", "de"], cer))}


LAYERWISE = ["s1_t2", "s2_t4"]
LAST_LAYER = ["s2_t2", "s2_t4"]
RANDOM_PROBE = rates((0.9, 0.8, 1.0), (0.6, 0.5, 0.7))
TEACHER_PROBE = rates((0.3, 0.4, 0.5), (0.2, 0.5, 0.1))


def hand_made_outcomes():
    floor = {"s1_t2": (0.1, 0.5), "s2_t4": (-0.1, 0.3)}          # means: cos 0.0, CKA 0.4
    return {
        "colld": RunOutcome(final_loss=2.5, report=report(
            LAYERWISE, {"s1_t2": (0.6, 0.9), "s2_t4": (0.8, 0.7)}, floor,
            {"trained": rates((0.45, 0.5, 0.9), (0.4, 0.5, 0.3)), "random": RANDOM_PROBE,
             "teacher": TEACHER_PROBE, "init": rates((0.7, 0.6, 0.8), (0.5, 0.5, 0.5))},
            init={"s1_t2": (0.2, 0.7), "s2_t4": (0.0, 0.7)})),
        "l2l": RunOutcome(final_loss=0.7, report=report(
            LAYERWISE, {"s1_t2": (0.5, 0.55), "s2_t4": (0.5, 0.55)}, floor,
            {"trained": rates((0.6, 0.6, 0.75), (0.6, 0.45, 0.4)), "random": RANDOM_PROBE,
             "teacher": TEACHER_PROBE})),
        "distilhubert": RunOutcome(final_loss=None, report=report(
            LAST_LAYER, {"s2_t2": (0.6, 0.8), "s2_t4": (0.6, 0.6)},
            {"s2_t2": (0.2, 0.3), "s2_t4": (0.2, 0.3)},
            {"trained": rates((0.9, 0.8, 1.0), (0.6, 0.5, 0.7)), "random": RANDOM_PROBE,
             "teacher": TEACHER_PROBE})),
    }


def test_table_gaps_match_hand_computation():
    table = build_table(hand_made_outcomes(), {"Seed": "0"}, "colld compare --config x.yaml")
    rows = {}
    for row in table["rows"]:
        rows.setdefault(row["row"], []).append(row)
    assert [r["row"] for r in table["rows"]] == ["colld", "l2l", "distilhubert", "init",
                                                 "init", "random", "random", "teacher"]
    colld, l2l, hubert = rows["colld"][0], rows["l2l"][0], rows["distilhubert"][0]
    # colld: cosine mean 0.7 over a floor of 0.0 -> 0.7; CKA 0.8 over 0.4 -> 0.4 / 0.6.
    assert colld["cosine"] == pytest.approx(0.7) and colld["cka"] == pytest.approx(0.8)
    assert colld["gap_closed"]["cosine"] == pytest.approx(0.7)
    assert colld["gap_closed"]["cka"] == pytest.approx(2 / 3)
    assert l2l["gap_closed"]["cosine"] == pytest.approx(0.5)
    assert l2l["gap_closed"]["cka"] == pytest.approx(0.25)
    # distilhubert has its own floor (its heads sit on the last layer): cos 0.2, CKA 0.3.
    assert hubert["gap_closed"]["cosine"] == pytest.approx(0.4 / 0.8)
    assert hubert["gap_closed"]["cka"] == pytest.approx(0.4 / 0.7)
    floors = {tuple(r["pairs"]): r for r in rows["random"]}
    assert floors[tuple(LAYERWISE)]["floor_of"] == ["colld", "l2l"]
    assert floors[tuple(LAST_LAYER)]["floor_of"] == ["distilhubert"]
    assert floors[tuple(LAST_LAYER)]["cosine"] == pytest.approx(0.2)
    # init (step 0), layer-wise layout: cosine 0.1, CKA 0.7 -> gaps 0.1 and 0.3 / 0.6.
    start = rows["init"][0]
    assert start["pairs"] == LAYERWISE and start["cka"] == pytest.approx(0.7)
    assert start["gap_closed"]["cosine"] == pytest.approx(0.1)
    assert start["gap_closed"]["cka"] == pytest.approx(0.5)
    assert rows["init"][1]["gap_closed"]["cosine"] == pytest.approx(0.0)   # init = random
    # Error rates: (random - student) / (random - teacher).
    assert colld["gap_closed"]["per"]["overall"] == pytest.approx((0.9 - 0.45) / 0.6)
    assert colld["gap_closed"]["per"]["en"] == pytest.approx(0.3 / 0.4)
    assert colld["gap_closed"]["per"]["de"] == pytest.approx(0.1 / 0.5)
    assert colld["gap_closed"]["cer"]["overall"] == pytest.approx(0.2 / 0.4)
    assert colld["gap_closed"]["cer"]["en"] is None          # random == teacher: undefined
    assert colld["gap_closed"]["cer"]["de"] == pytest.approx(0.4 / 0.6)
    assert l2l["gap_closed"]["per"]["de"] == pytest.approx(0.25 / 0.5)
    assert hubert["gap_closed"]["per"]["overall"] == pytest.approx(0.0)
    teacher = rows["teacher"][0]
    assert (teacher["cosine"], teacher["cka"], teacher["parameters"]) == (1.0, 1.0, 5000)
    assert teacher["per"]["en"] == 0.4 and rows["random"][0]["cer"]["de"] == 0.7
    assert table["languages"] == ["en", "de"]

    markdown = format_markdown(table)
    assert "| colld | 1,000 | s1_t2, s2_t4 | 0.700 | 0.800 | 0.70 | 0.67 | 2.5000 |" in markdown
    assert "| distilhubert | 1,000 | s2_t2, s2_t4 | 0.600 | 0.700 | 0.50 | 0.57 | n/a |" \
        in markdown
    assert "| teacher | 5,000 | - | 1.000 | 1.000 | 1.00 | 1.00 | n/a |" in markdown
    assert "| init | 1,000 | s1_t2, s2_t4 | 0.100 | 0.700 | 0.10 | 0.50 | n/a |" in markdown
    assert "## Probe PER" in markdown and "## Probe CER" in markdown
    assert "| colld | 0.450 (0.75) | 0.500 (0.75) | 0.900 (0.20) |" in markdown
    assert "| colld | 0.400 (0.50) | 0.500 (n/a) | 0.300 (0.67) |" in markdown
    probe_part = markdown.split("## Probe PER")[1].split("## Probe CER")[0]
    # init's probe (colld's report only): (random - init) / (random - teacher) per language
    assert "| init | 0.700 (0.33) | 0.600 (0.50) | 0.800 (0.40) |" in probe_part
    assert probe_part.count("| init |") == 1
    assert probe_part.count("| random |") == 1 and "| teacher | 0.300 | 0.400 | 0.500 |" \
        in probe_part
    assert "Made by: `colld compare --config x.yaml`" in markdown and "- Seed: 0" in markdown
    assert "teacher ceiling is 1 by definition" in markdown


def test_table_without_probe_has_no_probe_section():
    outcomes = hand_made_outcomes()
    for outcome in outcomes.values():
        outcome.report.probe = None
        outcome.report.probe_skipped = "no probe-training split given"
    table = build_table(outcomes)
    assert table["probe"] is None and all("per" not in row for row in table["rows"])
    markdown = format_markdown(table)
    assert "## Probe" not in markdown and "- No probe: no probe-training split given" in markdown


def test_final_loss_is_the_last_row_logged_at_the_last_step(tmp_path):
    rows = [{"step": 3, "loss/total": 3.0}, {"step": 6, "loss/total": 2.0},   # killed run
            {"step": 4, "loss/total": 2.9}, {"step": 6, "loss/total": 1.5}]   # resumed
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert final_training_loss(tmp_path, 6) == 1.5
    assert final_training_loss(tmp_path, 7) is None
    assert final_training_loss(tmp_path / "absent", 6) is None


def test_bad_settings_name_the_flag():
    with pytest.raises(ConfigError, match="--objectives.*'mse'"):
        CompareSettings(config="x", eval_shards="y", objectives="colld,mse")
    with pytest.raises(ConfigError, match="--objectives"):
        CompareSettings(config="x", eval_shards="y", objectives=("l2l", "l2l"))
    with pytest.raises(ConfigError, match="--objective.name.*--objectives"):
        CompareSettings(config="x", eval_shards="y", overrides={"objective.name": "l2l"})
    with pytest.raises(ConfigError, match="--ranks"):
        CompareSettings(config="x", eval_shards="y", ranks=0)
    with pytest.raises(ConfigError, match="--probe_steps.*--probe_train_shards"):
        CompareSettings(config="x", eval_shards="y", probe_steps=20)


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    teacher, train, heldout = tiny_teacher_and_shards(root)
    return {"root": root, "teacher": teacher, "train": train, "heldout": heldout}


def _overrides(assets):
    return {"teacher.path": assets["teacher"], "data.train_shards": assets["train"],
            "optim.max_steps": 6, "optim.warmup_steps": 1, "run.save_every": 3,
            "run.log_every": 1, "data.num_workers": 0}


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns
            for p in sorted(directory.rglob("*")) if p.is_file() and "checkpoints" in p.parts}


def test_compare_three_objectives_on_equal_terms_then_skip_then_resume(assets, capfd,
                                                                      monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")          # the training processes: 2 shared cores
    out = assets["root"] / "out"
    settings = CompareSettings(config=str(CONFIG), eval_shards=assets["heldout"],
                               out_dir=str(out), ranks=1, overrides=_overrides(assets))
    table = compare(settings)
    first_log = capfd.readouterr().out

    # The three runs differ only in the objective (and where they write).
    resolved = {name: yaml.safe_load((out / name / "config.yaml").read_text())
                for name in ("colld", "l2l", "distilhubert")}
    for name, config in resolved.items():
        assert config["objective"]["name"] == name
        assert config["run"]["out_dir"] == str((out / name).resolve())
        assert (out / name / "checkpoints" / "step00000006" / "complete.json").is_file()
    shared = {name: {**config, "objective": None, "run": {**config["run"], "out_dir": None}}
              for name, config in resolved.items()}
    assert shared["colld"] == shared["l2l"] == shared["distilhubert"]
    assert resolved["colld"]["run"]["seed"] == 0 and resolved["colld"]["optim"]["max_steps"] == 6
    assert resolved["colld"]["student"]["num_layers"] == 2
    assert resolved["colld"]["layer_map"]["teacher_layers"] == [[2], [4]]

    # Every row, each run's own pairs, values from its eval report and metrics.
    rows = {row["row"]: row for row in table["rows"]}
    assert [row["row"] for row in table["rows"]] == ["colld", "l2l", "distilhubert", "init",
                                                     "init", "random", "random", "teacher"]
    assert rows["distilhubert"]["pairs"] == ["s2_t2", "s2_t4"]
    assert rows["colld"]["pairs"] == rows["l2l"]["pairs"] == ["s1_t2", "s2_t4"]
    for name in ("colld", "l2l", "distilhubert"):
        fidelity = json.loads((out / name / "eval" / "fidelity.json").read_text())
        cosines = fidelity["models"]["trained"]["cosine"]
        assert rows[name]["cosine"] == pytest.approx(sum(cosines.values()) / len(cosines))
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
        assert rows[name]["final_loss"] == metrics[-1]["loss/total"] and metrics[-1]["step"] == 6
        assert rows[name]["parameters"] == rows["random"]["parameters"] < \
            rows["teacher"]["parameters"]
    # colld and l2l share one random floor: the same random student and heads, evaluated alike.
    colld_floor = json.loads((out / "colld" / "eval" / "fidelity.json").read_text())
    l2l_floor = json.loads((out / "l2l" / "eval" / "fidelity.json").read_text())
    assert colld_floor["models"]["random"]["cosine"] == \
        pytest.approx(l2l_floor["models"]["random"]["cosine"], abs=1e-6)
    written = json.loads((out / "compare.json").read_text())
    assert [row["row"] for row in written["rows"]] == [row["row"] for row in table["rows"]]
    markdown = (out / "compare.md").read_text()
    assert markdown in first_log and "| distilhubert |" in markdown
    assert "Steps: 6" in markdown and "Seed: 0" in markdown and "--ranks 1" in markdown
    assert not list(out.glob(".*.tmp"))

    # A second invocation, through the CLI: nothing trained, nothing evaluated again.
    before = _files(out)
    command = [sys.executable, "-m", "colld_ds.cli", "compare", "--config", str(CONFIG),
               "--eval_shards", assets["heldout"], "--out_dir", str(out), "--ranks", "1"]
    for key, value in _overrides(assets).items():
        command += [f"--{key}", str(value)]
    started = time.perf_counter()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "RANK"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("training skipped") == 3
    assert again.stdout.count("reused") == 3
    assert _files(out) == before
    assert json.loads((out / "compare.json").read_text())["rows"] == written["rows"]
    assert time.perf_counter() - started < 60

    # An interrupted run (its final checkpoint never written) is resumed, and only it.
    final = out / "l2l" / "checkpoints" / "step00000006"
    shutil.rmtree(final)
    resumed = compare(settings)
    log = capfd.readouterr().out
    assert "l2l: resuming from step00000003" in log and log.count("training skipped") == 2
    assert (final / "complete.json").is_file()
    resumed_rows = {row["row"]: row for row in resumed["rows"]}
    assert resumed_rows["l2l"]["final_loss"] == pytest.approx(rows["l2l"]["final_loss"],
                                                              rel=1e-4)
    assert resumed_rows["colld"] == rows["colld"]


def test_a_run_started_with_other_settings_is_refused(assets, tmp_path):
    settings = CompareSettings(config=str(CONFIG), eval_shards=assets["heldout"],
                               out_dir=str(tmp_path), objectives="l2l",
                               overrides=_overrides(assets))
    config = objective_configs(settings)["l2l"]
    (tmp_path / "l2l").mkdir()
    earlier = config.to_dict()
    earlier["run"]["seed"] = 7
    (tmp_path / "l2l" / "config.yaml").write_text(yaml.safe_dump(earlier))
    with pytest.raises(ConfigError, match=r"config.yaml: .*run.seed: 7 there, 0 now.*--out_dir"):
        check_earlier_run(config)
    earlier["run"]["seed"] = 0
    earlier["run"]["resume"] = "none"              # compare's own fields do not count
    earlier["run"]["save_every"] = 1               # nor how often a run saves or logs
    earlier["run"]["log_every"] = 2
    earlier["objective"]["temperature"] = 0.7      # nor what l2l never reads
    (tmp_path / "l2l" / "config.yaml").write_text(yaml.safe_dump(earlier))
    check_earlier_run(config)
    # a run written before a field existed: the missing field is its default, not a difference
    del earlier["objective"]["target_norm"]
    (tmp_path / "l2l" / "config.yaml").write_text(yaml.safe_dump(earlier))
    check_earlier_run(config)
    config.objective.target_norm = "none"
    with pytest.raises(ConfigError, match="objective.target_norm: 'utterance' there, 'none' now"):
        check_earlier_run(config)
