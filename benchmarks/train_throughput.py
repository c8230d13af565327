"""Training throughput: teacher online vs teacher cache, and CoLLD vs l2l step time.

One process times, side by side on the same batches and student, optimiser steps with the
teacher run online, from the teacher cache, with l2l instead of CoLLD, from a cached front end
(`--freeze_front_end`) and on other contrastive backends (`--contrastive_backends`), for an
XLS-R 300M-shaped teacher with random weights (`--full`; shrunk by default). Steps are
interleaved across runs, medians reported with per-round ratios. With `--codecs` the cache is
also written with those codecs; each codec's row times what a loader worker spends decoding one
batch's run layers (`colld_ds.data`), in the same rounds, next to the cached step, which reads the
same float16 (B, T, D) targets from any codec (checked). pq and rq get a second row: the same
batches' codes decoded in the step, on its device (`data.decode_codes device`,
`codecs.CodeDecoder`). What is timed and why: "How train_throughput.py measures" in
`benchmarks/README.md`.

    python benchmarks/train_throughput.py            # CPU default: 24 x 256 teacher, ~1.5 min
    python benchmarks/train_throughput.py --freeze_front_end   # + the cached_front_end row
    python benchmarks/train_throughput.py --full --freeze_front_end \\
        --contrastive_backends auto,dense --out benchmarks/results/train_throughput_gpu.json
    python benchmarks/train_throughput.py --codecs fp16,int8,pq,rq \\
        --out benchmarks/results/train_throughput_cpu_codecs.json
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.config import load_config  # noqa: E402
from colld_ds.data import (AudioBatchStream, cached_frames, decode_wave, expand_urls,  # noqa: E402
                           read_samples)
from colld_ds.formats import CODECS, QUANTISED, SAMPLE_RATE, FrameGeometry  # noqa: E402
from colld_ds.objectives import build_objective  # noqa: E402
from colld_ds.distill import (  # noqa: E402
    DistillationModel,
    build_run,
    distillation_loss,
    mask_batch,
    step_seed,
)
from colld_ds.data_prep.cache import cache_teacher  # noqa: E402
from colld_ds.data_prep.generated_audio import generate_utterances  # noqa: E402
from colld_ds.data_prep.shards import write_audio_shards  # noqa: E402


def make_xlsr_teacher(out_dir: str, num_layers: int, width: int, seed: int = 0) -> str:
    """A random-weight teacher of the XLS-R 300M architecture (24 x 1024 at full size)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=width, num_hidden_layers=num_layers, num_attention_heads=max(1, width // 64),
        intermediate_size=4 * width, do_stable_layer_norm=True, feat_extract_norm="layer",
        conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
        feat_extract_activation="gelu", hidden_act="gelu", mask_time_prob=0.075,
    )
    torch.manual_seed(seed)
    Wav2Vec2Model(config).eval().save_pretrained(out_dir)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(out_dir)
    return out_dir


def take_batches(stream: AudioBatchStream, n: int) -> list:
    return [batch for _, batch in zip(range(n), stream)]


def codec_cache(cache: str) -> tuple[dict[str, dict], dict[str, int]]:
    """The raw samples of ``cache`` by key and their audio lengths (16 kHz samples) by key,
    read before the timing."""
    samples = {s["__key__"]: s for s in read_samples(expand_urls(cache))}
    return samples, {key: decode_wave(s).shape[0] for key, s in samples.items()}


def decode_features(samples: list[dict], expect: dict, lengths: dict[str, int]
                    ) -> list[list[np.ndarray]]:
    """What a loader worker does to one batch's cached teacher layers: per sample its json, then
    the loader's ``colld_ds.data.cached_frames`` (identity and length checks, ``np.load`` of the
    run layers' members, ``codecs.decode``; pq: with the codebook beside the shard, read once per
    process) -> per sample float16 (T, D) arrays, whole utterances (cropped after)."""
    return [cached_frames(s, json.loads(s["json"]), expect, lengths[s["__key__"]], None)
            for s in samples]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="the XLS-R 300M shape: 24 layers x 1024 (overrides the two below)")
    parser.add_argument("--teacher_layers", type=int, default=24)
    parser.add_argument("--teacher_width", type=int, default=256)
    parser.add_argument("--student_layers", type=int, default=3)
    parser.add_argument("--freeze_front_end", action="store_true",
                        help="student.freeze_front_end: the student's conv front end does not "
                             "train; adds the cached_front_end run (data.cached_front_end)")
    parser.add_argument("--contrastive_backends", default="auto",
                        help="comma-separated objective.contrastive_backend values (auto, triton, "
                             "dense, chunked): the cached CoLLD run is timed once per backend")
    parser.add_argument("--codecs", default="",
                        help=f"comma-separated cache codecs ({', '.join(CODECS)}): per codec, "
                             "the loader's decode time per batch next to the cached step")
    parser.add_argument("--num_codebooks", type=int, default=32,
                        help="pq, rq: M bytes per frame (sub-vectors, stages)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_seconds", type=float, default=2.0, help="crop length")
    parser.add_argument("--num_negatives", type=int, default=None,
                        help="objective.num_negatives; default: 100, or the crop's frames - 1 "
                             "when fewer (98 at 2 s), which CoLLD's start-up check requires")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default). 1 by default: on a shared "
                             "2-core machine 2 threads ran 5x slower and 3x noisier")
    parser.add_argument("--out", default="benchmarks/results/train_throughput_cpu.json")
    args = parser.parse_args()
    if args.full:
        args.teacher_layers, args.teacher_width = 24, 1024
    backends = args.contrastive_backends.split(",")
    if len(set(backends)) != len(backends):
        parser.error(f"--contrastive_backends {args.contrastive_backends}: a backend is repeated")
    codecs = args.codecs.split(",") if args.codecs else []
    if not set(codecs) <= set(CODECS) or len(set(codecs)) != len(codecs):
        parser.error(f"--codecs {args.codecs}: distinct entries of {', '.join(CODECS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds = args.warmup + args.steps
    if args.num_negatives is None:
        crop_frames = FrameGeometry().num_frames(round(args.max_seconds * SAMPLE_RATE))
        args.num_negatives = min(100, crop_frames - 1)
    num_utts = args.batch_size * rounds

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        audio = str(root / "audio")
        write_audio_shards(generate_utterances(num_utts, seed=0, min_seconds=args.max_seconds + 0.1,
                                               max_seconds=args.max_seconds + 0.5),
                           audio, max_count=num_utts, progress=False)
        teacher_dir = make_xlsr_teacher(str(root / "xlsr"), args.teacher_layers,
                                        args.teacher_width)
        overrides = {"teacher.path": teacher_dir, "data.train_shards": audio,
                     "student.num_layers": args.student_layers,
                     "data.batch_size": args.batch_size, "data.max_seconds": args.max_seconds,
                     "student.freeze_front_end": args.freeze_front_end,
                     "objective.contrastive_backend": backends[0],
                     "objective.num_negatives": args.num_negatives}
        config = load_config(overrides=overrides)
        backend_configs = {
            b: load_config(overrides={**overrides, "objective.contrastive_backend": b})
            for b in backends[1:]}
        config_l2l = load_config(overrides={**overrides, "objective.name": "l2l"})
        teacher, pairs, model = build_run(config, device)
        teacher_layers = list(teacher.layers)
        student_init = copy.deepcopy(model.student)
        setup_s = time.perf_counter() - started

        started = time.perf_counter()
        cache_teacher(audio, teacher_dir, teacher_layers, str(root / "cache"), progress=False,
                      front_end=args.freeze_front_end)  # one cache serves (b) to (e)
        cache_s = time.perf_counter() - started
        caches = {c: str(root / "cache") if c == "fp16" else str(root / f"cache_{c}")
                  for c in codecs}
        for codec, cache in caches.items():
            if codec != "fp16":
                cache_teacher(audio, teacher_dir, teacher_layers, cache, progress=False,
                              codec=codec, num_codebooks=args.num_codebooks)

        common = dict(batch_size=args.batch_size, max_seconds=args.max_seconds, seed=0,
                      num_workers=0, shuffle_buffer=0)
        audio_batches = take_batches(AudioBatchStream(audio, **common), rounds)
        cached_stream = AudioBatchStream(str(root / "cache"), expect_teacher=teacher.identity,
                                         **common)
        cached_batches = take_batches(cached_stream, rounds)
        assert [b.keys for b in audio_batches] == [b.keys for b in cached_batches]
        assert all(torch.equal(a.wave, c.wave) for a, c in zip(audio_batches, cached_batches))

        def targets(batch) -> list:
            return [batch.keys] + [(f.shape, f.dtype) for f in batch.teacher_features]

        for cache in caches.values():  # the step reads the same float16 targets from any codec
            stream = AudioBatchStream(cache, expect_teacher=teacher.identity, **common)
            assert list(map(targets, take_batches(stream, rounds))) == list(
                map(targets, cached_batches))
        decoding = {codec: codec_cache(cache) for codec, cache in caches.items()}
        in_step = {}  # pq, rq: the same batches as codes, and the step's decoder
        for codec in [c for c in codecs if c in QUANTISED]:
            stream = AudioBatchStream(caches[codec], expect_teacher=teacher.identity,
                                      decode_codes=False, **common)
            in_step[codec] = (take_batches(stream, rounds), stream.code_decoder(device))

        torch.manual_seed(config.run.seed)
        l2l_model = DistillationModel(
            copy.deepcopy(student_init),
            build_objective(config_l2l.objective, pairs, model.student.hidden_size,
                            teacher.hidden_size, config_l2l.layer_map.weights)).to(device)
        def cached_copy(objective_config):
            """Student and heads as `model`'s initial ones; the CoLLD backend of the config."""
            objective = build_objective(objective_config, pairs, model.student.hidden_size,
                                        teacher.hidden_size, config.layer_map.weights)
            objective.load_state_dict(model.objective.state_dict())
            return DistillationModel(copy.deepcopy(student_init), objective).to(device)

        runs = [  # name, objective, backend, model, teacher, batches, config
            ("online", "colld", backends[0], model, teacher, audio_batches, config),
            ("cached", "colld", backends[0], cached_copy(config.objective), None, cached_batches,
             config),
            ("cached_l2l", "l2l", "-", l2l_model, None, cached_batches, config_l2l),
        ]
        runs += [(f"cached_{b}", "colld", b, cached_copy(c.objective), None, cached_batches, c)
                 for b, c in backend_configs.items()]
        if args.freeze_front_end:
            config_front_end = load_config(overrides={
                **overrides, "data.teacher_cache": str(root / "cache"),
                "data.cached_front_end": True})
            model.student.check_cached_front_end(teacher, config.data.max_seconds)
            front_end_batches = take_batches(AudioBatchStream(
                str(root / "cache"), expect_teacher=teacher.cache_identity(front_end=True),
                **common), rounds)
            assert [b.keys for b in front_end_batches] == [b.keys for b in cached_batches]
            runs.append(("cached_front_end", "colld", backends[0], cached_copy(config.objective),
                         None, front_end_batches, config_front_end))
        optims = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad],
                                    lr=config.optim.lr, betas=tuple(config.optim.betas),
                                    fused=True)
                  for _, _, _, m, _, _, _ in runs]
        times: list[list[float]] = [[] for _ in runs]
        decode_times: dict[str, list[float]] = {codec: [] for codec in decoding}
        in_step_times: dict[str, list[float]] = {codec: [] for codec in in_step}
        losses: list[float] = [0.0 for _ in runs]
        for step in range(rounds):
            for i, (_, _, _, m, t, batches, cfg) in enumerate(runs):
                batch = batches[step].to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tic = time.perf_counter()
                torch.manual_seed(step_seed(cfg, 0, step))
                masked = mask_batch(batch, teacher, cfg, step, m.objective)
                output = distillation_loss(m, t, masked, cfg, teacher_layers)
                optims[i].zero_grad(set_to_none=True)
                output.loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.optim.grad_clip)
                optims[i].step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step >= args.warmup:
                    times[i].append(time.perf_counter() - tic)
                losses[i] = float(output.loss.detach())
            for codec, (samples, lengths) in decoding.items():  # in the same round as the steps
                keys = cached_batches[step].keys
                tic = time.perf_counter()
                decode_features([samples[k] for k in keys], teacher.identity, lengths)
                if step >= args.warmup:
                    decode_times[codec].append(time.perf_counter() - tic)
            for codec, (code_batches, decoder) in in_step.items():
                batch = code_batches[step].to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tic = time.perf_counter()
                decoder(batch.teacher_codes, batch.frame_lengths)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step >= args.warmup:
                    in_step_times[codec].append(time.perf_counter() - tic)

    audio_per_batch = statistics.mean(float(b.wave_lengths.sum()) / SAMPLE_RATE
                                      for b in audio_batches)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    teacher_params = sum(p.numel() for p in teacher.model.parameters())
    info = machine_info(device)
    rows = []
    for (name, objective, backend, _, _, _, _), ts, loss in zip(runs, times, losses):
        step_s = statistics.median(ts)
        rows.append(dict(
            mode=name, objective=objective, contrastive_backend=backend,
            teacher=f"{args.teacher_layers}x{args.teacher_width}",
            teacher_params_M=teacher_params / 1e6, student_layers=args.student_layers,
            student_trainable_M=trainable / 1e6, batch_size=args.batch_size,
            crop_s=args.max_seconds, num_negatives=args.num_negatives, step_ms=1000 * step_s,
            step_ms_min=1000 * min(ts), step_ms_max=1000 * max(ts), steps=len(ts),
            warmup=args.warmup, samples_per_s=args.batch_size / step_s,
            audio_s_per_s=audio_per_batch / step_s, last_loss=loss,
            setup_s=setup_s, cache_s=cache_s, threads=torch.get_num_threads(),
            device=device.type, **info))
    by_mode = {row["mode"]: row for row in rows}
    step_times = {name: ts for (name, *_), ts in zip(runs, times)}

    def per_round(a: str, b: str) -> float:
        """Median over rounds of step(a) / step(b) (a round's runs ran back to back: steadier
        under shared load than the ratio of medians)."""
        return statistics.median(x / y for x, y in zip(step_times[a], step_times[b]))

    ratios = {  # JSON fields on every row: ratio of medians, and per round
        "cached_over_online": by_mode["online"]["step_ms"] / by_mode["cached"]["step_ms"],
        "cached_over_online_per_round": per_round("online", "cached"),
        "colld_over_l2l_step": by_mode["cached"]["step_ms"] / by_mode["cached_l2l"]["step_ms"],
        "colld_over_l2l_step_per_round": per_round("cached", "cached_l2l"),
    }
    by_mode["online"]["ratio"] = "-"
    by_mode["cached"]["ratio"] = f"cached/online {ratios['cached_over_online']:.2f}"
    by_mode["cached_l2l"]["ratio"] = f"colld/l2l {ratios['colld_over_l2l_step']:.2f}"
    for b in backends[1:]:
        ratios[f"colld_{b}_over_l2l_step"] = (by_mode[f"cached_{b}"]["step_ms"]
                                              / by_mode["cached_l2l"]["step_ms"])
        ratios[f"colld_{b}_over_l2l_step_per_round"] = per_round(f"cached_{b}", "cached_l2l")
        by_mode[f"cached_{b}"]["ratio"] = f"colld/l2l {ratios[f'colld_{b}_over_l2l_step']:.2f}"
    if "cached_front_end" in by_mode:
        ratios["cached_front_end_over_online"] = (by_mode["online"]["step_ms"]
                                                  / by_mode["cached_front_end"]["step_ms"])
        ratios["cached_front_end_over_online_per_round"] = per_round("online", "cached_front_end")
        ratios["cached_front_end_over_cached_per_round"] = per_round("cached", "cached_front_end")
        by_mode["cached_front_end"]["ratio"] = (
            f"cached_front_end/online {ratios['cached_front_end_over_online']:.2f}")
    for row in rows:
        row.update(ratios)
    decode_rows = []
    timed = [(f"decode_{codec}", codec, "a loader worker (colld_ds.data)", ts)
             for codec, ts in decode_times.items()]
    timed += [(f"decode_{codec}_in_step", codec, f"the step, on {device.type} (CodeDecoder)", ts)
              for codec, ts in in_step_times.items()]
    for mode, codec, where, ts in timed:
        decode_s = statistics.median(ts)
        decode_rows.append(dict(
            mode=mode, codec=codec, where=where,
            layers=teacher_layers, width=args.teacher_width, batch_size=args.batch_size,
            crop_s=args.max_seconds, decode_ms=1000 * decode_s, decode_ms_min=1000 * min(ts),
            decode_ms_max=1000 * max(ts), steps=len(ts),
            decode_pct_of_cached_step=100000 * decode_s / by_mode["cached"]["step_ms"],
            decode_pct_of_cached_step_per_round=100 * statistics.median(
                d / c for d, c in zip(ts, step_times["cached"])),
            decode_audio_s_per_s=audio_per_batch / decode_s,
            num_codebooks=args.num_codebooks if codec in QUANTISED else "-",
            threads=torch.get_num_threads(), device=device.type, **info))
    per_round_text = ", ".join(f"{k.removesuffix('_per_round')} {v:.2f}"
                               for k, v in ratios.items() if k.endswith("_per_round"))
    print(f"teacher {args.teacher_layers}x{args.teacher_width} ({teacher_params / 1e6:.1f}M "
          f"params), student {args.student_layers} layers ({trainable / 1e6:.1f}M trainable), "
          f"batch {args.batch_size} x {args.max_seconds} s, median of {args.steps} steps after "
          f"{args.warmup} warm-up, {torch.get_num_threads()} threads; setup {setup_s:.0f} s, "
          f"caching {cache_s:.0f} s; per-round medians: {per_round_text}")
    print_table(rows, ["mode", "objective", "contrastive_backend", "step_ms", "step_ms_min",
                       "step_ms_max", "samples_per_s", "audio_s_per_s", "ratio"])
    if decode_rows:
        print(f"decoding one batch's cached layers {teacher_layers}, per codec: in a loader "
              "worker (decode_<codec>) or in the step (pq, rq: decode_<codec>_in_step)")
        print_table(decode_rows, ["mode", "decode_ms", "decode_ms_min", "decode_ms_max",
                                  "decode_pct_of_cached_step", "decode_audio_s_per_s"])
    write_rows(rows + decode_rows, args.out)


if __name__ == "__main__":
    main()
