"""Naive reference of the sampled-negative cosine InfoNCE loss, for tests and benchmarks only.

It gathers every positive and negative row into one ``(N, K+1, D)`` tensor, so its memory grows
with ``N*K*D``; the training path is :func:`colld_ds.kernels.contrastive_loss`.

Each vector is divided by its norm clamped at eps, the forward of
``torch.nn.functional.cosine_similarity``. Its autograd is the exact derivative of that function
(zero through the clamp below eps), as in the fused kernels; ``F.cosine_similarity``'s own
backward instead clamps the norm in place under no-grad, so below eps it differs.
"""

import torch

from colld_ds.kernels.chunked import EPS


def _normalize(x):
    """(..., D) -> (..., D) divided by its norm clamped at ``EPS``."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def contrastive_loss_reference(predictions, targets, positive_index, negative_index, temperature):
    """Per-row InfoNCE, computed the obvious way.

    Args:
        predictions: (N, D) float.
        targets: (M, D) float.
        positive_index: (N,) int64 rows of ``targets``.
        negative_index: (N, K) int64 rows of ``targets``.
        temperature: float > 0.

    Returns:
        loss: (N,) float32 (float64 for float64 inputs), ``logsumexp(l) - l_0``.
        correct: (N,) bool, positive logit strictly above every negative logit.
    """
    dtype = torch.promote_types(predictions.dtype, torch.float32)
    index = torch.cat([positive_index[:, None], negative_index], dim=1)  # (N, K+1)
    candidates = targets.to(dtype)[index]  # (N, K+1, D)
    cos = (_normalize(predictions.to(dtype))[:, None] * _normalize(candidates)).sum(dim=-1)
    logits = cos / temperature  # (N, K+1)
    zeros = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    loss = torch.nn.functional.cross_entropy(logits, zeros, reduction="none")
    correct = logits[:, 0].detach() > logits[:, 1:].detach().amax(dim=1)
    return loss, correct
