"""Remote shards for real: a local HTTP server and a local S3 server (moto's server mode, read
with the real `aws` CLI), both started here on 127.0.0.1; streamed shards must give what the
same local shards give, and a missing URL, bucket or key, or a connection dropped mid-shard,
must be one clear error naming the URL (never a shard cut short in silence)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from colld_ds.data import AudioBatchStream, expand_urls, read_samples
from colld_ds.formats import SHARD_INDEX
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from helpers import http_server, keys_of, s3_server, take

REPO = Path(__file__).resolve().parent.parent
NAMES = "train-{000000..000003}.tar"
BUCKET = "colld-shards"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> str:
    """4 shards x 4 utterances of 0.3-1.5 s, with their shard index."""
    out = tmp_path_factory.mktemp("remote_shards")
    write_audio_shards(generate_utterances(16, seed=7, min_seconds=0.3, max_seconds=1.5),
                       str(out), max_count=4, progress=False)
    return str(out)


def member_offset(path: str, index: int) -> int:
    """Byte offset of the header of the `index`-th tar member of `path` (a member boundary)."""
    with tarfile.open(path) as tar:
        return tar.getmembers()[index].offset


@pytest.fixture(scope="module")
def http_url(shard_dir):
    with http_server(shard_dir) as url:
        yield url


def stream(urls, **kw) -> AudioBatchStream:
    return AudioBatchStream(urls, **{"batch_seconds": 2.0, "max_seconds": 1.0, "seed": 3,
                                     "shuffle_buffer": 4, "bucket_buffer": 4, **kw})


def same_batches(local: AudioBatchStream, remote: AudioBatchStream) -> None:
    n = local.epoch_length(0) + 2      # into the second epoch
    a, b = take(local, n), take(remote, n)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x.wave, y.wave) for x, y in zip(a, b))


# --- http ------------------------------------------------------------------------------------


def test_http_brace_pattern_expands_and_reads_as_local(shard_dir, http_url):
    urls = expand_urls(f"{http_url}/{NAMES}", allow_remote=True)
    assert urls == [f"{http_url}/train-00000{i}.tar" for i in range(4)]
    local = list(read_samples(expand_urls(shard_dir)))
    remote = list(read_samples(urls))
    assert [s["__key__"] for s in remote] == [s["__key__"] for s in local]
    assert all(r["flac"] == s["flac"] and r["json"] == s["json"] for r, s in zip(remote, local))
    same_batches(stream(shard_dir), stream(f"{http_url}/{NAMES}"))
    same_batches(stream(shard_dir, batch_size=2, batch_seconds=None, num_workers=2),
                 stream(f"{http_url}/{NAMES}", batch_size=2, batch_seconds=None, num_workers=2))


def test_http_404_is_one_error_naming_the_url(http_url, shard_dir):
    missing = f"{http_url}/train-000009.tar"
    with pytest.raises(ValueError, match=rf"^cannot read shard {missing}: curl failed .*404$"):
        list(read_samples([missing]))
    # shards the index lists but the server lacks: the stream opens its first shard when it is
    # built, so the error comes before any training
    gone = f"{http_url}/gone/{NAMES}"
    with pytest.raises(ValueError,
                       match=rf"cannot read shard {http_url}/gone/train-00000.\.tar: .*404"):
        stream(gone, shard_index=os.path.join(shard_dir, SHARD_INDEX))


def test_an_os_error_on_a_local_shard_is_one_error_naming_it(shard_dir):
    # OSError's first argument is its errno, not the message: the message is kept whole
    with pytest.raises(ValueError, match=rf"^cannot read shard {shard_dir}: \[Errno 21\] Is a "
                                         "directory"):
        list(read_samples([shard_dir]))


def test_unreachable_server_is_named_at_construction(shard_dir):
    with pytest.raises(ValueError, match=r"cannot read shard index http://127\.0\.0\.1:9/"
                                         r"shardindex\.json: curl failed .*\(7\)"):
        stream("http://127.0.0.1:9/train-{000000..000003}.tar")


@pytest.mark.parametrize("cut", ["mid-member", "member-boundary"])
def test_connection_dropped_mid_shard_is_an_error_not_a_short_shard(shard_dir, http_url, cut):
    path = os.path.join(shard_dir, "train-000001.tar")
    offset = member_offset(path, 4) + (700 if cut == "mid-member" else 0)
    url = f"{http_url}/cut/{offset}/train-000001.tar"
    with pytest.raises(ValueError, match=rf"^cannot read shard {url}: curl failed .*\(18\)"):
        list(read_samples([url]))


# --- s3 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(shard_dir):
    """A moto S3 server on 127.0.0.1 with the shards and their index under
    s3://colld-shards/audio/; the aws CLI reaches it through AWS_ENDPOINT_URL."""
    with s3_server() as client:
        client.create_bucket(Bucket=BUCKET)
        for name in sorted(os.listdir(shard_dir)):
            client.upload_file(os.path.join(shard_dir, name), BUCKET, f"audio/{name}")
        yield f"s3://{BUCKET}/audio", client


def test_s3_shards_read_as_local(shard_dir, s3):
    prefix, _ = s3
    same_batches(stream(shard_dir), stream(f"{prefix}/{NAMES}"))


def test_s3_missing_key_or_bucket_is_one_error_naming_the_url(shard_dir, s3):
    prefix, _ = s3
    for url in (f"{prefix}/train-000009.tar", "s3://colld-no-such-bucket/audio/train-000000.tar"):
        with pytest.raises(ValueError, match=rf"^cannot read shard {url}: aws failed .*Not Found"):
            list(read_samples([url]))
    with pytest.raises(ValueError, match=r"cannot read shard index s3://colld-no-such-bucket/"
                                         r"audio/shardindex\.json: aws failed .*Not Found"):
        stream(f"s3://colld-no-such-bucket/audio/{NAMES}")


def test_train_checks_shard_urls_before_loading_the_teacher(tmp_path):
    url = "http://127.0.0.1:9/audio/train-{000000..000003}.tar"
    done = subprocess.run(
        [sys.executable, "-m", "colld_ds.cli", "train", "--data.train_shards", url,
         "--teacher.path", str(tmp_path / "no-teacher"), "--run.out_dir", str(tmp_path / "run")],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=300)
    assert done.returncode != 0
    assert "cannot read shard index http://127.0.0.1:9/audio/shardindex.json" in done.stderr, \
        done.stderr[-3000:]
    assert "no-teacher" not in done.stderr
