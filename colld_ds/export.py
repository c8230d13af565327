"""``colld export``: a trained student (``colld_ds.trained.load_student``) as a Hugging Face
directory, ONNX and int8 ONNX.

``export(checkpoint, out_dir)`` writes:

- ``out_dir/hf``: ``student.model.save_pretrained`` + ``preprocessor_config.json``, the feature
  extractor the student was trained with: the teacher's, or the family's defaults when the
  teacher has none (``models.families.build_front_end``; 16 kHz, zero-mean unit-variance
  waveforms for the wav2vec 2.0 family); it loads with the teacher's model class
  (``load_teacher`` / ``AutoModel``), and every layer's output is checked against the
  checkpoint's student (max abs difference <= 1e-5);
- ``out_dir/onnx/model.onnx`` (``--onnx``): the HF model with dynamic batch (and time) axes,
  inputs as the front end makes them (``input_values`` [+ ``attention_mask``], or
  ``input_features``), outputs ``last_hidden_state`` and ``hidden_states`` (K + 1, B, T, D: the
  embeddings then each layer, HF's ``output_hidden_states``); checked with onnxruntime against
  torch (max abs difference <= 1e-4); weight-normed convolutions (the positional conv of
  wav2vec 2.0, HuBERT, XLS-R) are exported with their weight folded, as a stored tensor;
- ``out_dir/onnx/model.int8.onnx`` (``--quantize``): onnxruntime dynamic int8 quantisation;
  sizes, CPU latencies and its difference to fp32 are reported (not checked: int8 is lossy).

``out_dir/export.json`` records what was written and every number checked. All of it is written
under ``out_dir/.partial-export`` first and moved into ``out_dir`` once every check passed, so
a failed or killed export leaves no ``hf/`` or ``onnx/`` without its ``export.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import WhisperFeatureExtractor

from colld_ds.formats import SAMPLE_RATE
from colld_ds.models import load_teacher
from colld_ds.trained import load_student, resolve_checkpoint, torch_threads

HF_TOLERANCE = 1e-5
ONNX_TOLERANCE = 1e-4


# --- Hugging Face export ------------------------------------------------------------------------


def _probe_wave(num_utterances: int = 2, seconds: float = 1.5, seed: int = 0):
    """Deterministic test audio of two lengths: (B, S) wave and (B,) lengths."""
    generator = torch.Generator().manual_seed(seed)
    num_samples = int(seconds * SAMPLE_RATE)
    wave = 0.1 * torch.randn(num_utterances, num_samples, generator=generator)
    lengths = torch.tensor([num_samples - i * num_samples // 4 for i in range(num_utterances)])
    return wave, lengths


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _save_extractor(extractor, config, out_dir: Path) -> None:
    """The student's feature extractor as ``out_dir/preprocessor_config.json``; for a Whisper
    student on a trimmed window (``teacher.window_seconds``) with ``chunk_length`` set to that
    window, so HF's ``WhisperFeatureExtractor`` pads to what the exported encoder takes."""
    if config.model_type != "whisper":
        extractor.save_pretrained(out_dir)
        return
    window_samples = config.max_source_positions * 2 * extractor.hop_length   # 2 mel frames each
    if window_samples != extractor.n_samples:
        if window_samples % extractor.sampling_rate:
            raise ValueError(
                f"the student's Whisper window is {window_samples / extractor.sampling_rate:g} s; "
                "WhisperFeatureExtractor's chunk_length takes whole seconds: train with a "
                "whole-second teacher.window_seconds to export it")
        extractor = WhisperFeatureExtractor.from_dict(
            {**extractor.to_dict(), "chunk_length": window_samples // extractor.sampling_rate})
    extractor.save_pretrained(out_dir)


def export_hf(student, teacher, out_dir: Path) -> dict[str, Any]:
    """``student.model.save_pretrained(out_dir)`` + the student's feature extractor config;
    reloaded as a teacher (the teacher's model class) and checked layer by layer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    student.model.save_pretrained(out_dir)
    _save_extractor(student.front_end.feature_extractor, student.model.config, out_dir)
    from_teacher = (Path(teacher.path) / "preprocessor_config.json").is_file()
    reloaded = load_teacher(str(out_dir), list(range(1, student.num_layers + 1)),
                            dtype=torch.float32)
    wave, lengths = _probe_wave()
    with torch.inference_mode():
        expected = student(wave, lengths).hidden
    got = reloaded(wave, lengths).features
    diffs = [_max_diff(e, g) for e, g in zip(expected, got)]
    result = {"dir": str(out_dir), "model_class": type(reloaded.model).__name__,
              "preprocessor_config": "the teacher's" if from_teacher else "family defaults",
              "max_abs_diff_per_layer": diffs,
              "tolerance": HF_TOLERANCE, "ok": max(diffs) <= HF_TOLERANCE}
    if not result["ok"]:
        raise RuntimeError(f"exported model in {out_dir} differs from the checkpoint's student "
                           f"by {max(diffs):.3g} > {HF_TOLERANCE} (per layer: {diffs})")
    return result


# --- ONNX -----------------------------------------------------------------------------------------


class _OnnxWrapper(nn.Module):
    """HF model -> (last_hidden_state, hidden_states stacked (K + 1, B, T, D))."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor):
        out = self.model(**dict(zip(self.input_names, inputs)), output_hidden_states=True)
        return out.last_hidden_state, torch.stack(out.hidden_states)


def _plain_weights(model: nn.Module) -> nn.Module:
    """``model``, or where some of its weights are parametrised (the weight norm of the
    positional conv of wav2vec 2.0, HuBERT, XLS-R) a copy with them folded into plain ones: the
    same function, but the ONNX graph then stores the weight instead of computing it, which
    onnxruntime's int8 quantizer needs ("Expected ... to be an initializer"). The copy is built
    anew from the config, not deep-copied: removing a parametrisation edits the module's class,
    which a deep copy shares with the original."""
    if not any(parametrize.is_parametrized(module) for module in model.modules()):
        return model
    plain = type(model)(model.config)
    plain.load_state_dict(model.state_dict())
    for module in [m for m in plain.modules() if parametrize.is_parametrized(m)]:
        for name in list(module.parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return plain.eval()


def _model_inputs(student, wave: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs, _ = student.front_end(wave, lengths)
    return {k: v for k, v in inputs.items() if v is not None}


def _file_size(path: Path) -> int:
    """Bytes of an ONNX model with its external data file, if any."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _ort_session(path: Path):
    import onnxruntime as ort      # loaded by the ONNX export only

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()   # the same threads as torch
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _latency(run, repeats: int = 5) -> float:
    run()                                                    # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def export_onnx(student, out_dir: Path, quantize: bool = False) -> dict[str, Any]:
    """ONNX of ``student.model`` checked with onnxruntime; optional dynamic int8 copy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = student.model.eval()
    wave, lengths = _probe_wave()
    inputs = _model_inputs(student, wave, lengths)
    names = list(inputs)
    # Whisper's encoder takes a fixed 30 s window: only its batch axis is dynamic.
    whisper = "input_features" in names and inputs["input_features"].shape[-1] == 3000
    auto = torch.export.Dim.AUTO
    dynamic = tuple({0: auto} if whisper else {0: auto, 1: auto} for _ in names)
    path = out_dir / "model.onnx"
    for stale in out_dir.glob("model.onnx*"):
        stale.unlink()
    wrapper = _OnnxWrapper(model, names)
    with warnings_quiet(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(_OnnxWrapper(_plain_weights(model), names), tuple(inputs.values()),
                          str(path), input_names=names,
                          output_names=["last_hidden_state", "hidden_states"],
                          dynamic_shapes={"inputs": dynamic}, dynamo=True, verbose=False)
    # Checked on other shapes than the traced ones: a batch of 3, another length.
    wave, lengths = _probe_wave(num_utterances=3, seconds=2.1, seed=1)
    inputs = _model_inputs(student, wave, lengths)
    with torch.inference_mode():
        expected = wrapper(*inputs.values())
    feeds = {k: v.numpy() for k, v in inputs.items()}
    session = _ort_session(path)
    got = session.run(None, feeds)
    diffs = {name: _max_diff(e, torch.from_numpy(g))
             for name, e, g in zip(["last_hidden_state", "hidden_states"], expected, got)}
    result: dict[str, Any] = {
        "path": str(path), "inputs": names, "outputs": ["last_hidden_state", "hidden_states"],
        "max_abs_diff": diffs, "tolerance": ONNX_TOLERANCE,
        "ok": max(diffs.values()) <= ONNX_TOLERANCE, "bytes": _file_size(path),
        "check_input_shape": {k: list(v.shape) for k, v in inputs.items()},
        "latency_s": {"torch": _latency(lambda: _torch_run(wrapper, inputs)),
                      "onnxruntime_fp32": _latency(lambda: session.run(None, feeds))},
    }
    if not result["ok"]:
        raise RuntimeError(f"ONNX model {path} differs from torch by {diffs} > {ONNX_TOLERANCE}")
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic  # int8 only

        int8 = out_dir / "model.int8.onnx"
        with warnings_quiet():
            quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
        int8_session = _ort_session(int8)
        got8 = int8_session.run(None, feeds)
        result["int8"] = {
            "path": str(int8), "bytes": _file_size(int8),
            "max_abs_diff_vs_torch": {name: _max_diff(e, torch.from_numpy(g)) for name, e, g
                                      in zip(["last_hidden_state", "hidden_states"], expected,
                                             got8)},
            "relative_error_vs_torch": float((expected[0] - torch.from_numpy(got8[0])).norm()
                                             / expected[0].norm()),
            "latency_s": _latency(lambda: int8_session.run(None, feeds)),
        }
    return result


def _torch_run(wrapper, inputs):
    with torch.inference_mode():
        return wrapper(*inputs.values())


@contextlib.contextmanager
def warnings_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export(checkpoint: str | Path, out_dir: str | Path, onnx: bool = False,
           quantize: bool = False, teacher_path: str | None = None,
           threads: int | None = None) -> dict[str, Any]:
    """Export the student of ``checkpoint`` (see the module docstring); returns the report
    also written to ``out_dir/export.json``. ``threads``: CPU threads of torch and
    onnxruntime for the latency figures (default: torch's)."""
    with torch_threads(threads):
        return _export(checkpoint, out_dir, onnx, quantize, teacher_path)


def _export(checkpoint, out_dir, onnx, quantize, teacher_path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    config, teacher, pairs, model = load_student(checkpoint, teacher_path)
    student = model.student
    report: dict[str, Any] = {"checkpoint": str(resolve_checkpoint(checkpoint)),
                              "parameters": sum(p.numel() for p in student.model.parameters())}
    staging = out_dir / ".partial-export"           # moved into out_dir once all checks pass
    shutil.rmtree(staging, ignore_errors=True)      # left by a killed export
    try:
        report["hf"] = export_hf(student, teacher, staging / "hf")
        if onnx or quantize:
            report["onnx"] = export_onnx(student, staging / "onnx", quantize=quantize)
        _relocate(report, staging, out_dir)
        (staging / "export.json").write_text(json.dumps(report, indent=2))
        for name in ("export.json", "hf", "onnx"):  # the previous export goes as a whole
            _remove(out_dir / name)
        for name in ("hf", "onnx", "export.json"):  # export.json last: it marks a whole export
            if (staging / name).exists():
                os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _relocate(report: dict[str, Any], staging: Path, out_dir: Path) -> None:
    """In place: the report's paths under ``staging`` as they will be under ``out_dir``."""
    for key, value in report.items():
        if isinstance(value, dict):
            _relocate(value, staging, out_dir)
        elif key in ("dir", "path"):
            report[key] = str(out_dir / Path(value).relative_to(staging))


def _remove(path: Path) -> None:
    """The file or directory tree ``path``, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def format_export_report(report: dict[str, Any]) -> str:
    hf = report["hf"]
    lines = [f"[colld] exported {report['checkpoint']} ({report['parameters']:,} parameters)",
             f"  Hugging Face: {hf['dir']} ({hf['model_class']}); max |diff| vs checkpoint "
             f"{max(hf['max_abs_diff_per_layer']):.2e} (<= {hf['tolerance']:g}); feature "
             f"extractor config: {hf['preprocessor_config']}"]
    if hf["preprocessor_config"] == "family defaults":
        lines.append("  note: the teacher has no preprocessor_config.json; the one written holds "
                     "the family defaults the student was trained with")
    onnx = report.get("onnx")
    if onnx:
        lat = onnx["latency_s"]
        lines.append(f"  ONNX: {onnx['path']} ({onnx['bytes'] / 2**20:.2f} MiB); max |diff| vs "
                     f"torch {max(onnx['max_abs_diff'].values()):.2e} (<= "
                     f"{onnx['tolerance']:g}); CPU latency torch {lat['torch'] * 1e3:.1f} ms, "
                     f"onnxruntime {lat['onnxruntime_fp32'] * 1e3:.1f} ms "
                     f"(input {onnx['check_input_shape']})")
        int8 = onnx.get("int8")
        if int8:
            lines.append(f"  int8: {int8['path']} ({int8['bytes'] / 2**20:.2f} MiB, "
                         f"{onnx['bytes'] / max(int8['bytes'], 1):.1f}x smaller); CPU latency "
                         f"{int8['latency_s'] * 1e3:.1f} ms; max |diff| vs torch "
                         f"{max(int8['max_abs_diff_vs_torch'].values()):.2e}, relative "
                         f"{int8['relative_error_vs_torch']:.2e} (lossy, not checked)")
    return "\n".join(lines)


__all__ = ["export", "export_hf", "export_onnx", "format_export_report"]
