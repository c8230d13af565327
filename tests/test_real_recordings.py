"""The real-recordings evaluation set (`colld_ds.data_prep.real_recordings`) and the sdist reader it
needs (`colld_ds.data_prep.whisper.wheels`, pysptk publishes no wheel).

The chunking and reader tests need no network. The shard-set test needs the pinned
pyannote-audio wheel and pysptk sdist (`pip download`, cached under ~/.cache/colld/wheels) and
skips, saying why, when they cannot be fetched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf

from colld_ds.data import read_samples
from colld_ds.formats import SAMPLE_RATE, SHARD_INDEX, read_shard_index
from colld_ds.data_prep.real_recordings import chunk_bounds, real_samples, write_real_shards
from colld_ds.data_prep.whisper import wheels as whisper_wheels
from colld_ds.data_prep.whisper.wheels import Member, read_member


@pytest.mark.parametrize("num_samples, max_samples, expected", [
    (10, 4, [(0, 3), (3, 6), (6, 10)]),                 # 3 chunks of 10/3: 3, 3, 4
    (8, 4, [(0, 4), (4, 8)]),                           # exact fit: two full windows
    (3, 4, [(0, 3)]),                                   # shorter than the window: whole
    (9, 8, [(0, 4), (4, 9)]),                           # 4 + 5, not 8 + a 1-sample tail
    (480000, 128000, [(0, 120000), (120000, 240000),    # 30 s in an 8 s window: 4 x 7.5 s
                      (240000, 360000), (360000, 480000)]),
])
def test_chunk_bounds_are_the_hand_computed_cuts(num_samples, max_samples, expected):
    assert chunk_bounds(num_samples, max_samples) == expected


def test_chunks_cover_the_waveform_without_dropping_anything():
    wave = np.random.default_rng(0).standard_normal(SAMPLE_RATE * 30 + 77).astype(np.float32)
    bounds = chunk_bounds(wave.size, SAMPLE_RATE * 8)
    chunks = [wave[start:end] for start, end in bounds]
    assert len(chunks) == 4 and max(c.size for c in chunks) <= SAMPLE_RATE * 8
    np.testing.assert_array_equal(np.concatenate(chunks), wave)
    with pytest.raises(ValueError, match="max_samples >= 1"):
        chunk_bounds(10, 0)


def test_sdist_member_is_read_and_verified(tmp_path, monkeypatch):
    """A pinned member of a source `.tar.gz` already in the cache: read without pip, and a
    wrong pin fails naming the file."""
    payload = b"RIFF not really a wav" * 100
    with tarfile.open(tmp_path / "fakepkg-1.0.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("fakepkg-1.0/fakepkg/data/a.wav")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    path = "fakepkg-1.0/fakepkg/data/a.wav"
    good = Member("fakepkg", "1.0", path, len(payload), hashlib.sha256(payload).hexdigest(),
                  sdist=True)
    bad = Member("fakepkg", "1.0", path, len(payload), "0" * 64, sdist=True)
    monkeypatch.setitem(whisper_wheels.PINNED, "fake/good", good)
    monkeypatch.setitem(whisper_wheels.PINNED, "fake/bad", bad)
    assert read_member("fake/good", str(tmp_path)) == payload
    with pytest.raises(ValueError, match=r"fakepkg==1\.0:.*a\.wav: got 2100 bytes"):
        read_member("fake/bad", str(tmp_path))


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """The real shard set for an 8 s window; skips when the packages cannot be fetched."""
    try:
        return write_real_shards(str(tmp_path_factory.mktemp("real")), window_seconds=8.0)
    except RuntimeError as exc:  # pip download failed: no index reachable
        pytest.skip(f"pyannote-audio / pysptk packages cannot be fetched: {exc}")


def test_real_shard_set_holds_both_recordings_whole_in_window_chunks(real_shards):
    samples = list(read_samples(real_shards))
    waves, metas = {}, {}
    for sample in samples:
        wave, rate = sf.read(io.BytesIO(sample["flac"]), dtype="int16")
        assert rate == SAMPLE_RATE and wave.ndim == 1
        waves[sample["__key__"]], metas[sample["__key__"]] = wave, json.loads(sample["json"])
    assert all(w.size <= 8 * SAMPLE_RATE for w in waves.values())
    assert all(m["lang"] == "en" and "phones" not in m for m in metas.values())
    # reference: the original 16 kHz 16-bit files, decoded independently of the shard writer
    pyannote, rate_p = sf.read(io.BytesIO(read_member("pyannote/sample.wav")), dtype="int16")
    arctic, rate_a = sf.read(io.BytesIO(read_member("pysptk/arctic_a0007.wav")), dtype="int16")
    assert (rate_p, rate_a) == (SAMPLE_RATE, SAMPLE_RATE)
    total_seconds = sum(m["duration"] for m in metas.values())
    # within a 20 ms frame
    assert abs(total_seconds - (30.0 + arctic.size / SAMPLE_RATE)) <= 0.02
    chunk_keys = [k for k in waves if k.startswith("pyannote_")]        # in file order = time
    assert len(chunk_keys) == 4                                          # 30 s / 8 s -> 4
    np.testing.assert_array_equal(np.concatenate([waves[k] for k in chunk_keys]), pyannote)
    np.testing.assert_array_equal(waves["arctic_a0007"], arctic)
    index = read_shard_index(os.path.join(os.path.dirname(real_shards[0]), SHARD_INDEX))
    assert sum(e["nsamples"] for e in index.values()) == len(samples) == 5


def test_a_window_shorter_than_the_arctic_utterance_is_refused(real_shards):
    with pytest.raises(ValueError, match=r"arctic_a0007\.wav is 4\.00 s, longer than the 3 s "
                                         r"window: use a window of at least 4 s"):
        real_samples(3.0)
