"""A tiny teacher and tiny train / held-out shards, shared by the end-to-end tests."""

from pathlib import Path

from data_prep.generated_audio import generate_utterances
from data_prep.shards import write_audio_shards
from data_prep.tiny_teacher import make_tiny_teacher


def tiny_teacher_and_shards(root: Path) -> tuple[str, str, str]:
    """A 4-layer, 32-wide random wav2vec 2.0 teacher, 8 training utterances (one shard) and 6
    held-out ones (`test-*.tar`) under `root` -> (teacher dir, train dir, held-out dir)."""
    teacher = make_tiny_teacher("wav2vec2", str(root / "teacher"), seed=0, num_layers=4,
                                hidden_size=32)
    write_audio_shards(generate_utterances(8, seed=1), str(root / "train"), max_count=8,
                       progress=False)
    write_audio_shards(generate_utterances(6, seed=2), str(root / "heldout"), prefix="test",
                       max_count=8, progress=False)
    return teacher, str(root / "train"), str(root / "heldout")
