"""Audio seconds per second the loader delivers: from audio shards vs from teacher-cache shards.

Generated audio (``data_prep.generated_audio``) is written to audio shards, a tiny random
XLS-R-style teacher (``--teacher_width``, ``--teacher_layers``; only the cache's array sizes
matter here) caches its layers into cache shards, and one epoch of ``AudioBatchStream`` is read
from each with ``--workers`` DataLoader workers. Both modes decode FLAC and crop; cached mode
also reads and pads one fp16 ``(T, D)`` array per layer.

    python benchmarks/data_throughput.py            # 256 utterances, 2 workers
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.data import AudioBatchStream  # noqa: E402
from colld_ds.formats import SAMPLE_RATE  # noqa: E402
from colld_ds.models import load_teacher  # noqa: E402
from data_prep.cache import cache_teacher  # noqa: E402
from data_prep.generated_audio import generate_utterances  # noqa: E402
from data_prep.shards import write_audio_shards  # noqa: E402
from data_prep.tiny_teacher import make_tiny_teacher  # noqa: E402


def read_epoch(stream: AudioBatchStream) -> tuple[float, int, float]:
    """(audio seconds delivered, batches, wall seconds) over epoch 0."""
    batches = stream.epoch_length(0)
    audio_samples = 0
    started = time.perf_counter()
    for _, batch in zip(range(batches), stream):
        audio_samples += int(batch.wave_lengths.sum())
    return audio_samples / SAMPLE_RATE, batches, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seconds", type=float, default=4.0)
    parser.add_argument("--teacher_width", type=int, default=256)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/data_throughput_cpu.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        audio = str(root / "audio")
        write_audio_shards(generate_utterances(args.utterances, seed=0, min_seconds=2.0,
                                               max_seconds=6.0),
                           audio, max_count=args.shard_size, progress=False)
        teacher_dir = make_tiny_teacher("xlsr", str(root / "teacher"), seed=0,
                                        num_layers=args.teacher_layers,
                                        hidden_size=args.teacher_width)
        layers = list(range(1, args.teacher_layers + 1))
        cache_teacher(audio, teacher_dir, layers, str(root / "cache"), progress=False)
        identity = load_teacher(teacher_dir, layers).identity

        common = dict(batch_size=args.batch_size, max_seconds=args.max_seconds, seed=0,
                      num_workers=args.workers, shuffle_buffer=64)
        info = machine_info(torch.device("cpu"))
        rows = []
        for mode, stream in [
            ("audio", AudioBatchStream(audio, **common)),
            ("cache", AudioBatchStream(str(root / "cache"), expect_teacher=identity, **common)),
        ]:
            seconds, batches, wall = read_epoch(stream)
            rows.append(dict(mode=mode, workers=args.workers, batches=batches,
                             audio_seconds=seconds, wall_s=wall,
                             audio_s_per_s=seconds / wall,
                             cached_arrays=f"{len(layers)} x (T, {args.teacher_width}) fp16"
                             if mode == "cache" else "-", **info))
        for row in rows:
            row["ratio_to_audio"] = row["audio_s_per_s"] / rows[0]["audio_s_per_s"]
    print_table(rows, ["mode", "workers", "batches", "audio_seconds", "wall_s",
                       "audio_s_per_s", "ratio_to_audio"])
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
