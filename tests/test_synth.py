"""`colld_ds.data_prep.synth`: the espeak-ng corpus has the languages, durations, splits and phoneme
strings it promises, and is the same bytes for the same seed."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections import defaultdict

import pytest
import soundfile as sf

from colld_ds.formats import SAMPLE_RATE
from colld_ds.data_prep.synth import DEFAULT_LANGS, LANGUAGES, SPLITS, sentences, synth

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"
)
LANGS = ("en", "de", "ru", "hi", "fi", "tr", "vi", "ar")  # 8 languages, 6 families
MINUTES = 0.1  # 4.8 s of train speech per language, 0.6 s of dev and of test (>= 1 utterance)


def _members(paths) -> dict[str, bytes]:
    out = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = synth(
        str(out / "a"), minutes_per_language=MINUTES, langs=",".join(LANGS), seed=0, progress=False
    )
    return out, paths


def test_default_languages_cover_families():
    assert len(DEFAULT_LANGS) >= 8
    assert len({LANGUAGES[lang][0] for lang in DEFAULT_LANGS}) >= 4
    assert len({LANGUAGES[lang][0] for lang in LANGS}) >= 4


def test_languages_durations_phones_splits(corpus):
    _, paths = corpus
    assert set(paths) == set(SPLITS)
    seconds, texts = defaultdict(float), defaultdict(set)
    for split, split_paths in paths.items():
        members = _members(split_paths)
        metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
        assert {m["lang"] for m in metas} == set(LANGS)
        for meta in metas:
            wave, sr = sf.read(io.BytesIO(members[meta["utt_id"] + ".flac"]), dtype="float32")
            assert sr == meta["sample_rate"] == SAMPLE_RATE and wave.ndim == 1
            assert meta["duration"] == pytest.approx(wave.size / sr)
            assert 0.5 < meta["duration"] < 15 and abs(wave).max() > 0.05  # speech, not silence
            assert meta["utt_id"].startswith(f"{meta['lang']}_{split}_")
            assert isinstance(meta["phones"], str) and len(meta["phones"].split()) >= 3
            assert meta["text"].endswith(".") and len(meta["text"].split()) >= 4
            seconds[meta["lang"], split] += meta["duration"]
            texts[meta["lang"], split].add(meta["text"])
    for lang in LANGS:
        for split, share in SPLITS.items():
            assert seconds[lang, split] >= MINUTES * 60 * share
        # split by sentence: no text is in two splits
        assert not texts[lang, "train"] & (texts[lang, "dev"] | texts[lang, "test"])
        assert not texts[lang, "dev"] & texts[lang, "test"]


def test_phones_are_espeak_ipa(corpus):
    _, paths = corpus
    metas = [json.loads(v) for k, v in _members(paths["train"]).items() if k.endswith(".json")]
    de = next(m for m in metas if m["lang"] == "de")
    assert "ˈ" in de["phones"]  # IPA stress marks from espeak-ng --ipa
    ru = next(m for m in metas if m["lang"] == "ru")
    assert not any("а" <= ch <= "я" for ch in ru["phones"])  # phonemes, not Cyrillic text


def test_same_seed_same_bytes(corpus):
    out, paths = corpus
    again = synth(str(out / "b"), minutes_per_language=MINUTES, langs=LANGS, seed=0, progress=False)
    for split in SPLITS:
        assert _members(paths[split]) == _members(again[split])


def test_seed_changes_sentences():
    def first(seed):
        return [text for _, _, text in itertools.islice(sentences("en", seed), 5)]

    assert first(0) == first(0) != first(1)


def test_rejects_unknown_language(tmp_path):
    with pytest.raises(ValueError, match="unsupported languages"):
        synth(str(tmp_path), langs="en,xx")
