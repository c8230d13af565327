"""Teacher-cache codecs on a real fp16 cache: per layer, how well int8 (per-channel vs per-frame
scales), pq (M sub-vectors) and rq (M residual stages) reconstruct the fp16 features, bytes per
frame per layer, and the projected size of an XLS-R 300M cache (1024-d, 50 frames/s, 3 layers)
per 10,000 hours.

Per layer and codec: the mean and lowest per-frame cosine of decoded vs fp16 features, the
relative L2 error ``||decoded - fp16|| / ||fp16||`` over all frames, the same three of the
targets a run compares with by default (``objective.target_norm: utterance``: each utterance
standardised per dimension, ``colld_ds.objectives.base.utterance_norm``, which removes what all
its frames share and weighs every dimension alike, so that it judges a codec by what the
objective sees rather than by a few large dimensions), bytes per frame on disk
(tar and npy headers included, at this cache's utterance lengths) and of payload alone, and the
loader's decode time per frame. The projection uses the same utterance lengths at D = 1024 (pq:
the same M; the codebook, stored once, is left out). fp16 and int8 are measured on every
utterance; pq and rq on the odd-numbered utterances (in shard order) only, held out from their
codebooks, which are learned (``colld_ds.data_prep.codebook.train_pq_codebook``,
``train_rq_codebook``, seeded) on up to ``--codebook_train_frames`` frames of the even-numbered
ones, and coded with the cache's own ``colld_ds.codecs`` functions. ``--faiss_quantisers opq-M``
adds, the same way, a quantiser that is not a cache codec, to show what a codec of the same
bytes could reconstruct: pq with M sub-vectors after a learned rotation. ``--standardised``
adds, for each pq and rq row, the codec of a ``cache-teacher --standardise utterance`` cache
(``pq-M-std``, ``rq-M-std``): its codebook learned on, and its codes made of, each utterance's
standardised frames (``colld_ds.codecs.standardise_utterance``, float16-rounded as such a cache
stores them); since that cache holds standardised frames, its feature columns compare the
decoded frames with the standardised reference, and its target columns are computed as every
row's.
``--written dir,...`` adds a row per layer of each cache already written from the same audio
(any codec; pq, rq: with the codebook beside its shards, however it was learned), decoded as
the loader does, measured on every utterance: what a run on that cache trains on.

    python benchmarks/cache_codecs.py --cache demo_out/whisper/cache
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, write_rows  # noqa: E402
from colld_ds.codecs import (dequantise_int8, pq_decode, pq_encode, quantise_int8,  # noqa: E402
                             rq_decode, rq_encode, standardise_utterance)
from colld_ds.data import cached_frames, decode_wave, expand_urls, read_samples  # noqa: E402
from colld_ds.errors import DataError  # noqa: E402
from colld_ds.formats import (QUANTISED, cache_codec, codebook_identity,  # noqa: E402
                              feature_member, layer_arrays)
from colld_ds.data_prep.cache_size import member_bytes, npy_bytes  # noqa: E402
from colld_ds.data_prep.codebook import train_pq_codebook, train_rq_codebook  # noqa: E402

VARIANTS = ("fp16", "int8-channel", "int8-frame")  # int8-channel is the cache's `int8`
XLSR_WIDTH, XLSR_FRAME_RATE, XLSR_LAYERS = 1024, 50.0, 3


def stored_bytes(variant: str, num_frames: int, width: int) -> tuple[int, int]:
    """(bytes on disk with tar and npy headers, payload bytes) of one layer of one utterance."""
    if variant == "int8-frame":  # not a cache codec: int8 codes and float16 (T, 1) scales
        arrays = (((num_frames, width), "int8"), ((num_frames, 1), "float16"))
    elif variant.startswith(("pq-", "rq-", "opq-")):  # pq-32(-std): M = 32, one byte each
        arrays = layer_arrays("pq", num_frames, width, int(variant.split("-")[1]))
    else:
        arrays = layer_arrays(variant.removesuffix("-channel"), num_frames, width)
    disk = sum(member_bytes(npy_bytes(shape, dtype)) for shape, dtype in arrays)
    payload = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in arrays)
    return disk, payload


def faiss_quantiser(variant: str, frames: np.ndarray, seed: int):
    """A faiss index trained on float32 (N, D) ``frames`` whose ``sa_encode`` / ``sa_decode``
    are the ``opq-M`` quantiser (module docstring)."""
    import faiss  # noqa: PLC0415  (only these rows need it)

    kind, bytes_per_frame = variant.split("-")
    if kind != "opq":
        raise ValueError(f"--faiss_quantisers: {variant!r}; use opq-M (rq is --rq_stages)")
    width, size = frames.shape[1], int(bytes_per_frame)
    pq = faiss.IndexPQ(width, size, 8)
    pq.pq.cp.seed = seed
    index = faiss.IndexPreTransform(faiss.OPQMatrix(width, size), pq)
    index.train(np.ascontiguousarray(frames, np.float32))
    return index


def roundtrip(x: np.ndarray, variant: str, learned=None) -> tuple[np.ndarray, float]:
    """float16 (T, D) -> (decoded float32 (T, D), decode seconds); ``learned``: what the
    layer's ``codebooks`` learned for ``variant`` (pq: the (M, 256, D / M) codebook; rq: the
    (M, 256, D) one; opq: the ``faiss_quantiser``)."""
    if variant == "fp16":
        return x.astype(np.float32), 0.0
    if variant.startswith("opq-"):
        codes = learned.sa_encode(np.ascontiguousarray(x, np.float32))
        start = time.perf_counter()
        decoded = learned.sa_decode(codes)
        return decoded, time.perf_counter() - start
    if variant.startswith(("pq-", "rq-")):
        encode, decode = (pq_encode, pq_decode) if variant.startswith("pq-") else (rq_encode,
                                                                                 rq_decode)
        codes = encode(x, learned)
        start = time.perf_counter()
        decoded = decode(codes, learned)
        return decoded.astype(np.float32), time.perf_counter() - start
    codes, scale = quantise_int8(x, per=variant.removeprefix("int8-"))
    start = time.perf_counter()
    decoded = dequantise_int8(codes, scale)
    return decoded.astype(np.float32), time.perf_counter() - start


class Error:
    """Running per-frame cosines and squared errors of decoded vs reference features."""

    def __init__(self) -> None:
        self.cosines: list[np.ndarray] = []
        self.err = self.ref = 0.0

    def add(self, ref: np.ndarray, decoded: np.ndarray) -> None:
        """ref, decoded: float32 (T, D)."""
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(decoded, axis=1)
        self.cosines.append((ref * decoded).sum(1) / np.maximum(norms, 1e-12))
        self.err += float(((decoded - ref) ** 2).sum())
        self.ref += float((ref**2).sum())

    def row(self, prefix: str) -> dict:
        cosines = np.concatenate(self.cosines)
        return {f"{prefix}cosine_mean": float(cosines.mean()),
                f"{prefix}cosine_min": float(cosines.min()),
                f"{prefix}rel_l2": float(np.sqrt(self.err / self.ref))}


class Tally:
    """Running sums of one (layer, variant)."""

    def __init__(self) -> None:
        self.features, self.targets = Error(), Error()
        self.seconds = 0.0
        self.frames = self.disk = self.payload = self.xlsr_disk = 0

    def add(self, x: np.ndarray, x_target: np.ndarray, decoded: np.ndarray, seconds: float,
            variant: str) -> None:
        """x: the float16 (T, D) reference (``-std`` variants: its standardised frames, what
        their cache stores); x_target: ``standardise_utterance`` of the fp16 features (one per
        utterance and layer, shared by its variants); decoded: float32 (T, D)."""
        self.features.add(x.astype(np.float32), decoded)
        self.targets.add(x_target, standardise_utterance(decoded))
        self.seconds += seconds
        self.frames += x.shape[0]
        disk, payload = stored_bytes(variant, *x.shape)
        self.disk, self.payload = self.disk + disk, self.payload + payload
        self.xlsr_disk += stored_bytes(variant, x.shape[0], XLSR_WIDTH)[0]

    def row(self) -> dict:
        xlsr = self.xlsr_disk / self.frames
        return {
            "frames": self.frames,
            **self.features.row(""),
            **self.targets.row("target_"),
            "bytes_per_frame": self.disk / self.frames,
            "payload_bytes_per_frame": self.payload / self.frames,
            "decode_ns_per_frame": 1e9 * self.seconds / self.frames,
            "xlsr300m_bytes_per_frame": xlsr,
            "xlsr300m_tb_per_10k_h_3_layers": xlsr * XLSR_FRAME_RATE * 3600 * 1e4 * XLSR_LAYERS
            / 1e12,
        }


def utterances_of(cache: str, max_utterances: int | None
                  ) -> Iterator[tuple[str, dict, dict[int, np.ndarray]]]:
    """(key, teacher identity, {layer: float16 (T, D)}) of each utterance of the fp16 ``cache``."""
    for n, sample in enumerate(read_samples(expand_urls(cache))):
        if max_utterances is not None and n >= max_utterances:
            return
        identity = json.loads(sample["json"])["teacher"]
        if cache_codec(identity, f"{sample['__url__']}") != "fp16":
            raise DataError(f"{cache} is not an fp16 cache: the reference must be fp16")
        yield sample["__key__"], identity, {layer: np.load(io.BytesIO(sample[feature_member(
            layer, identity["target_kind"])]), allow_pickle=False) for layer in identity["layers"]}


def layers_of(cache: str, max_utterances: int | None
              ) -> Iterator[tuple[int, dict, dict[int, np.ndarray]]]:
    """(n, teacher identity, {layer: float16 (T, D)}) of each utterance of the fp16 ``cache``."""
    for n, (_, identity, layers) in enumerate(utterances_of(cache, max_utterances)):
        yield n, identity, layers


def written_rows(cache: str, written: str, max_utterances: int | None) -> list[dict]:
    """One row per layer of the cache ``written`` (a directory of any codec, pq and rq with
    their codebook beside the shards), cached from the same audio as the fp16 ``cache``: its
    frames decoded as the loader does (``colld_ds.data.cached_frames``) against the fp16 ones,
    every utterance of ``cache``; DataError naming an utterance ``written`` lacks."""
    decoded, variant = {}, None
    for sample in read_samples(expand_urls(written)):
        meta = json.loads(sample["json"])
        codec = cache_codec(meta["teacher"], written)
        variant = codec + (f"-{codebook_identity(meta['teacher'], written).num_codebooks}"
                           if codec in QUANTISED else "")
        start = time.perf_counter()
        frames = cached_frames(sample, meta, meta["teacher"], decode_wave(sample).shape[0], None)
        seconds = time.perf_counter() - start
        decoded[sample["__key__"]] = dict(zip(meta["teacher"]["layers"], frames, strict=True)), \
            seconds / len(frames)
    tallies: dict[int, Tally] = {}
    identity = None
    for key, identity, layers in utterances_of(cache, max_utterances):
        if key not in decoded:
            raise DataError(f"{written} has no utterance {key}, which {cache} has: --written "
                            "must be a cache of the same audio")
        written_layers, seconds = decoded[key]
        for layer, x in layers.items():
            tallies.setdefault(layer, Tally()).add(
                x, standardise_utterance(x), written_layers[layer].astype(np.float32), seconds,
                variant)
    return [{"teacher": identity["name"], "layer": layer,
             "codec": f"{variant} ({Path(written).name})", "measured_on": f"all, from {written}",
             **tally.row()} for layer, tally in sorted(tallies.items())]


def standardised(x: np.ndarray) -> np.ndarray:
    """float16 (T, D) -> the float16 (T, D) frames a ``--standardise utterance`` cache codes."""
    return standardise_utterance(x).astype(np.float16)


def codebooks(cache: str, max_utterances: int | None, learned: list[str], train_frames: int,
              seed: int) -> dict[tuple[int, str], object]:
    """(layer, variant) -> what each ``learned`` variant decodes with (``pq-M``: the (M, 256,
    D / M) codebook; ``rq-M``: the (M, 256, D) one; ``opq-M``: ``faiss_quantiser``; ``-std``:
    of ``standardised`` frames), learned on up to ``train_frames`` frames (seeded sample) of the
    even-numbered utterances."""
    frames: dict[tuple[int, bool], list[np.ndarray]] = {}
    for n, _, layers in layers_of(cache, max_utterances):
        for layer, x in layers.items():
            if n % 2 == 0:
                frames.setdefault((layer, False), []).append(x)
                frames.setdefault((layer, True), []).append(standardised(x))
    books = {}
    for (layer, std), xs in frames.items():
        x = np.concatenate(xs).astype(np.float32)  # (N, D)
        x = x[np.sort(np.random.default_rng(seed).permutation(len(x))[:train_frames])]
        for variant in learned:
            kind, size, *suffix = variant.split("-")
            if bool(suffix) != std:
                continue
            learn = {"pq": train_pq_codebook, "rq": train_rq_codebook}.get(kind)
            books[layer, variant] = (learn(x, int(size), seed) if learn
                                     else faiss_quantiser(variant, x, seed))
    return books


def measure(cache: str, max_utterances: int | None, subvectors: list[int] = (),
            train_frames: int = 65536, seed: int = 0, others: list[str] = (),
            stages: list[int] = (), with_standardised: bool = False) -> list[dict]:
    """One row per (layer, variant) of the fp16 cache ``cache`` (module docstring); ``others``:
    the ``--faiss_quantisers``; ``stages``: the rq rows' M; ``with_standardised``: the
    ``-std`` rows of ``--standardised``."""
    codecs = [f"pq-{m}" for m in subvectors] + [f"rq-{m}" for m in stages]
    learned = codecs + list(others) + [f"{c}-std" for c in codecs if with_standardised]
    books = codebooks(cache, max_utterances, learned, train_frames, seed)
    tallies: dict[tuple[int, str], Tally] = {}
    identity = None
    for n, identity, layers in layers_of(cache, max_utterances):
        for layer, x in layers.items():
            x_target = standardise_utterance(x)
            x_std = x_target.astype(np.float16)  # standardised(x), computed once
            for variant in [*VARIANTS, *(learned if n % 2 else ())]:
                stored = x_std if variant.endswith("-std") else x
                decoded, seconds = roundtrip(stored, variant.removesuffix("-std"),
                                             books.get((layer, variant)))
                tallies.setdefault((layer, variant), Tally()).add(stored, x_target, decoded,
                                                                  seconds, variant)
    return [{"teacher": identity["name"], "layer": layer, "codec": variant,
             "measured_on": "all" if variant in VARIANTS else "odd utterances (held out)",
             **tally.row()} for (layer, variant), tally in sorted(
                 tallies.items(), key=lambda item: item[0][0])]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="demo_out/whisper/cache", help="an fp16 teacher cache")
    parser.add_argument("--max_utterances", type=int, default=None)
    parser.add_argument("--pq_subvectors", default="32,64,128",
                        help="pq rows: M values, comma separated ('' for none)")
    parser.add_argument("--rq_stages", default="",
                        help="rq rows: M values, comma separated (default: none)")
    parser.add_argument("--faiss_quantisers", default="",
                        help="rows of quantisers that are not cache codecs: opq-M")
    parser.add_argument("--standardised", action="store_true",
                        help="also the pq and rq rows of a --standardise utterance cache")
    parser.add_argument("--written", default="",
                        help="rows of caches written from the same audio (any codec), comma "
                        "separated directories, decoded as the loader does")
    parser.add_argument("--codebook_train_frames", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/cache_codecs_whisper_demo.json")
    args = parser.parse_args(argv)
    stamp = machine_info(torch.device("cpu"))
    subvectors = [int(m) for m in args.pq_subvectors.split(",") if m]
    measured = measure(args.cache, args.max_utterances, subvectors, args.codebook_train_frames,
                       args.seed, [q for q in args.faiss_quantisers.split(",") if q],
                       [int(m) for m in args.rq_stages.split(",") if m], args.standardised)
    measured += [row for written in args.written.split(",") if written
                 for row in written_rows(args.cache, written, args.max_utterances)]
    rows = [{**row, "cache": args.cache, "codebook_train_frames": args.codebook_train_frames,
             **stamp} for row in measured]
    print("layer | codec         | cosine mean | cosine min | rel L2  | target cosine mean | "
          "target rel L2 | B/frame | decode ns/frame | XLS-R TB/10k h")
    for r in rows:
        print(f"{r['layer']:>5} | {r['codec']:<13} | {r['cosine_mean']:.6f}    | "
              f"{r['cosine_min']:.6f}   | {r['rel_l2']:.5f} | {r['target_cosine_mean']:.6f}"
              f"           | {r['target_rel_l2']:.5f}       | {r['bytes_per_frame']:7.1f} | "
              f"{r['decode_ns_per_frame']:15.0f} | {r['xlsr300m_tb_per_10k_h_3_layers']:.2f}")
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
