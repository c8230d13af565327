"""The rq cache codec: encoding against faiss's beam search and a hand greedy search, decoding
against a hand sum, a cache written, read back and described, the size estimate against it, and
the refusals that keep a cache all one codec."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import faiss
import fire
import numpy as np
import pytest

from colld_ds.codecs import RQ_BEAM, decode, encode, rq_decode, rq_encode
from colld_ds.data import AudioBatchStream
from colld_ds.errors import DataError
from colld_ds.formats import CODEBOOK_FILE
from colld_ds.models import load_teacher
from colld_ds.data_prep.cache import cache_teacher, train_codebook
from colld_ds.data_prep.cli import DataPrep
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.codebook import CODEBOOK_META, train_rq_codebook
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from helpers import CONFIG, REPO, cached_codes, check_codes_decoded_in_the_step, file_sha256

LAYERS = [2, 4]
M = 4  # residual stages over the tiny teacher's 32 channels
RQ = {"codec": "rq", "num_codebooks": M, "codebook_train_frames": 900, "progress": False}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # conftest.py


@pytest.fixture(scope="module")
def rq_cache(tmp_path_factory):
    """Tiny XLS-R teacher (32 wide), 2 audio shards x 6 utterances (2-3 s), their rq cache of
    layers 2 and 4 (M 4, codebook from 900 frames) and their fp16 cache."""
    root = tmp_path_factory.mktemp("rq")
    teacher_dir = make_tiny_teacher("xlsr", str(root / "xlsr"))
    audio = str(root / "audio")
    write_audio_shards(generate_utterances(12, 5, 2.0, 3.0, ("en",)), audio, max_count=6,
                       progress=False)
    cache_teacher(audio, teacher_dir, LAYERS, str(root / "cache"), **RQ)
    cache_teacher(audio, teacher_dir, LAYERS, str(root / "fp16"), progress=False)
    return {"teacher_dir": teacher_dir, "teacher": load_teacher(teacher_dir, LAYERS),
            "audio": audio, "cache": str(root / "cache"), "fp16": str(root / "fp16")}


def faiss_quantiser(frames: np.ndarray, stages: int, beam: int, niter: int | None = 5
                    ) -> faiss.ResidualQuantizer:
    """faiss's own residual quantiser, seed 0, trained on (N, D) `frames`; `niter` None keeps
    faiss's default Lloyd iterations (5 keeps the tests fast)."""
    rq = faiss.ResidualQuantizer(frames.shape[1], stages, 8)
    rq.max_beam_size = beam
    rq.cp.seed = 0
    if niter is not None:
        rq.cp.niter = niter
    rq.train(np.ascontiguousarray(frames, np.float32))
    return rq


def correlated_frames(num: int, width: int, seed: int) -> np.ndarray:
    """Frames with decaying per-direction scales, like a layer's: (num, width) float32."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((width, width)) / np.sqrt(width)
    scales = np.linspace(3.0, 0.1, width)
    return ((rng.standard_normal((num, width)) * scales) @ mix).astype(np.float32)


def test_rq_encode_is_faiss_beam_search_and_decode_a_sum():
    frames = correlated_frames(2560, 16, seed=0)
    rq = faiss_quantiser(frames, 3, RQ_BEAM)
    codebook = faiss.vector_to_array(rq.codebooks).reshape(3, 256, 16)
    x = correlated_frames(300, 16, seed=1)
    codes = rq_encode(x, codebook)
    assert codes.dtype == np.uint8 and codes.shape == (300, 3)
    np.testing.assert_array_equal(codes, rq.compute_codes(x))
    # the sum of gathered rows, by hand, and faiss's own decode of the same codes
    hand = np.array([sum(codebook[m, codes[t, m]] for m in range(3)) for t in range(300)])
    np.testing.assert_array_equal(rq_decode(codes, codebook), hand.astype(np.float16))
    np.testing.assert_allclose(rq_decode(codes, codebook), rq.decode(codes), atol=2e-3)
    np.testing.assert_array_equal(decode(encode(x.astype(np.float16), "rq", codebook), "rq",
                                         codebook), rq_decode(codes, codebook))
    with pytest.raises(ValueError, match=r"expected uint8 \(300, 3\), got uint8 \(300, 2\)"):
        decode([codes[:, :2]], "rq", codebook)


def test_rq_codebook_is_faiss_residual_quantizer_with_its_defaults():
    """Below 65,536 frames the codebook is the one faiss learns with its own defaults: each stage
    clusters all num x beam residuals of the beam search, not a sample of num of them."""
    frames = correlated_frames(600, 16, seed=4)
    rq = faiss_quantiser(frames, 2, RQ_BEAM, niter=None)
    np.testing.assert_array_equal(train_rq_codebook(frames, 2, seed=0),
                                  faiss.vector_to_array(rq.codebooks).reshape(2, 256, 16))


def test_rq_beam_one_is_the_greedy_search_and_a_wider_beam_is_no_worse():
    frames = correlated_frames(2560, 16, seed=2)
    codebook = faiss.vector_to_array(faiss_quantiser(frames, 4, 1).codebooks).reshape(4, 256, 16)
    x = correlated_frames(200, 16, seed=3)
    greedy = np.zeros((200, 4), np.uint8)
    for t in range(200):  # each stage: the entry nearest to what the earlier stages left
        residual = x[t].astype(np.float64)
        for m in range(4):
            greedy[t, m] = ((residual - codebook[m]) ** 2).sum(1).argmin()
            residual = residual - codebook[m, greedy[t, m]]
    assert (rq_encode(x, codebook, beam=1) == greedy).mean() > 0.99  # float32 ties aside

    def errors(codes):
        return ((rq_decode(codes, codebook).astype(np.float32) - x) ** 2).sum(1)
    assert errors(rq_encode(x, codebook, beam=4)).mean() < errors(greedy).mean()


def test_rq_cache_round_trip_and_fidelity(rq_cache):
    teacher, cache = rq_cache["teacher"], rq_cache["cache"]
    with open(os.path.join(cache, CODEBOOK_FILE), "rb") as f:
        data = f.read()
    meta = json.load(open(os.path.join(cache, CODEBOOK_META)))
    assert meta["codec"] == "rq" and meta["beam"] == RQ_BEAM
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    codebook = np.load(io.BytesIO(data), allow_pickle=False)
    assert codebook.dtype == np.float32 and codebook.shape == (2, M, 256, 32)
    hands, cosines = {}, []
    for sample, layers in cached_codes(cache, teacher, LAYERS, "rq"):
        identity = json.loads(sample["json"])["teacher"]
        assert identity["codec"] == "rq"
        assert identity["codebook"] == {"version": 2, "num_codebooks": M,
                                        "sha256": meta["sha256"]}
        hands[sample["__key__"]] = []
        for i, (ref, codes) in enumerate(layers):
            assert codes.dtype == np.uint8 and codes.shape == (ref.shape[0], M)
            hand = sum(codebook[i, m][codes[:, m]] for m in range(M))  # (T, D)
            hands[sample["__key__"]].append(hand.astype(np.float16))
            ref = ref.astype(np.float32)
            cosines.append((hand * ref).sum(1) / np.linalg.norm(hand, axis=1)
                           / np.linalg.norm(ref, axis=1))
    assert len(hands) == 12
    # 4 bytes for 32 channels; pq with 4 sub-vectors of the same teacher keeps less
    assert np.concatenate(cosines).mean() > 0.8
    stream = AudioBatchStream(cache, batch_size=1, shuffle_buffer=0,
                              expect_teacher=teacher.identity)
    for batch, _ in zip(iter(stream), range(12)):
        for feats, hand in zip(batch.teacher_features, hands[batch.keys[0]], strict=True):
            np.testing.assert_array_equal(feats[0].numpy(), hand)


def test_a_cache_is_all_one_codec_and_codebook(rq_cache, tmp_path):
    cache = rq_cache["cache"]
    with pytest.raises(DataError, match=r"learned with other codec \(codec 'rq'\): use the "
                                        r"same --codec"):
        cache_teacher(rq_cache["audio"], rq_cache["teacher_dir"], LAYERS, cache,
                      **{**RQ, "codec": "pq"})
    with pytest.raises(DataError, match=r"train-codebook learns the codebook of a pq or rq cache"):
        train_codebook(rq_cache["audio"], rq_cache["teacher_dir"], LAYERS, str(tmp_path),
                       codec="int8")
    copy = str(tmp_path / "copy")
    shutil.copytree(cache, copy)
    codebook = np.load(os.path.join(cache, CODEBOOK_FILE), allow_pickle=False)
    np.save(os.path.join(copy, CODEBOOK_FILE), codebook[:, :, :, :16], allow_pickle=False)
    sha256 = file_sha256(os.path.join(copy, CODEBOOK_FILE))
    meta = json.load(open(os.path.join(copy, CODEBOOK_META)))
    json.dump({**meta, "sha256": sha256}, open(os.path.join(copy, CODEBOOK_META), "w"))
    with pytest.raises(DataError, match=r"was written with the codebook .* restore"):
        cache_teacher(rq_cache["audio"], rq_cache["teacher_dir"], LAYERS, copy, **RQ)


def test_inspect_and_estimate_of_an_rq_cache(rq_cache, tmp_path, capsys):
    cache = rq_cache["cache"]
    DataPrep().inspect(cache)
    printed = capsys.readouterr().out
    codebook_file = os.path.join(cache, CODEBOOK_FILE)
    sha256 = file_sha256(codebook_file)
    assert "all members valid" in printed
    assert (f"rq codebook {codebook_file} (format 2): sha256 {sha256} (matches the json's), "
            f"float32 (2, {M}, 256, 32): M {M} residual stages x 256 centroids of 32 dims "
            "(D 32), layers 2, 4") in printed
    out = str(tmp_path / "cache")
    fire.Fire(DataPrep, ["cache-teacher", rq_cache["audio"], rq_cache["teacher_dir"], "2,4", out,
                         "--codec", "rq", "--num_codebooks", str(M), "--estimate"])
    printed = capsys.readouterr().out
    written = sum(os.path.getsize(os.path.join(cache, n)) for n in os.listdir(cache)
                  if n.endswith(".tar") or "codebook" in n)
    total = int(re.search(r"these shards: .* \(([\d,]+) bytes\)", printed)[1].replace(",", ""))
    assert "codec rq" in printed and not os.path.exists(out)
    assert abs(total - written) <= 0.02 * written, (printed, written)


@pytest.mark.parametrize("layers", [LAYERS, [4]])
def test_rq_codes_decoded_in_the_step_are_the_loaders_targets(rq_cache, layers):
    """`data.decode_codes device`: codes shipped and decoded by `CodeDecoder` (helpers)."""
    check_codes_decoded_in_the_step(rq_cache["cache"], rq_cache["teacher_dir"], layers, "rq")


def test_colld_train_decodes_rq_codes_in_the_step_as_the_loader_does(rq_cache, tmp_path):
    """`colld train --data.decode_codes device` (the loader ships codes, each step decodes them
    where it runs) trains on the targets of `loader`: the same loss at every step."""
    losses = {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for where in ("loader", "device"):
        out_dir = tmp_path / where
        command = [sys.executable, "-m", "colld_ds.cli", "train", "--config", str(CONFIG),
                   "--teacher.path", rq_cache["teacher_dir"],
                   "--data.teacher_cache", rq_cache["cache"], "--data.decode_codes", where,
                   "--optim.max_steps", "3", "--optim.warmup_steps", "1", "--run.log_every", "1",
                   "--run.save_every", "3",
                   "--run.out_dir", str(out_dir)]
        done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        losses[where] = [row["loss/total"] for row in rows if "loss/total" in row]
    assert len(losses["device"]) == 3
    np.testing.assert_allclose(losses["device"], losses["loader"], rtol=1e-5)
