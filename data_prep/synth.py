"""A multilingual synthetic speech corpus: espeak-ng reading sentences of real words.

    synth("out/synth", minutes_per_language=2.0, langs=("en", "de", "ru"), seed=0)

- Text: sentences of 4-10 words drawn uniformly from the 2000 most frequent words of each
  language that `wordfreq` ships (filtered to the language's script), capitalised, ending "."
- Speech: `espeak-ng` with a voice variant (`+m3`, `+f2`, `+klatt`, ...), speed (wpm) and
  pitch drawn per utterance; 22.05 kHz output resampled to 16 kHz with soxr.
- Phonemes: espeak-ng's IPA for the same text (`--ipa`, clauses joined by " "), in `phones`.
- Splits by sentence: the text stream of a language is one deterministic sequence; sentence i
  goes to test if i % 10 == 0, dev if i % 10 == 1, else train, and a text already drawn is
  skipped, so no sentence is in two splits. Each split gets its share of
  `minutes_per_language` (80 / 10 / 10 %), at least one utterance.
- Output: audio shards `{out_dir}/{split}-NNNNNN.tar` via
  `colld_ds.data_prep.shards.write_audio_shards` (format there), utt_id `{lang}_{split}_{n:05d}`,
  `lang` the ISO 639-1 code.

Everything (texts, voices, speeds, pitches, hence audio) is a function of `seed`; espeak-ng and
soxr are deterministic, so the same call gives the same shard members byte for byte.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr
import wordfreq

from colld_ds.formats import SAMPLE_RATE
from colld_ds.data_prep.shards import write_audio_shards

_LATIN = r"a-zà-ɏḀ-ỿ\u0300-\u036f"
# code -> (language family, characters a word may contain)
LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("Indo-European", _LATIN),
    "de": ("Indo-European", _LATIN),
    "fr": ("Indo-European", _LATIN),
    "es": ("Indo-European", _LATIN),
    "ru": ("Indo-European", "а-яё"),
    "hi": ("Indo-European", "\u0900-\u097f"),
    "fi": ("Uralic", _LATIN),
    "hu": ("Uralic", _LATIN),
    "tr": ("Turkic", _LATIN),
    "vi": ("Austroasiatic", _LATIN),
    "id": ("Austronesian", _LATIN),
    "ar": ("Afro-Asiatic", "\u0621-\u064a"),
}
DEFAULT_LANGS = tuple(LANGUAGES)
VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "Andy",
    "Annie",
    "Alicia",
    "Mike",
    "steph",
)
SPEED_WPM = (130, 200)  # espeak-ng default 175
PITCH = (25, 75)  # espeak-ng default 50, range 0-99
SPLITS = {"train": 0.8, "dev": 0.1, "test": 0.1}
ESPEAK_RATE = 22050


def _rng(seed: int, lang: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(lang.encode()), *keys])


def vocabulary(lang: str, size: int = 2000) -> list[str]:
    """The `size` most frequent `wordfreq` words of `lang` written only in its script."""
    word = re.compile(f"[{LANGUAGES[lang][1]}]{{2,}}")
    words = [w for w in wordfreq.top_n_list(lang, 4 * size) if word.fullmatch(w)]
    if len(words) < size:
        raise ValueError(f"wordfreq has only {len(words)} usable {lang} words, need {size}")
    return words[:size]


def sentences(lang: str, seed: int) -> Iterator[tuple[int, str, str]]:
    """Endless `(index, split, text)` for `lang`: unique sentences, split by index (module doc)."""
    words, rng, seen = vocabulary(lang), _rng(seed, lang), set()
    for index in range(10**9):
        n = int(rng.integers(4, 11))
        text = " ".join(words[i] for i in rng.integers(0, len(words), n))
        text = text[0].upper() + text[1:] + "."
        if text in seen:
            continue
        seen.add(text)
        yield index, ("test" if index % 10 == 0 else "dev" if index % 10 == 1 else "train"), text


def speak(
    text: str, lang: str, variant: str, speed: int, pitch: int, tmp_dir: str
) -> tuple[np.ndarray, str]:
    """espeak-ng `text` -> ((S,) float32 at 16 kHz, IPA phonemes with clauses joined by " ")."""
    wav = os.path.join(tmp_dir, "utt.wav")
    cmd = [
        "espeak-ng",
        "-v",
        f"{lang}+{variant}",
        "-s",
        str(speed),
        "-p",
        str(pitch),
        "--ipa",
        "-w",
        wav,
        text,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wave, sr = sf.read(wav, dtype="float32")
    if sr != ESPEAK_RATE:
        raise ValueError(f"espeak-ng wrote {sr} Hz, expected {ESPEAK_RATE}")
    wave = soxr.resample(wave, sr, SAMPLE_RATE).astype(np.float32)
    return wave, " ".join(proc.stdout.split())


def utterances(lang: str, split: str, seconds: float, seed: int, tmp_dir: str) -> Iterator[dict]:
    """Sample dicts (`colld_ds.data_prep.shards.encode_audio_sample`) of `split` sentences of `lang`
    until their total duration reaches `seconds` (at least one)."""
    total, n = 0.0, 0
    for index, sentence_split, text in sentences(lang, seed):
        if sentence_split != split:
            continue
        rng = _rng(seed, lang, index)
        variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
        speed, pitch = (
            int(rng.integers(*SPEED_WPM, endpoint=True)),
            int(rng.integers(*PITCH, endpoint=True)),
        )
        wave, phones = speak(text, lang, variant, speed, pitch, tmp_dir)
        yield {
            "utt_id": f"{lang}_{split}_{n:05d}",
            "wave": wave,
            "lang": lang,
            "text": text,
            "phones": phones,
        }
        total, n = total + wave.size / SAMPLE_RATE, n + 1
        if total >= seconds:
            return


def synth(
    out_dir: str,
    minutes_per_language: float = 2.0,
    langs: Sequence[str] = DEFAULT_LANGS,
    seed: int = 0,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Write the corpus (module docstring) to `out_dir`; return `{split: shard paths}`.

    `langs`: codes from `LANGUAGES`, a sequence or a comma-separated string. Complete shards
    from an earlier run are kept (`write_audio_shards` resumes).
    """
    langs = tuple(langs.split(",")) if isinstance(langs, str) else tuple(langs)
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"unsupported languages {unknown}; choose from {', '.join(LANGUAGES)}")
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng not found: apt-get install espeak-ng (scripts/setup.sh does)")
    paths = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        for split, share in SPLITS.items():
            seconds = minutes_per_language * 60 * share
            samples = (
                utt for lang in langs for utt in utterances(lang, split, seconds, seed, tmp_dir)
            )
            paths[split] = write_audio_shards(
                samples, out_dir, split, shard_size, progress=progress
            )
    return paths
