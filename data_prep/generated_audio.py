"""Deterministic generated "speech-like" audio for tests and the tiny demo (numpy only).

Each utterance is a sequence of syllables separated by short silences. A syllable is a voiced
segment: a glottal-like harmonic series on a smooth random F0 contour (90-250 Hz), weighted by
three formant-like resonances drawn per syllable, under a Hann envelope. Light white noise is
added everywhere. The made-up transcript has one consonant-vowel syllable per voiced segment;
`phones` lists the same syllables' phones. Not speech, but it has pitch, formants, onsets and
silences, which is enough to exercise the data path and make teachers produce varied features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from colld_ds.formats import SAMPLE_RATE

CONSONANTS = ("p", "t", "k", "b", "d", "g", "m", "n", "s", "l")
VOWELS = ("a", "e", "i", "o", "u")


def _syllable(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) float32 voiced segment with peak amplitude 1."""
    t = np.arange(n) / SAMPLE_RATE
    knots = rng.uniform(90.0, 250.0, size=4)  # F0 contour through 4 random points
    f0 = np.interp(t, np.linspace(0.0, t[-1], 4), knots)  # (n,) Hz
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE  # (n,)
    formants = rng.uniform((300.0, 900.0, 2200.0), (900.0, 2200.0, 3200.0))  # (3,) Hz
    k = np.arange(1, int(3800 / knots.max()) + 1)  # harmonic numbers below ~3.8 kHz
    freqs = k[:, None] * f0.mean()  # (K, 1) nominal harmonic frequencies
    amps = np.exp(-(((freqs - formants) / 150.0) ** 2)).sum(axis=1) + 0.02 / k  # (K,)
    seg = (amps[:, None] * np.sin(k[:, None] * phase)).sum(axis=0) * np.hanning(n)  # (n,)
    return (seg / (np.abs(seg).max() + 1e-9)).astype(np.float32)


def generate_wave(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, list[str]]:
    """One utterance: ((S,) float32 in [-1, 1] with S = round(seconds * SAMPLE_RATE), syllables)."""
    n = round(seconds * SAMPLE_RATE)
    wave = np.zeros(n, dtype=np.float32)
    syllables = []
    pos = int(rng.integers(800, 3200))  # 50-200 ms leading silence
    while n - pos >= 1600:  # room for a >= 100 ms syllable
        length = min(int(rng.integers(1600, 6400)), n - pos)
        wave[pos : pos + length] = rng.uniform(0.2, 0.6) * _syllable(rng, length)
        syllables.append(rng.choice(CONSONANTS) + rng.choice(VOWELS))
        pos += length + int(rng.integers(480, 3200))  # 30-200 ms gap
    wave += 0.005 * rng.standard_normal(n).astype(np.float32)
    return np.clip(wave, -1.0, 1.0), syllables


def generate_utterances(
    n: int,
    seed: int,
    min_seconds: float = 1.0,
    max_seconds: float = 3.0,
    langs: Sequence[str] = ("xx",),
) -> Iterator[dict]:
    """Yield `n` sample dicts for `write_audio_shards`, deterministic for `seed`.

    Each dict: `{"utt_id": "gen<seed>-<i:06d>", "wave": (S,) float32 16 kHz, "lang": str,
    "text": str, "phones": str}`; durations uniform in [min_seconds, max_seconds]; utterance
    `i` depends only on (seed, i) and takes lang `langs[i % len(langs)]`.
    """
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        wave, syllables = generate_wave(rng, rng.uniform(min_seconds, max_seconds))
        words = [
            "".join(syllables[j : j + 2]) for j in range(0, len(syllables), 2)
        ]  # two syllables per word
        yield {
            "utt_id": f"gen{seed}-{i:06d}",
            "wave": wave,
            "lang": langs[i % len(langs)],
            "text": " ".join(words),
            "phones": " ".join(" ".join(s) for s in syllables),
        }
