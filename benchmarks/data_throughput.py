"""Audio seconds per second the loader delivers: from audio shards vs teacher-cache shards of
each codec.

Generated audio (``colld_ds.data_prep.generated_audio``) is written to audio shards, a tiny random
XLS-R-style teacher (``--teacher_width``, ``--teacher_layers``; only the cache's array sizes matter
here) caches its layers once per ``--codecs`` entry (``colld_ds.codecs``: fp16, int8, pq or rq with
``--num_codebooks`` M, its codebook learned first), and ``--repeats`` epochs of ``AudioBatchStream``
are read from each with ``--workers`` DataLoader workers, interleaved (audio, fp16, int8, pq, audio,
...) so that load from other processes hits every mode alike; rows give the median epoch. All modes
decode FLAC and crop; cached modes also read, decode (int8: one multiply per value; pq: a gather
from the codebook; rq: the sum of M gathers) and pad one (T, D) array per layer; pq and rq get a
second row, ``cache, codes``, where the loader ships their (T, M) uint8 codes undecoded
(``data.decode_codes device``). Bytes on disk per frame per layer: the cache shards' layer members,
tar and npy headers included (``colld_ds.data_prep.inspect_shards.layer_disk_bytes``; the pq or rq
codebook, stored once, left out).

    python benchmarks/data_throughput.py            # 256 utterances, 2 workers, ~1.5 min
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.data import AudioBatchStream, expand_urls, read_samples  # noqa: E402
from colld_ds.formats import CODECS, QUANTISED, SAMPLE_RATE  # noqa: E402
from colld_ds.models import load_teacher  # noqa: E402
from colld_ds.data_prep.cache import cache_teacher  # noqa: E402
from colld_ds.data_prep.generated_audio import generate_utterances  # noqa: E402
from colld_ds.data_prep.inspect_shards import layer_disk_bytes  # noqa: E402
from colld_ds.data_prep.shards import write_audio_shards  # noqa: E402
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher  # noqa: E402


def read_epoch(stream: AudioBatchStream) -> tuple[float, int, float]:
    """(audio seconds delivered, batches, wall seconds) over epoch 0."""
    batches = stream.epoch_length(0)
    audio_samples = 0
    started = time.perf_counter()
    for _, batch in zip(range(batches), stream):
        audio_samples += int(batch.wave_lengths.sum())
    return audio_samples / SAMPLE_RATE, batches, time.perf_counter() - started


def bytes_per_frame_per_layer(cache: str) -> float:
    """Bytes on disk of the layer members of ``cache``'s shards per frame and layer."""
    stored = frames = 0
    for sample in read_samples(expand_urls(cache)):
        teacher = json.loads(sample["json"])["teacher"]
        stored += layer_disk_bytes(sample, teacher)
        frames += teacher["num_frames"] * len(teacher["layers"])
    return stored / frames


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seconds", type=float, default=4.0)
    parser.add_argument("--teacher_width", type=int, default=256)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--codecs", default="fp16,int8,pq",
                        help=f"comma-separated cache codecs ({', '.join(CODECS)}), one cache each")
    parser.add_argument("--num_codebooks", type=int, default=32,
                        help="pq, rq: M bytes per frame (sub-vectors, stages)")
    parser.add_argument("--repeats", type=int, default=5, help="epochs per mode (median)")
    parser.add_argument("--note", default="", help="stamped on every row (e.g. other load)")
    parser.add_argument("--out", default="benchmarks/results/data_throughput_cpu.json")
    args = parser.parse_args()
    codecs = args.codecs.split(",") if args.codecs else []
    if not set(codecs) <= set(CODECS) or len(set(codecs)) != len(codecs):
        parser.error(f"--codecs {args.codecs}: distinct entries of {', '.join(CODECS)}")

    load_before = os.getloadavg()[0]
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
        identity = load_teacher(teacher_dir, layers).identity
        width, m = args.teacher_width, args.num_codebooks
        arrays = {"fp16": f"(T, {width}) fp16", "int8": f"(T, {width}) int8 + (1, {width}) fp16",
                  "pq": f"(T, {m}) uint8, M {m}", "rq": f"(T, {m}) uint8, M {m} stages"}
        common = dict(batch_size=args.batch_size, max_seconds=args.max_seconds, seed=0,
                      num_workers=args.workers, shuffle_buffer=64)
        modes = [dict(mode="audio", codec="-", cached_arrays="-", bytes_per_frame_per_layer="-",
                      stream=AudioBatchStream(audio, **common))]
        for codec in codecs:
            cache = str(root / f"cache_{codec}")
            cache_teacher(audio, teacher_dir, layers, cache, progress=False, codec=codec,
                          num_codebooks=m)
            modes.append(dict(mode="cache", codec=codec,
                              cached_arrays=f"{len(layers)} x {arrays[codec]}",
                              bytes_per_frame_per_layer=bytes_per_frame_per_layer(cache),
                              stream=AudioBatchStream(cache, expect_teacher=identity, **common)))
            if codec in QUANTISED:  # data.decode_codes device: the loader ships the codes
                modes.append(dict(modes[-1], mode="cache, codes", stream=AudioBatchStream(
                    cache, expect_teacher=identity, decode_codes=False, **common)))
        walls: list[list[float]] = [[] for _ in modes]
        for _ in range(args.repeats):
            for mode, wall in zip(modes, walls):
                seconds, batches, elapsed = read_epoch(mode["stream"])
                wall.append(elapsed)
                mode.update(audio_seconds=seconds, batches=batches)

    info = {**machine_info(torch.device("cpu")), "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0], "note": args.note}
    rows = []
    for mode, wall in zip(modes, walls):
        stream = mode.pop("stream")
        median = statistics.median(wall)
        rows.append(dict(**mode, workers=stream.num_workers, repeats=len(wall), wall_s=median,
                         wall_s_min=min(wall), wall_s_max=max(wall),
                         audio_s_per_s=mode["audio_seconds"] / median, **info))
    for row in rows:
        row["ratio_to_audio"] = row["audio_s_per_s"] / rows[0]["audio_s_per_s"]
    print(f"load average (1 min) {load_before:.2f} before, {info['loadavg_1min_after']:.2f} "
          f"after; {args.note}")
    print_table(rows, ["mode", "codec", "workers", "batches", "audio_seconds", "wall_s",
                       "audio_s_per_s", "ratio_to_audio", "bytes_per_frame_per_layer"])
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
