"""`cache-teacher --standardise utterance`: every layer stored standardised per utterance. The
frames against a hand standardisation of the plain cache's, a run with `target_norm: utterance`
computing the same loss from it as from the plain cache (crops included), the refusals (a run
with `target_norm: none`, a resume or a codebook of the other setting), pq codes of the
standardised frames against brute force, and what `inspect` and the codec benchmark say."""

import io
import json
import re

import numpy as np
import pytest
import torch

from benchmarks.cache_codecs import main as cache_codecs_benchmark
from colld_ds.config import load_config
from colld_ds.data import AudioBatchStream, read_samples
from colld_ds.distill import build_run, distillation_loss, mask_batch
from colld_ds.errors import DataError
from colld_ds.formats import CODEBOOK_FILE
from colld_ds.models import load_teacher
from colld_ds.data_prep.cache import cache_teacher, train_codebook
from colld_ds.data_prep.cli import DataPrep
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import cached_codes, tars

LAYERS = [2, 4]
M = 8  # pq sub-vectors of the tiny teacher's 32 channels
PQ = {"codec": "pq", "num_codebooks": M, "codebook_train_frames": 900, "progress": False}

pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """Tiny XLS-R teacher (4 layers, 32 wide), 2 audio shards x 6 utterances (1-3 s), and three
    caches of layers 2 and 4: fp16, fp16 standardised, pq (M 8) standardised."""
    root = tmp_path_factory.mktemp("standardised")
    teacher_dir = make_tiny_teacher("xlsr", str(root / "teacher"), seed=0, num_layers=4)
    audio = str(root / "audio")
    write_audio_shards(generate_utterances(12, seed=2), audio, max_count=6, progress=False)
    paths = {"fp16": str(root / "fp16"), "std": str(root / "std"), "pq": str(root / "pq")}
    cache_teacher(audio, teacher_dir, LAYERS, paths["fp16"], progress=False)
    cache_teacher(audio, teacher_dir, LAYERS, paths["std"], progress=False,
                  standardise="utterance")
    cache_teacher(audio, teacher_dir, LAYERS, paths["pq"], standardise="utterance", **PQ)
    return {"teacher_dir": teacher_dir, "teacher": load_teacher(teacher_dir, LAYERS),
            "audio": audio, **paths}


def layer_arrays(cache: str) -> dict[str, list[np.ndarray]]:
    """key -> the float16 (T, D) arrays of layers 2 and 4 in an fp16 cache."""
    return {sample["__key__"]: [np.load(io.BytesIO(sample[f"l{layer:02d}.layer_output.npy"]),
                                        allow_pickle=False) for layer in LAYERS]
            for sample in read_samples(tars(cache))}


def by_hand(x: np.ndarray) -> np.ndarray:
    """Each dimension of (T, D) standardised over the T frames, in float64 (utterance_norm's
    biased variance and 1e-5)."""
    x = x.astype(np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)


def test_the_cache_holds_each_utterance_standardised(caches):
    plain, standardised = layer_arrays(caches["fp16"]), layer_arrays(caches["std"])
    assert plain.keys() == standardised.keys() and len(plain) == 12
    for key, arrays in standardised.items():
        for x, stored in zip(plain[key], arrays, strict=True):
            assert stored.dtype == np.float16 and stored.shape == x.shape
            np.testing.assert_allclose(stored, by_hand(x), rtol=2e-3, atol=2e-3)
            assert np.abs(x.astype(np.float64).mean(0)).max() > 0.05  # the plain one is not
    identities = {name: json.loads(next(read_samples(tars(caches[name])))["json"])["teacher"]
                  for name in ("fp16", "std", "pq")}
    assert "standardised" not in identities["fp16"]
    assert identities["std"]["standardised"] == identities["pq"]["standardised"] == "utterance"


def first_batch(cache: str, expect: dict, max_seconds: float):
    stream = AudioBatchStream(cache, batch_size=4, max_seconds=max_seconds, seed=0,
                              shuffle_buffer=0, expect_teacher=expect)
    return next(iter(stream))


@pytest.mark.parametrize("target_norm", ["utterance", "utterance_position"])
def test_a_run_reads_the_targets_of_the_plain_cache(caches, target_norm):
    """0.5 s crops of 1-3 s utterances: the run standardises each crop, which undoes the
    cache's standardisation over the whole utterance. The loss from the standardised cache is
    the plain cache's, and not that of targets merely close to them."""
    config = load_config(overrides={
        "teacher.path": caches["teacher_dir"], "data.teacher_cache": caches["fp16"],
        "student.num_layers": 2, "layer_map.teacher_layers": [[2], [4]],
        "objective.num_negatives": 20, "masking.span_length": 5, "data.max_seconds": 0.5,
        "objective.target_norm": target_norm})
    teacher, _, model = build_run(config, torch.device("cpu"))
    model.eval()
    if target_norm == "utterance_position":          # any fixed mean: the same for both
        model.objective.set_position_mean(torch.randn_like(model.objective.position_mean))
    expect = {**teacher.identity, "target_norm": target_norm}
    plain = first_batch(caches["fp16"], expect, 0.5)
    standardised = first_batch(caches["std"], expect, 0.5)
    assert plain.keys == standardised.keys and plain.wave_lengths.tolist() == [8000] * 4

    def loss(batch):
        masked = mask_batch(batch, None, config, 3, model.objective)
        return distillation_loss(model, None, masked, config, LAYERS).loss.item()

    reference = loss(plain)
    assert loss(standardised) == pytest.approx(reference, rel=2e-3)
    standardised.teacher_features = [f.roll(1, dims=1) for f in standardised.teacher_features]
    assert abs(loss(standardised) - reference) > 1e-2 * reference


def test_a_run_without_standardised_targets_refuses_the_cache(caches):
    identity = caches["teacher"].identity
    message = re.escape("teacher.standardised 'utterance'") + ".*" + re.escape(
        "this run has objective.target_norm 'none': set objective.target_norm utterance")
    for cache in ("std", "pq"):
        with pytest.raises(DataError, match=message):
            first_batch(caches[cache], {**identity, "target_norm": "none"}, 0.5)
        with pytest.raises(DataError, match=message):  # a reader that states no target_norm
            first_batch(caches[cache], identity, 0.5)
    first_batch(caches["fp16"], {**identity, "target_norm": "none"}, 0.5)  # the plain one reads


def test_a_cache_and_its_codebook_are_all_one_setting(caches, tmp_path):
    with pytest.raises(DataError, match=r"written with --standardise utterance, this run has "
                                        r"--standardise none"):
        cache_teacher(caches["audio"], caches["teacher_dir"], LAYERS, caches["std"],
                      progress=False)
    with pytest.raises(DataError, match=r"written with --standardise none, this run has "
                                        r"--standardise utterance"):
        cache_teacher(caches["audio"], caches["teacher_dir"], LAYERS, caches["fp16"],
                      progress=False, standardise="utterance")
    with pytest.raises(DataError, match=r"learned with other standardised \(standardised "
                                        r"'utterance'\)"):
        train_codebook(caches["audio"], caches["teacher_dir"], LAYERS, caches["pq"],
                       **{k: v for k, v in PQ.items() if k != "progress"}, progress=False)
    with pytest.raises(DataError, match=r"--standardise 'frame': use one of none, utterance"):
        cache_teacher(caches["audio"], caches["teacher_dir"], LAYERS, str(tmp_path / "c"),
                      progress=False, standardise="frame")


def test_pq_codes_the_standardised_frames(caches):
    """Each cached code picks the nearest centroid of the teacher's own frames standardised
    here (not of the raw frames), and the codebook was learned on standardised frames."""
    codebook = np.load(f"{caches['pq']}/{CODEBOOK_FILE}", allow_pickle=False)
    cosines = []
    for _, layers in cached_codes(caches["pq"], caches["teacher"], LAYERS, "pq"):
        for i, (raw, codes) in enumerate(layers):
            x = by_hand(raw.astype(np.float32)).astype(np.float16).astype(np.float64)
            parts = x.reshape(len(x), M, 1, -1)
            dist = ((parts - codebook[i].astype(np.float64)[None]) ** 2).sum(-1)  # (T, M, 256)
            picked = np.take_along_axis(dist, codes[..., None].astype(np.int64), -1)[..., 0]
            np.testing.assert_allclose(picked, dist.min(-1), rtol=1e-4, atol=1e-5)
            hand = codebook[i][np.arange(M)[None], codes].reshape(len(codes), -1)
            cosines.append((hand * x).sum(1) / np.linalg.norm(hand, axis=1)
                           / np.linalg.norm(x, axis=1))
    assert np.concatenate(cosines).mean() > 0.8
    # centroids of standardised frames: each channel's centroids average near 0, spread near 1
    channels = codebook.transpose(0, 2, 1, 3).reshape(len(LAYERS), 256, -1)  # (L, 256, D)
    assert np.abs(channels.mean(1)).max() < 0.5 and 0.3 < channels.std(1).mean() < 1.5


def test_inspect_says_the_layers_are_standardised(caches, capsys):
    DataPrep().inspect(caches["pq"])
    printed = capsys.readouterr().out
    assert "all members valid" in printed and '"standardised": "utterance"' in printed
    assert ("layers standardised per utterance (teacher.standardised): read only by runs with "
            "objective.target_norm utterance or utterance_position") in printed
    DataPrep().inspect(caches["fp16"])
    assert "layers standardised per" not in capsys.readouterr().out


def test_codec_benchmark_standardised_rows(caches, tmp_path):
    rows = cache_codecs_benchmark(["--cache", caches["fp16"], "--out", str(tmp_path / "r.json"),
                                   "--pq_subvectors", "8", "--rq_stages", "4",
                                   "--codebook_train_frames", "900", "--standardised"])
    by = {(r["layer"], r["codec"]): r for r in rows}
    assert {c for _, c in by} == {"fp16", "int8-channel", "int8-frame", "pq-8", "rq-4",
                                  "pq-8-std", "rq-4-std"}
    for layer in LAYERS:
        for codec, size in (("pq-8", 8), ("rq-4", 4)):
            plain, std = by[layer, codec], by[layer, f"{codec}-std"]
            assert std["frames"] == plain["frames"] and std["payload_bytes_per_frame"] == size
            # the feature columns of a -std row compare with the standardised frames, which its
            # targets re-standardise: the two errors nearly agree (not so for the plain row)
            assert 0 < std["rel_l2"] < 1
            assert std["target_rel_l2"] == pytest.approx(std["rel_l2"], rel=0.1)
