"""Regression baselines: layer-to-layer (``l2l``) and DistilHuBERT prediction heads.

Both regress the teacher features on every valid frame (masked or not):
- ``l2l`` (FitHuBERT/DPHuBERT style): distance (L1 or MSE) + cosine_weight * (1 - cos);
- ``distilhubert`` (s3prl): L1 - cosine_weight * log sigmoid(cos); heads on the last layer.
"""

from __future__ import annotations

import torch.nn.functional as F

from colld_ds.layer_map import LayerPair
from colld_ds.objectives.base import FrameSelection, PairwiseObjective


class RegressionObjective(PairwiseObjective):
    def __init__(self, pairs: list[LayerPair], student_dim: int, teacher_dim: int, head: str,
                 distance: str, cosine_weight: float, cosine_term: str,
                 weights: list[float] | None = None, target_norm: str = "none",
                 position_frames: int = 0):
        """cosine_term: ``one_minus`` (1 - cos) or ``log_sigmoid`` (-log sigmoid(cos))."""
        super().__init__(pairs, student_dim, teacher_dim, head, weights, target_norm,
                         position_frames)
        self.distance = distance
        self.cosine_weight = cosine_weight
        self.cosine_term = cosine_term

    def anchors(self, frame_mask, mask_time):
        return frame_mask

    def pair_loss(self, predictions, targets, selection: FrameSelection):
        """Per frame: distance averaged over D_t, plus the weighted cosine term; summed."""
        targets = targets[selection.rows]                                   # (N, D_t)
        if self.distance == "l1":
            distance = F.l1_loss(predictions, targets, reduction="none").mean(-1)   # (N,)
        else:
            distance = F.mse_loss(predictions, targets, reduction="none").mean(-1)
        cosine = F.cosine_similarity(predictions, targets, dim=-1)               # (N,)
        if self.cosine_term == "one_minus":
            cosine_loss = 1 - cosine
        else:
            cosine_loss = -F.logsigmoid(cosine)
        return (distance + self.cosine_weight * cosine_loss).sum(), {"cos": cosine.sum()}
