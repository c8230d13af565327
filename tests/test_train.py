"""The real CLI on 2 CPU ranks (DeepSpeed over gloo, through launch.sh) on a tiny teacher.

Each launch costs ~15 s (process start, DeepSpeed init); the runs are shared where they can be.
"""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colld_ds.config import ConfigError, load_config
from colld_ds.data import AudioBatchStream
from colld_ds.distill import build_run, distillation_loss, mask_batch
from colld_ds.formats import SAMPLE_RATE
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher
from colld_ds.trained import load_student
from helpers import CONFIG, MAX_STEPS, REPO, overrides

def launch(train_assets, out_dir, **extra) -> list[dict]:
    """Run ./launch.sh on 2 CPU ranks; return the metrics.jsonl rows of out_dir. The run must
    not leave DeepSpeed's per-rank shared-memory segments behind (64 MiB of RAM each)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(REPO / "launch.sh"), "--master_port", str(port), "--config", str(CONFIG)]
    for key, value in overrides(train_assets, out_dir, **extra).items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = dict(os.environ, COLLD_CPU_RANKS="2", COLLD_PYTHON=sys.executable)
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(train_assets):
    return launch(train_assets, train_assets["root"] / "full")


def test_zero2_two_ranks_lower_the_colld_loss(uninterrupted):
    losses = [row["loss/total"] for row in uninterrupted]
    assert [row["step"] for row in uninterrupted] == list(range(1, MAX_STEPS + 1))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    assert all("acc/s1_t2" in row and "grad_norm" in row and "audio_seconds_per_s" in row
               for row in uninterrupted)


def test_stopped_and_resumed_run_matches_uninterrupted(train_assets, uninterrupted):
    out_dir = train_assets["root"] / "resumed"
    first = launch(train_assets, out_dir, **{"run.stop_at_step": 8})
    assert [row["step"] for row in first] == list(range(1, 9))
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").iterdir()
                         if p.name.startswith(("step", ".partial")))
    assert checkpoints == ["step00000008"]
    rows = launch(train_assets, out_dir, **{"run.resume": "auto"})
    resumed = {row["step"]: row["loss/total"] for row in rows[8:]}
    reference = {row["step"]: row["loss/total"] for row in uninterrupted}
    assert sorted(resumed) == list(range(9, MAX_STEPS + 1))
    for step in range(9, MAX_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_a_run_resumed_after_a_crash_logs_each_step_once(train_assets):
    out_dir = train_assets["root"] / "crashed"
    first = launch(train_assets, out_dir, **{"run.stop_at_step": 12})
    assert [row["step"] for row in first] == list(range(1, 13))
    shutil.rmtree(out_dir / "checkpoints" / "step00000012")   # crashed before checkpointing 12
    rows = launch(train_assets, out_dir, **{"run.resume": "auto"})      # resumes from step 8
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1))


FROZEN = {"student.freeze_front_end": True, "student.frozen_layers": [1]}


@pytest.mark.parametrize("extra", [{"run.zero_stage": 1}, {"run.zero_stage": 3},
                                   {"run.zero_stage": 2, "run.offload_optimizer": True},
                                   {"run.zero_stage": 3, **FROZEN}],
                         ids=["zero1", "zero3", "zero2-offload", "zero3-frozen-front-end-layer1"])
def test_other_zero_stages_complete(train_assets, tmp_path, extra):
    rows = launch(train_assets, tmp_path, **{"optim.max_steps": 3, **extra})
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["loss/total"])) for row in rows)
    assert (tmp_path / "checkpoints" / "step00000003" / "complete.json").is_file()
    if "student.frozen_layers" in extra:    # partitioned by ZeRO-3, the frozen weights stay put
        _, _, _, trained = load_student(tmp_path / "checkpoints" / "step00000003")
        config = load_config(CONFIG, overrides(train_assets, tmp_path, **extra))
        init = dict(build_run(config, torch.device("cpu"))[2].named_parameters())
        moved = {name for name, p in trained.named_parameters()
                 if not torch.equal(p, init[name].detach())}
        frozen = [name for name in init if ".layers.0." in name or ".feature_extractor." in name]
        assert frozen and not moved.intersection(frozen), moved
        assert any(".layers.1." in name for name in moved), moved


def test_bad_input_is_refused_before_training(train_assets, tmp_path):
    def build(**extra):
        config = load_config(CONFIG, overrides(train_assets, tmp_path, **extra))
        build_run(config, torch.device("cpu"))

    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build(**{"teacher.path": str(tmp_path / "does-not-exist")})
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        build(**{"teacher.path": str(tmp_path / "bert")})
    with pytest.raises(ConfigError, match="teacher layer 7 does not exist"):
        build(**{"layer_map.teacher_layers": [[2], [7]]})
    with pytest.raises(ValueError, match="wider"):
        build(**{"student.hidden_size": 64})
    with pytest.raises(ValueError, match="student.init_from_teacher_layers"):
        build(**{"student.hidden_size": 16, "student.init_from_teacher_layers": [1, 2]})


def test_more_negatives_than_the_longest_crop_supplies_are_refused_at_start(train_assets, tmp_path):
    teacher = json.loads((Path(train_assets["teacher"]) / "config.json").read_text())
    crop_frames = round(load_config(CONFIG).data.max_seconds * SAMPLE_RATE)
    for kernel, stride in zip(teacher["conv_kernel"], teacher["conv_stride"], strict=True):
        crop_frames = (crop_frames - kernel) // stride + 1            # the conv length formula

    def build(num_negatives):
        config = load_config(CONFIG, overrides(train_assets, tmp_path,
                                               **{"objective.num_negatives": num_negatives}))
        build_run(config, torch.device("cpu"))

    build(crop_frames - 1)
    limit = crop_frames - 1
    with pytest.raises(ConfigError, match=rf"objective.num_negatives: {crop_frames} is more than "
                                          rf"the {limit} other frames.* at most {limit} "):
        build(crop_frames)


def test_launch_sh_resolves_relative_paths_from_the_callers_directory(train_assets):
    """Config, teacher, shards and out_dir given relative to where launch.sh is called from."""
    cwd = train_assets["root"]
    (cwd / "configs").mkdir(exist_ok=True)
    shutil.copy(CONFIG, cwd / "configs" / "tiny.yaml")
    relative = {"teacher.path": "teacher", "data.train_shards": "shards/*.tar",
                "run.out_dir": "relative-run", "optim.max_steps": 2, "optim.warmup_steps": 1,
                "run.log_every": 1}
    command = [str(REPO / "launch.sh"), "--config", "configs/tiny.yaml"]
    for key, value in relative.items():
        command += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}     # as a user runs it
    env.update(COLLD_CPU_RANKS="2", COLLD_PYTHON=sys.executable)
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = (cwd / "relative-run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1, 2]
    assert not (REPO / "relative-run").exists()


def run_cli(train_assets, out_dir, **extra):
    """`colld train` run directly: one process, no launcher."""
    command = [sys.executable, "-m", "colld_ds.cli", "train", "--config", str(CONFIG)]
    for key, value in overrides(train_assets, out_dir, **extra).items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_trains_without_launcher_and_reports_config_errors_plainly(train_assets, tmp_path):
    done = run_cli(train_assets, tmp_path, **{"optim.max_steps": 2, "optim.warmup_steps": 1})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step00000002" / "complete.json").is_file()
    bad = run_cli(train_assets, tmp_path, **{"objective.name": "mse"})
    assert bad.returncode != 0
    assert "colld: config error: objective.name: 'mse' is not allowed" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("family", ["wav2vec2", "whisper", "w2v-bert"])
def test_freeze_front_end(train_assets, tmp_path, family):
    teacher_dir = make_tiny_teacher(family, str(tmp_path / family), seed=0, num_layers=4)
    config = load_config(CONFIG, overrides(train_assets, tmp_path, **{
        "teacher.path": teacher_dir, "student.freeze_front_end": True}))
    if family == "w2v-bert":
        with pytest.raises(ValueError, match="no convolutional front end to freeze"):
            build_run(config, torch.device("cpu"))
        return

    def frozen_parameters(config):
        _, _, model = build_run(config, torch.device("cpu"))
        return {name for name, p in model.named_parameters() if not p.requires_grad}

    newly_frozen = frozen_parameters(config) - frozen_parameters(
        load_config(CONFIG, overrides(train_assets, tmp_path, **{"teacher.path": teacher_dir})))
    front = ("feature_extractor.",) if family == "wav2vec2" else ("conv1.", "conv2.")
    assert newly_frozen
    assert all(any(f".model.{prefix}" in name for prefix in front) for name in newly_frozen)


@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_frozen_layers_keep_their_init_while_the_rest_learns(train_assets, tmp_path, family):
    """student.frozen_layers [1]: after a step of the loss, student layer 1 holds exactly its
    copied weights; layer 2 and the heads moved."""
    teacher_dir = make_tiny_teacher(family, str(tmp_path / family), seed=0, num_layers=4)
    config = load_config(CONFIG, overrides(train_assets, tmp_path, **{
        "teacher.path": teacher_dir, "student.frozen_layers": [1]}))
    teacher, _, model = build_run(config, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    first_layer = {name for name in before if ".model.encoder.layers.0." in name
                   or ".model.layers.0." in name}
    assert first_layer and first_layer <= frozen   # (Whisper's positions never train)
    assert not any(".layers.1." in name for name in frozen)
    stream = AudioBatchStream(train_assets["shards"], batch_size=3, max_seconds=2.0, seed=0,
                              num_workers=0, shuffle_buffer=0)
    masked = mask_batch(next(iter(stream)), teacher, config, 1, model.objective)
    output = distillation_loss(model, teacher, masked, config, list(teacher.layers))
    (output.loss * output.count).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert not moved & frozen
    assert any(".layers.1." in name for name in moved)
    assert any(name.startswith("objective.") for name in moved)
    with pytest.raises(ConfigError, match=r"student.frozen_layers: distinct student layers in"):
        load_config(CONFIG, overrides(train_assets, tmp_path, **{"student.frozen_layers": [3]}))


@pytest.mark.parametrize("family,cached_front_end", [("wav2vec2", False), ("hubert", False),
                                                     ("wav2vec2", True), ("whisper", False)])
def test_a_training_step_off_the_cpu_mixes_no_devices_and_reads_nothing_back(
        train_assets, tmp_path, family, cached_front_end):
    """The cached-mode step (student forward, objective, backward) with the model and the batch
    on the meta device: an op mixing a CPU tensor with a device tensor, or reading a value back
    to the host (`.item()`, `nonzero`, a boolean-mask index), raises there, as it would fail or
    cost a sync on a GPU. (Where HF reads the attention mask back, xlsr-style models, the step
    is not covered.)"""
    teacher_dir = make_tiny_teacher(family, str(tmp_path / family), seed=0, num_layers=4)
    config = load_config(CONFIG, overrides(train_assets, tmp_path, **{
        "teacher.path": teacher_dir, "objective.contrastive_backend": "chunked",
        "student.freeze_front_end": cached_front_end}))
    config.data.cached_front_end = cached_front_end          # (validated for a teacher_cache run)
    teacher, _, model = build_run(config, torch.device("cpu"))
    stream = AudioBatchStream(train_assets["shards"], batch_size=3, max_seconds=2.0, seed=0,
                              num_workers=0, shuffle_buffer=0)
    batch = next(iter(stream))
    with torch.no_grad():                                   # what the cache would hold
        output = teacher(batch.wave, batch.wave_lengths, front_end=cached_front_end)
    batch = dataclasses.replace(batch, teacher_features=output.features,
                                frame_lengths=output.frame_lengths,
                                front_end_features=output.front_end)
    masked = mask_batch(batch, None, config, 0, model.objective)
    model = model.to("meta")
    loss = distillation_loss(model, None, masked.to("meta"), config, list(teacher.layers))
    (loss.loss * loss.count).backward()
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    unused = (["student.model.layer_norm.weight", "student.model.layer_norm.bias"]
              if family == "whisper" else [])    # Whisper's final LayerNorm: no target needs it
    assert loss.loss.device.type == "meta" and no_grad == unused


def test_build_run_puts_the_whole_model_on_the_device(train_assets, tmp_path):
    """The student is built from the teacher on ``device``; the projection heads must follow
    (a GPU run outside DeepSpeed, as train_throughput.py's, otherwise mixes devices)."""
    config = load_config(CONFIG, overrides(train_assets, tmp_path))
    _, _, model = build_run(config, torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_head_warmup_steps_train_the_heads_only(train_assets, tmp_path):
    """Before optim.head_warmup_steps the loss reaches the projection heads and nothing of the
    student; from that step on, both."""
    warmup = {"optim.head_warmup_steps": 2}
    config = load_config(CONFIG, overrides(train_assets, tmp_path, **warmup))
    teacher, _, model = build_run(config, torch.device("cpu"))
    stream = AudioBatchStream(train_assets["shards"], batch_size=3, max_seconds=2.0, seed=0,
                              num_workers=0, shuffle_buffer=0)
    batch = next(iter(stream))
    for step, student_learns in ((1, False), (2, True)):
        model.zero_grad(set_to_none=True)
        masked = mask_batch(batch, teacher, config, step, model.objective)
        assert masked.train_student is student_learns
        output = distillation_loss(model, teacher, masked, config, list(teacher.layers))
        (output.loss * output.count).backward()
        head_grads = [p.grad for p in model.objective.parameters()]
        student_grads = [p.grad for p in model.student.parameters() if p.requires_grad]
        assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
        assert any(g is not None and g.abs().sum() > 0 for g in student_grads) is student_learns


def test_utterance_position_mean_is_estimated_over_ranks_and_kept_in_the_checkpoint(
        train_assets, tmp_path):
    """``objective.target_norm: utterance_position`` on 2 ranks: the mean per frame index is
    each rank's first utterances (numpy, from the teacher on the same batches), summed over
    both; a resumed run takes it from the checkpoint, so its last checkpoint still holds it
    (exact resumption in general: ``test_stopped_and_resumed_run_matches_uninterrupted``)."""
    extra = {"objective.target_norm": "utterance_position",
             "objective.position_stats_utterances": 6, "optim.max_steps": 4,
             "run.save_every": 2}
    launch(train_assets, tmp_path / "part", **extra, **{"run.stop_at_step": 2})
    rest = launch(train_assets, tmp_path / "part", **extra, **{"run.resume": "auto"})
    assert [row["step"] for row in rest] == list(range(1, 5))

    config, teacher, _, model = load_student(tmp_path / "part" / "checkpoints" / "step00000004")
    num_frames = model.objective.position_mean.shape[1]
    sums, counts = np.zeros((2, num_frames, 32)), np.zeros(num_frames)
    for rank in range(2):                               # each rank's first 3 utterances
        stream = AudioBatchStream(train_assets["shards"], batch_size=config.data.batch_size,
                                  max_seconds=config.data.max_seconds, seed=config.run.seed,
                                  rank=rank, world_size=2, num_workers=0,
                                  shuffle_buffer=config.data.shuffle_buffer)
        batch = next(iter(stream))
        with torch.no_grad():
            output = teacher(batch.wave, batch.wave_lengths)
        for b in range(3):
            length = int(output.frame_lengths[b])
            for index, features in enumerate(output.features):
                x = features[b, :length].double().numpy()
                sums[index, :length] += (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
            counts[:length] += 1
    expected = sums / np.maximum(counts, 1)[None, :, None]
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(model.objective.position_mean.numpy(), expected, atol=2e-4)
