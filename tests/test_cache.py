"""Teacher cache: cache-teacher writes what the teacher computes, resumes, and the stream's
cached mode refuses foreign caches and crops audio and frames consistently."""

import io
import itertools
import json
import os

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from colld_ds.data import AudioBatchStream, decode_wave, read_samples
from colld_ds.formats import FrameGeometry
from colld_ds.models import load_teacher
from colld_ds.data_prep.cache import cache_teacher, frame_geometry, padding_invariant
from colld_ds.data_prep.cli import DataPrep
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

LAYERS = [2, 4]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny XLS-R teacher, 3 audio shards x 4 utterances (0.4-1.2 s), their cache (layers 2, 4)."""
    root = tmp_path_factory.mktemp("cache")
    teacher_dir = make_tiny_teacher("xlsr", str(root / "xlsr"))
    audio = str(root / "audio")
    write_audio_shards(generate_utterances(12, 3, 0.4, 1.2, ("en", "de")), audio, max_count=4,
                       progress=False)
    cache = str(root / "cache")
    paths = cache_teacher(audio, teacher_dir, LAYERS, cache, batch_size=3, progress=False)
    teacher = load_teacher(teacher_dir, LAYERS)
    return {"teacher_dir": teacher_dir, "teacher": teacher, "audio": audio, "cache": cache,
            "paths": paths}


def whole(teacher, wave):
    """Teacher features of one whole, unpadded utterance: L_req x (T, D) float32."""
    out = teacher(torch.from_numpy(wave)[None], torch.tensor([wave.shape[0]]))
    return [h[0].numpy() for h in out.features]


def identity(setup):
    return setup["teacher"].identity


def test_cache_holds_the_teachers_features(setup):
    teacher = setup["teacher"]
    noise = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    assert padding_invariant(teacher, noise)
    audio_names = sorted(n for n in os.listdir(setup["audio"]) if n.endswith(".tar"))
    assert [os.path.basename(p) for p in setup["paths"]] == audio_names
    n = 0
    for path, audio_path in zip(setup["paths"], audio_names):
        audio_samples = list(read_samples([os.path.join(setup["audio"], audio_path)]))
        for sample, audio_sample in zip(read_samples([path]), audio_samples, strict=True):
            assert sample["__key__"] == audio_sample["__key__"]
            assert sample["flac"] == audio_sample["flac"]
            meta = json.loads(sample["json"])
            wave = decode_wave(sample)
            expected = whole(teacher, wave)
            num_frames = int(teacher.num_frames(torch.tensor(wave.shape[0])))
            assert meta["teacher"] == {**teacher.identity, "frame_stride": 320,
                                       "receptive_field": 400, "codec": "fp16",
                                       "num_frames": num_frames}
            for layer, ref in zip(LAYERS, expected):
                cached = np.load(io.BytesIO(sample[f"l{layer:02d}.layer_output.npy"]))
                assert cached.dtype == np.float16 and cached.shape == ref.shape
                np.testing.assert_allclose(cached.astype(np.float32), ref, rtol=2e-3,
                                           atol=2e-3 * np.abs(ref).max())
            n += 1
    assert n == 12


def test_cache_resumes_and_splits_by_rank(setup, tmp_path, capsys):
    out = str(tmp_path / "cache")
    first = cache_teacher(setup["audio"], setup["teacher_dir"], LAYERS, out, rank=1, world_size=2,
                          progress=False)
    assert [os.path.basename(p) for p in first] == ["train-000001.tar"]
    assert sorted(os.listdir(out)) == ["shardindex.json", "train-000001.tar"]   # no lock left
    paths = cache_teacher(setup["audio"], setup["teacher_dir"], LAYERS, out, progress=False)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    os.remove(paths[2])
    with open(paths[2] + ".tmp", "wb") as f:
        f.write(b"killed mid-shard")
    capsys.readouterr()
    cache_teacher(setup["audio"], setup["teacher_dir"], LAYERS, out, progress=False)
    assert "cached 1 shards (2 already done)" in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in paths[:2]] == mtimes[:2]
    written = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert written == [os.path.basename(p) for p in paths]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    with pytest.raises(ValueError, match=r"existing cache shard .*train-000000.tar"):  # other kind
        cache_teacher(setup["audio"], setup["teacher_dir"], LAYERS, out, target_kind="ffn",
                      progress=False)


def test_stream_refuses_a_cache_of_another_teacher(setup):
    AudioBatchStream(setup["cache"], batch_size=2, expect_teacher=identity(setup))  # the right one
    for change in ({"config_hash": "0123456789abcdef"}, {"target_kind": "ffn"}, {"layers": [1, 2]}):
        other = {**identity(setup), **change}
        with pytest.raises(ValueError, match="different teacher") as info:
            AudioBatchStream(setup["cache"], batch_size=2, expect_teacher=other)
        message = str(info.value)
        cache_line, run_line = message.splitlines()[1:3]
        assert identity(setup)["config_hash"] in cache_line and json.dumps(change)[1:-1] in run_line
    with pytest.raises(ValueError, match="not a teacher-cache shard"):
        AudioBatchStream(setup["audio"], batch_size=2, expect_teacher=identity(setup))


def test_sample_missing_a_layer_names_the_member(setup, tmp_path):
    bad = str(tmp_path / "bad-000000.tar")
    with TarWriter(bad) as writer:
        for i, sample in enumerate(read_samples([setup["paths"][0]])):
            sample = {k: v for k, v in sample.items() if k != "__url__"}
            if i == 2:
                del sample["l04.layer_output.npy"]
            writer.write(sample)
    stream = AudioBatchStream(bad, batch_size=1, expect_teacher=identity(setup), shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"no member 'l04.layer_output.npy' \(teacher layer 4\)"):
        list(itertools.islice(iter(stream), 4))


def test_cached_crop_keeps_audio_and_frames_aligned(setup):
    teacher = setup["teacher"]
    full = {}
    for sample in read_samples(setup["paths"]):
        frames = [np.load(io.BytesIO(sample[f"l{layer:02d}.layer_output.npy"])) for layer in LAYERS]
        full[sample["__key__"]] = (decode_wave(sample), frames)
    max_samples = 9600  # 0.6 s
    kwargs = dict(batch_size=3, max_seconds=0.6, seed=4, shuffle_buffer=4)
    stream = AudioBatchStream(setup["cache"], expect_teacher=identity(setup), **kwargs)
    batches = list(itertools.islice(iter(stream), 4))
    audio_mode = list(itertools.islice(iter(AudioBatchStream(setup["audio"], **kwargs)), 4))
    cropped = 0
    for batch, plain in zip(batches, audio_mode):
        assert batch.keys == plain.keys and torch.equal(batch.wave, plain.wave)  # same crops
        num_frames = int(teacher.num_frames(batch.wave_lengths.max()))
        assert [f.shape for f in batch.teacher_features] == [(3, num_frames, 32)] * 2
        assert torch.equal(batch.frame_lengths, teacher.num_frames(batch.wave_lengths))
        for b, key in enumerate(batch.keys):
            wave, frames = full[key]
            length, t = int(batch.wave_lengths[b]), int(batch.frame_lengths[b])
            assert length == min(wave.shape[0], max_samples)
            starts = [o for o in range(0, wave.shape[0] - length + 1, 320)
                      if np.array_equal(wave[o : o + length], batch.wave[b, :length].numpy())]
            assert len(starts) >= 1  # a crop starting at a whole frame
            f0 = starts[0] // 320
            cropped += f0 > 0
            for feats, ref in zip(batch.teacher_features, frames):
                assert feats.dtype == torch.float16
                np.testing.assert_array_equal(feats[b, :t].numpy(), ref[f0 : f0 + t])
                assert not feats[b, t:].any()  # zero padding
    assert cropped > 0


@pytest.mark.parametrize("family,field", [("xlsr", 400), ("w2v-bert", 560)])
def test_frame_geometry_matches_the_front_end(tmp_path, family, field):
    teacher = load_teacher(make_tiny_teacher(family, str(tmp_path / family)), [1])
    geometry = frame_geometry(teacher)
    assert geometry == FrameGeometry(320, field)
    lengths = torch.arange(field, field + 5000, 7)
    assert teacher.num_frames(lengths).tolist() == [geometry.num_frames(int(s)) for s in lengths]


def test_group_norm_teacher_is_cached_one_at_a_time(tmp_path, setup):
    teacher_dir = make_tiny_teacher("wav2vec2", str(tmp_path / "w2v"))
    with pytest.warns(UserWarning, match="not padding invariant"):
        (path,) = cache_teacher(setup["audio"], teacher_dir, [1], str(tmp_path / "c"), batch_size=4,
                                rank=0, world_size=3, progress=False)
    teacher = load_teacher(teacher_dir, [1])
    for sample in read_samples([path]):
        (ref,) = whole(teacher, decode_wave(sample))
        cached = np.load(io.BytesIO(sample["l01.layer_output.npy"])).astype(np.float32)
        np.testing.assert_allclose(cached, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_inspect_shows_the_teacher_and_flags_a_bad_array(setup, tmp_path, capsys):
    DataPrep().inspect(setup["cache"])
    printed = capsys.readouterr().out
    assert "3 shards, 12 samples" in printed and "all members valid" in printed
    assert ".l04.layer_output.npy: float16 (T, 32)" in printed
    assert identity(setup)["config_hash"] in printed
    bad = str(tmp_path / "bad-000000.tar")
    with TarWriter(bad) as writer:
        for i, sample in enumerate(read_samples([setup["paths"][0]])):
            sample = {k: v for k, v in sample.items() if k != "__url__"}
            if i == 1:
                sample["l02.layer_output.npy"] = sample["l02.layer_output.npy"][:-10]  # truncated
            writer.write(sample)
    with pytest.raises(SystemExit, match=r"bad-000000.tar: \S+\.l02\.layer_output\.npy"):
        DataPrep().inspect(bad)
