"""Distillation objectives behind one interface (see ``base.PairwiseObjective.forward``)."""

from __future__ import annotations

from colld_ds.config import ObjectiveConfig
from colld_ds.layer_map import LayerPair
from colld_ds.objectives.base import ObjectiveOutput, PairwiseObjective
from colld_ds.objectives.colld import ColldObjective, sample_negatives
from colld_ds.objectives.regression import RegressionObjective

__all__ = ["ObjectiveOutput", "PairwiseObjective", "build_objective", "sample_negatives"]


def build_objective(config: ObjectiveConfig, pairs: list[LayerPair], student_dim: int,
                    teacher_dim: int, weights: list[float] | None = None,
                    position_frames: int = 0) -> PairwiseObjective:
    """position_frames: the frames of the longest crop (``target_norm: utterance_position``)."""
    if config.name == "colld":
        return ColldObjective(pairs, student_dim, teacher_dim, config.head, config.temperature,
                              config.num_negatives, weights, config.contrastive_backend,
                              anchor_frames=config.anchor_frames,
                              target_norm=config.target_norm,
                              position_negatives=config.position_negatives,
                              position_frames=position_frames)
    if config.name == "l2l":
        return RegressionObjective(pairs, student_dim, teacher_dim, config.head, config.distance,
                                   config.cosine_weight, "one_minus", weights, config.target_norm,
                                   position_frames)
    if config.name == "distilhubert":
        return RegressionObjective(pairs, student_dim, teacher_dim, config.head, "l1",
                                   config.cosine_weight, "log_sigmoid", weights, config.target_norm,
                                   position_frames)
    raise ValueError(f"objective.name: {config.name!r} is not allowed; "
                     "choose one of ['colld', 'l2l', 'distilhubert']")
