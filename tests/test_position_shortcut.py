"""benchmarks/position_shortcut.py: a planted positional component is found and removed."""

import json

import numpy as np
import pytest

from benchmarks.position_shortcut import main, measure
from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher


def test_a_planted_position_signal_is_found_and_removed():
    rng = np.random.default_rng(0)
    position = rng.normal(size=(60, 16))                  # the same vector at each frame index
    utterances = [(3 * position[:length] + rng.normal(size=(length, 16))).astype(np.float16)
                  for length in rng.integers(40, 61, size=90)]
    noise = [rng.normal(size=(50, 16)).astype(np.float16) for _ in range(90)]
    rows = {(r["layer"], r["target_norm"]): r
            for r in measure({1: utterances, 2: noise}, num_negatives=20)}
    assert rows[1, "utterance"]["acc"] > 0.9                     # position alone solves it
    assert rows[1, "utterance"]["variance_explained"] > 0.8
    assert rows[1, "utterance_position"]["acc"] < 0.2            # the mean removed, it cannot
    assert rows[1, "utterance_position"]["variance_explained"] < 0.1
    for target_norm in ("utterance", "utterance_position"):      # no position in noise
        assert rows[2, target_norm]["acc"] < 0.2
        assert abs(rows[2, target_norm]["variance_explained"]) < 0.1


@pytest.fixture
def tiny_cache(tmp_path) -> str:
    """An fp16 cache of layers 2 and 4 of a tiny random teacher over 8 generated utterances."""
    teacher = make_tiny_teacher("wav2vec2", str(tmp_path / "teacher"), seed=0, num_layers=4)
    write_audio_shards(generate_utterances(8, seed=2), str(tmp_path / "audio"), max_count=8,
                       progress=False)
    cache_teacher(str(tmp_path / "audio"), teacher, "2,4", str(tmp_path / "cache"),
                  progress=False)
    return str(tmp_path / "cache")


def test_plumbing_on_a_real_cache(tmp_path, tiny_cache):
    out = tmp_path / "shortcut.json"
    main(["--cache", tiny_cache, "--num_negatives", "10", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["layer"], r["target_norm"]) for r in rows} == {
        (layer, norm) for layer in (2, 4) for norm in ("utterance", "utterance_position")}
    assert all(0 <= r["acc"] <= 1 and r["utterances_scored"] == 2 for r in rows)
