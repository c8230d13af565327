"""cache-teacher from streamed shards (a local HTTP server, a moto S3 server, `pipe:`): the cache
equals the one of the same local shards, sizes come from the shard index, a failing stream
names its URL and leaves no shard behind, a resumed run skips complete shards without reading
them, an `--out_dir` URL is refused, and training reads a cache streamed over https or s3."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import types

import faiss
import pytest
import torch

from colld_ds.data import AudioBatchStream, check_shards, expand_urls, read_samples
from colld_ds.errors import DataError
from colld_ds.formats import SHARD_INDEX
from colld_ds.models import load_teacher
from colld_ds.remote import RemoteReadError
from colld_ds.data_prep.cache import cache_teacher, train_codebook
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import ShardWriteError, write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import http_server, s3_server, take

LAYERS = [2, 4]
NAMES = "train-{000000..000002}.tar"
TARS = [f"train-00000{i}.tar" for i in range(3)]
BUCKET = "colld-cache"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """`root/teacher` (tiny XLS-R, 32 wide), `root/audio` (3 shards x 3 utterances of 0.8-1.6 s,
    indexed) and `root/cache`, their local cache of layers 2 and 4."""
    root = str(tmp_path_factory.mktemp("remote_cache"))
    make_tiny_teacher("xlsr", os.path.join(root, "teacher"))
    write_audio_shards(generate_utterances(9, 11, 0.8, 1.6, ("en",)), os.path.join(root, "audio"),
                       max_count=3, progress=False)
    cache_teacher(os.path.join(root, "audio"), os.path.join(root, "teacher"), LAYERS,
                  os.path.join(root, "cache"), progress=False)
    return root


@pytest.fixture(scope="module")
def http_root(root):
    with http_server(root) as url:
        yield url


@pytest.fixture(scope="module")
def s3_root(root):
    """`root/audio` and `root/cache` under s3://colld-cache/."""
    with s3_server() as client:
        client.create_bucket(Bucket=BUCKET)
        for folder in ("audio", "cache"):
            for name in os.listdir(os.path.join(root, folder)):
                client.upload_file(os.path.join(root, folder, name), BUCKET, f"{folder}/{name}")
        yield f"s3://{BUCKET}"


def members(shards: str) -> list[dict]:
    """Every sample's members (its `__url__` aside) of a directory or pattern of shards."""
    return [{k: v for k, v in s.items() if k != "__url__"}
            for s in read_samples(expand_urls(shards, allow_remote=True))]


def cache(root: str, shards, out_dir, **kw) -> list[str]:
    return cache_teacher(shards, os.path.join(root, "teacher"), LAYERS, str(out_dir),
                         progress=False, **kw)


def streamed(source: str, request, root: str) -> tuple[str, str | None]:
    """(URL pattern of `root/audio`'s shards, shard index to pass) for `source`."""
    if source == "pipe":
        return f"pipe:cat {root}/audio/{NAMES}", os.path.join(root, "audio", SHARD_INDEX)
    base = request.getfixturevalue("http_root" if source == "https" else "s3_root")
    return f"{base}/audio/{NAMES}", None


@pytest.mark.parametrize("source", ["https", "s3", "pipe"])
def test_streamed_shards_cache_as_the_local_shards(root, source, request, tmp_path):
    shards, index = streamed(source, request, root)
    paths = cache(root, shards, tmp_path / "cache", shard_index=index)
    assert paths == [str(tmp_path / "cache" / name) for name in TARS]
    assert sorted(os.listdir(tmp_path / "cache")) == [SHARD_INDEX, *TARS]
    assert members(str(tmp_path / "cache")) == members(os.path.join(root, "cache"))


@pytest.mark.parametrize("failure", ["404", "dropped mid-shard", "no such bucket"])
def test_a_failing_stream_names_its_url_and_leaves_no_shard(root, http_root, request, tmp_path,
                                                            failure):
    audio = os.path.join(root, "audio")
    with tarfile.open(os.path.join(audio, "train-000001.tar")) as tar:  # into its 3rd sample:
        offset = tar.getmembers()[4].offset + 700  # the 1st is in the .tmp when the stream fails
    bad = {"404": f"{http_root}/gone/train-000001.tar",
           "dropped mid-shard": f"{http_root}/cut/{offset}/audio/train-000001.tar",
           "no such bucket": "s3://colld-no-such-bucket/audio/train-000001.tar"}[failure]
    if bad.startswith("s3://"):
        request.getfixturevalue("s3_root")
    out = tmp_path / "cache"
    with pytest.raises(RemoteReadError) as info:
        cache(root, [f"{http_root}/audio/train-000000.tar", bad], out,
              shard_index=os.path.join(audio, SHARD_INDEX))
    assert re.fullmatch(rf"cannot read shard {re.escape(bad)}: (curl|aws) failed with exit "
                        r"status \d+: .+", str(info.value)), str(info.value)
    assert sorted(os.listdir(out)) == ["train-000000.tar"]  # the complete one, nothing else


def test_estimate_and_free_space_check_read_sizes_from_the_shard_index(root, http_root, tmp_path,
                                                                      capsys, monkeypatch):
    index = os.path.join(root, "audio", SHARD_INDEX)
    cache(root, os.path.join(root, "audio"), tmp_path / "local", estimate=True)
    local = capsys.readouterr().out
    # shards the server lacks: the estimate opens none of them, it reads their index entries
    cache(root, f"{http_root}/gone/{NAMES}", tmp_path / "remote", estimate=True, shard_index=index)
    assert capsys.readouterr().out == local and "3 shards, 9 utterances" in local
    assert not os.path.exists(tmp_path / "remote")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(ShardWriteError, match=r"the 3 shards still to cache need about .* but "
                                              r".* has 1\.0 kB free"):
        cache(root, f"{http_root}/audio/{NAMES}", tmp_path / "full")
    assert os.listdir(tmp_path / "full") == []


def test_resume_skips_complete_shards_without_reading_them(root, http_root, tmp_path, capsys):
    out = tmp_path / "cache"
    (done,) = cache(root, f"{http_root}/audio/{NAMES}", out, rank=1, world_size=2)
    mtime = os.stat(done).st_mtime_ns
    (out / "train-000002.tar.tmp").write_bytes(b"killed mid-shard")
    capsys.readouterr()
    # shard 1 is done: its URL now answers 404, and the run must not open it
    cache(root, [f"{http_root}/audio/train-000000.tar", f"{http_root}/gone/train-000001.tar",
                 f"{http_root}/audio/train-000002.tar"], out)
    assert "cached 2 shards (1 already done)" in capsys.readouterr().out
    assert os.stat(done).st_mtime_ns == mtime
    assert sorted(os.listdir(out)) == [SHARD_INDEX, *TARS]
    assert members(str(out)) == members(os.path.join(root, "cache"))


@pytest.mark.parametrize("out_dir", ["s3://bucket/cache", "https://host/cache"])
def test_an_out_dir_url_is_refused_in_one_line(root, out_dir):
    expected = (f"--out_dir {out_dir}: caches are written to a local or shared filesystem; copy "
                "them with aws s3 sync (or to an https server) afterwards; training reads s3:// "
                "and https:// caches through data.teacher_cache")
    # before anything is loaded: no such teacher here
    for command in (cache_teacher, train_codebook):
        with pytest.raises(DataError) as info:
            command(os.path.join(root, "audio"), "no-such-teacher", LAYERS, out_dir)
        assert str(info.value) == expected


def same_cached_batches(local: str, remote: str, teacher_dir: str) -> None:
    """The batches of the cache `remote` equal those of `local`, into a second epoch."""
    identity = load_teacher(teacher_dir, LAYERS).identity
    kw = dict(batch_size=3, max_seconds=1.0, seed=5, shuffle_buffer=4, expect_teacher=identity)
    a, b = AudioBatchStream(local, **kw), AudioBatchStream(remote, **kw)
    n = a.epoch_length(0) + 2
    for x, y in zip(take(a, n), take(b, n), strict=True):
        assert x.keys == y.keys and torch.equal(x.wave, y.wave)
        assert all(torch.equal(p, q) for p, q in zip(x.teacher_features, y.teacher_features,
                                                     strict=True))


@pytest.mark.parametrize("source", ["https", "s3"])
def test_training_reads_a_streamed_cache(root, source, request):
    base = request.getfixturevalue("http_root" if source == "https" else "s3_root")
    check_shards(f"{base}/cache/{NAMES}")  # what training runs first on data.teacher_cache
    same_cached_batches(os.path.join(root, "cache"), f"{base}/cache/{NAMES}",
                        os.path.join(root, "teacher"))


def test_pq_cache_of_https_shards_is_the_local_one_and_reads_over_https(root, http_root,
                                                                        tmp_path):
    """The codebook is learned from the streamed shards, and a streamed pq cache decodes with
    the codebook beside it, read over https."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # see tests/test_cache_pq.py
    pq = dict(codec="pq", num_codebooks=8, codebook_train_frames=900)
    try:
        cache(root, os.path.join(root, "audio"), os.path.join(root, "cache_pq"), **pq)
        cache(root, f"{http_root}/audio/{NAMES}", tmp_path / "cache_pq", **pq)
    finally:
        faiss.omp_set_num_threads(threads)
    assert members(str(tmp_path / "cache_pq")) == members(os.path.join(root, "cache_pq"))
    same_cached_batches(str(tmp_path / "cache_pq"), f"{http_root}/cache_pq/{NAMES}",
                        os.path.join(root, "teacher"))
