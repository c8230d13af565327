"""Which student layer predicts which teacher layer.

Layers are numbered from 1 (output of transformer layer i), on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

from colld_ds.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class LayerPair:
    student_layer: int
    teacher_layer: int

    @property
    def name(self) -> str:
        return f"s{self.student_layer}_t{self.teacher_layer}"


def uniform_teacher_layers(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Student layer k -> teacher layer round(k * L / K), rounding halves up."""
    return [int(k * num_teacher_layers / num_student_layers + 0.5)
            for k in range(1, num_student_layers + 1)]


def resolve_layer_map(config: TrainConfig, num_teacher_layers: int) -> list[LayerPair]:
    """The (student layer, teacher layer) pairs of the run, in loss order.

    ``distilhubert`` puts every head on the last student layer; by default it predicts three
    evenly spaced teacher layers (layers 4, 8, 12 of a 12-layer teacher, as DistilHuBERT).
    """
    num_student_layers = config.student.num_layers
    groups = config.layer_map.teacher_layers
    if config.objective.name == "distilhubert":
        targets = ([t for group in groups for t in group] if groups is not None
                   else uniform_teacher_layers(3, num_teacher_layers))
        pairs = [LayerPair(num_student_layers, t) for t in targets]
    else:
        if groups is None:
            groups = [[t] for t in uniform_teacher_layers(num_student_layers, num_teacher_layers)]
        pairs = [LayerPair(k, t) for k, group in enumerate(groups, start=1) for t in group]
    for pair in pairs:
        if not 1 <= pair.teacher_layer <= num_teacher_layers:
            raise ConfigError(
                f"layer_map.teacher_layers: teacher layer {pair.teacher_layer} does not exist; "
                f"the teacher has layers 1..{num_teacher_layers}")
    weights = config.layer_map.weights
    if weights is not None and len(weights) != len(pairs):
        raise ConfigError(f"layer_map.weights: needs one weight per pair ({len(pairs)}: "
                          f"{[p.name for p in pairs]}), got {len(weights)}")
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"layer_map.teacher_layers: a pair is listed twice in "
                          f"{[p.name for p in pairs]}")
    return pairs
