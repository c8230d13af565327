"""CoLLD: masked contrastive layer-to-layer distillation (Chang et al., ICASSP 2024).

For each pair, the projected student state at a scored frame (its input masked or not) must pick
out the teacher's feature of the same frame (computed on the unmasked input) among K teacher
features of other frames of the same utterance (optionally also the same frame index of the
batch's other utterances), at the same layer: InfoNCE on cosine similarity / temperature.
"""

from __future__ import annotations

import warnings

import torch

from colld_ds.layer_map import LayerPair
from colld_ds.objectives.base import FrameSelection, PairwiseObjective
from colld_ds.kernels import contrastive_loss


def sample_negatives(frame_lengths: torch.Tensor, batch_index: torch.Tensor,
                     frame_index: torch.Tensor, num_frames: int, num_negatives: int,
                     generator: torch.Generator | None = None,
                     seeds: torch.Tensor | None = None) -> torch.Tensor:
    """K negatives per anchor frame, uniform over the other valid frames of its utterance.

    CPU tensors: frame_lengths (B,) valid frames per utterance; batch_index, frame_index (N,)
    the anchors, sorted by utterance; num_frames T of the padded batch. Returns (N, K) int64
    rows of the (B * T, D) flattened targets. Draws r uniform in {0 .. L - 2} and shifts
    r >= t up by one, so the positive is never drawn and neither is padding (t >= L).

    The uniforms come from ``generator`` (or torch's global RNG), or with ``seeds`` (B,) int64
    from one generator per utterance seeded ``seeds[b] + 1`` (the span mask uses
    ``seeds[b]``), so an utterance's negatives do not depend on the rest of the batch.
    """
    lengths = frame_lengths[batch_index]
    if bool((lengths < 2).any()):
        raise ValueError("CoLLD needs at least 2 valid frames per utterance to draw negatives; "
                         "raise data.max_seconds or filter out very short utterances")
    if seeds is None:
        uniform = torch.rand(batch_index.shape[0], num_negatives, generator=generator)
    else:
        rows = torch.bincount(batch_index, minlength=seeds.shape[0]).tolist()
        uniform = torch.cat([
            torch.rand(n, num_negatives, generator=torch.Generator().manual_seed(seed + 1))
            for n, seed in zip(rows, seeds.tolist(), strict=True)
        ])
    others = (lengths - 1).unsqueeze(1)
    drawn = (uniform * others).long().minimum(others - 1)
    drawn = drawn + (drawn >= frame_index.unsqueeze(1)).long()
    return batch_index.unsqueeze(1) * num_frames + drawn


def same_position_negatives(frame_lengths: torch.Tensor, batch_index: torch.Tensor,
                            frame_index: torch.Tensor, num_frames: int,
                            fallback: torch.Tensor) -> torch.Tensor:
    """For each anchor (b, t), frame t of every other utterance of the batch: (N, B - 1) rows
    of the (B * T, D) flattened targets, utterances in the order b + 1, b + 2, ... (mod B).

    Where an utterance has no frame t (it is shorter), the row is taken from ``fallback``
    (N, K) (the anchor's same-utterance negatives; column j, or j mod K), so no padded frame is
    ever a candidate. Such negatives share the positive's position: a student cannot reject
    them by an absolute positional embedding (Whisper adds one after the mask)."""
    batch_size = frame_lengths.shape[0]
    columns = torch.arange(batch_size - 1)
    other = (batch_index.unsqueeze(1) + 1 + columns) % batch_size          # (N, B - 1)
    rows = other * num_frames + frame_index.unsqueeze(1)
    present = frame_index.unsqueeze(1) < frame_lengths[other]
    return torch.where(present, rows, fallback[:, columns % fallback.shape[1]])


class ShortUtteranceWarning(UserWarning):
    """An utterance has fewer other frames than ``objective.num_negatives``."""


class ColldObjective(PairwiseObjective):
    def __init__(self, pairs: list[LayerPair], student_dim: int, teacher_dim: int, head: str,
                 temperature: float, num_negatives: int, weights: list[float] | None = None,
                 backend: str = "auto", *, anchor_frames: str, target_norm: str,
                 position_negatives: bool, position_frames: int = 0):
        super().__init__(pairs, student_dim, teacher_dim, head, weights, target_norm,
                         position_frames)
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.backend = backend
        """``colld_ds.kernels.contrastive_loss``'s backend (``objective.contrastive_backend``)."""
        self.anchor_frames = anchor_frames
        """``masked`` or ``all`` (``objective.anchor_frames``)."""
        self.position_negatives = position_negatives
        """Add the frames at the anchor's index in the batch's other utterances as negatives
        (``objective.position_negatives``)."""

    def anchors(self, frame_mask, mask_time):
        return mask_time & frame_mask if self.anchor_frames == "masked" else frame_mask

    def select_frames(self, frame_mask, mask_time, seeds=None):
        """The anchors; one draw of negatives serves every pair of the batch.

        An utterance with fewer other frames than ``num_negatives`` repeats some negatives:
        that is a warning (once per process), not an error, since corpora hold utterances
        shorter than the crop; the config is checked against the longest crop at start-up
        (``config.check_num_negatives``)."""
        selection = super().select_frames(frame_mask, mask_time)
        selection.num_frames = frame_mask.shape[1]      # negatives stay in their utterance
        frame_lengths = frame_mask.sum(1)
        if bool((frame_lengths <= self.num_negatives).any()):
            warnings.warn(
                f"objective.num_negatives: {self.num_negatives} is more than the other frames "
                f"of some utterances (fewer than {self.num_negatives + 1} frames): their "
                f"negatives must repeat; lower objective.num_negatives or leave out short "
                f"utterances (colld prep make_shards --min_seconds)", ShortUtteranceWarning)
        selection.negatives = sample_negatives(frame_lengths, selection.batch_index,
                                               selection.frame_index, frame_mask.shape[1],
                                               self.num_negatives, seeds=seeds)
        if self.position_negatives and frame_mask.shape[0] > 1:
            selection.negatives = torch.cat([selection.negatives, same_position_negatives(
                frame_lengths, selection.batch_index, selection.frame_index,
                frame_mask.shape[1], selection.negatives)], dim=1)
            selection.num_frames = None             # candidates span utterances
        return selection

    def pair_loss(self, predictions, targets, selection: FrameSelection):
        loss, correct = contrastive_loss(predictions, targets, selection.rows,
                                         selection.negatives, self.temperature,
                                         num_frames=selection.num_frames,
                                         backend=self.backend)
        return loss.sum(), {"acc": correct.float().sum()}
