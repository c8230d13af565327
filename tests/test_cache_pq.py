"""The pq cache codec: encode and decode against brute force and a hand gather, the codebook step
(deterministic, reused, shared by ranks, resumed with), its identity refusals, the size
estimate against a pq cache actually written, and what `colld prep inspect` says of it."""

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import fire
import numpy as np
import pytest
import torch
from webdataset import TarWriter

from benchmarks.cache_codecs import main as cache_codecs_benchmark
from colld_ds.codecs import decode, pq_decode, pq_encode
from colld_ds.data import AudioBatchStream, read_samples
from colld_ds.errors import DataError
from colld_ds.formats import CODEBOOK_FILE, SHARD_INDEX
from colld_ds.models import load_teacher
from colld_ds.data_prep.cache import cache_teacher, train_codebook
from colld_ds.data_prep.cli import DataPrep
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.codebook import CODEBOOK_META
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import (CONFIG, REPO, cached_codes, check_codes_decoded_in_the_step, file_sha256,
                     take, tars)

LAYERS = [2, 4]
M = 8  # sub-vectors of the tiny teacher's 32 channels: 4 each
PQ = {"codec": "pq", "num_codebooks": M, "codebook_train_frames": 900, "progress": False}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


@pytest.fixture(scope="module")
def pq_cache(tmp_path_factory):
    """Tiny XLS-R teacher (32 wide), 2 audio shards x 8 utterances (2-3 s), and their pq cache
    of layers 2 and 4 (M 8, codebook from 900 frames)."""
    root = tmp_path_factory.mktemp("pq")
    teacher_dir = make_tiny_teacher("xlsr", str(root / "xlsr"))
    audio = str(root / "audio")
    write_audio_shards(generate_utterances(16, 5, 2.0, 3.0, ("en",)), audio, max_count=8,
                       progress=False)
    cache_teacher(audio, teacher_dir, LAYERS, str(root / "cache"), **PQ)
    return {"teacher_dir": teacher_dir, "teacher": load_teacher(teacher_dir, LAYERS),
            "audio": audio, "cache": str(root / "cache")}


def same_samples(a: str, b: str) -> bool:
    """Whether shards ``a`` and ``b`` hold the same members (their tar mtimes aside)."""
    def members(path):
        return [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples([path])]
    return members(a) == members(b)


def brute_force_codes(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(T, M) squared-L2 distances of each sub-vector to its nearest centroid, in float64, by
    explicit differences (no expansion of the square)."""
    num_sub, _, sub = codebook.shape
    parts = x.astype(np.float64).reshape(len(x), num_sub, 1, sub)
    return ((parts - codebook.astype(np.float64)[None]) ** 2).sum(-1)  # (T, M, 256)


def test_pq_encode_picks_the_nearest_centroid_and_decode_is_a_gather():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((6, 256, 5)).astype(np.float32)  # M 6, 30 channels
    x = rng.standard_normal((50, 30)).astype(np.float16)
    codes = pq_encode(x, codebook)
    assert codes.dtype == np.uint8 and codes.shape == (50, 6)
    dist = brute_force_codes(x, codebook)
    picked = np.take_along_axis(dist, codes[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(picked, dist.min(-1), rtol=1e-5, atol=1e-5)
    assert (codes == dist.argmin(-1)).mean() > 0.99  # ties aside, the same index
    hand = np.zeros((50, 30))
    for t, m in itertools.product(range(50), range(6)):
        hand[t, 5 * m: 5 * m + 5] = codebook[m, codes[t, m]]
    np.testing.assert_array_equal(pq_decode(codes, codebook), hand.astype(np.float16))
    np.testing.assert_array_equal(decode([codes], "pq", codebook), hand.astype(np.float16))
    with pytest.raises(ValueError, match=r"expected uint8 \(50, 6\), got int64 \(50, 6\)"):
        decode([codes.astype(np.int64)], "pq", codebook)


def test_pq_cache_round_trip(pq_cache):
    teacher, cache = pq_cache["teacher"], pq_cache["cache"]
    with open(os.path.join(cache, CODEBOOK_FILE), "rb") as f:
        data = f.read()
    meta = json.load(open(os.path.join(cache, CODEBOOK_META)))
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    codebook = np.load(io.BytesIO(data), allow_pickle=False)
    assert codebook.dtype == np.float32 and codebook.shape == (2, M, 256, 4)
    hands = {}
    for sample, layers in cached_codes(cache, teacher, LAYERS, "pq"):
        identity = json.loads(sample["json"])["teacher"]
        assert identity["codec"] == "pq"
        assert identity["codebook"] == {"version": 2, "num_codebooks": M,
                                        "sha256": meta["sha256"]}
        hands[sample["__key__"]] = []
        for i, (ref, codes) in enumerate(layers):
            assert codes.dtype == np.uint8 and codes.shape == (ref.shape[0], M)
            dist = brute_force_codes(ref, codebook[i])
            picked = np.take_along_axis(dist, codes[..., None].astype(np.int64), -1)[..., 0]
            np.testing.assert_allclose(picked, dist.min(-1), rtol=1e-4, atol=1e-6)
            hand = codebook[i][np.arange(M)[None], codes].reshape(len(codes), -1)
            hands[sample["__key__"]].append(hand.astype(np.float16))
            cosine = (hand * ref).sum(1) / np.linalg.norm(hand, axis=1) / np.linalg.norm(
                ref.astype(np.float32), axis=1)
            assert cosine.mean() > 0.8  # a codebook of this layer, not noise
    assert len(hands) == 16
    stream = AudioBatchStream(cache, batch_size=1, shuffle_buffer=0,
                              expect_teacher=teacher.identity)
    for batch in itertools.islice(iter(stream), 16):
        for feats, hand in zip(batch.teacher_features, hands[batch.keys[0]], strict=True):
            np.testing.assert_array_equal(feats[0].numpy(), hand)
    # a run of layer 4 alone reads the codebook's second layer
    only4 = AudioBatchStream(cache, batch_size=1, shuffle_buffer=0,
                             expect_teacher={**teacher.identity, "layers": [4]})
    batch = next(iter(only4))
    np.testing.assert_array_equal(batch.teacher_features[0][0].numpy(), hands[batch.keys[0]][1])


def test_pq_identity_refusals(pq_cache, tmp_path):
    identity, cache = pq_cache["teacher"].identity, pq_cache["cache"]
    copy = str(tmp_path / "copy")
    shutil.copytree(cache, copy)
    codebook_file = os.path.join(copy, CODEBOOK_FILE)
    os.remove(codebook_file)
    with pytest.raises(DataError) as info:
        AudioBatchStream(copy, batch_size=1, expect_teacher=identity)
    message = str(info.value)
    assert "\n" not in message and f"cannot read the pq codebook {codebook_file}" in message
    assert "teacher.codebook.sha256" in message and "--codec pq" in message
    other = np.load(os.path.join(cache, CODEBOOK_FILE), allow_pickle=False) + 1
    np.save(codebook_file, other, allow_pickle=False)
    with pytest.raises(DataError, match=r"records teacher\.codebook\.sha256 .* copy the "
                                        r"codebook\.npy the cache was written with"):
        AudioBatchStream(copy, batch_size=1, expect_teacher=identity)
    os.remove(os.path.join(copy, CODEBOOK_META))  # a codebook learned anew, with another seed
    with pytest.raises(DataError, match=r"was written with the codebook \{.*\}, this run's "
                                        r"codebook is .*restore the codebook\.npy and "
                                        r"codebook\.json"):
        cache_teacher(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, copy, **PQ, seed=1)
    with pytest.raises(DataError, match=r"learned with other num_codebooks \(num_codebooks 8\): "
                                        r"use the same --codec, --num_codebooks"):
        cache_teacher(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, cache,
                      **{**PQ, "num_codebooks": 16})
    newer = str(tmp_path / "newer")
    os.makedirs(newer)
    shutil.copy(os.path.join(cache, CODEBOOK_FILE), newer)
    with TarWriter(os.path.join(newer, "train-000000.tar")) as writer:
        for sample in read_samples(tars(cache)[:1]):
            meta = json.loads(sample["json"])
            meta["teacher"]["codebook"]["version"] = 3
            writer.write({**{k: v for k, v in sample.items() if k != "__url__"},
                          "json": json.dumps(meta).encode()})
    with pytest.raises(DataError, match=r"train-000000.tar: its json has teacher\.codebook\."
                                        r"version 3, this colld reads 2: re-cache with"):
        AudioBatchStream(newer, batch_size=1, expect_teacher=identity)
    with pytest.raises(DataError, match=r"--num_codebooks 5 does not divide the teacher's width"):
        train_codebook(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, str(tmp_path / "x"),
                       num_codebooks=5)


def as_format_1(cache: str, out: str) -> None:
    """Rewrite the pq cache ``cache`` into ``out`` as a colld before codebook format 2 wrote it,
    by hand: the identity's ``"pq": {"version": 1, "subvectors", "codebook_sha256"}`` block, and
    ``pq_codebook.npy`` / ``pq_codebook.json`` (keys ``subvectors``, ``train_frames``,
    ``codebook_sha256``) beside the shards."""
    os.makedirs(out)
    shutil.copy(os.path.join(cache, CODEBOOK_FILE), os.path.join(out, "pq_codebook.npy"))
    meta = json.load(open(os.path.join(cache, CODEBOOK_META)))
    json.dump({"version": 1, "codec": "pq", "subvectors": meta["num_codebooks"],
               "train_frames": meta["codebook_train_frames"], "seed": meta["seed"],
               "teacher": meta["teacher"], "codebook_sha256": meta["sha256"]},
              open(os.path.join(out, "pq_codebook.json"), "w"))
    for path in tars(cache):
        with TarWriter(os.path.join(out, os.path.basename(path))) as writer:
            for sample in read_samples([path]):
                sample_meta = json.loads(sample["json"])
                block = sample_meta["teacher"].pop("codebook")
                sample_meta["teacher"]["pq"] = {"version": 1, "subvectors": block["num_codebooks"],
                                                "codebook_sha256": block["sha256"]}
                writer.write({**{k: v for k, v in sample.items() if k != "__url__"},
                              "json": json.dumps(sample_meta).encode()})


def test_a_format_1_cache_is_read_as_before_and_not_extended(pq_cache, tmp_path, capsys):
    cache, identity = pq_cache["cache"], pq_cache["teacher"].identity
    old = str(tmp_path / "old")
    as_format_1(cache, old)
    kw = dict(batch_size=4, max_seconds=1.0, seed=5, shuffle_buffer=4, expect_teacher=identity)
    now, before = AudioBatchStream(cache, **kw), AudioBatchStream(old, **kw)
    n = now.epoch_length(0)
    for x, y in zip(take(now, n), take(before, n), strict=True):
        assert x.keys == y.keys and all(torch.equal(p, q) for p, q in zip(
            x.teacher_features, y.teacher_features, strict=True))
    DataPrep().inspect(old)
    codebook_file = os.path.join(old, "pq_codebook.npy")
    assert (f"pq codebook {codebook_file} (format 1): sha256 {file_sha256(codebook_file)} "
            "(matches the json's)") in capsys.readouterr().out
    assert not os.path.exists(os.path.join(old, CODEBOOK_FILE))  # read from pq_codebook.npy
    with pytest.raises(DataError, match=r"holds pq_codebook\.json, the codebook of a cache begun "
                                        r"by a colld before codebook format 2: .* another out_dir"):
        cache_teacher(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, old, **PQ)
    os.remove(os.path.join(old, "pq_codebook.json"))
    with pytest.raises(DataError, match=r"written by a colld before codebook format 2 \(its json "
                                        r"has teacher\.pq\)"):
        cache_teacher(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, old, **PQ)


def test_pq_cache_through_pipe_urls(pq_cache, tmp_path):
    """pipe: shards have no directory: data.codebook_file names the codebook (here away from the
    shards), checked against the identity as beside local shards; without it, one error."""
    cache, identity = pq_cache["cache"], pq_cache["teacher"].identity
    piped = f"pipe:cat {cache}/train-{{000000..000001}}.tar"
    kw = dict(batch_size=4, max_seconds=1.0, seed=5, shuffle_buffer=4, num_workers=2,
              expect_teacher=identity)
    codebook = str(tmp_path / "elsewhere.npy")
    shutil.copy(os.path.join(cache, CODEBOOK_FILE), codebook)
    local = AudioBatchStream(cache, **kw)
    kw["shard_index"] = os.path.join(cache, SHARD_INDEX)  # pipe: shards need theirs named
    streamed = AudioBatchStream(piped, **kw, codebook_file=codebook)
    n = local.epoch_length(0) + 2  # into a second epoch
    for x, y in zip(take(local, n), take(streamed, n), strict=True):
        assert x.keys == y.keys and torch.equal(x.wave, y.wave)
        assert all(torch.equal(p, q) for p, q in zip(x.teacher_features, y.teacher_features,
                                                     strict=True))
    with pytest.raises(DataError) as info:
        AudioBatchStream(piped, **kw)
    assert str(info.value) == (
        f"pq cache shard pipe:cat {cache}/train-000000.tar is a pipe: command, which has no "
        f"directory to find its {CODEBOOK_FILE} in: set data.codebook_file to the codebook's path "
        f"or URL (e.g. --data.codebook_file /mnt/cache/{CODEBOOK_FILE})")
    wrong = str(tmp_path / "wrong.npy")
    np.save(wrong, np.load(codebook, allow_pickle=False) + 1, allow_pickle=False)
    with pytest.raises(DataError, match=rf"^pq codebook {re.escape(wrong)} has sha256 .* records "
                                        r"teacher\.codebook\.sha256 .*name it in "
                                        r"data\.codebook_file"):
        AudioBatchStream(piped, **kw, codebook_file=wrong)
    with pytest.raises(DataError, match="is not a local file: this command reads local shards"):
        DataPrep().inspect(piped)  # inspect reads local caches, their codebook beside them


def test_colld_train_hands_data_codebook_file_to_the_loader(pq_cache, tmp_path):
    """`colld train` on pipe: pq shards reads the codebook data.codebook_file names: a wrong one
    is refused in one line naming it, before training starts."""
    cache = pq_cache["cache"]
    wrong = str(tmp_path / "wrong.npy")
    np.save(wrong, np.load(os.path.join(cache, CODEBOOK_FILE), allow_pickle=False) + 1,
            allow_pickle=False)
    command = [sys.executable, "-m", "colld_ds.cli", "train", "--config", str(CONFIG),
               "--teacher.path", pq_cache["teacher_dir"],
               "--data.teacher_cache", f"pipe:cat {cache}/train-{{000000..000001}}.tar",
               "--data.shard_index", os.path.join(cache, SHARD_INDEX),
               "--data.codebook_file", wrong, "--run.out_dir", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"colld: error: pq codebook {wrong} has sha256 "), done.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_inspect_describes_the_pq_codebook(pq_cache, capsys):
    cache = pq_cache["cache"]
    DataPrep().inspect(cache)
    printed = capsys.readouterr().out
    codebook_file = os.path.join(cache, CODEBOOK_FILE)
    sha256 = file_sha256(codebook_file)
    assert "all members valid" in printed
    assert (f"pq codebook {codebook_file} (format 2): sha256 {sha256} (matches the json's), "
            f"float32 (2, {M}, 256, 4): M {M} sub-vectors x 256 centroids of 4 dims (D 32), "
            "layers 2, 4") in printed
    # bytes per frame per layer, by hand from the tar headers: M codes plus headers per member
    frames = sum(json.loads(s["json"])["teacher"]["num_frames"] for s in read_samples(tars(cache)))
    stored = 0
    for path in tars(cache):
        with tarfile.open(path) as tar:
            stored += sum(1536 + -(-m.size // 512) * 512 for m in tar if m.name.endswith(".pq.npy"))
    per_frame = float(re.search(r"codec pq: uint8 \(T, M\) codes into the codebook beside the "
                                r"shards; ([\d.]+) bytes per frame per layer", printed)[1])
    assert M < per_frame == pytest.approx(stored / (frames * len(LAYERS)), abs=0.05)


def test_inspect_flags_a_missing_or_mismatched_codebook(pq_cache, tmp_path, capsys):
    copy = str(tmp_path / "copy")
    shutil.copytree(pq_cache["cache"], copy)
    codebook_file = os.path.join(copy, CODEBOOK_FILE)
    fix = ("copy the codebook.npy the cache was written with beside its shards (or name it in "
           "data.codebook_file), or re-cache with `colld prep cache-teacher --codec pq` into a "
           "new out_dir")
    os.remove(codebook_file)
    with pytest.raises(SystemExit) as info:
        DataPrep().inspect(copy)
    assert "(matches the json's)" not in capsys.readouterr().out
    (line,) = str(info.value).splitlines()[1:]  # one problem, one line
    assert line.strip().startswith(f"cannot read the pq codebook {codebook_file} ")
    assert line.endswith(fix)
    codebook = np.load(os.path.join(pq_cache["cache"], CODEBOOK_FILE), allow_pickle=False)
    np.save(codebook_file, codebook + 1, allow_pickle=False)
    with pytest.raises(SystemExit) as info:
        DataPrep().inspect(copy)
    (line,) = str(info.value).splitlines()[1:]
    assert line.strip().startswith(f"pq codebook {codebook_file} has sha256 ")
    assert "records teacher.codebook.sha256" in line and line.endswith(fix)
    np.save(codebook_file, codebook[:1], allow_pickle=False)  # one layer of two
    one_layer = file_sha256(codebook_file)
    for path in tars(copy):  # the identity now names this codebook, which has the wrong shape
        samples = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples([path])]
        with TarWriter(path) as writer:
            for sample in samples:
                meta = json.loads(sample["json"])
                meta["teacher"]["codebook"]["sha256"] = one_layer
                writer.write({**sample, "json": json.dumps(meta).encode()})
    with pytest.raises(SystemExit, match=rf"pq codebook {re.escape(codebook_file)} has shape "
                                         rf"\(1, {M}, 256, 4\), expected \(2, {M}, 256, D / M\)"):
        DataPrep().inspect(copy)


def test_inspect_flags_pq_codes_of_another_m(pq_cache, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(pq_cache["cache"], copy)
    path = tars(copy)[0]
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples([path])]
    with TarWriter(path) as writer:
        for sample in samples:
            codes = np.load(io.BytesIO(sample["l04.layer_output.pq.npy"]), allow_pickle=False)
            buf = io.BytesIO()
            np.save(buf, codes[:, :-1], allow_pickle=False)
            writer.write({**sample, "l04.layer_output.pq.npy": buf.getvalue()})
    with pytest.raises(SystemExit, match=rf"8 invalid members:\n  {re.escape(path)}: \S+\.l04\."
                                         rf"layer_output\.pq\.npy: {M - 1} codes per frame, the "
                                         rf"json's codebook has M {M} \(teacher\.codebook\."
                                         r"num_codebooks\)"):
        DataPrep().inspect(copy)


def test_pq_codebook_is_its_own_deterministic_step_shared_by_ranks(pq_cache, tmp_path,
                                                                   monkeypatch, capsys):
    audio, teacher_dir, out = pq_cache["audio"], pq_cache["teacher_dir"], str(tmp_path / "ranks")
    with pytest.raises(DataError, match=r"has no pq codebook .* learn it first with `colld prep "
                                        r"train-codebook"):
        cache_teacher(audio, teacher_dir, LAYERS, out, **PQ, rank=1, world_size=2)
    fire.Fire(DataPrep, ["train-codebook", audio, teacher_dir, "2,4", out,
                         "--num_codebooks", str(M), "--codebook_train_frames", "900"])
    bars = capsys.readouterr().err  # the long step shows where it is: frames, then layers
    assert re.search(r"codebook sample: 100%\S* \d+/900 \[", bars), bars
    assert re.search(r"pq codebook: 100%\S* 2/2 \[", bars), bars
    with open(os.path.join(out, CODEBOOK_FILE), "rb") as f, \
            open(os.path.join(pq_cache["cache"], CODEBOOK_FILE), "rb") as g:
        assert f.read() == g.read()  # same frames and seed: the same codebook, bit for bit

    def no_learning(*args):
        raise AssertionError("the codebook was learned again")

    monkeypatch.setattr("colld_ds.data_prep.codebook._learn", no_learning)
    for rank in (1, 0):
        cache_teacher(audio, teacher_dir, LAYERS, out, **PQ, rank=rank, world_size=2)
    for ours, theirs in zip(tars(out), tars(pq_cache["cache"]), strict=True):
        assert same_samples(ours, theirs)


def test_interrupted_pq_cache_resumes_with_its_codebook(pq_cache, tmp_path, monkeypatch):
    out = str(tmp_path / "resumed")
    shutil.copytree(pq_cache["cache"], out)
    first, second = tars(out)
    os.remove(second)
    shutil.copy(first, second + ".tmp")  # a shard the killed job left half written
    before = os.stat(os.path.join(out, CODEBOOK_FILE)).st_mtime_ns
    monkeypatch.setattr("colld_ds.data_prep.codebook._learn",
                        lambda *args: pytest.fail("learned again"))
    cache_teacher(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, out, **PQ)
    assert os.stat(os.path.join(out, CODEBOOK_FILE)).st_mtime_ns == before
    assert not os.path.exists(second + ".tmp")
    for ours, theirs in zip(tars(out), tars(pq_cache["cache"]), strict=True):
        assert same_samples(ours, theirs)
    # killed while learning (no json yet): learned again from the same frames and seed, the
    # same codebook, so the shards written before are kept
    os.remove(os.path.join(out, CODEBOOK_META))
    os.remove(second)
    monkeypatch.undo()
    cache_teacher(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, out, **PQ)
    assert os.stat(os.path.join(out, CODEBOOK_FILE)).st_mtime_ns != before
    assert same_samples(second, tars(pq_cache["cache"])[1])


def test_estimate_matches_a_pq_cache_written(pq_cache, tmp_path, capsys):
    out = str(tmp_path / "cache")
    fire.Fire(DataPrep, ["cache-teacher", pq_cache["audio"], pq_cache["teacher_dir"], "2,4", out,
                         "--codec", "pq", "--num_codebooks", str(M), "--estimate"])
    printed = capsys.readouterr().out
    assert not os.path.exists(out)
    total = int(re.search(r"these shards: .* \(([\d,]+) bytes\)", printed)[1].replace(",", ""))
    per_frame = float(re.search(r"layers: ([\d.]+) bytes per frame per layer", printed)[1])
    assert "codec pq" in printed and "pq codebook" in printed
    written = sum(os.path.getsize(os.path.join(pq_cache["cache"], n))
                  for n in os.listdir(pq_cache["cache"]) if n.endswith(".tar") or "codebook" in n)
    assert abs(total - written) <= 0.02 * written, (printed, written)
    # M codes per frame, plus the member's tar and npy headers spread over the frames
    frames = sum(json.loads(s["json"])["teacher"]["num_frames"]
                 for s in read_samples(tars(pq_cache["cache"])))
    members = 16 * len(LAYERS)
    assert M < per_frame < M + members * (1536 + 128 + 512) / (frames * len(LAYERS))


def test_codec_benchmark_pq_rows(pq_cache, tmp_path):
    fp16 = str(tmp_path / "fp16")
    cache_teacher(pq_cache["audio"], pq_cache["teacher_dir"], LAYERS, fp16, progress=False)
    rows = cache_codecs_benchmark(["--cache", fp16, "--out", str(tmp_path / "rows.json"),
                                   "--pq_subvectors", "8,32", "--codebook_train_frames", "900",
                                   "--rq_stages", "8", "--faiss_quantisers", "opq-8"])
    by = {(r["layer"], r["codec"]): r for r in rows}
    assert {c for _, c in by} == {"fp16", "int8-channel", "int8-frame", "pq-8", "pq-32",
                                  "rq-8", "opq-8"}
    odd = sum(json.loads(s["json"])["teacher"]["num_frames"]
              for n, s in enumerate(read_samples(tars(fp16))) if n % 2)
    for layer in LAYERS:
        pq8, pq32 = by[layer, "pq-8"], by[layer, "pq-32"]
        assert pq8["frames"] == pq32["frames"] == odd  # held out from the codebooks
        assert pq8["measured_on"] == "odd utterances (held out)"
        assert (pq8["payload_bytes_per_frame"], pq32["payload_bytes_per_frame"]) == (8, 32)
        # M = D: k-means of 256 levels per channel, close; 4 channels per byte: coarser
        assert pq32["rel_l2"] < 0.05 < pq8["rel_l2"] < 0.6 and pq32["cosine_mean"] > 0.99
        assert pq8["xlsr300m_tb_per_10k_h_3_layers"] < by[layer, "int8-channel"][
            "xlsr300m_tb_per_10k_h_3_layers"] / 20
        for other in ("rq-8", "opq-8"):      # the rq codec and faiss's opq: held out, 8 bytes
            row = by[layer, other]
            assert row["frames"] == odd and row["payload_bytes_per_frame"] == 8
            assert 0 < row["rel_l2"] < 0.6 and 0 < row["target_rel_l2"] < 1
        # the same 8 bytes as 8 stages over all 32 channels keep more than 8 sub-vectors of 4
        for key in ("rel_l2", "target_rel_l2"):
            assert by[layer, "rq-8"][key] < 0.8 * pq8[key]


@pytest.mark.parametrize("layers", [LAYERS, [4]])
def test_pq_codes_decoded_in_the_step_are_the_loaders_targets(pq_cache, layers):
    """`data.decode_codes device`: codes shipped and decoded by `CodeDecoder` (helpers)."""
    check_codes_decoded_in_the_step(pq_cache["cache"], pq_cache["teacher_dir"], layers, "pq")
