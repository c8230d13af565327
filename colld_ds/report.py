"""The evaluation report (``fidelity.json``) as typed data: written by ``colld eval``, read by
``colld compare`` and the demo. ``to_json`` / ``from_json`` keep the file's layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from colld_ds.layer_map import LayerPair


@dataclass(frozen=True)
class ModelFidelity:
    """One model against the teacher, on valid frames of the held-out audio."""

    cosine: dict[str, float]
    """Pair name -> mean cosine of the pair's head on the student state vs its target."""
    cka_pairs: dict[str, float]
    """Pair name -> linear CKA of the raw student state vs the teacher feature."""
    cka: list[list[float]]
    """K x L linear CKA, every student layer (rows) x teacher layer (columns)."""


@dataclass(frozen=True)
class EncoderSize:
    """Size and CPU speed of the teacher or the student."""

    layers: int
    parameters: int
    fp32_mib: float
    rtf: float
    """Real-time factor: forward seconds / audio seconds (front end included)."""
    path: str | None = None
    """The teacher's directory (None for the student)."""

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        path = values.pop("path")
        return values if path is None else {"path": path, **values}


@dataclass(frozen=True)
class LossCurves:
    source: str
    """Where the training curves were read (TensorBoard events, metrics.jsonl, or why none)."""
    final: dict[str, float]
    """Tag (``loss/total``, ``acc/<pair>``, ...) -> its last logged value."""


@dataclass
class FidelityReport:
    """``colld eval``'s report of one checkpoint on held-out shards."""

    checkpoint: str
    shards: str
    utterances: int
    audio_seconds: float
    frames: int
    """Valid (unpadded) frames scored."""
    target_kind: str
    pairs: list[LayerPair]
    teacher: EncoderSize
    student: EncoderSize
    cpu_threads: int
    models: dict[str, ModelFidelity]
    """``trained``, ``random`` (the floor) and ``init`` (the student at step 0)."""
    loss_curves: LossCurves
    probe: dict[str, Any] | None = None
    """``colld_ds.probe.run_probe``'s ``probe`` section: error rates per model and language."""
    probe_details: dict[str, Any] | None = None
    probe_skipped: str | None = None
    """Why there is no probe (set when ``probe`` is None)."""

    def to_json(self) -> dict[str, Any]:
        """The ``fidelity.json`` content."""
        probe = ({"probe": self.probe, "probe_details": self.probe_details} if self.probe
                 else {"probe_skipped": self.probe_skipped})
        return {
            "checkpoint": self.checkpoint, "shards": self.shards, "utterances": self.utterances,
            "audio_seconds": self.audio_seconds, "frames": self.frames,
            "target_kind": self.target_kind,
            "pairs": [{"name": p.name, "student_layer": p.student_layer,
                       "teacher_layer": p.teacher_layer} for p in self.pairs],
            "teacher": self.teacher.to_json(), "student": self.student.to_json(),
            "cpu_threads": self.cpu_threads,
            "models": {name: asdict(model) for name, model in self.models.items()},
            **probe,
            "loss_curves": asdict(self.loss_curves),
        }

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> FidelityReport:
        """A report read back from ``fidelity.json`` (KeyError or TypeError if not one)."""
        return cls(
            checkpoint=values["checkpoint"], shards=values["shards"],
            utterances=values["utterances"], audio_seconds=values["audio_seconds"],
            frames=values["frames"], target_kind=values["target_kind"],
            pairs=[LayerPair(p["student_layer"], p["teacher_layer"]) for p in values["pairs"]],
            teacher=EncoderSize(**values["teacher"]), student=EncoderSize(**values["student"]),
            cpu_threads=values["cpu_threads"],
            models={name: ModelFidelity(**model) for name, model in values["models"].items()},
            loss_curves=LossCurves(**values["loss_curves"]),
            probe=values.get("probe"), probe_details=values.get("probe_details"),
            probe_skipped=values.get("probe_skipped"))
