"""`colld demo`: the tiny-teacher smoke run through the real CLI (2 CPU ranks), and the pieces of
the Whisper demo that run without Whisper (re-sharding, window check, corpus flags)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from colld_ds.checkpoint import complete_checkpoints
from colld_ds.data import read_samples, shard_infos
from colld_ds.config import ConfigError
from colld_ds.demo import (_check_cached_layers, _mix_shards, _print_fidelity,
                           _synthesise)
from colld_ds.report import ModelFidelity
from colld_ds.data_prep.cache import check_fits_window
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards, write_shards
from helpers import fidelity_report

REPO = Path(__file__).resolve().parent.parent


def _demo(out_dir, *flags, ok=True):
    command = [sys.executable, "-m", "colld_ds.cli", "demo", "--teacher", "tiny", "--out_dir",
               str(out_dir), "--steps", "4", "--num_utterances", "16", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLLD_PYTHON=sys.executable))
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout if ok else done.stderr


def test_tiny_demo_runs_end_to_end_then_skips_every_stage(tmp_path):
    first = _demo(tmp_path)
    for stage in ("generated audio shards", "tiny wav2vec2 teacher", "CoLLD distillation"):
        assert f"{stage}" in first and "exists, skipped" not in first
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in checkpoints] == ["step00000004"]
    assert f"checkpoint:      {checkpoints[0]}" in first
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert rows[-1]["step"] == 4 and math.isfinite(rows[-1]["loss/total"])
    second = _demo(tmp_path)
    assert second.count("exists, skipped") == 3 and "running" not in second
    assert "step 4" in second        # the summary is printed from the existing run
    # other settings (an upgraded config, a flag) are refused, not skipped to the old run
    refused = _demo(tmp_path, "--objective.temperature", "0.5", ok=False)
    assert f"{tmp_path / 'run' / 'config.yaml'}: that run was started with other settings" in (
        refused) and "objective.temperature" in refused


def test_a_cache_of_other_teacher_layers_is_refused(tmp_path):
    """The Whisper demo's cache stage, its shards there: made for another layer map (a config
    changed since), it is refused naming the folder, not skipped to a failing distillation."""
    cache = tmp_path / "cache"
    meta = {"utt_id": "a", "duration": 1.0, "teacher": {"layers": [3, 6]}}
    write_shards([meta], lambda m: {"__key__": m["utt_id"], "json": json.dumps(m).encode()},
                 str(cache), "train", progress=False)
    shard = next(cache.glob("train-*.tar"))
    _check_cached_layers(shard, [3, 6])
    _check_cached_layers(shard, [6])
    with pytest.raises(ConfigError, match=rf"{cache} caches teacher layers \[3, 6\]; the "
                                          r"demo's layer map .* needs \[1, 4\]: delete"):
        _check_cached_layers(shard, [1, 4])


def _corpus(directory, langs, per_lang):
    """Language-contiguous audio shards like the synth corpus: per_lang utterances of each."""
    samples = [dict(s, utt_id=f"{lang}_{i:03d}", lang=lang) for lang in langs
               for i, s in enumerate(generate_utterances(per_lang, len(lang), max_seconds=1.5))]
    return write_audio_shards(samples, str(directory), "train", max_count=7, progress=False)


def test_mix_shards_makes_equal_shards_of_mixed_languages_byte_for_byte(tmp_path):
    sources = _corpus(tmp_path / "corpus", ["en", "de", "fi"], 9)        # 27 utterances
    original = {s["__key__"]: s for s in read_samples(sources)}
    paths = _mix_shards(sources, tmp_path / "shards", num_shards=4, seed=0)
    assert [Path(p).name for p in paths] == [f"train-{i:06d}.tar" for i in range(4)]
    shards = [list(read_samples([p])) for p in paths]
    assert [len(s) for s in shards] == [6, 6, 6, 6]                      # 27 // 4, 3 dropped
    keys = [s["__key__"] for shard in shards for s in shard]
    assert len(set(keys)) == 24 and set(keys) <= set(original)
    for shard in shards:
        assert len({json.loads(s["json"])["lang"] for s in shard}) >= 2  # languages mixed
        for sample in shard:
            assert sample["flac"] == original[sample["__key__"]]["flac"]
            assert sample["json"] == original[sample["__key__"]]["json"]
    with pytest.raises(ValueError, match="3 train utterances, fewer than the 4 shards"):
        _mix_shards(_corpus(tmp_path / "small", ["en"], 3), tmp_path / "x", 4, seed=0)


def test_window_check_names_the_longest_utterance(tmp_path):
    shards = _corpus(tmp_path / "corpus", ["en"], 5)
    durations = {json.loads(s["json"])["utt_id"]: json.loads(s["json"])["duration"]
                 for s in read_samples(shards)}
    longest = max(durations, key=durations.get)
    infos = shard_infos(shards, None, True)
    check_fits_window(infos, durations[longest])                      # fits exactly
    with pytest.raises(ValueError, match=rf"{longest} is {durations[longest]:.2f} s.*"
                                         rf"--window_seconds {math.ceil(durations[longest])}"):
        check_fits_window(infos, float(np.floor(durations[longest] * 10) / 10))


def test_corpus_made_with_other_flags_is_refused(tmp_path):
    record = {"minutes_per_language": 0.5, "langs": ["en"], "seed": 0}
    (tmp_path / "corpus.json").write_text(json.dumps(record))
    _synthesise(tmp_path, 0.5, ["en"], 0)                             # same flags: reused as is
    assert sorted(os.listdir(tmp_path)) == ["corpus.json"]
    with pytest.raises(ValueError, match=r"made with .*'minutes_per_language': 0\.5.*not.*2\.0"):
        _synthesise(tmp_path, 2.0, ["en"], 0)


def test_fidelity_table_shows_head_free_cka_for_every_model(capsys):
    """The closing table compares trained, init and random on equal terms (CKA, no head)."""
    models = {name: ModelFidelity(cosine={"s1_t3": cos, "s2_t6": cos},
                                  cka_pairs={"s1_t3": cka, "s2_t6": cka / 2}, cka=[])
              for name, cka, cos in (("trained", 0.62, 0.264), ("random", 0.332, 0.013),
                                     ("init", 0.52, 0.021))}
    report = fidelity_report(
        ["s1_t3", "s2_t6"], models, utterances=50, audio_seconds=161.0,
        probe={"steps": 300, "models": {"trained": {"per": {"overall": 0.65}},
                                        "init": {"per": {"overall": 0.7}}}})
    _print_fidelity(report, "the test split")
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("pair"))
    assert header.split() == ["pair", "CKA", "trained", "CKA", "random", "CKA", "init",
                              "cos", "trained", "cos", "random", "cos", "init"]
    row = next(line for line in out.splitlines() if line.startswith("s2_t6")).split()
    assert [float(v) for v in row[1:]] == [0.31, 0.166, 0.26, 0.264, 0.013, 0.021]
    assert "trained PER 0.650, init PER 0.700" in out
