"""Learning the codebook of a `--codec pq` (product) or `--codec rq` (residual quantisation)
teacher cache (`colld_ds.codecs`).

The codebook is its own resumable step before any cache shard is written. `codebook_for`
runs the teacher over a seeded sample of the audio (shards in a seeded order, up to
`FRAMES_PER_UTTERANCE` seeded frames of each utterance, until `train_frames` frames), learns per
layer the (M, 256, D / M) centroids by k-means in each sub-space (`train_pq_codebook`; rq: the
(M, 256, D) stage codebooks, `train_rq_codebook`), and writes `out_dir/codebook.npy`
(`formats.CODEBOOK_FILE`: float32 (L, M, 256, D / M) or (L, M, 256, D), layers in the cache
identity's order, no pickle; a `--standardise utterance` cache's codebook is learned on each
utterance's standardised frames, what it codes) and then `codebook.json` (`CODEBOOK_META`:
version, settings, the teacher identity, sha256 of the npy), each atomically; the json marks
the codebook complete. A later run with the same settings reuses it (an interrupted cache
resumes with the same codebook); other settings or another teacher are refused
(`codebook_for`), and so is an out_dir holding the `pq_codebook.json` of a cache begun by a
colld before codebook format 2. All ranks of a multi-rank cache must share one codebook: `colld
prep train-codebook` learns it once before they start, and `cache-teacher --codec pq` learns it
itself only with `world_size` 1 (otherwise it refuses, naming `train-codebook`).

k-means is faiss's (`faiss.ProductQuantizer`, 25 Lloyd iterations per sub-space from
seeded random frames, `cp.seed`): a well-kept C++ library, about 1.5 s for 20k 512-d
frames at M = 32 on one core, and deterministic: the same frames and seed give bit-identical
centroids (checked with 1 and 2 OpenMP threads). rq codebooks are faiss's too
(`faiss.ResidualQuantizer`: per stage k-means of what the earlier stages leave, with the beam
search `colld_ds.codecs.RQ_BEAM` wide), M times the k-means work of pq on D-dim rather than
D / M-dim vectors. Encoding and decoding need no faiss (`colld_ds.codecs`: numpy, and torch
for rq's beam search), so the loader does not import it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from colld_ds.codecs import RQ_BEAM, standardise_utterance
from colld_ds.data import decode_wave, read_samples
from colld_ds.errors import DataError
from colld_ds.formats import (CODEBOOK_ENTRIES, CODEBOOK_FILE, CODEBOOK_VERSION,
                              LEGACY_CODEBOOK_FILE)
from colld_ds.models import Teacher

CODEBOOK_META = "codebook.json"  # beside CODEBOOK_FILE: written last, marks it complete
FRAMES_PER_UTTERANCE = 64  # at most this many training frames from one utterance


def train_pq_codebook(frames: np.ndarray, subvectors: int, seed: int) -> np.ndarray:
    """(N, D) training frames -> float32 (M, 256, D / M) centroids, k-means per sub-space."""
    import faiss  # noqa: PLC0415  (only the codebook step needs it)

    num, width = frames.shape
    pq = faiss.ProductQuantizer(width, subvectors, 8)
    pq.cp.seed = seed
    pq.cp.max_points_per_centroid = -(-num // CODEBOOK_ENTRIES)  # use every frame given
    pq.train(np.ascontiguousarray(frames, np.float32))
    return faiss.vector_to_array(pq.centroids).reshape(subvectors, CODEBOOK_ENTRIES, -1)


def train_rq_codebook(frames: np.ndarray, stages: int, seed: int) -> np.ndarray:
    """(N, D) training frames -> float32 (M, 256, D) residual-quantisation codebooks, stage m
    learned on what stages 1..m-1 leave (module docstring)."""
    import faiss  # noqa: PLC0415  (only the codebook step needs it)

    num, width = frames.shape
    rq = faiss.ResidualQuantizer(width, stages, 8)
    rq.max_beam_size = RQ_BEAM
    rq.cp.seed = seed
    # each stage's k-means runs on the num x beam residuals the beam keeps, subsampled to
    # max_points_per_centroid x 256: faiss's default (256) or more, so that every frame given
    # counts; fewer (a cap of num points) learns worse codebooks below 65,536 frames
    rq.cp.max_points_per_centroid = max(rq.cp.max_points_per_centroid,
                                        -(-num // CODEBOOK_ENTRIES))
    rq.train(np.ascontiguousarray(frames, np.float32))
    return faiss.vector_to_array(rq.codebooks).reshape(stages, CODEBOOK_ENTRIES, width)


def sample_frames(teacher: Teacher, urls: list[str], train_frames: int, seed: int,
                  progress: bool = False, standardise: str = "none") -> list[np.ndarray]:
    """Per teacher layer, the float16-rounded float32 (N, D) frames of the seeded sample
    (module docstring), N = min(`train_frames`, frames available); `progress`: a bar of
    frames; `standardise` `utterance`: each utterance's frames standardised over all of them
    (`standardise_utterance`) before the sample and the rounding, as the cache stores them."""
    rng = np.random.default_rng(seed)
    device = next(teacher.model.parameters()).device
    picked: list[list[np.ndarray]] = [[] for _ in teacher.layers]
    total = 0
    bar = tqdm(total=train_frames, unit="frame", desc="codebook sample", disable=not progress)
    for url in (urls[i] for i in rng.permutation(len(urls))):
        for sample in read_samples([url]):
            wave = torch.from_numpy(decode_wave(sample))
            out = teacher(wave[None].to(device), torch.tensor([wave.shape[0]], device=device))
            num = int(out.frame_lengths[0])
            rows = np.sort(rng.permutation(num)[:FRAMES_PER_UTTERANCE])
            for layer, h in zip(picked, out.features, strict=True):
                frames = h[0, :num].to(torch.float16).cpu().numpy()
                if standardise != "none":
                    frames = standardise_utterance(frames).astype(np.float16)
                layer.append(frames[rows].astype(np.float32))
            total += rows.size
            bar.update(min(rows.size, train_frames - bar.n))
            if total >= train_frames:
                bar.close()
                return [np.concatenate(layer)[:train_frames] for layer in picked]
    bar.close()
    return [np.concatenate(layer) for layer in picked]


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _settings(teacher: Teacher, num_codebooks: int, train_frames: int, seed: int, codec: str,
              standardise: str) -> dict:
    """What a codebook depends on; a reused codebook must have been learned with the same (rq
    also records its encoding beam; a codebook of standardised frames records
    `standardised`)."""
    settings = {"version": CODEBOOK_VERSION, "codec": codec, "num_codebooks": num_codebooks,
                "codebook_train_frames": train_frames, "seed": seed,
                "teacher": {k: teacher.identity[k] for k in ("config_hash", "target_kind",
                                                             "layers")}}
    if standardise != "none":
        settings["standardised"] = standardise
    return settings if codec == "pq" else {**settings, "beam": RQ_BEAM}


def codebook_for(teacher: Teacher, urls: list[str], out_dir: str, num_codebooks: int,
                 train_frames: int, seed: int, learn: bool, codec: str = "pq",
                 progress: bool = False, standardise: str = "none") -> tuple[dict, np.ndarray]:
    """The cache identity's ``"codebook"`` block and the float32 codebook of a ``codec`` (pq: (L, M,
    256, D / M), rq: (L, M, 256, D)) cache in `out_dir`: the one there (complete and of the same
    settings, else DataError), or with `learn` a new one (module docstring), else DataError
    naming `colld prep train-codebook`. `progress`: bars of the sample's frames and the layers
    learned; `standardise`: the cache's `--standardise` (`sample_frames`)."""
    meta_path, npy_path = (os.path.join(out_dir, CODEBOOK_META),
                           os.path.join(out_dir, CODEBOOK_FILE))
    settings = _settings(teacher, num_codebooks, train_frames, seed, codec, standardise)
    legacy = os.path.join(out_dir, LEGACY_CODEBOOK_FILE.replace(".npy", ".json"))
    if not os.path.exists(meta_path) and os.path.exists(legacy):
        raise DataError(f"{out_dir} holds {os.path.basename(legacy)}, the codebook of a cache "
                        "begun by a colld before codebook format 2: this colld reads such "
                        "caches but does not extend them; finish it with the colld that began "
                        "it, or cache into another out_dir")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        changed = [k for k in dict.fromkeys([*settings, "standardised"])  # absent: none
                   if meta.get(k) != settings.get(k)]
        if changed:
            raise DataError(
                f"{meta_path}: the {codec} codebook in {out_dir} was learned with other "
                f"{', '.join(changed)} ({', '.join(f'{k} {meta.get(k)!r}' for k in changed)}): "
                "use the same --codec, --num_codebooks, --codebook_train_frames, --seed, "
                "--standardise and teacher, or another out_dir")
        with open(npy_path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise DataError(f"{npy_path} does not hash to the sha256 of {meta_path}: "
                            "restore the codebook, or use another out_dir")
        codebook = np.load(io.BytesIO(data), allow_pickle=False)
    elif not learn:
        raise DataError(
            f"{out_dir} has no {codec} codebook ({CODEBOOK_META}), and the ranks of a multi-rank "
            "cache must share one: learn it first with `colld prep train-codebook <shards> "
            f"<teacher> <layers> <out_dir> --codec {codec}` (same --num_codebooks, "
            "--codebook_train_frames, --seed, --standardise)")
    else:
        codebook = _learn(teacher, urls, out_dir, num_codebooks, train_frames, seed, codec,
                          progress, standardise)
        with open(npy_path, "rb") as f:
            meta = {**settings, "sha256": hashlib.sha256(f.read()).hexdigest()}
        _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    fields = {k: meta[k] for k in ("version", "num_codebooks", "sha256")}
    return fields, codebook


def _learn(teacher: Teacher, urls: list[str], out_dir: str, num_codebooks: int,
           train_frames: int, seed: int, codec: str, progress: bool, standardise: str
           ) -> np.ndarray:
    """Learn and write `out_dir/codebook.npy`; return it, float32 (L, M, 256, D / M) for pq,
    (L, M, 256, D) for rq."""
    frames = sample_frames(teacher, urls, train_frames, seed, progress, standardise)
    width = frames[0].shape[1]
    if frames[0].shape[0] < CODEBOOK_ENTRIES:
        raise DataError(f"the shards give {frames[0].shape[0]} frames, k-means of "
                        f"{CODEBOOK_ENTRIES} centroids needs at least that many: use more audio")
    learn = train_pq_codebook if codec == "pq" else train_rq_codebook
    # one layer takes minutes at rq's M = 32 (M k-means of 256 on D-dim residuals)
    layers = tqdm(frames, unit="layer", desc=f"{codec} codebook", disable=not progress)
    codebook = np.stack([learn(x, num_codebooks, seed) for x in layers])
    os.makedirs(out_dir, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, codebook, allow_pickle=False)
    _write_atomic(os.path.join(out_dir, CODEBOOK_FILE), buf.getvalue())
    print(f"{codec} codebook: {len(frames)} layers x {codebook.shape[1:]} from "
          f"{frames[0].shape[0]} frames (D {width}) -> {out_dir}/{CODEBOOK_FILE}")
    return codebook
