"""Teacher-cache codecs (int8 against a hand computation, the cache and the loader), the codec in
the cache identity, the size estimate against caches actually written, the free-space check,
and the codec benchmark's plumbing."""

import collections
import io
import itertools
import json
import os
import re

import fire
import numpy as np
import pytest
import torch
from webdataset import TarWriter

from benchmarks.cache_codecs import main as cache_codecs_benchmark
from benchmarks.cache_estimate import main as cache_estimate_benchmark
from benchmarks.code_decode import main as code_decode_benchmark
from colld_ds.codecs import decode, quantise_int8
from colld_ds.data import AudioBatchStream, decode_wave, expand_urls, read_samples
from colld_ds.errors import DataError
from colld_ds.models import load_teacher
from colld_ds.data_prep.cache import cache_teacher
from colld_ds.data_prep.cli import DataPrep
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import ShardWriteError, write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

LAYERS = [2, 4]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Tiny XLS-R teacher (32 wide), 3 audio shards x 4 utterances (0.4-1.2 s), their fp16 and
    int8 caches of layers 2 and 4, and 2 shards x 8 longer utterances (2-3 s, "long")."""
    root = tmp_path_factory.mktemp("codecs")
    teacher_dir = make_tiny_teacher("xlsr", str(root / "xlsr"))
    audio = str(root / "audio")
    write_audio_shards(generate_utterances(12, 3, 0.4, 1.2, ("en", "de")), audio, max_count=4,
                       progress=False)
    write_audio_shards(generate_utterances(16, 5, 2.0, 3.0, ("en",)), str(root / "long"),
                       max_count=8, progress=False)
    out = {codec: str(root / codec) for codec in ("fp16", "int8")}
    for codec, directory in out.items():
        cache_teacher(audio, teacher_dir, LAYERS, directory, codec=codec, progress=False)
    return {"teacher_dir": teacher_dir, "teacher": load_teacher(teacher_dir, LAYERS),
            "audio": audio, "long": str(root / "long"), **out}


def tar_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
               if n.endswith(".tar"))


def size(text: str) -> float:
    """Bytes of a size ``human`` printed: ``12.3 kB``."""
    number, unit = text.split()
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def rewrite(src: str, dst: str, change) -> None:
    """Copy shard ``src`` to ``dst`` with ``change(sample)`` applied to each sample."""
    with TarWriter(dst) as writer:
        for sample in read_samples([src]):
            writer.write(change({k: v for k, v in sample.items() if k != "__url__"}))


def hand_int8(x: np.ndarray, per: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 by hand, in float64: (codes, scale) with the scale shaped to broadcast."""
    lines = x.T if per == "channel" else x  # the values sharing one scale, line by line
    scale = np.array([np.float16(max(abs(float(v)) for v in line) / 127) for line in lines])
    wide = np.expand_dims(scale.astype(np.float64), 0 if per == "channel" else 1)
    codes = np.where(wide > 0, np.round(x / np.where(wide > 0, wide, 1)), 0)
    return codes, wide


def test_int8_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12)).astype(np.float16)
    x[:, 3] *= 40  # an outlier channel
    x[:, 5] = 0  # a silent channel
    for per in ("channel", "frame"):
        codes, scale = quantise_int8(x, per)
        hand, wide = hand_int8(x, per)
        assert codes.dtype == np.int8 and scale.dtype == np.float16
        np.testing.assert_array_equal(scale.astype(np.float64), wide)
        assert np.abs(codes - hand).max() <= 1 and (codes == hand).mean() > 0.99
        assert np.abs(codes.astype(int)).max() <= 127
        decoded = (codes * wide).astype(np.float16).astype(np.float64)
        # within half a step, plus float16 rounding of the decoded value
        assert (np.abs(decoded - x) <= wide / 2 * 1.001 + np.abs(x) * 2**-10).all()
    codes, scale = quantise_int8(x)
    assert not codes[:, 5].any() and scale[0, 5] == 0
    with pytest.raises(ValueError, match=r"expected float16 \(1, 12\), got float16 \(40, 1\)"):
        decode(list(quantise_int8(x, "frame")), "int8")  # the cache stores per-channel scales


def test_int8_cache_round_trip(caches):
    teacher, kind = caches["teacher"], "layer_output"
    decoded = {}
    for sample in read_samples(sorted(os.path.join(caches["int8"], n)
                                      for n in os.listdir(caches["int8"]) if n.endswith(".tar"))):
        meta = json.loads(sample["json"])
        assert meta["teacher"]["codec"] == "int8"
        wave = decode_wave(sample)
        out = teacher(torch.from_numpy(wave)[None], torch.tensor([wave.shape[0]]))
        hands = []
        for layer, feats in zip(LAYERS, out.features):
            ref = feats[0].numpy().astype(np.float64)  # (T, D), computed here, not read
            assert f"l{layer:02d}.{kind}.npy" not in sample
            codes = np.load(io.BytesIO(sample[f"l{layer:02d}.{kind}.int8.npy"]), allow_pickle=False)
            scale = np.load(io.BytesIO(sample[f"l{layer:02d}.{kind}.scale.npy"]),
                            allow_pickle=False)
            assert codes.dtype == np.int8 and codes.shape == ref.shape
            assert scale.dtype == np.float16 and scale.shape == (1, ref.shape[1])
            hand = codes.astype(np.float64) * scale.astype(np.float64)
            step = scale.astype(np.float64)
            assert (np.abs(hand - ref) <= step / 2 * 1.01 + 2e-3 * np.abs(ref).max()).all()
            hands.append(hand.astype(np.float16))
        decoded[sample["__key__"]] = hands
    assert len(decoded) == 12
    stream = AudioBatchStream(caches["int8"], batch_size=1, shuffle_buffer=0,
                              expect_teacher=teacher.identity)
    for batch in itertools.islice(iter(stream), 12):
        for feats, hand in zip(batch.teacher_features, decoded[batch.keys[0]]):
            assert feats.dtype == torch.float16
            np.testing.assert_array_equal(feats[0].numpy(), hand)


def test_codec_refusals(caches, tmp_path):
    identity = caches["teacher"].identity
    shard = sorted(n for n in os.listdir(caches["int8"]) if n.endswith(".tar"))[0]

    def with_codec(codec):
        def change(sample):
            meta = json.loads(sample["json"])
            if codec is None:
                del meta["teacher"]["codec"]
            else:
                meta["teacher"]["codec"] = codec
            return {**sample, "json": json.dumps(meta).encode()}
        return change

    (tmp_path / "int4").mkdir()
    rewrite(os.path.join(caches["int8"], shard), str(tmp_path / "int4" / shard),
            with_codec("int4"))
    with pytest.raises(DataError) as info:
        AudioBatchStream(str(tmp_path / "int4"), batch_size=1, expect_teacher=identity)
    message = str(info.value)
    assert "\n" not in message and f"int4/{shard}" in message
    assert "teacher.codec 'int4'" in message and "--codec fp16" in message
    # a cache written before codecs (no codec field) is fp16 and still reads
    (tmp_path / "old").mkdir()
    rewrite(os.path.join(caches["fp16"], shard), str(tmp_path / "old" / shard), with_codec(None))
    old = AudioBatchStream(str(tmp_path / "old"), batch_size=1, shuffle_buffer=0,
                           expect_teacher=identity)
    new = AudioBatchStream(caches["fp16"], batch_size=1, shuffle_buffer=0,
                           expect_teacher=identity)
    by_key = {b.keys[0]: b.teacher_features for b in itertools.islice(iter(new), 12)}
    for batch in itertools.islice(iter(old), 4):
        assert all(torch.equal(x, y) for x, y in zip(batch.teacher_features,
                                                     by_key[batch.keys[0]], strict=True))
    with pytest.raises(DataError, match=r"written with --codec int8, this run has --codec fp16"):
        cache_teacher(caches["audio"], caches["teacher_dir"], LAYERS, caches["int8"],
                      progress=False)
    with pytest.raises(DataError, match=r"--codec 'int4': use one of fp16, int8, pq"):
        cache_teacher(caches["audio"], caches["teacher_dir"], LAYERS, str(tmp_path / "x"),
                      codec="int4", progress=False)


@pytest.mark.parametrize("codec,front_end", [("fp16", False), ("int8", False), ("int8", True)])
def test_estimate_matches_the_cache_written(caches, tmp_path, capsys, codec, front_end):
    """Exact but for the json's block padding and each tar's end padding (up to 10 KiB)."""
    out = str(tmp_path / "cache")
    fire.Fire(DataPrep, ["cache-teacher", caches["long"], caches["teacher_dir"], "2,4", out,
                         "--codec", codec, "--front_end", str(front_end).lower(), "--estimate"])
    printed = capsys.readouterr().out
    assert not os.path.exists(out)  # wrote nothing
    total = int(re.search(r"these shards: .* \(([\d,]+) bytes\)", printed)[1].replace(",", ""))
    assert f"codec {codec}" in printed and "10,000 h" in printed
    cache_teacher(caches["long"], caches["teacher_dir"], LAYERS, out, codec=codec,
                  front_end=front_end, progress=False)
    written = tar_bytes(out)
    assert abs(total - written) <= 0.02 * written, (printed, written)
    # per hour: the same bytes over the audio's hours
    seconds = sum(json.loads(s["json"])["duration"] for s in read_samples(
        sorted(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".tar"))))
    per_hour = size(re.search(r"whole cache: ([\d.]+ \w+) per hour", printed).group(1))
    assert abs(per_hour * seconds / 3600 - written) <= 0.02 * written


def test_estimate_benchmark_reads_each_cache_identity(caches, tmp_path):
    """`benchmarks/cache_estimate.py` estimates each written cache from its own identity."""
    out = tmp_path / "estimate.json"
    rows = cache_estimate_benchmark(["--shards", caches["audio"], "--teacher",
                                     caches["teacher_dir"], "--out", str(out),
                                     "--caches", f"{caches['fp16']},{caches['int8']}"])
    assert json.loads(out.read_text()) == rows
    assert [(r["codec"], r["layers"]) for r in rows] == [("fp16", "2,4"), ("int8", "2,4")]
    for row, codec in zip(rows, ("fp16", "int8"), strict=True):
        assert row["written_bytes"] == tar_bytes(caches[codec])
        assert abs(row["estimated_bytes"] - row["written_bytes"]) <= 0.02 * row["written_bytes"]
        assert row["estimate_error_pct"] == pytest.approx(
            100 * (row["estimated_bytes"] / row["written_bytes"] - 1))


def test_cache_refuses_when_the_disk_will_not_fit_it(caches, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("colld_ds.data_prep.cache_size.shutil.disk_usage",
                        lambda path: usage(10**9, 0, 50_000))
    out = str(tmp_path / "cache")
    with pytest.raises(ShardWriteError, match=r"need about .* but .*cache has 50\.0 kB free"):
        cache_teacher(caches["audio"], caches["teacher_dir"], LAYERS, out, progress=False)
    assert os.listdir(out) == []


def test_inspect_validates_an_int8_cache(caches, tmp_path, capsys):
    DataPrep().inspect(caches["int8"])
    printed = capsys.readouterr().out
    assert "all members valid" in printed and '"codec": "int8"' in printed
    assert ".l04.layer_output.int8.npy: int8 (T, 32) codes" in printed
    assert ".l04.layer_output.scale.npy: float16 (1, 32) scales" in printed
    shard = sorted(n for n in os.listdir(caches["int8"]) if n.endswith(".tar"))[0]

    def drop_scale(sample):
        return {k: v for k, v in sample.items() if k != "l02.layer_output.scale.npy"}

    rewrite(os.path.join(caches["int8"], shard), str(tmp_path / shard), drop_scale)
    with pytest.raises(SystemExit, match=r"\S+\.l02\.layer_output\.scale\.npy: missing"):
        DataPrep().inspect(str(tmp_path / shard))


def test_codec_benchmark_plumbing(caches, tmp_path):
    out = tmp_path / "codecs.json"
    rows = cache_codecs_benchmark(["--cache", caches["fp16"], "--out", str(out),
                                   "--pq_subvectors", ""])  # pq: tests/test_cache_pq.py
    assert json.loads(out.read_text()) == rows
    by = {(r["layer"], r["codec"]): r for r in rows}
    assert set(by) == {(layer, c) for layer in LAYERS for c in ("fp16", "int8-channel",
                                                                "int8-frame")}
    arrays = [np.load(io.BytesIO(s["l02.layer_output.npy"]), allow_pickle=False).astype(float)
              for s in read_samples(sorted(os.path.join(caches["fp16"], n)
                                           for n in os.listdir(caches["fp16"])
                                           if n.endswith(".tar")))]
    for per in ("channel", "frame"):  # relative L2 of layer 2 by hand
        err = sum(((np.multiply(*hand_int8(x, per)) - x) ** 2).sum() for x in arrays)
        rel_l2 = np.sqrt(err / sum((x**2).sum() for x in arrays))
        assert by[2, f"int8-{per}"]["rel_l2"] == pytest.approx(rel_l2, rel=1e-2)

        def standardised(x):           # per utterance and dimension, as target_norm utterance
            return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
        pairs = [(standardised(x), standardised(np.multiply(*hand_int8(x, per))))
                 for x in arrays]
        err = sum(((decoded - ref) ** 2).sum() for ref, decoded in pairs)
        target_rel_l2 = np.sqrt(err / sum((ref**2).sum() for ref, _ in pairs))
        assert by[2, f"int8-{per}"]["target_rel_l2"] == pytest.approx(target_rel_l2, rel=1e-2)
    for layer in LAYERS:
        assert by[layer, "fp16"]["rel_l2"] == 0
        assert by[layer, "fp16"]["cosine_min"] == pytest.approx(1, abs=1e-6)
        assert by[layer, "fp16"]["target_rel_l2"] == 0
        for codec in ("int8-channel", "int8-frame"):
            assert 0 < by[layer, codec]["rel_l2"] < 0.02 and by[layer, codec]["cosine_min"] > 0.99
        frames = by[layer, "fp16"]["frames"]
        assert by[layer, "fp16"]["payload_bytes_per_frame"] == 64  # 32 wide, float16
        assert by[layer, "int8-frame"]["payload_bytes_per_frame"] == 32 + 2
        assert by[layer, "int8-channel"]["payload_bytes_per_frame"] == pytest.approx(
            32 + 64 * 12 / frames)
        # XLS-R 300M at 3 layers in fp16: 2048 bytes x 50 frames x 36e6 s, plus headers
        assert 11.05 < by[layer, "fp16"]["xlsr300m_tb_per_10k_h_3_layers"] < 11.6


def test_codec_benchmark_measures_written_caches(caches, tmp_path):
    rows = cache_codecs_benchmark(["--cache", caches["fp16"], "--out", str(tmp_path / "r.json"),
                                   "--pq_subvectors", "",
                                   "--written", f"{caches['int8']},{caches['fp16']}"])
    by = {(r["layer"], r["codec"]): r for r in rows}
    arrays = [np.load(io.BytesIO(s["l04.layer_output.npy"]), allow_pickle=False).astype(float)
              for s in read_samples(expand_urls(caches["fp16"]))]
    written_int8 = by[4, "int8 (int8)"]
    err = sum(((np.multiply(*hand_int8(x, "channel")) - x) ** 2).sum() for x in arrays)
    assert written_int8["rel_l2"] == pytest.approx(np.sqrt(err / sum((x**2).sum()
                                                                      for x in arrays)), rel=1e-2)
    assert written_int8["frames"] == sum(len(x) for x in arrays)
    assert written_int8["measured_on"] == f"all, from {caches['int8']}"
    assert by[4, "fp16 (fp16)"]["rel_l2"] == 0 and by[4, "fp16 (fp16)"]["target_rel_l2"] == 0
    part = tmp_path / "part"
    part.mkdir()
    first = sorted(n for n in os.listdir(caches["int8"]) if n.endswith(".tar"))[0]
    os.link(os.path.join(caches["int8"], first), part / first)
    with pytest.raises(DataError, match=rf"{part} has no utterance \S+, which .* has"):
        cache_codecs_benchmark(["--cache", caches["fp16"], "--out", str(tmp_path / "p.json"),
                                "--pq_subvectors", "", "--written", str(part)])


def test_code_decode_benchmark_plumbing(tmp_path):
    out = tmp_path / "decode.json"
    rows = code_decode_benchmark(["--widths", "16", "--num_codebooks", "4,8", "--layers", "2",
                                  "--batch_size", "2", "--seconds", "0.2", "--repeats", "2",
                                  "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["codec"], r["num_codebooks"], r["where"]) for r in rows] == [
        (codec, m, where) for codec in ("pq", "rq") for m in (4, 8)
        for where in ("loader worker", "step on cpu")]
    for row in rows:
        assert row["decode_ms_min"] <= row["decode_ms"] <= row["decode_ms_max"]
        assert row["audio_s_per_s"] == pytest.approx(2 * 0.2 / (row["decode_ms"] / 1000))
