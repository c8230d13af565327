"""Audio shards (atomic, resumable writer), load_audio, generated audio and the streaming loader."""

import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from webdataset import TarWriter

from colld_ds.data import AudioBatchStream, Batch, expand_urls, read_samples
from colld_ds.formats import SAMPLE_RATE
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import count_samples, load_audio, shard_stats, write_audio_shards
from helpers import keys_of, take


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """8 shards x 6 utterances (0.5-1.5 s), two languages."""
    out = tmp_path_factory.mktemp("shards")
    samples = generate_utterances(48, seed=1, min_seconds=0.5, max_seconds=1.5, langs=("en", "de"))
    write_audio_shards(samples, str(out), max_count=6, progress=False)
    return str(out)


# --- generated audio -----------------------------------------------------------------------------


def test_generated_audio_is_deterministic_per_seed():
    a, b = list(generate_utterances(4, seed=3)), list(generate_utterances(4, seed=3))
    c = list(generate_utterances(4, seed=4))
    for x, y in zip(a, b):
        assert x["utt_id"] == y["utt_id"] and x["text"] == y["text"] and x["phones"] == y["phones"]
        np.testing.assert_array_equal(x["wave"], y["wave"])
    assert not any(np.array_equal(x["wave"], z["wave"]) for x, z in zip(a, c))
    for x in a:
        assert x["wave"].dtype == np.float32 and 1.0 <= len(x["wave"]) / SAMPLE_RATE <= 3.0
        assert np.abs(x["wave"]).max() <= 1.0 and x["text"]


# --- shard writer --------------------------------------------------------------------------------


def lazy_samples(n, calls):
    """Generated samples whose waves record in `calls` when they are materialised."""
    for s in generate_utterances(n, seed=0, min_seconds=0.2, max_seconds=0.4):
        wave = s["wave"]
        yield {**s, "wave": lambda w=wave, k=s["utt_id"]: calls.append(k) or w}


def test_shards_are_atomic_and_resume_skips_complete_ones(tmp_path):
    out = str(tmp_path)
    paths = write_audio_shards(lazy_samples(20, []), out, max_count=8, progress=False)
    assert [os.path.basename(p) for p in paths] == [f"train-{i:06d}.tar" for i in range(3)]
    assert [count_samples(p) for p in paths] == [8, 8, 4]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert shard_stats(paths)["utterances"] == 20
    keys_before = [[s["__key__"] for s in read_samples([p])] for p in paths]

    # a killed run: shard 1 never completed, only its temporary file exists
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths}
    os.remove(paths[1])
    with open(paths[1] + ".tmp", "wb") as f:
        f.write(b"half a shard")
    assert expand_urls(out) == [paths[0], paths[2]]  # the stray .tmp is not a shard

    calls = []
    assert write_audio_shards(lazy_samples(20, calls), out, max_count=8, progress=False) == paths
    assert calls == keys_before[1]  # only the missing shard's audio was encoded
    untouched = (paths[0], paths[2])
    assert [os.stat(p).st_mtime_ns for p in untouched] == [mtimes[p] for p in untouched]
    assert [[s["__key__"] for s in read_samples([p])] for p in paths] == keys_before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_shard_sample_format(tmp_path):
    (sample,) = generate_utterances(1, seed=0, langs=("de",))
    (path,) = write_audio_shards([sample], str(tmp_path), progress=False)
    (raw,) = read_samples([path])
    assert raw["__key__"] == sample["utt_id"] and set(raw) >= {"flac", "json"}
    wave, sr = sf.read(io.BytesIO(raw["flac"]), dtype="float32")
    assert sr == SAMPLE_RATE and wave.shape == sample["wave"].shape
    np.testing.assert_allclose(wave, sample["wave"], atol=1 / 32767)
    meta = json.loads(raw["json"])
    assert meta["utt_id"] == sample["utt_id"] and meta["lang"] == "de"
    assert meta["text"] == sample["text"]
    assert meta["phones"] == sample["phones"] and meta["sample_rate"] == SAMPLE_RATE
    assert meta["duration"] == pytest.approx(len(sample["wave"]) / SAMPLE_RATE)


@pytest.mark.parametrize(
    "wave",
    [np.zeros(0, np.float32), np.array([0.1, np.nan], np.float32), np.array([np.inf], np.float32)],
)
def test_writer_rejects_bad_waves_naming_the_utterance(tmp_path, wave):
    sample = {"utt_id": "bad_utt_7", "wave": wave, "lang": "xx", "text": ""}
    with pytest.raises(ValueError, match="bad_utt_7"):
        write_audio_shards([sample], str(tmp_path), progress=False)


# --- load_audio ----------------------------------------------------------------------------------


def test_load_audio_downmixes_and_resamples(tmp_path):
    t = np.arange(int(1.5 * 44100)) / 44100
    left = 0.6 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, 0.2 * np.ones_like(t)], axis=1)  # (S, 2)
    path = str(tmp_path / "stereo.wav")
    sf.write(path, stereo, 44100, subtype="PCM_16")
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.shape == (24000,)
    t16 = np.arange(24000) / SAMPLE_RATE
    expected = 0.3 * np.sin(2 * np.pi * 440 * t16) + 0.1  # mean of the two channels
    np.testing.assert_allclose(wave[1000:-1000], expected[1000:-1000], atol=2e-3)


def test_load_audio_error_names_the_file(tmp_path):
    path = tmp_path / "broken_take.wav"
    path.write_bytes(b"RIFF not really audio")
    with pytest.raises(ValueError, match="broken_take.wav"):
        load_audio(str(path))


# --- loader --------------------------------------------------------------------------------------


def test_two_ranks_two_workers_see_every_key_once(shard_dir):
    streams = [
        AudioBatchStream(shard_dir, batch_size=3, seed=5, rank=r, world_size=2, num_workers=2,
                         shuffle_buffer=4)
        for r in range(2)
    ]
    assert streams[0].epoch_length(0) == streams[1].epoch_length(0) == 8  # 24 samples per rank
    per_rank = [take(s, s.epoch_length(0)) for s in streams]
    keys = keys_of(per_rank[0]) + keys_of(per_rank[1])
    assert len(keys) == 48 and len(set(keys)) == 48
    assert set(keys) == {f"gen1-{i:06d}" for i in range(48)}
    assert all(s.state_dict() == {"epoch": 1, "batches_in_epoch": 0} for s in streams)


@pytest.mark.parametrize(
    "rank,world_size,num_workers,k",
    [(0, 1, 0, 5), (1, 2, 2, 3), (0, 2, 2, 8), (0, 1, 2, 11)],
)
def test_resume_from_state_dict_is_exact(shard_dir, rank, world_size, num_workers, k):
    def make():
        return AudioBatchStream(
            shard_dir, batch_size=3, max_seconds=1.0, seed=2, rank=rank, world_size=world_size,
            num_workers=num_workers, shuffle_buffer=5,
        )

    reference = take(make(), k + 6)
    first = make()
    assert keys_of(take(first, k)) == keys_of(reference[:k])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = take(resumed, 6)
    assert keys_of(tail) == keys_of(reference[k:])
    for a, b in zip(tail, reference[k:]):
        assert torch.equal(a.wave, b.wave) and torch.equal(a.wave_lengths, b.wave_lengths)


def test_same_settings_same_batches_and_epochs_reshuffle(shard_dir):
    def make(seed):
        return AudioBatchStream(shard_dir, batch_size=4, seed=seed, num_workers=2, shuffle_buffer=8)

    n = make(0).epoch_length(0)
    assert n == 12  # 1 rank, 2 workers x 4 shards x 6 samples / 4
    a, b, c = take(make(0), 2 * n), take(make(0), 2 * n), take(make(1), n)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x.wave, y.wave) for x, y in zip(a, b))
    epoch0, epoch1 = keys_of(a[:n]), keys_of(a[n:])
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 48
    assert epoch0 != epoch1 and keys_of(c) != epoch0


def test_crop_padding_and_lengths(shard_dir):
    def make(max_seconds):
        return AudioBatchStream(shard_dir, batch_size=4, max_seconds=max_seconds, seed=3,
                                shuffle_buffer=6)

    cropped, full = take(make(0.75), 12), take(make(None), 12)
    assert keys_of(cropped) == keys_of(full)
    n_cropped = 0
    for c, f in zip(cropped, full):
        assert c.wave.dtype == torch.float32 and c.wave_lengths.dtype == torch.int64
        assert c.wave.shape == (4, int(c.wave_lengths.max())) and int(c.wave_lengths.max()) <= 12000
        for row, length, orig, orig_len in zip(c.wave, c.wave_lengths, f.wave, f.wave_lengths):
            assert length == min(int(orig_len), 12000)
            assert not row[length:].any() and not orig[orig_len:].any()  # zero padding
            seg, orig = row[:length].numpy(), orig[:orig_len].numpy()
            starts = [o for o in range(len(orig) - length + 1) if orig[o] == seg[0]]
            # a contiguous crop
            assert any(np.array_equal(orig[o : o + length], seg) for o in starts)
            n_cropped += int(orig_len) > 12000
    assert n_cropped > 0


def test_batch_moves_and_pickles():
    batch = Batch(torch.zeros(2, 5), torch.tensor([5, 3]), ["a", "b"], ["en", "de"])
    moved = pickle.loads(pickle.dumps(batch)).to("cpu")
    assert torch.equal(moved.wave, batch.wave)
    assert moved.keys == ["a", "b"] and moved.langs == ["en", "de"]


def test_uneven_shards_give_equal_steps_per_rank(tmp_path):
    out = str(tmp_path)
    write_audio_shards(generate_utterances(10, 0, 0.2, 0.4), out, prefix="a", max_count=5,
                       progress=False)
    write_audio_shards(generate_utterances(7, 1, 0.2, 0.4), out, prefix="b", max_count=4,
                       progress=False)
    streams = [AudioBatchStream(out, batch_size=2, rank=r, world_size=2, shuffle_buffer=0)
               for r in range(2)]
    for epoch in range(3):  # shard sizes 5, 5, 4, 3: ranks get different sample counts
        lengths = {s.epoch_length(epoch) for s in streams}
        assert len(lengths) == 1
    counts = [len(take(s, streams[0].epoch_length(0))) for s in streams]
    assert counts[0] == counts[1] and all(s.state_dict()["epoch"] == 1 for s in streams)
    with pytest.warns(UserWarning, match="sit out"):
        AudioBatchStream(out, batch_size=1, world_size=3)


def test_loader_errors_are_clear(tmp_path, shard_dir):
    with pytest.raises(ValueError, match=r"no shards matched .*nowhere-\{000000\.\.000003\}\.tar"):
        AudioBatchStream(str(tmp_path / "nowhere-{000000..000003}.tar"), batch_size=1)
    with pytest.raises(ValueError, match="no shards matched"):
        AudioBatchStream(str(tmp_path), batch_size=1)  # empty directory
    with pytest.raises(ValueError, match="write at least 16 shards"):
        AudioBatchStream(shard_dir, batch_size=1, world_size=4, num_workers=4)

    truncated = str(tmp_path / "cut-000000.tar")
    for cut in (100, 0, -5000):  # in a header, at a member boundary, inside a member
        shutil.copy(os.path.join(shard_dir, "train-000000.tar"), truncated)
        os.truncate(truncated, os.path.getsize(truncated) // 2 + cut)
        with pytest.raises(ValueError, match="cut-000000.tar"):
            AudioBatchStream(truncated, batch_size=1)
    with pytest.raises(ValueError, match="cut-000000.tar"):
        list(read_samples([truncated]))

    no_json = str(tmp_path / "nojson-000000.tar")
    with TarWriter(no_json) as writer:
        writer.write({"__key__": "lonely_utt", "flac": b"not read"})
    with pytest.raises(ValueError, match="lonely_utt"):
        take(AudioBatchStream(no_json, batch_size=1), 1)


def test_glob_patterns_expand_sorted(shard_dir):
    paths = expand_urls(os.path.join(shard_dir, "train-00000[13].tar"))
    assert [os.path.basename(p) for p in paths] == ["train-000001.tar", "train-000003.tar"]
    assert expand_urls(os.path.join(shard_dir, "*.tar")) == expand_urls(shard_dir)
    with pytest.raises(ValueError, match="no shards matched"):
        expand_urls(os.path.join(shard_dir, "test-*.tar"))
