"""Cached mode computes the same CoLLD loss as online mode: the cache holds what the teacher
computes, aligned frame by frame."""

import pytest
import torch

from colld_ds.config import load_config
from colld_ds.data import AudioBatchStream
from colld_ds.distill import build_run, distillation_loss, mask_batch
from data_prep.cache import cache_teacher
from data_prep.generated_audio import generate_utterances
from data_prep.shards import write_audio_shards
from data_prep.tiny_teacher import make_tiny_teacher


def test_cached_loss_equals_online_loss(tmp_path):
    # xlsr-style (layer-norm front end + attention mask) is padding-invariant, so a batch of
    # padded utterances gives the teacher features of each whole utterance, as in the cache.
    teacher_dir = make_tiny_teacher("xlsr", str(tmp_path / "teacher"), seed=0, num_layers=4)
    shards = str(tmp_path / "audio")
    write_audio_shards(generate_utterances(8, seed=2), shards, max_count=4, progress=False)
    cache_teacher(shards, teacher_dir, "2,4", str(tmp_path / "cache"), progress=False)
    config = load_config(overrides={
        "teacher.path": teacher_dir, "data.train_shards": shards, "student.num_layers": 2,
        "layer_map.teacher_layers": [[2], [4]], "objective.num_negatives": 20,
        "masking.span_length": 5, "data.max_seconds": 10.0})     # no crop: whole utterances
    teacher, pairs, model = build_run(config, torch.device("cpu"))
    model.eval()                                                   # no dropout: same forward
    layers = [2, 4]

    def first_batch(urls, expect_teacher=None):
        stream = AudioBatchStream(urls, batch_size=4, max_seconds=10.0, seed=0,
                                  shuffle_buffer=0, expect_teacher=expect_teacher)
        return next(iter(stream))

    audio_batch = first_batch(shards)
    cached_batch = first_batch(str(tmp_path / "cache"), expect_teacher=teacher.identity)
    assert audio_batch.keys == cached_batch.keys
    assert cached_batch.frame_lengths.tolist() == teacher.num_frames(
        audio_batch.wave_lengths).tolist()

    def loss(batch, source):                      # masks and negatives: from (seed, step, key)
        return distillation_loss(model, source, mask_batch(batch, teacher, config, 3, model.objective),
                                 config, layers)

    online, cached = loss(audio_batch, teacher), loss(cached_batch, None)
    assert cached.loss.item() == pytest.approx(online.loss.item(), rel=2e-3)
    for key in online.metrics:
        assert cached.metrics[key].item() == pytest.approx(online.metrics[key].item(),
                                                           rel=2e-3, abs=1e-3), key
    # the same batch against features shifted by one frame is clearly different: the equality
    # above is not that of a loss insensitive to its targets
    agreement = abs(cached.loss.item() - online.loss.item())
    shifted = [features.roll(1, dims=1) for features in cached_batch.teacher_features]
    cached_batch.teacher_features = shifted
    assert abs(loss(cached_batch, None).loss.item() - online.loss.item()) > 20 * agreement + 1e-3
