"""Loading a trained student out of a DeepSpeed checkpoint (``trained_run``, conftest.py),
and exporting it (HF, ONNX, int8); consolidation is checked against the weights it saved."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import colld_ds.export as export_module
from colld_ds.distill import build_run
from colld_ds.export import export, export_hf, export_onnx
from colld_ds.formats import SAMPLE_RATE
from colld_ds.models import build_student, load_teacher
from colld_ds.trained import CheckpointNotFoundError, load_student, resolve_checkpoint
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher

INT8_RELATIVE_ERROR = 0.1
"""Dynamic int8 against fp32 on a tiny random student: ||int8 - fp32|| / ||fp32||."""

def test_zero3_checkpoint_consolidates_to_the_trained_weights(trained_run):
    config, teacher, pairs, model = load_student(trained_run["checkpoint"])
    reference = trained_run["reference"]
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    assert not model.training and config.run.zero_stage == 3
    assert [p.name for p in pairs] == ["s1_t2", "s2_t4"]
    # The weights moved: what was loaded is not build_run's step-0 model.
    _, _, initial = build_run(config, torch.device("cpu"))
    moved = [k for k, v in initial.state_dict().items() if not torch.equal(v, state[k])]
    assert any(k.startswith("student.model.encoder.layers") for k in moved)
    assert any(k.startswith("objective.heads") for k in moved)
    # A run directory resolves to its newest complete checkpoint.
    assert resolve_checkpoint(trained_run["root"] / "run") == trained_run["checkpoint"]


def test_missing_or_incomplete_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        load_student(tmp_path / "nowhere")
    partial = tmp_path / "checkpoints" / "step00000004"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="step00000004.*complete.json"):
        load_student(partial)


def test_export_reloads_equal_and_onnx_matches(trained_run, tmp_path):
    from transformers import AutoModel

    report = export(trained_run["checkpoint"], tmp_path, onnx=True, quantize=True, threads=1)
    assert report["hf"]["ok"] and report["onnx"]["ok"]
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    assert (tmp_path / "export.json").is_file()

    # Independent checks, against the live engine's weights (reference.pt).
    config, _, _, model = load_student(trained_run["checkpoint"])
    model.load_state_dict(trained_run["reference"])
    student = model.student
    generator = torch.Generator().manual_seed(5)
    wave = 0.1 * torch.randn(2, 27_000, generator=generator)
    lengths = torch.tensor([27_000, 19_000])
    inputs, _ = student.front_end(wave, lengths)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    with torch.inference_mode():
        expected = student.model(**inputs, output_hidden_states=True)
        reloaded = AutoModel.from_pretrained(tmp_path / "hf").eval()
        assert type(reloaded) is type(student.model)
        got = reloaded(**inputs, output_hidden_states=True)
    for e, g in zip(expected.hidden_states, got.hidden_states):
        assert (e - g).abs().max() <= 1e-5

    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    last, hidden = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert np.abs(last - expected.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(hidden - torch.stack(expected.hidden_states).numpy()).max() <= 1e-4

    int8 = report["onnx"]["int8"]
    assert Path(int8["path"]).is_file() and int8["bytes"] < report["onnx"]["bytes"]
    assert int8["latency_s"] > 0


def test_windowed_whisper_export_carries_its_window(tmp_path):
    """A student of a Whisper teacher on a 2 s window exports a feature extractor that pads to
    2 s, and HF's own extractor + encoder reproduce the student's states."""
    from transformers import WhisperFeatureExtractor


    tiny = make_tiny_teacher("whisper", str(tmp_path / "teacher"), seed=0, num_layers=2)
    teacher = load_teacher(tiny, [1, 2], window_seconds=2.0)
    student = build_student(teacher, 1, init_from_teacher_layers=[1])
    report = export_hf(student, teacher, tmp_path / "hf")
    assert report["ok"]
    extractor = WhisperFeatureExtractor.from_pretrained(tmp_path / "hf")
    wave = 0.1 * torch.randn(24_000, generator=torch.Generator().manual_seed(0))
    features = extractor(wave.numpy(), sampling_rate=SAMPLE_RATE,
                         return_tensors="pt").input_features
    assert features.shape[-1] == 200                            # 2 s of 10 ms log-mel frames
    ours, _ = student.front_end(wave[None], torch.tensor([24_000]))   # colld's log-mel front end
    assert (ours["input_features"] - features).abs().max() <= 1e-4
    model = type(student.model).from_pretrained(tmp_path / "hf").eval()      # WhisperEncoder
    with torch.inference_mode():
        got = model(features, output_hidden_states=True).hidden_states
        expected = student.model(**ours, output_hidden_states=True).hidden_states
    for e, g in zip(expected, got, strict=True):
        assert (e - g).abs().max() <= 1e-4


def test_teacher_without_preprocessor_config_exports_the_student_front_ends(tmp_path):
    """The exported preprocessor_config.json, run by HF's own extractor, gives the inputs the
    student's front end computes (here the family defaults: the teacher has none)."""
    from transformers import AutoFeatureExtractor

    tiny = make_tiny_teacher("xlsr", str(tmp_path / "teacher"), seed=0, num_layers=2)
    os.remove(os.path.join(tiny, "preprocessor_config.json"))
    teacher = load_teacher(tiny, [1, 2])
    student = build_student(teacher, 1, init_from_teacher_layers=[1]).eval()
    report = export_hf(student, teacher, tmp_path / "hf")
    assert report["ok"] and report["preprocessor_config"] == "family defaults"
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path / "hf")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([24_000, 17_000])
    wave = 0.1 * torch.randn(2, 24_000, generator=generator) + 0.05   # an offset to normalise
    features = extractor([w[:n].numpy() for w, n in zip(wave, lengths.tolist())],
                         sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")
    ours, _ = student.front_end(wave, lengths)
    assert torch.equal(features["attention_mask"].bool(), ours["attention_mask"].bool())
    valid = ours["attention_mask"].bool()
    diff = (features["input_values"] - ours["input_values"])[valid].abs().max()
    assert diff <= 1e-5


def test_onnx_int8_export_of_a_weight_normed_positional_conv(tmp_path):
    """An XLS-R-shaped student (weight-normed positional conv, large enough that the exporter
    does not fold it): every ONNX Conv weight is stored, so int8 quantisation takes it, and the
    int8 model stays close to the PyTorch student."""
    import onnx
    import onnxruntime as ort
    from torch.nn.utils import parametrize

    tiny = make_tiny_teacher("xlsr", str(tmp_path / "teacher"), seed=0, num_layers=2,
                             hidden_size=64)
    student = build_student(load_teacher(tiny, [1, 2]), 2,
                            init_from_teacher_layers=[1, 2]).eval()
    conv = student.model.encoder.pos_conv_embed.conv
    assert parametrize.is_parametrized(conv, "weight")
    report = export_onnx(student, tmp_path / "onnx", quantize=True)
    assert parametrize.is_parametrized(conv, "weight")             # exported from a copy
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    stored = {tensor.name for tensor in graph.initializer}
    assert all(node.input[1] in stored for node in graph.node if node.op_type == "Conv")

    generator = torch.Generator().manual_seed(3)
    wave = 0.1 * torch.randn(2, 30_000, generator=generator)
    inputs, _ = student.front_end(wave, torch.tensor([30_000, 21_000]))
    inputs = {k: v for k, v in inputs.items() if v is not None}
    with torch.inference_mode():
        expected = student.model(**inputs).last_hidden_state
    session = ort.InferenceSession(report["int8"]["path"], providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])
    relative = float((got - expected).norm() / expected.norm())
    assert relative <= INT8_RELATIVE_ERROR, relative


def test_a_failed_export_leaves_the_previous_one_and_no_partial_output(trained_run, tmp_path,
                                                                         monkeypatch):

    def fail(*args, **kwargs):
        raise RuntimeError("onnx export failed")

    def failed_export(out_dir):
        with monkeypatch.context() as patch:
            patch.setattr(export_module, "export_onnx", fail)
            with pytest.raises(RuntimeError, match="onnx export failed"):
                export(trained_run["checkpoint"], out_dir, onnx=True)

    failed_export(tmp_path / "fresh")                       # after hf/ was written and checked
    assert not (tmp_path / "fresh").exists() or not os.listdir(tmp_path / "fresh")

    export(trained_run["checkpoint"], tmp_path / "previous")
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "previous").rglob("*")}
    assert sorted(p.name for p in (tmp_path / "previous").iterdir()) == ["export.json", "hf"]
    failed_export(tmp_path / "previous")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "previous").rglob("*")} == files
    report = json.loads((tmp_path / "previous" / "export.json").read_text())
    assert report["hf"]["dir"] == str(tmp_path / "previous" / "hf")
