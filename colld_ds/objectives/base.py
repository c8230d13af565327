"""What every objective takes and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from colld_ds.layer_map import LayerPair
from colld_ds.objectives.heads import make_head


class ObjectiveOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 must find the tensors a module returns to hook
    its backward."""

    loss: torch.Tensor
    """Scalar fp32: weighted mean over pairs of each pair's mean loss over the scored frames."""
    metrics: dict[str, torch.Tensor]
    """0-d detached tensors, means over the scored frames: ``loss/<pair>``, and e.g.
    ``acc/<pair>`` or ``cos/<pair>``."""
    count: torch.Tensor
    """0-d fp32: the frames scored (the same for every pair). ``loss * count`` is the sum that
    training normalises over a whole optimiser step (all micro-batches and ranks)."""


@dataclass
class FrameSelection:
    """The frames an objective scores in a batch, shared by all pairs.

    batch_index, frame_index: (N,) the selected frames; rows: (N,) their row in the (B * T, D)
    flattened targets; negatives: (N, K) rows of negative frames (contrastive objectives only),
    num_frames: T when they lie in the utterance of their positive. Drawn on the CPU from the
    CPU masks (``PairwiseObjective.select_frames``) and moved to the device once (``to``), so
    that the forward never waits on the device to learn N.
    """
    batch_index: torch.Tensor
    frame_index: torch.Tensor
    rows: torch.Tensor
    negatives: torch.Tensor | None = None
    num_frames: int | None = None
    frame_mask: torch.Tensor | None = None
    """(B, T) bool, the valid frames of the batch (for per-utterance target statistics)."""

    @property
    def count(self) -> int:
        """N, the frames scored."""
        return self.rows.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FrameSelection:
        def move(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)
        return FrameSelection(move(self.batch_index), move(self.frame_index), move(self.rows),
                              move(self.negatives), self.num_frames, move(self.frame_mask))


class PairwiseObjective(nn.Module):
    """One projection head per (student layer, teacher layer) pair, and the pair weights.

    Subclasses choose the frames (``select_frames``) and score one pair (``pair_loss``);
    ``forward`` runs the heads on the selected frames only and averages over pairs.
    """

    def __init__(self, pairs: list[LayerPair], student_dim: int, teacher_dim: int,
                 head: str, weights: list[float] | None = None, target_norm: str = "none",
                 position_frames: int = 0):
        """position_frames: frame indices of ``position_mean`` (the longest crop), needed by
        ``target_norm: utterance_position``."""
        super().__init__()
        self.target_norm = target_norm
        """``none``, ``utterance`` or ``utterance_position`` (``objective.target_norm``)."""
        self.target_layers = sorted({pair.teacher_layer for pair in pairs})
        if target_norm == "utterance_position":
            if position_frames < 1:
                raise ValueError("target_norm utterance_position needs position_frames >= 1")
            self.register_buffer("position_mean",
                                 torch.zeros(len(self.target_layers), position_frames,
                                             teacher_dim))
            """(L_targets, T_max, D_t): mean of each target layer's standardised features at
            each frame index over the training data (``distill.position_mean``), saved with
            the model."""
        self.pairs = pairs
        self.heads = nn.ModuleDict({p.name: make_head(head, student_dim, teacher_dim)
                                    for p in pairs})
        weights = weights if weights is not None else [1.0] * len(pairs)
        self.weights = [w / sum(weights) for w in weights]

    def anchors(self, frame_mask: torch.Tensor, mask_time: torch.Tensor) -> torch.Tensor:
        """(B, T) bool, True at the frames this objective scores."""
        raise NotImplementedError

    def select_frames(self, frame_mask: torch.Tensor, mask_time: torch.Tensor,
                      seeds: torch.Tensor | None = None) -> FrameSelection:
        """frame_mask, mask_time (B, T) bool on the CPU -> the anchors in row-major order, on
        the CPU (``seeds`` (B,) int64: per-utterance seeds for objectives that sample, e.g.
        negatives; None: torch's global RNG). Called once per batch before the forward: the
        number of scored frames is then known without running the student."""
        selection = select_rows(self.anchors(frame_mask, mask_time))
        selection.frame_mask = frame_mask
        return selection

    def normalise_targets(self, teacher_features: dict[int, torch.Tensor],
                          frame_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """teacher layer -> (B, T, D_t) features, frame_mask (B, T) bool -> the targets the
        pairs compare with (``objective.target_norm``): as they are (``none``); standardised
        per utterance (``utterance``, fp32, padding 0); and minus ``position_mean`` at each
        valid frame of a target layer (``utterance_position``)."""
        if self.target_norm == "none":
            return teacher_features
        normalised = {layer: utterance_norm(features.float(), frame_mask)
                      for layer, features in teacher_features.items()}
        if self.target_norm == "utterance_position":
            num_frames = frame_mask.shape[1]
            if num_frames > self.position_mean.shape[1]:
                raise ValueError(f"a batch of {num_frames} frames is longer than the "
                                 f"{self.position_mean.shape[1]} of position_mean (the crop)")
            for index, layer in enumerate(self.target_layers):
                if layer in normalised:
                    mean = self.position_mean[index, :num_frames].float()         # (T, D_t)
                    normalised[layer] = torch.where(frame_mask.unsqueeze(-1),
                                                    normalised[layer] - mean, 0.0)
        return normalised

    def set_position_mean(self, mean: torch.Tensor) -> None:
        """mean (L_targets, T_max, D_t), e.g. ``distill.position_mean``."""
        self.position_mean.copy_(mean)

    def pair_loss(self, predictions: torch.Tensor, targets: torch.Tensor,
                  selection: FrameSelection) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """predictions (N, D_t) fp32 at the selected frames, targets (B * T, D_t) fp32 ->
        (scalar loss summed over the N frames, metrics summed over the N frames by short
        name)."""
        raise NotImplementedError

    def forward(self, student_hidden: list[torch.Tensor], teacher_features: dict[int, torch.Tensor],
                selection: FrameSelection) -> ObjectiveOutput:
        """student_hidden: one (B, T, D_s) per student layer (index 0 = layer 1);
        teacher_features: teacher layer -> (B, T, D_t); selection: ``select_frames`` of the
        batch's masks, on the device of the states. A batch with no scored frame has loss 0
        (and count 0)."""
        count = selection.count
        device = student_hidden[0].device
        teacher_features = self.normalise_targets(teacher_features, selection.frame_mask)
        total = torch.zeros((), dtype=torch.float32, device=device)
        metrics: dict[str, torch.Tensor] = {}
        for pair, weight in zip(self.pairs, self.weights):
            states = student_hidden[pair.student_layer - 1][selection.batch_index,
                                                            selection.frame_index]
            predictions = self.heads[pair.name](states).float()        # (N, D_t)
            targets = teacher_features[pair.teacher_layer]
            loss_sum, metric_sums = self.pair_loss(
                predictions, targets.reshape(-1, targets.shape[-1]).float(), selection)
            loss = loss_sum / max(count, 1)
            total = total + weight * loss
            metrics[f"loss/{pair.name}"] = loss.detach()
            for key, value in metric_sums.items():
                metrics[f"{key}/{pair.name}"] = value.detach() / max(count, 1)
        count_tensor = torch.tensor(float(count), device=device)
        return ObjectiveOutput(loss=total, metrics=metrics, count=count_tensor)


def utterance_norm(features: torch.Tensor, frame_mask: torch.Tensor,
                   eps: float = 1e-5) -> torch.Tensor:
    """features (B, T, D), frame_mask (B, T) bool -> every dimension of each utterance
    standardised over its valid frames (mean 0, variance 1: data2vec's instance norm of
    targets); padded frames become 0. Removes what all frames of an utterance share, which
    otherwise crowds the logits of utterance-local negatives."""
    valid = frame_mask.unsqueeze(-1)                                           # (B, T, 1)
    features = torch.where(valid, features, 0.0)        # padding may hold anything, even NaN
    count = valid.sum(1, keepdim=True).clamp_min(1).to(features.dtype)
    mean = features.sum(1, keepdim=True) / count                              # (B, 1, D)
    centred = torch.where(valid, features - mean, 0.0)
    variance = (centred**2).sum(1, keepdim=True) / count
    return centred * torch.rsqrt(variance + eps)


def select_rows(anchors: torch.Tensor) -> FrameSelection:
    """anchors (B, T) bool -> the selection of its True frames, in row-major order."""
    batch_index, frame_index = anchors.nonzero(as_tuple=True)
    return FrameSelection(batch_index, frame_index, batch_index * anchors.shape[1] + frame_index)
