"""Cached front end (`data.cached_front_end`): a frozen student front end copied from the teacher
computes what the teacher's computed, so the student may start from the cached output instead.

References are independent of the cached path: the student's own forward from the audio (HF's
forward with its conv front end), and the teacher model's `feature_extractor` called directly."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colld_ds.config import ConfigError, load_config
from colld_ds.data import AudioBatchStream, decode_wave, read_samples
from colld_ds.formats import FRONT_END_MEMBER
from colld_ds.models import build_student, load_teacher, utterance_span_masks
from colld_ds.distill import build_run, distillation_loss, mask_batch, step_seed
from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"
WINDOW = 4.0  # Whisper window (s): utterances are at most 1.2 s, so nothing is cropped


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """2 shards x 3 utterances of 0.4-1.2 s."""
    out = str(tmp_path_factory.mktemp("audio") / "audio")
    write_audio_shards(generate_utterances(6, 3, 0.4, 1.2), out, max_count=3, progress=False)
    return out


def teacher_and_cache(root, audio, family, front_end=True, num_layers=2):
    """A tiny teacher of `family` and its cache of layers 1..num_layers (+ front end)."""
    window = WINDOW if family == "whisper" else None
    teacher_dir = make_tiny_teacher(family, str(root / family), num_layers=num_layers)
    cache = str(root / f"cache-{family}-{front_end}")
    cache_teacher(audio, teacher_dir, list(range(1, num_layers + 1)), cache, batch_size=1,
                  progress=False, window_seconds=window, front_end=front_end)
    return load_teacher(teacher_dir, list(range(1, num_layers + 1)), window_seconds=window), cache


def frozen_copy(teacher, num_layers=2):
    student = build_student(teacher, num_layers,
                            init_from_teacher_layers=list(range(1, num_layers + 1)))
    student.freeze_front_end()
    return student.eval()  # no dropout: the two forwards must see the same computation


# wav2vec2 / HuBERT (group-norm conv: the front end sees the padding) run one utterance per
# batch; the others a padded batch of 3, which checks the frame attention mask too.
@pytest.mark.parametrize("family,batch_size", [("xlsr", 3), ("data2vec", 3), ("whisper", 3),
                                               ("wav2vec2", 1), ("hubert", 1)])
def test_student_from_cached_front_end_equals_student_from_audio(tmp_path, audio, family,
                                                                 batch_size):
    teacher, cache = teacher_and_cache(tmp_path, audio, family)
    student = frozen_copy(teacher)
    student.check_cached_front_end(teacher, WINDOW)
    stream = AudioBatchStream(cache, batch_size=batch_size, max_seconds=WINDOW, shuffle_buffer=0,
                              expect_teacher=teacher.cache_identity(front_end=True))
    for batch, _ in zip(stream, range(3 // batch_size)):
        num_frames = batch.teacher_features[0].shape[1]
        masks = {"unmasked": None,
                 "masked": utterance_span_masks(batch.frame_lengths, num_frames, 0.5, 3,
                                                torch.arange(batch_size) + 7)}
        assert masks["masked"].any()
        for name, mask in masks.items():
            with torch.no_grad():
                reference = student(batch.wave, batch.wave_lengths, mask).hidden
                cached = student(batch.wave, batch.wave_lengths, mask,
                                 front_end_features=batch.front_end_features).hidden
                rolled = batch.front_end_features.roll(1, dims=1)
                shifted = student(batch.wave, batch.wave_lengths, mask,
                                  front_end_features=rolled).hidden
            for k, (ref, got, off) in enumerate(zip(reference, cached, shifted, strict=True)):
                scale = float(ref.abs().max())
                torch.testing.assert_close(got, ref, rtol=0, atol=3e-3 * scale,
                                           msg=f"{family} {name} student layer {k + 1}")
                agreement = float((got - ref).abs().max())  # the test can fail: a wrong
                assert float((off - ref).abs().max()) > 10 * agreement + 1e-3 * scale  # input shows


def test_cache_round_trip_shapes_padding_and_identity(tmp_path, audio, capsys):
    teacher, cache = teacher_and_cache(tmp_path, audio, "xlsr")
    full = {}
    for sample in read_samples([f"{cache}/train-000000.tar", f"{cache}/train-000001.tar"]):
        meta = json.loads(sample["json"])["teacher"]
        assert meta["front_end"] == "utterance" and meta["layers"] == [1, 2]
        array = np.load(io.BytesIO(sample[FRONT_END_MEMBER]))
        wave = torch.from_numpy(decode_wave(sample))[None]
        inputs, _ = teacher.front_end(wave, torch.tensor([wave.shape[1]]))
        with torch.no_grad():  # the conv front end called directly, no hook: (1, C, T)
            ref = teacher.model.feature_extractor(inputs["input_values"])[0].T.numpy()
        assert array.dtype == np.float16 and array.shape == ref.shape == (meta["num_frames"], 16)
        np.testing.assert_allclose(array.astype(np.float32), ref, rtol=2e-3,
                                   atol=2e-3 * np.abs(ref).max())
        layer1 = np.load(io.BytesIO(sample["l01.layer_output.npy"]))
        full[sample["__key__"]] = (layer1, array)

    stream = AudioBatchStream(cache, batch_size=3, max_seconds=0.6, seed=1, shuffle_buffer=3,
                              expect_teacher=teacher.cache_identity(front_end=True))
    cropped = 0
    for batch, _ in zip(stream, range(2)):
        num_frames = batch.teacher_features[0].shape[1]
        assert batch.front_end_features.shape == (3, num_frames, 16)
        assert batch.front_end_features.dtype == torch.float16
        for b, key in enumerate(batch.keys):
            t = int(batch.frame_lengths[b])
            layer1, front = full[key]
            batch_layer1 = batch.teacher_features[0][b, :t].numpy()
            starts = [f0 for f0 in range(layer1.shape[0] - t + 1)
                      if np.array_equal(layer1[f0 : f0 + t], batch_layer1)]
            f0 = starts[0]  # where the layers were cut: the front end is cut there too
            cropped += f0 > 0
            np.testing.assert_array_equal(batch.front_end_features[b, :t].numpy(),
                                          front[f0 : f0 + t])
            assert not batch.front_end_features[b, t:].any()  # zero padding
    assert cropped > 0
    assert batch.to("meta").front_end_features.device.type == "meta"

    # the same cache read without the option: no front end in the batches
    plain = next(iter(AudioBatchStream(cache, batch_size=3, expect_teacher=teacher.identity)))
    assert plain.front_end_features is None and plain.teacher_features is not None
    # identity: a re-run resumes with the option, refuses the other setting
    capsys.readouterr()
    cache_teacher(audio, teacher.path, [1, 2], cache, progress=False, front_end=True)
    assert "cached 0 shards (2 already done)" in capsys.readouterr().out
    with pytest.raises(ValueError,
                       match=r"written with front_end=True, this run has front_end=False"):
        cache_teacher(audio, teacher.path, [1, 2], cache, progress=False)


def test_start_of_run_errors(tmp_path, audio):
    overrides = {"teacher.path": "t", "data.teacher_cache": "c", "data.cached_front_end": True,
                 "student.freeze_front_end": True}
    load_config(overrides=overrides)
    with pytest.raises(ConfigError, match="set student.freeze_front_end true"):
        load_config(overrides={**overrides, "student.freeze_front_end": False})
    with pytest.raises(ConfigError, match="set data.teacher_cache"):
        load_config(overrides={**overrides, "data.teacher_cache": ""})

    teacher, cache = teacher_and_cache(tmp_path, audio, "xlsr", front_end=False)
    with pytest.raises(ValueError, match=r"holds no front-end features(.|\n)*--front_end true"):
        AudioBatchStream(cache, batch_size=1, expect_teacher=teacher.cache_identity(front_end=True))

    student = build_student(teacher, 2, init_from_teacher_layers=[1, 2])
    with pytest.raises(ValueError, match="set student.freeze_front_end true"):
        student.check_cached_front_end(teacher, 4.0)
    batch = next(iter(AudioBatchStream(cache, batch_size=1, expect_teacher=teacher.identity)))
    features = torch.zeros(1, batch.teacher_features[0].shape[1], 16)
    with pytest.raises(ValueError, match="set student.freeze_front_end true"):
        student(batch.wave, batch.wave_lengths, front_end_features=features)
    student.freeze_front_end()
    student.check_cached_front_end(teacher, 4.0)
    with torch.no_grad():  # e.g. a checkpoint of a run whose front end trained
        student.model.feature_extractor.conv_layers[3].conv.weight[0, 0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"not the teacher's "
                                         r"\(feature_extractor: \['conv_layers.3.conv.weight'\]"):
        student.check_cached_front_end(teacher, 4.0)

    whisper = load_teacher(make_tiny_teacher("whisper", str(tmp_path / "whisper")), [1],
                           window_seconds=WINDOW)
    narrow = build_student(whisper, 1, hidden_size=16)  # conv2 cannot be copied: random
    narrow.freeze_front_end()
    with pytest.raises(ValueError, match=r"conv1: \['bias', 'weight'\] differ"):
        narrow.check_cached_front_end(whisper, WINDOW)
    with pytest.raises(ValueError,
                       match=r"data.max_seconds 2 is shorter than the Whisper window \(4 s\)"):
        frozen_copy(whisper, 1).check_cached_front_end(whisper, 2.0)

    w2v_bert = load_teacher(make_tiny_teacher("w2v-bert", str(tmp_path / "w2v-bert")), [1])
    with pytest.raises(ValueError, match="no convolutional front end"):
        w2v_bert.cache_identity(front_end=True)


def test_short_cached_run_with_cached_front_end_matches_the_run_without(tmp_path, audio):
    teacher, cache = teacher_and_cache(tmp_path, audio, "xlsr", num_layers=4)
    losses, front_end_calls = {}, {}
    for option in (False, True):
        config = load_config(overrides={
            "teacher.path": teacher.path, "data.teacher_cache": cache, "student.num_layers": 2,
            "layer_map.teacher_layers": [[2], [4]], "student.freeze_front_end": True,
            "data.cached_front_end": option, "objective.num_negatives": 10,
            "masking.span_length": 3, "data.batch_size": 3, "data.max_seconds": 1.0,
            "optim.lr": 1e-3})
        run_teacher, _, model = build_run(config, torch.device("cpu"))  # same seed: same init
        stream = AudioBatchStream(cache, batch_size=3, max_seconds=1.0, seed=0, num_workers=0,
                                  expect_teacher=run_teacher.cache_identity(option))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        calls = []
        model.student.model.feature_extractor.register_forward_hook(lambda *_: calls.append(1))
        losses[option] = []
        for step, batch in zip(range(4), stream):
            torch.manual_seed(step_seed(config, 0, step))
            output = distillation_loss(model, None,
                                       mask_batch(batch, None, config, step, model.objective),
                                       config, list(run_teacher.layers))
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            losses[option].append(float(output.loss.detach()))
        front_end_calls[option] = len(calls)
    assert front_end_calls == {False: 4, True: 0}  # the option skips the conv front end
    assert all(np.isfinite(losses[True]))
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-4)
    assert losses[True][-1] != losses[True][0]  # it trained


def test_colld_train_with_cached_front_end_under_zero3(tmp_path, audio):
    """The real command: `colld train` (one process, ZeRO-3, whose hooks must cope with the
    skipped conv front end) reads the front end from the cache and trains; a cache without it
    is refused before training."""
    teacher, cache = teacher_and_cache(tmp_path, audio, "xlsr", num_layers=4)
    plain_cache = teacher_and_cache(tmp_path, audio, "xlsr", front_end=False, num_layers=4)[1]

    def colld_train(cache_dir, out_dir):
        command = [sys.executable, "-m", "colld_ds.cli", "train", "--config", str(CONFIG),
                   "--teacher.path", teacher.path, "--data.teacher_cache", cache_dir,
                   "--student.freeze_front_end", "true", "--data.cached_front_end", "true",
                   "--data.max_seconds", "1.0", "--data.batch_size", "3",
                   "--run.zero_stage", "3", "--run.out_dir", str(out_dir),
                   "--optim.max_steps", "3", "--optim.warmup_steps", "1", "--run.log_every", "1"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)

    done = colld_train(cache, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(np.isfinite(row["loss/total"]) for row in rows)
    refused = colld_train(plain_cache, tmp_path / "refused")
    assert refused.returncode != 0 and "front" in refused.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
