"""How close a trimmed Whisper window (``teacher.window_seconds``) is to Whisper's 30 s window.

Whisper's encoder was trained on 30 s windows only. ``teacher.window_seconds`` pads utterances
to a shorter window and keeps the first 50 x window positional embeddings, which is much cheaper
but an approximation. This script runs the same utterances through the full-window teacher and
through each trimmed one and reports, per layer, the cosine similarity of their outputs on the
valid (unpadded) frames: mean over frames and the lowest frame, plus the forward time of each.

Needs a converted Whisper directory (``colld prep convert-whisper base``) and audio shards whose
utterances fit every window (the demo's test split: ``demo_out/whisper/corpus/test-*.tar``).

    python benchmarks/whisper_window.py --teacher ~/.cache/colld/whisper-base-hf \\
        --shards 'demo_out/whisper/corpus/test-*.tar' --windows 8,10
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.data import decode_audio, expand_urls, read_samples  # noqa: E402
from colld_ds.formats import SAMPLE_RATE  # noqa: E402
from colld_ds.models import load_teacher, read_num_layers  # noqa: E402


def padded_batches(waves: list, batch_size: int):
    """(S,) float32 arrays -> ((B, S_max) zero-padded, (B,) lengths) batches, in order."""
    for start in range(0, len(waves), batch_size):
        chunk = waves[start:start + batch_size]
        lengths = torch.tensor([len(w) for w in chunk])
        batch = torch.zeros(len(chunk), int(lengths.max()))
        for row, wave in zip(batch, chunk):
            row[:len(wave)] = torch.from_numpy(wave)
        yield batch, lengths


def timed(model, batch, lengths):
    started = time.perf_counter()
    output = model(batch, lengths)
    return output, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="Hugging Face Whisper directory")
    parser.add_argument("--shards", required=True, help="audio shards (pattern or directory)")
    parser.add_argument("--windows", default="8", help="comma-separated window seconds")
    parser.add_argument("--max_utterances", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/whisper_window_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    layers = list(range(1, read_num_layers(args.teacher) + 1))
    windows = [float(w) for w in args.windows.split(",")]
    full = load_teacher(args.teacher, layers)
    trimmed = {w: load_teacher(args.teacher, layers, window_seconds=w) for w in windows}
    waves = [s["wave"] for s in decode_audio(read_samples(expand_urls(args.shards)))]
    waves = waves[:args.max_utterances]
    cos_sum = {w: torch.zeros(len(layers), dtype=torch.float64) for w in windows}
    cos_min = {w: torch.ones(len(layers), dtype=torch.float64) for w in windows}
    seconds = {"30": 0.0, **{w: 0.0 for w in windows}}
    frames = 0
    for batch, lengths in padded_batches(waves, args.batch_size):
        reference, spent = timed(full, batch, lengths)
        seconds["30"] += spent
        valid = torch.arange(reference.features[0].shape[1]) < reference.frame_lengths[:, None]
        frames += int(valid.sum())
        for window, model in trimmed.items():
            output, spent = timed(model, batch, lengths)
            seconds[window] += spent
            for i, (ours, theirs) in enumerate(zip(output.features, reference.features)):
                cos = torch.nn.functional.cosine_similarity(ours[valid].double(),
                                                            theirs[valid].double(), dim=-1)
                cos_sum[window][i] += cos.sum()
                cos_min[window][i] = min(cos_min[window][i], cos.min())

    info = machine_info(torch.device("cpu"))
    audio_seconds = sum(len(w) for w in waves) / SAMPLE_RATE
    rows = []
    for window in windows:
        for i, layer in enumerate(layers):
            rows.append(dict(window_s=window, layer=layer,
                             mean_cos=float(cos_sum[window][i] / frames),
                             min_cos=float(cos_min[window][i]), frames=frames,
                             utterances=len(waves), audio_s=audio_seconds,
                             forward_s=seconds[window], forward_s_30=seconds["30"],
                             speedup_vs_30=seconds["30"] / seconds[window],
                             threads=args.threads, teacher=args.teacher, **info))
    print_table(rows, ["window_s", "layer", "mean_cos", "min_cos", "forward_s",
                       "forward_s_30", "speedup_vs_30"])
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
