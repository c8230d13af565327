"""wav2vec 2.0 span masking over the student's frames.

For an utterance with L valid frames and span length s: n = floor(mask_prob * L / s + u),
u ~ U(0, 1) (stochastic rounding, so E[n] = mask_prob * L / s), raised to ``min_masks`` when
L >= s; n span starts drawn uniformly and independently in [0, L - s]; each span masks s frames.
Spans may overlap, so the masked fraction is below ``mask_prob`` (about 0.49 of the frames for
the default 0.65 / 10). Utterances shorter than one span get no mask. No frame t >= L is masked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_span_mask(
    frame_lengths: Tensor,
    max_frames: int,
    mask_prob: float,
    span_length: int,
    generator: torch.Generator | None = None,
    min_masks: int = 1,
) -> Tensor:
    """frame_lengths (B,) int, max_frames T >= max(frame_lengths) -> (B, T) bool, True = masked.

    Draws on ``generator``'s device (default: torch's global RNG on frame_lengths' device) and
    never synchronises with the host. Deterministic for a seeded generator.
    """
    device = frame_lengths.device
    rng_device = generator.device if generator is not None else device
    lengths = frame_lengths.to(rng_device).long()  # (B,)
    batch = lengths.shape[0]
    # Upper bound on spans per utterance, known on the host: no .item() needed.
    max_spans = max(min_masks, math.floor(mask_prob * max_frames / span_length) + 1)

    u = torch.rand(batch, generator=generator, device=rng_device)
    spans = torch.floor(mask_prob * lengths / span_length + u).long()
    long_enough = lengths >= span_length
    spans = torch.where(long_enough, spans.clamp(min=min_masks), 0)  # (B,)

    num_starts = (lengths - span_length + 1).clamp(min=1)  # (B,)
    starts = (
        torch.rand(batch, max_spans, generator=generator, device=rng_device)
        * num_starts.unsqueeze(1)
    ).long()  # (B, N)
    used = torch.arange(max_spans, device=rng_device) < spans.unsqueeze(1)  # (B, N)
    positions = starts.unsqueeze(-1) + torch.arange(span_length, device=rng_device)  # (B, N, s)
    positions = torch.where(used.unsqueeze(-1), positions, 0).flatten(1)
    hits = torch.zeros(batch, max_frames, dtype=torch.int32, device=rng_device)
    hits.scatter_add_(1, positions, used.unsqueeze(-1).expand(-1, -1, span_length).flatten(1).int())
    return (hits > 0).to(device)


def utterance_span_masks(
    frame_lengths: Tensor,
    max_frames: int,
    mask_prob: float,
    span_length: int,
    seeds: Tensor,
    min_masks: int = 1,
) -> Tensor:
    """Like :func:`compute_span_mask`, each utterance drawn from its own seed on the CPU.

    frame_lengths (B,) int, seeds (B,) int64 -> (B, T) bool on the CPU, True = masked. Row b
    depends only on (frame_lengths[b], seeds[b]): not on the padding T, the other utterances
    of the batch, or how the batch was split into micro-batches.
    """
    mask = torch.zeros(frame_lengths.shape[0], max_frames, dtype=torch.bool)
    for row, length, seed in zip(mask, frame_lengths.tolist(), seeds.tolist(), strict=True):
        generator = torch.Generator().manual_seed(seed)
        row[:length] = compute_span_mask(torch.tensor([length]), length, mask_prob, span_length,
                                         generator, min_masks)[0]
    return mask


def expected_masked_fraction(
    length: int, mask_prob: float, span_length: int, min_masks: int = 1
) -> float:
    """Expected fraction of the ``length`` valid frames that :func:`compute_span_mask` masks.

    Computed analytically: a start uniform over the P = L - s + 1 positions covers frame t with
    probability p_t = (number of starts covering t) / P; with n independent spans
    P(t masked) = 1 - (1 - p_t)^n, averaged over t and over the two values of the stochastically
    rounded n.
    """
    if length < span_length:
        return 0.0
    positions = length - span_length + 1
    x = mask_prob * length / span_length
    low, frac = math.floor(x), x - math.floor(x)
    counts = [(max(low, min_masks), 1.0 - frac), (max(low + 1, min_masks), frac)]
    total = 0.0
    for t in range(length):
        coverage = min(t, positions - 1) - max(0, t - span_length + 1) + 1
        p = coverage / positions
        total += sum(weight * (1.0 - (1.0 - p) ** n) for n, weight in counts)
    return total / length
