"""Cached mode computes the CoLLD loss of online mode: the cache holds what the teacher computes,
aligned frame by frame. With a crop, the cache's frames keep the whole utterance's context
while the online teacher sees only the crop: a small difference, bounded here."""

import pytest
import torch
from torch.nn.functional import cosine_similarity

from colld_ds.config import load_config
from colld_ds.data import AudioBatchStream
from colld_ds.distill import build_run, distillation_loss, mask_batch
from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

LAYERS = [2, 4]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    # xlsr-style (layer-norm front end + attention mask) is padding-invariant, so a batch of
    # padded utterances gives the teacher features of each whole utterance, as in the cache.
    root = tmp_path_factory.mktemp("cached-mode")
    teacher = make_tiny_teacher("xlsr", str(root / "teacher"), seed=0, num_layers=4)
    shards = str(root / "audio")
    write_audio_shards(generate_utterances(8, seed=2), shards, max_count=4, progress=False)
    cache_teacher(shards, teacher, "2,4", str(root / "cache"), progress=False)
    return {"teacher": teacher, "shards": shards, "cache": str(root / "cache")}


def online_and_cached(cache: dict, max_seconds: float):
    """The run (no dropout) and the first batch of the audio and of the cache shards, cropped
    to ``max_seconds`` -> (config, teacher, model, audio batch, cached batch)."""
    config = load_config(overrides={
        "teacher.path": cache["teacher"], "data.train_shards": cache["shards"],
        "student.num_layers": 2, "layer_map.teacher_layers": [[2], [4]],
        "objective.num_negatives": 20, "masking.span_length": 5,
        "data.max_seconds": max_seconds})
    teacher, _, model = build_run(config, torch.device("cpu"))
    model.eval()                                                   # no dropout: same forward

    def first_batch(urls, expect_teacher=None):
        stream = AudioBatchStream(urls, batch_size=4, max_seconds=max_seconds, seed=0,
                                  shuffle_buffer=0, expect_teacher=expect_teacher)
        return next(iter(stream))

    audio = first_batch(cache["shards"])
    cached = first_batch(cache["cache"], expect_teacher=teacher.identity)
    assert audio.keys == cached.keys
    assert cached.frame_lengths.tolist() == teacher.num_frames(audio.wave_lengths).tolist()
    return config, teacher, model, audio, cached


def loss(model, teacher, config, batch):
    """The loss at step 3 (masks and negatives: from (seed, step, key)); ``teacher`` None:
    targets from the cache."""
    masked = mask_batch(batch, teacher, config, 3, model.objective)
    return distillation_loss(model, teacher if batch.teacher_features is None else None, masked,
                             config, LAYERS)


def test_cached_loss_equals_online_loss(cache):
    config, teacher, model, audio_batch, cached_batch = online_and_cached(cache, 10.0)  # no crop
    online = loss(model, teacher, config, audio_batch)
    cached = loss(model, teacher, config, cached_batch)
    assert cached.loss.item() == pytest.approx(online.loss.item(), rel=2e-3)
    for key in online.metrics:
        assert cached.metrics[key].item() == pytest.approx(online.metrics[key].item(),
                                                           rel=2e-3, abs=1e-3), key
    # the same batch against features shifted by one frame is clearly different: the equality
    # above is not that of a loss insensitive to its targets
    agreement = abs(cached.loss.item() - online.loss.item())
    shifted = [features.roll(1, dims=1) for features in cached_batch.teacher_features]
    cached_batch.teacher_features = shifted
    assert abs(loss(model, teacher, config, cached_batch).loss.item()
               - online.loss.item()) > 20 * agreement + 1e-3


def test_cropped_utterances_differ_within_the_bound(cache):
    """0.5 s crops of 1-3 s utterances: every utterance is cropped. The cached frames of the
    crop (whole-utterance context) and the online teacher's (the crop alone) differ, within
    cosine >= 0.95 per frame and a relative loss difference <= 1e-2 (README, Data)."""
    config, teacher, model, audio_batch, cached_batch = online_and_cached(cache, 0.5)
    assert audio_batch.wave_lengths.tolist() == [8000] * 4
    online_features = teacher(audio_batch.wave, audio_batch.wave_lengths).features
    valid = torch.arange(cached_batch.teacher_features[0].shape[1]) \
        < cached_batch.frame_lengths.unsqueeze(1)                                   # (B, T)
    for online, cached in zip(online_features, cached_batch.teacher_features):
        cosine = cosine_similarity(online.float()[valid], cached.float()[valid], dim=-1)
        assert 0.95 <= cosine.min().item() < 0.999, cosine.min().item()
    online = loss(model, teacher, config, audio_batch).loss.item()
    cached = loss(model, teacher, config, cached_batch).loss.item()
    assert 0 < abs(cached - online) / online <= 1e-2, (cached, online)
