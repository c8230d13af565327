"""Dynamic batching by audio seconds, the shard index, and streamed (pipe:, http) shards."""

import functools
import http.server
import io
import json
import os
import random
import shutil
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from benchmarks.batch_fill import main as batch_fill
from colld_ds.batching import ShardInfo, bucket_batches
from colld_ds.config import ConfigError, load_config
from colld_ds.data import AudioBatchStream, read_samples, shard_name
from colld_ds.ds_config import build_ds_config
from colld_ds.formats import SAMPLE_RATE, SHARD_INDEX, FrameGeometry, shard_keys
from colld_ds.models import load_teacher
from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards, write_shard_index
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import keys_of, take

NAMES = "train-{000000..000007}.tar"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """8 shards x 6 utterances of 0.3-2.5 s (written with their shard index)."""
    out = tmp_path_factory.mktemp("shards")
    write_audio_shards(generate_utterances(48, seed=4, min_seconds=0.3, max_seconds=2.5),
                       str(out), max_count=6, progress=False)
    return str(out)


def decoded_lengths(path):
    """Audio samples of each utterance of a shard, by decoding its FLAC members: {key: S}."""
    return {s["__key__"]: sf.info(io.BytesIO(s["flac"])).frames for s in read_samples([path])}


def dynamic(urls, **kw):
    args = dict(batch_seconds=3.0, max_seconds=2.0, seed=1, shuffle_buffer=5, bucket_buffer=8)
    return AudioBatchStream(urls, **{**args, **kw})


# --- the batching function -------------------------------------------------------------------


def records(lengths):
    return [{"__key__": f"u{i}", "__length__": n} for i, n in enumerate(lengths)]


def test_bucket_batches_by_hand():
    # sorted 1 2 3 4 10, budget 8: [1,2] (3 x 3 = 9 > 8 closes it), [3,4] (4 x 2), [10] alone (> 8)
    batches = list(bucket_batches(records([4, 10, 1, 3, 2]), 8, 5, None, random.Random(0)))
    assert sorted([r["__length__"] for r in b] for b in batches) == [[1, 2], [3, 4], [10]]
    # cropped to 6: 10 counts as 6, still alone (6 x 3 > 8) but within the budget
    batches = list(bucket_batches(records([4, 10, 1, 3, 2, 6]), 8, 6, 6, random.Random(0)))
    assert sorted([r["__length__"] for r in b] for b in batches) == [[1, 2], [3, 4], [6], [10]]


@pytest.mark.parametrize("max_samples", [None, 700])
def test_bucket_batches_respect_the_budget_and_keep_every_sample(max_samples):
    lengths = np.random.default_rng(0).integers(50, 1500, 203).tolist()  # some above the budget
    batches = list(bucket_batches(records(lengths), 1000, 37, max_samples, random.Random(3)))
    keys = [r["__key__"] for b in batches for r in b]
    assert sorted(keys) == sorted(f"u{i}" for i in range(203))  # each exactly once
    for batch in batches:  # padded size within the budget, but for an over-long one alone
        cropped = [min(r["__length__"], max_samples or 10**9) for r in batch]
        assert max(cropped) * len(cropped) <= 1000 or (len(batch) == 1 and max_samples is None)
    assert max_samples or any(len(b) == 1 and b[0]["__length__"] > 1000 for b in batches)
    buffers = [set(f"u{i}" for i in range(s, min(s + 37, 203))) for s in range(0, 203, 37)]
    assert all(any({r["__key__"] for r in b} <= buf for buf in buffers) for b in batches)


def test_bucket_batch_order_is_shuffled_deterministically():
    def maxima(seed):  # one buffer: the batches of all 120 samples, in emitted order
        batches = bucket_batches(records(range(1, 121)), 200, 120, None, random.Random(seed))
        return [max(r["__length__"] for r in b) for b in batches]

    assert maxima(5) == maxima(5) and sorted(maxima(5)) == sorted(maxima(6))
    assert maxima(5) != sorted(maxima(5)) and maxima(5) != maxima(6)


# --- the stream ----------------------------------------------------------------------------------


def test_dynamic_batches_fit_the_budget_with_padding_and_lengths(shard_dir):
    stream = dynamic(shard_dir, num_workers=2)
    batches = take(stream, stream.epoch_length(0))
    sizes = {len(b.keys) for b in batches}
    assert len(sizes) > 1  # the batch size varies
    lengths = {}
    for path in sorted(os.listdir(shard_dir)):
        if path.endswith(".tar"):
            lengths.update(decoded_lengths(os.path.join(shard_dir, path)))
    for batch in batches:
        B, S = batch.wave.shape
        assert B * S <= 3.0 * SAMPLE_RATE and S == int(batch.wave_lengths.max())
        for row, key, n in zip(batch.wave, batch.keys, batch.wave_lengths.tolist()):
            assert n == min(lengths[key], 2 * SAMPLE_RATE)
            assert not row[n:].any() and row[:n].abs().sum() > 0


def test_an_utterance_longer_than_the_budget_forms_a_batch_alone(shard_dir):
    stream = dynamic(shard_dir, batch_seconds=1.0, max_seconds=None)
    batches = take(stream, stream.epoch_length(0))
    long = [b for b in batches if int(b.wave_lengths.max()) > SAMPLE_RATE]
    assert long and all(len(b.keys) == 1 for b in long)
    assert all(b.wave.numel() <= SAMPLE_RATE
               for b in batches if int(b.wave_lengths.max()) <= SAMPLE_RATE)


def test_two_ranks_two_workers_equal_steps_plan_and_accounting(shard_dir):
    with pytest.warns(UserWarning, match=r"epoch 0: every worker yields \d+ batches"
                                         r".* \d+ of 48 utterances \(\d"):
        streams = [dynamic(shard_dir, rank=r, world_size=2, num_workers=2) for r in range(2)]
    length = streams[0].epoch_length(0)
    assert streams[1].epoch_length(0) == length
    accounting = streams[0].planner.accounting(0)
    n = accounting.batches_per_worker
    yielded, dropped = [], []
    for rank, stream in enumerate(streams):
        batches = take(stream, length)
        assert stream.state_dict() == {"epoch": 1, "batches_in_epoch": 0}
        plan = stream.planner.plan(0, rank)  # per worker, all planned batches
        # batch i of the epoch is batch i // W of worker i % W
        assert [b.keys for b in batches] == [plan[w][j] for j in range(n) for w in range(2)]
        yielded += keys_of(batches)
        dropped += [k for worker in plan for batch in worker[n:] for k in batch]
    all_keys = {f"gen4-{i:06d}" for i in range(48)}
    assert len(yielded) + len(dropped) == 48 and set(yielded) | set(dropped) == all_keys
    assert ((accounting.used, accounting.dropped, accounting.sat_out)
            == (len(yielded), len(dropped), 0))
    assert dropped  # uneven plans: the check above is not vacuous


@pytest.mark.parametrize("rank,world_size,num_workers,k",
                         [(0, 1, 0, 4), (1, 2, 2, 3), (0, 1, 2, 7)])
def test_dynamic_resume_is_exact(shard_dir, rank, world_size, num_workers, k):
    def make():
        return dynamic(shard_dir, rank=rank, world_size=world_size, num_workers=num_workers)

    reference = take(make(), k + 8)  # crosses into epoch 1
    first = make()
    assert keys_of(take(first, k)) == keys_of(reference[:k])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = take(resumed, 8)
    assert [b.keys for b in tail] == [b.keys for b in reference[k:]]
    assert all(torch.equal(a.wave, b.wave) for a, b in zip(tail, reference[k:]))


# --- the shard index -----------------------------------------------------------------------------


def test_make_shards_writes_a_wids_shard_index(shard_dir):
    with open(os.path.join(shard_dir, SHARD_INDEX)) as f:
        index = json.load(f)
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".tar"))
    assert [e["url"] for e in index["shardlist"]] == names
    for entry in index["shardlist"]:
        path = os.path.join(shard_dir, entry["url"])
        lengths = decoded_lengths(path)
        assert entry["keys"] == shard_keys(path) == list(lengths)
        assert entry["lengths"] == list(lengths.values()) and entry["nsamples"] == len(lengths)
        assert entry["filesize"] == os.path.getsize(path)


def test_cache_teacher_indexes_its_shards_for_dynamic_cached_batches(tmp_path):
    teacher_dir = make_tiny_teacher("xlsr", str(tmp_path / "teacher"), seed=0, num_layers=2)
    audio, cache = str(tmp_path / "audio"), str(tmp_path / "cache")
    write_audio_shards(generate_utterances(6, seed=2, min_seconds=0.5, max_seconds=2.0), audio,
                       max_count=3, progress=False)
    cache_teacher(audio, teacher_dir, "2", cache, progress=False)

    def entries(directory):
        with open(os.path.join(directory, SHARD_INDEX)) as f:
            return [(e["url"], e["keys"], e["lengths"]) for e in json.load(f)["shardlist"]]

    assert entries(cache) == entries(audio)  # the cache keeps the audio, so the same lengths
    stream = AudioBatchStream(cache, batch_seconds=2.0, max_seconds=1.0, shuffle_buffer=0,
                              expect_teacher=load_teacher(teacher_dir, [2]).identity)
    batches = take(stream, stream.epoch_length(0))
    assert sorted(keys_of(batches)) == sorted(k for _, keys, _ in entries(audio) for k in keys)
    for batch in batches:
        B, S = batch.wave.shape
        frames = [FrameGeometry().num_frames(n) for n in batch.wave_lengths.tolist()]
        assert B * S <= 2 * SAMPLE_RATE and batch.frame_lengths.tolist() == frames
        assert batch.teacher_features[0].shape[:2] == (B, max(frames))


def test_index_and_header_scan_give_the_same_batches(shard_dir, tmp_path):
    unindexed = str(tmp_path / "copy")
    shutil.copytree(shard_dir, unindexed, ignore=shutil.ignore_patterns(SHARD_INDEX + "*"))
    for kw in (dict(), dict(batch_size=4, batch_seconds=None)):
        a, b = dynamic(shard_dir, **kw), dynamic(unindexed, **kw)
        indexed, scanned = list(a.shards.values()), list(b.shards.values())
        assert [s.keys for s in indexed] == [s.keys for s in scanned]
        if not kw:  # dynamic batching reads lengths from the json members without an index
            assert [s.lengths for s in indexed] == [s.lengths for s in scanned]
        assert [x.keys for x in take(a, 12)] == [x.keys for x in take(b, 12)]


def test_local_shards_missing_from_the_index_are_scanned(shard_dir, tmp_path):
    extra = str(tmp_path / "extra")
    write_audio_shards(generate_utterances(4, 9, 0.3, 1.0), extra, prefix="extra", max_count=2,
                       progress=False)
    urls = ([f"{shard_dir}/train-00000{i}.tar" for i in range(2)]
            + [f"{extra}/extra-00000{i}.tar" for i in range(2)])
    stream = dynamic(urls)  # the index beside the first shard has no extra-*.tar
    for url in urls:
        lengths = decoded_lengths(url)
        assert stream.shards[url] == ShardInfo(url, tuple(lengths), tuple(lengths.values()))
    assert sorted(keys_of(take(stream, stream.epoch_length(0)))) == sorted(
        k for url in urls for k in decoded_lengths(url))


def test_a_stale_index_is_refused_naming_the_shard(shard_dir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(shard_dir, copy)
    shutil.copy(os.path.join(copy, "train-000001.tar"), os.path.join(copy, "train-000000.tar"))
    with pytest.raises(ValueError,
                       match=r"shard index .*shardindex.json .*train-000000.tar.*colld prep index"):
        dynamic(copy)
    # a pipe: shard has no size to check: the stream notices the other keys
    stream = dynamic(f"pipe:cat {copy}/{NAMES}", shard_index=os.path.join(copy, SHARD_INDEX),
                     shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"shard pipe:cat .*train-000000.tar holds 'gen4-000006'"):
        take(stream, stream.epoch_length(0))
    write_shard_index(copy)  # the fix the errors name: a refresh re-reads the changed shard
    keys = keys_of(take(dynamic(copy, batch_size=1, batch_seconds=None, max_seconds=None), 48))
    assert sorted(keys) == sorted(f"gen4-{i:06d}" for i in [*range(6, 12), *range(6, 48)])


def test_pipe_shards_with_an_index_stream_the_same_samples(shard_dir):
    local = dynamic(shard_dir, num_workers=2)
    piped = dynamic(f"pipe:cat {shard_dir}/{NAMES}",
                    shard_index=os.path.join(shard_dir, SHARD_INDEX), num_workers=2)
    assert piped.epoch_length(0) == local.epoch_length(0)
    for a, b in zip(take(local, 10), take(piped, 10)):
        assert a.keys == b.keys and torch.equal(a.wave, b.wave)


@pytest.fixture
def http_dir(shard_dir, tmp_path):
    """(url, directory): the shard directory's copy served over http on a local thread."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: webdataset streams http:// shards with curl")
    served = str(tmp_path / "served")
    shutil.copytree(shard_dir, served)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=served)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    thread.join()


def test_http_shards_find_the_index_beside_them(shard_dir, http_dir):
    url, _ = http_dir
    local, remote = dynamic(shard_dir), dynamic(f"{url}/{NAMES}")
    assert (remote.shards[f"{url}/train-000003.tar"].keys
            == local.shards[f"{shard_dir}/train-000003.tar"].keys)
    for a, b in zip(take(local, 8), take(remote, 8)):
        assert a.keys == b.keys and torch.equal(a.wave, b.wave)


def test_streamed_shards_without_an_index_are_refused_with_the_fix(shard_dir, http_dir):
    url, served = http_dir
    os.remove(os.path.join(served, SHARD_INDEX))
    with pytest.raises(ValueError, match=r"cannot read shard index http://.*/shardindex.json"
                                         r"[\s\S]*data.shard_index"):
        dynamic(f"{url}/{NAMES}")
    with pytest.raises(ValueError, match=r"no shard index found for pipe:cat "
                                         r".*train-0000..\.tar.*data.shard_index"):
        dynamic(f"pipe:cat {shard_dir}/{NAMES}")
    os.remove(os.path.join(served, "train-000001.tar"))  # a shard the index lists is gone
    stream = dynamic(f"{url}/{NAMES}", shard_index=os.path.join(shard_dir, SHARD_INDEX))
    with pytest.raises(ValueError, match=r"cannot read shard http://.*/train-000001\.tar: .*404"):
        take(stream, stream.epoch_length(0))
    os.remove(os.path.join(served, "train-000000.tar"))  # the first one: refused when built
    with pytest.raises(ValueError, match=r"cannot read shard http://.*/train-000000\.tar: .*404"):
        dynamic(f"{url}/{NAMES}", shard_index=os.path.join(shard_dir, SHARD_INDEX))


def test_url_helpers():
    for url in ("/d/train-000001.tar", "pipe:curl -s https://h/d/train-000001.tar?sig=1 | cat",
                "s3://b/d/train-000001.tar"):
        assert shard_name(url) == "train-000001.tar"
    with pytest.raises(ValueError, match="names no"):
        shard_name("pipe:cat /d/data.bin")


# --- config --------------------------------------------------------------------------------------


def test_batch_seconds_config():
    config = load_config(overrides={"data.batch_seconds": 12, "data.max_seconds": 4.0})
    assert build_ds_config(config)["train_micro_batch_size_per_gpu"] == 3  # nominal: 12 s / 4 s
    with pytest.raises(ConfigError, match="data.batch_seconds"):
        load_config(overrides={"data.batch_seconds": 0})


def test_batch_fill_benchmark_plumbing(tmp_path):
    """benchmarks/batch_fill.py: equal lengths fill every batch exactly, whatever the batching;
    on long-tailed lengths dynamic batches hold more real audio than fixed ones."""
    equal = batch_fill(["--utterances", "96", "--per_shard", "24", "--min_s", "3", "--max_s",
                        "3", "--budgets_s", "12", "--ranks", "1", "--workers", "1",
                        "--out", str(tmp_path / "equal.json")])
    assert [row["real_over_padded"] for row in equal] == [1.0, 1.0]
    assert [row["left_out"] for row in equal] == [0.0, 0.0]          # 96 = 12 x 8 = 24 x 4
    tailed = batch_fill(["--utterances", "400", "--per_shard", "50", "--budgets_s", "60",
                         "--out", str(tmp_path / "tailed.json")])
    fixed, dynamic = (row["real_over_padded"] for row in tailed)
    assert 0 < fixed < dynamic <= 1
    assert json.loads((tmp_path / "tailed.json").read_text()) == tailed
