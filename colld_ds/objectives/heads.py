"""Projection heads from student width to teacher width, one per layer pair."""

from __future__ import annotations

from torch import nn


def make_head(kind: str, student_dim: int, teacher_dim: int) -> nn.Module:
    """``linear``: one Linear; ``mlp``: Linear -> GELU -> Linear (hidden = teacher width)."""
    if kind == "linear":
        return nn.Linear(student_dim, teacher_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(student_dim, teacher_dim), nn.GELU(),
                             nn.Linear(teacher_dim, teacher_dim))
    raise ValueError(f"objective.head: {kind!r} is not allowed; choose one of ['linear', 'mlp']")
