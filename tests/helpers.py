"""Helpers shared by several test modules (their fixtures are in conftest.py)."""

import contextlib
import functools
import hashlib
import http.server
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from colld_ds.checkpoint import save_checkpoint
from colld_ds.data import AudioBatchStream, decode_wave, read_samples
from colld_ds.formats import CODEBOOK_FILE
from colld_ds.models import load_teacher
from colld_ds.remote import aws_cli
from colld_ds.layer_map import LayerPair
from colld_ds.report import EncoderSize, FidelityReport, LossCurves, ModelFidelity
from colld_ds.data_prep.generated_audio import generate_utterances
from colld_ds.data_prep.shards import write_audio_shards
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny-wav2vec2_to_2l_colld.yaml"
MAX_STEPS = 16
"""Optimiser steps of a run made with ``overrides``."""


def overrides(assets: dict, out_dir, **extra) -> dict:
    """Config overrides of a short run of CONFIG on the ``train_assets`` fixture into
    ``out_dir``: MAX_STEPS steps, logged every step, saved every 8; ``extra`` on top."""
    values = {"teacher.path": assets["teacher"], "data.train_shards": assets["shards"],
              "run.out_dir": str(out_dir), "optim.max_steps": MAX_STEPS, "run.log_every": 1,
              "run.save_every": 8, "optim.warmup_steps": 2, "optim.lr": 1e-3}
    values.update(extra)
    return values


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


def fidelity_report(pairs: list[str], models: dict[str, ModelFidelity], student_parameters=1000,
                    **fields) -> FidelityReport:
    """A hand-made eval report of ``models`` on pairs named ``s<k>_t<l>``; the other fields are
    placeholders unless given."""
    values = dict(
        checkpoint="/runs/x/checkpoints/step00000006", shards="test", utterances=6,
        audio_seconds=9.0, frames=400, target_kind="layer_output",
        pairs=[LayerPair(*map(int, re.findall(r"\d+", name))) for name in pairs],
        teacher=EncoderSize(4, 5000, 0.02, 0.1, "teacher"),
        student=EncoderSize(2, student_parameters, 0.004, 0.05), cpu_threads=1, models=models,
        loss_curves=LossCurves("no training logs", {}))
    return FidelityReport(**{**values, **fields})


def take(stream, n):
    """The first n batches of an `AudioBatchStream` (a fresh iterator)."""
    return list(itertools.islice(iter(stream), n))


def keys_of(batches):
    """Sample keys of batches, in order."""
    return [k for b in batches for k in b.keys]


# --- a stand-in for a DeepSpeed engine's checkpoint files -----------------------------------------

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    """What save_checkpoint / load_checkpoint use of a DeepSpeed engine: files on disk, loaded
    as DeepSpeed's TorchCheckpointEngine does (``weights_only=False``)."""

    def __init__(self, fail_save: BaseException | None = None, fail_load: set[str] = ()):
        self.fail_save, self.fail_load, self.loaded = fail_save, set(fail_load), []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"weight": torch.zeros(8)}}, directory / MODEL_STATES)
        if self.fail_save is not None:      # half written, then the disk is full
            raise self.fail_save
        torch.save({"optimizer_state_dict": {"exp_avg": torch.zeros(16)}},
                   directory / OPTIM_STATES)
        (directory / "client.json").write_text(json.dumps(client_state))

    def load_checkpoint(self, load_dir, tag):
        directory = Path(load_dir) / tag
        self.loaded.append(tag)
        if tag in self.fail_load:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        for name in (MODEL_STATES, OPTIM_STATES):
            torch.load(directory / name, weights_only=False)
        return str(directory), json.loads((directory / "client.json").read_text())


def save(engine, directory, step, keep=3):
    """``save_checkpoint`` of step ``step`` with a minimal client state."""
    return save_checkpoint(engine, directory, step, {"step": step, "data": {}}, keep)


def kill_group(launcher: subprocess.Popen) -> None:
    """SIGKILL the process group ``launcher`` leads (started with ``start_new_session``) and
    reap it: no rank outlives a test."""
    try:
        os.killpg(launcher.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launcher.wait()


# --- local servers for streamed shards (http with curl, s3 with the aws CLI) ----------------------


class _ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the directory; `/cut/<offset>/<path>` announces the whole file but sends only its
    first `offset` bytes, then drops the connection (a server dying mid-shard)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.startswith("/cut/"):
            return super().do_GET()
        _, _, offset, name = self.path.split("/", 3)
        data = open(os.path.join(self.directory, name), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: int(offset)])
        self.wfile.flush()
        self.close_connection = True


@contextlib.contextmanager
def http_server(directory: str) -> Iterator[str]:
    """`directory` served on 127.0.0.1 (`_ShardHandler`); yields its base URL. Skips the test
    without curl, which streams http(s):// shards."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: colld streams http(s):// shards with curl")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_ShardHandler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@contextlib.contextmanager
def s3_server() -> Iterator[object]:
    """A moto S3 server on 127.0.0.1 that the aws CLI reaches through AWS_ENDPOINT_URL (set here
    with placeholder credentials, restored after); yields a boto3 client of it. Skips the test
    without moto, boto3 or the aws CLI."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    try:
        aws_cli()
    except ValueError as exc:
        pytest.skip(str(exc))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "colld",
           "AWS_SECRET_ACCESS_KEY": "colld", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_CONFIG_FILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def tars(directory: str) -> list[str]:
    """The ``.tar`` shards of ``directory``, sorted."""
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".tar"))


def cached_codes(cache: str, teacher, layers: list[int], codec: str
                 ) -> Iterator[tuple[dict, list[tuple[np.ndarray, np.ndarray]]]]:
    """Per sample of a pq or rq ``cache`` of ``teacher``'s ``layers``: its sample dict and, per
    layer, the teacher's own float16 (T, D) features of the sample's audio (computed here, not
    read from the cache) with the uint8 codes the cache stores for them."""
    for sample in read_samples(tars(cache)):
        wave = decode_wave(sample)
        out = teacher(torch.from_numpy(wave)[None], torch.tensor([wave.shape[0]]))
        yield sample, [
            (feats[0].numpy().astype(np.float16),
             np.load(io.BytesIO(sample[f"l{layer:02d}.layer_output.{codec}.npy"]),
                     allow_pickle=False))
            for layer, feats in zip(layers, out.features, strict=True)]


def check_codes_decoded_in_the_step(cache: str, teacher_dir: str, layers: list[int],
                                    codec: str) -> None:
    """The batches of a pq or rq ``cache`` read with ``decode_codes=False`` (teacher
    ``layers``, a subset of the cached ones) against those the loader decodes: the same keys
    and crops, uint8 (B, T, M) codes in ``teacher_codes`` and no features; the stream's
    ``code_decoder`` gives the loader's float16 targets (up to the last float16 bit: the two sum
    in different orders) and a hand gather of the codebook file's rows (pq: concatenated, rq:
    summed, in float64), zero at padded frames."""
    identity = load_teacher(teacher_dir, layers).cache_identity()
    common = {"batch_size": 4, "max_seconds": 2.2, "seed": 0, "expect_teacher": identity}
    loader_batches = list(itertools.islice(iter(AudioBatchStream(cache, **common)), 3))
    stream = AudioBatchStream(cache, decode_codes=False, **common)
    decoder = stream.code_decoder("cpu")
    codebook = np.load(os.path.join(cache, CODEBOOK_FILE), allow_pickle=False)  # (L, M, 256, w)
    cached_layers = json.loads(next(read_samples(tars(cache)[:1]))["json"])["teacher"]["layers"]
    for loaded, shipped in zip(loader_batches, itertools.islice(iter(stream), 3), strict=True):
        assert shipped.keys == loaded.keys and shipped.teacher_features is None
        assert torch.equal(shipped.frame_lengths, loaded.frame_lengths)
        decoded = decoder(shipped.teacher_codes, shipped.frame_lengths)
        for layer, codes, features, ours in zip(layers, shipped.teacher_codes,
                                                loaded.teacher_features, decoded, strict=True):
            book = codebook[cached_layers.index(layer)].astype(np.float64)
            assert codes.dtype == torch.uint8 and codes.shape[:2] == features.shape[:2]
            assert codes.shape[2] == book.shape[0] and ours.dtype == torch.float16
            rows = book[np.arange(book.shape[0]), codes.numpy()]      # (B, T, M, w)
            hand = (rows.reshape(*rows.shape[:2], -1) if codec == "pq" else rows.sum(2))
            valid = (np.arange(codes.shape[1])[None]
                     < shipped.frame_lengths.numpy()[:, None])        # (B, T)
            np.testing.assert_allclose(ours.numpy(), np.where(valid[..., None], hand, 0),
                                       rtol=2**-10, atol=2**-12)
            torch.testing.assert_close(ours, features, rtol=2**-10, atol=2**-12)
            assert not ours[~torch.from_numpy(valid)].any()


def file_sha256(path: str) -> str:
    """The hex sha256 of the file at ``path`` (a codebook's, as its identity records it)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
