"""pq and rq decoding at real widths: in a loader worker (numpy, `codecs.decode`) against the
training step (`codecs.CodeDecoder` on the run's device, `data.decode_codes device`).

Random codebooks and codes of the given shapes (decoding cost does not depend on the values):
per (codec, D, M), one batch of `--batch_size` utterances x `--seconds` at 50 frames/s and
`--layers` cached layers, timed `--repeats` times after one warm-up; reported as milliseconds
per batch and audio seconds decoded per second, per worker (the loader) or per device (the step).

    python benchmarks/code_decode.py                  # CPU: D 512, 1024 x M 32, 64, pq and rq
    python benchmarks/code_decode.py --device cuda --out benchmarks/results/code_decode_cuda.json
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.codecs import CodeDecoder, decode  # noqa: E402
from colld_ds.formats import CODEBOOK_ENTRIES, QUANTISED  # noqa: E402

FRAME_RATE = 50  # frames per second of audio: wav2vec 2.0, XLS-R, HuBERT, Whisper's encoder


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after one untimed call."""
    times = []
    for repeat in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat:
            times.append(time.perf_counter() - tic)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="512,1024", help="feature widths D")
    parser.add_argument("--num_codebooks", default="32,64", help="bytes per frame M")
    parser.add_argument("--codecs", default="pq,rq")
    parser.add_argument("--layers", type=int, default=3, help="cached layers per utterance")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="audio per utterance")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/code_decode_cpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    frames = round(args.seconds * FRAME_RATE)
    audio_s = args.batch_size * args.seconds
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]  # a shared machine: compare the two places in one run
    rows = []
    for codec in args.codecs.split(","):
        if codec not in QUANTISED:
            parser.error(f"--codecs {args.codecs}: pq and rq only")
        for width in map(int, args.widths.split(",")):
            for num_codebooks in map(int, args.num_codebooks.split(",")):
                sub = width // num_codebooks if codec == "pq" else width
                books = rng.standard_normal(
                    (args.layers, num_codebooks, CODEBOOK_ENTRIES, sub)).astype(np.float32)
                codes = rng.integers(0, CODEBOOK_ENTRIES, (args.layers, args.batch_size, frames,
                                                           num_codebooks), dtype=np.uint8)
                def in_loader():  # what a worker does per utterance and layer (then collate)
                    for layer in range(args.layers):
                        for row in codes[layer]:
                            decode([row], codec, books[layer])
                decoder = CodeDecoder(codec, books, device)
                on_device = [torch.from_numpy(c).to(device) for c in codes]
                lengths = torch.full((args.batch_size,), frames)
                for where, fn in (("loader worker", in_loader),
                                  (f"step on {device.type}", lambda: decoder(on_device, lengths))):
                    times = timed(fn, args.repeats, device)
                    ms = 1000 * statistics.median(times)
                    rows.append({
                        "codec": codec, "width": width, "num_codebooks": num_codebooks,
                        "where": where, "layers": args.layers, "batch_size": args.batch_size,
                        "seconds": args.seconds, "decode_ms": ms,
                        "decode_ms_min": 1000 * min(times), "decode_ms_max": 1000 * max(times),
                        "audio_s_per_s": audio_s / (ms / 1000),
                        "threads": torch.get_num_threads(), **machine_info(device)})
    for row in rows:
        row.update(loadavg_1min_before=load_before, loadavg_1min_after=os.getloadavg()[0])
    print(f"{args.layers} layers x {args.batch_size} utterances x {args.seconds:g} s "
          f"({frames} frames), median of {args.repeats}")
    print_table(rows, ["codec", "width", "num_codebooks", "where", "decode_ms", "audio_s_per_s"])
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
