"""`make-shards` (validation, skip report, workers, resume), `inspect`, `spm`, `index` and
`cache-teacher` as fire calls it."""

import csv
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece
import soundfile as sf
from webdataset import TarWriter

import colld_ds.data_prep.manifest
from colld_ds.data import read_samples
from colld_ds.formats import SAMPLE_RATE, shard_keys
from colld_ds.data_prep.cli import DataPrep
from colld_ds.data_prep.shards import exclusive_lock
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

GOOD = ["good_a", "good_b", "stereo44k", "good_c", "good_d"]


def tone(seconds, sr=SAMPLE_RATE):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture
def manifest(tmp_path):
    """5 good inputs (one 44.1 kHz stereo) and 6 bad ones, in a TSV manifest."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "good_a.wav", tone(1.0), SAMPLE_RATE)
    sf.write(audio / "good_b.flac", tone(0.8), SAMPLE_RATE)
    sf.write(audio / "stereo44k.wav", np.stack([tone(1.2, 44100), tone(1.2, 44100)], 1), 44100)
    sf.write(audio / "good_c.wav", tone(0.6), SAMPLE_RATE)
    sf.write(audio / "good_d.wav", tone(0.7), SAMPLE_RATE)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00 this is not audio")
    sf.write(audio / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    sf.write(audio / "short.wav", tone(0.1), SAMPLE_RATE)
    sf.write(audio / "nan.wav", np.array([0.1, np.nan] * 8000, np.float32), SAMPLE_RATE,
             subtype="FLOAT")
    sf.write(audio / "long.wav", tone(3.0), SAMPLE_RATE)
    names = ["good_a.wav", "corrupt.wav", "good_b.flac", "empty.wav", "stereo44k.wav",
             "missing.wav", "short.wav", "good_c.wav", "nan.wav", "long.wav", "good_d.wav"]
    path = tmp_path / "manifest.tsv"
    with open(path, "w") as f:
        f.write("path\ttext\tlang\n")
        for i, name in enumerate(names):
            f.write(f"audio/{name}\tsentence {i}\t{'en' if i % 2 else 'de'}\n")
    return str(path)


def make(manifest, out, **kwargs):
    kwargs = dict(shard_size=2, min_seconds=0.5, max_seconds=2.0, progress=False, **kwargs)
    DataPrep().make_shards(manifest, out, **kwargs)
    paths = sorted(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".tar"))
    return paths, [k for p in paths for k in shard_keys(p)]


def read_report(out):
    with open(os.path.join(out, "train.skipped.tsv")) as f:
        return {row["utt_id"]: row["reason"] for row in csv.DictReader(f, delimiter="\t")}


def test_make_shards_skips_bad_inputs_with_reasons(manifest, tmp_path, capsys):
    out = str(tmp_path / "shards")
    paths, keys = make(manifest, out, workers=2)
    assert keys == GOOD and len(paths) == 3
    report = read_report(out)
    assert set(report) == {"corrupt", "empty", "missing", "short", "nan", "long"}
    assert report["missing"] == "missing file" and report["corrupt"].startswith("unreadable")
    assert report["empty"] == "empty" and report["nan"] == "NaN or inf samples"
    assert report["short"].startswith("too short") and report["long"].startswith("too long")
    printed = capsys.readouterr().out
    assert "3 shards, 5 utterances" in printed and "skipped 6 of 11 inputs" in printed
    assert "de " in printed and "en " in printed  # hours per language
    (stereo,) = [s for s in read_samples(paths) if s["__key__"] == "stereo44k"]
    wave, sr = sf.read(io.BytesIO(stereo["flac"]))
    assert sr == SAMPLE_RATE and wave.ndim == 1 and wave.shape[0] == 19200

    same, same_keys = make(manifest, str(tmp_path / "one_worker"), workers=1)
    assert same_keys == keys and read_report(str(tmp_path / "one_worker")) == report
    with pytest.raises(SystemExit) as info:
        make(manifest, str(tmp_path / "strict"), strict=True)
    assert info.value.code not in (0, None) and "6 inputs were skipped" in str(info.value.code)


def test_make_shards_leaves_no_lock_file(manifest, tmp_path):
    out = str(tmp_path / "shards")
    make(manifest, out)
    assert "shardindex.json" in os.listdir(out)
    assert not [name for name in os.listdir(out) if name.endswith(".lock")], os.listdir(out)


def _count_under_lock(lock: str, counter: str, times: int) -> None:
    for _ in range(times):
        with exclusive_lock(lock):
            value = int(open(counter).read())
            time.sleep(0.001)                 # another holder would overwrite this increment
            with open(counter, "w") as f:
                f.write(str(value + 1))


def test_exclusive_lock_excludes_while_removing_its_file(tmp_path):
    lock, counter = str(tmp_path / "x.lock"), str(tmp_path / "counter")
    with open(counter, "w") as f:
        f.write("0")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_count_under_lock, args=(lock, counter, 40))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert open(counter).read() == "160"
    assert not os.path.exists(lock)


def test_split_long_inputs(manifest, tmp_path):
    out = str(tmp_path / "split")
    _, keys = make(manifest, out, split_long=True)
    assert [k for k in keys if k.startswith("long")] == ["long_part000", "long_part001"]
    assert "long" not in read_report(out)


def test_killed_make_shards_resumes_without_rewriting(manifest, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    paths, keys = make(manifest, out)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    os.remove(paths[-1])  # killed while writing the last shard
    with open(paths[-1] + ".tmp", "wb") as f:
        f.write(b"half a shard")

    decoded = []
    load = colld_ds.data_prep.manifest.load_audio
    monkeypatch.setattr(colld_ds.data_prep.manifest, "load_audio",
                        lambda p: decoded.append(os.path.basename(p)) or load(p))
    again, again_keys = make(manifest, out)
    assert again == paths and again_keys == keys
    assert [os.stat(p).st_mtime_ns for p in paths[:-1]] == mtimes[:-1]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # finished inputs are not decoded again; bad ones are re-checked for the report
    assert "good_a.wav" not in decoded and "good_d.wav" in decoded and "nan.wav" in decoded
    assert len(read_report(out)) == 6

    with open(manifest) as f:
        header, *rows = f.read().splitlines()
    with open(manifest, "w") as f:
        f.write("\n".join([header, *rows[::-1]]) + "\n")
    with pytest.raises(ValueError, match="holds other samples"):
        make(manifest, out)


def test_make_shards_from_a_directory_tree(tmp_path):
    for sub in ("en/spk1", "de"):
        os.makedirs(tmp_path / "tree" / sub)
        sf.write(tmp_path / "tree" / sub / "utt.1.wav", tone(0.6), SAMPLE_RATE)
    (tmp_path / "tree" / "notes.txt").write_text("not audio")
    _, keys = make(str(tmp_path / "tree"), str(tmp_path / "out"), lang="xx")
    assert keys == ["de_utt_1", "en_spk1_utt_1"]


def test_inspect_reports_and_flags_a_corrupt_member(manifest, tmp_path, capsys):
    out = str(tmp_path / "shards")
    paths, _ = make(manifest, out)
    capsys.readouterr()
    DataPrep().inspect(out)
    printed = capsys.readouterr().out
    assert "3 shards, 5 samples" in printed and "all members valid" in printed
    assert "de: 4 samples" in printed and "en: 1 samples" in printed
    assert f".flac: flac audio, {SAMPLE_RATE} Hz mono" in printed

    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples([paths[0]])]
    samples[1]["flac"] = samples[1]["flac"][:40] + b"garbage" * 10
    bad = str(tmp_path / "bad-000000.tar")
    with TarWriter(bad) as writer:
        for s in samples:
            writer.write(s)
    with pytest.raises(SystemExit) as info:
        DataPrep().inspect(bad)
    assert f"{bad}: {samples[1]['__key__']}.flac" in str(info.value.code)
    result = subprocess.run([sys.executable, "-m", "colld_ds.data_prep.cli", "inspect", bad],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "1 invalid members" in result.stderr


def test_spm_trains_on_manifest_transcripts(manifest, tmp_path, capsys):
    model = DataPrep().spm(manifest, str(tmp_path / "spm" / "m"), vocab_size=20)
    assert "sentences per language: de 6, en 5" in capsys.readouterr().out
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    pieces = processor.encode("sentence 3", out_type=str)
    assert "".join(pieces).replace("\u2581", "") == "sentence3"


def test_index_command_refreshes_the_shard_index(tmp_path, capsys):
    out = str(tmp_path / "gen")
    DataPrep().generate(out, num_utterances=6, shard_size=3)
    index = tmp_path / "gen" / "shardindex.json"
    index.unlink()
    DataPrep().index(out)
    assert f"wrote {index}" in capsys.readouterr().out
    entries = json.loads(index.read_text())["shardlist"]
    # keys and lengths as the shards hold them: independent of the index writer
    for entry in entries:
        path = os.path.join(out, entry["url"])
        assert entry["keys"] == shard_keys(path)
        durations = [json.loads(s["json"])["duration"] for s in read_samples([path])]
        assert entry["lengths"] == [round(d * SAMPLE_RATE) for d in durations]
    with pytest.raises(SystemExit, match="not a directory of shards"):
        DataPrep().index(str(tmp_path / "missing"))


def test_cache_teacher_command_takes_command_line_flags(tmp_path, capsys):
    """`colld prep cache-teacher` as fire calls it: flags arrive as strings (`--front_end true`),
    the help shows the library function's own parameters, nothing is printed back."""
    import fire


    shards = str(tmp_path / "gen")
    DataPrep().generate(shards, num_utterances=2, shard_size=2)
    teacher = make_tiny_teacher("wav2vec2", str(tmp_path / "teacher"), num_layers=2)
    out = str(tmp_path / "cache")
    fire.Fire(DataPrep, ["cache-teacher", shards, teacher, "1,2", out, "--front_end", "true",
                         "--progress", "false"])
    (shard,) = [os.path.join(out, name) for name in os.listdir(out) if name.endswith(".tar")]
    sample = next(read_samples([shard]))
    assert json.loads(sample["json"])["teacher"]["front_end"] == "utterance"
    assert "front_end.npy" in sample and "l02.layer_output.npy" in sample
    assert out not in capsys.readouterr().out          # the returned paths are not printed
    with pytest.raises(SystemExit, match="--front_end 'maybe': use true or false"):
        fire.Fire(DataPrep, ["cache-teacher", shards, teacher, "1", out, "--front_end", "maybe"])
    with pytest.raises(SystemExit):
        fire.Fire(DataPrep, ["cache-teacher", "--help"])
    assert "--window_seconds" in capsys.readouterr().err    # fire writes help to stderr
