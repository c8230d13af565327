"""Memory-bounded PyTorch path of the sampled-negative cosine InfoNCE loss.

Rows are processed in chunks of ``C`` predictions, so at most ``(C, K+1, D)`` gathered targets exist
at a time. The forward saves the per-row log-sum-exp ``(N,)`` and nothing of size ``K*D``; the
backward regathers each chunk and applies the closed-form gradient derived in
``kernels/contrastive.py`` (the same maths as the Triton kernel):

    c_j  = g * (softmax(l)_j - [j == 0])                          dL/dl_j, (C, K+1)
    dp   = (sum_j c_j t_j / (tau |t_j|) - [|p| > eps] * (sum_j c_j cos_j / tau) * p_hat) / |p|
    dt_j = c_j / (tau |t_j|) * (p_hat - [|t_j| > eps] * cos_j * t_hat_j)

with every norm clamped at ``eps`` as in ``torch.nn.functional.cosine_similarity``.
"""

import torch

EPS = 1e-8
CHUNK_BYTES = 64 * 2**20  # budget for one chunk's (C, K+1, D) float32 gather


def default_chunk_size(num_candidates: int, dim: int) -> int:
    """Rows per chunk so that ``rows * num_candidates * dim`` float32 values fit ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (num_candidates * dim * 4))


def _chunk_cosines(p, targets, index, dtype):
    """Cosines of one chunk of predictions against their candidate targets.

    Args:
        p: (C, D) predictions of the chunk, any float dtype.
        targets: (M, D) all targets.
        index: (C, K+1) int64 candidate rows, column 0 the positive.
        dtype: compute dtype (float32, or float64 for float64 inputs).

    Returns:
        p: (C, D) in ``dtype``; p_norm: (C,); t: (C, K+1, D) gathered targets in ``dtype``;
        t_norm: (C, K+1); cos: (C, K+1). Norms are unclamped.
    """
    p = p.to(dtype)
    t = targets[index].to(dtype)
    p_norm, t_norm = p.norm(dim=-1), t.norm(dim=-1)
    dots = torch.bmm(t, p[:, :, None]).squeeze(-1)
    cos = dots / (p_norm.clamp_min(EPS)[:, None] * t_norm.clamp_min(EPS))
    return p, p_norm, t, t_norm, cos


class ChunkedContrastiveLoss(torch.autograd.Function):
    """Autograd function; see :func:`contrastive_loss_chunked` for the arguments."""

    @staticmethod
    def forward(ctx, predictions, targets, positive_index, negative_index, temperature, chunk_size):
        dtype = torch.promote_types(predictions.dtype, torch.float32)
        n = predictions.shape[0]
        loss = torch.empty(n, dtype=dtype, device=predictions.device)
        lse = torch.empty_like(loss)
        correct = torch.empty(n, dtype=torch.bool, device=predictions.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            index = torch.cat([positive_index[s:e, None], negative_index[s:e]], dim=1)
            *_, cos = _chunk_cosines(predictions[s:e], targets, index, dtype)
            logits = cos / temperature  # (C, K+1)
            lse[s:e] = torch.logsumexp(logits, dim=1)
            loss[s:e] = lse[s:e] - logits[:, 0]
            correct[s:e] = logits[:, 0] > logits[:, 1:].amax(dim=1)
        ctx.save_for_backward(predictions, targets, positive_index, negative_index, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        predictions, targets, positive_index, negative_index, lse = ctx.saved_tensors
        tau, chunk_size = ctx.temperature, ctx.chunk_size
        dtype = lse.dtype
        grad_p = torch.empty(predictions.shape, dtype=dtype, device=predictions.device)
        want_t = ctx.needs_input_grad[1]
        grad_t = torch.zeros(targets.shape, dtype=dtype, device=targets.device) if want_t else None
        for s in range(0, predictions.shape[0], chunk_size):
            e = min(s + chunk_size, predictions.shape[0])
            index = torch.cat([positive_index[s:e, None], negative_index[s:e]], dim=1)
            p, p_norm, t, t_norm, cos = _chunk_cosines(predictions[s:e], targets, index, dtype)
            coef = torch.exp(cos / tau - lse[s:e, None])  # softmax, (C, K+1)
            coef[:, 0] -= 1.0
            coef *= grad_loss[s:e, None].to(dtype)  # dL/dl_j
            p_norm_c, t_norm_c = p_norm.clamp_min(EPS)[:, None], t_norm.clamp_min(EPS)
            p_hat = p / p_norm_c
            w = coef / (tau * t_norm_c)  # (C, K+1)
            dp_hat = torch.bmm(w[:, None, :], t).squeeze(1)  # (C, D)
            radial = (coef * cos).sum(dim=1, keepdim=True) / tau * (p_norm > EPS)[:, None]
            grad_p[s:e] = (dp_hat - radial * p_hat) / p_norm_c
            if want_t:
                t_radial = (cos * (t_norm > EPS) / t_norm_c)[..., None] * t  # (C, K+1, D)
                dt = w[..., None] * (p_hat[:, None, :] - t_radial)
                grad_t.index_add_(0, index.flatten(), dt.flatten(0, 1))
        grad_t = grad_t.to(targets.dtype) if want_t else None
        return grad_p.to(predictions.dtype), grad_t, None, None, None, None


def contrastive_loss_chunked(
    predictions, targets, positive_index, negative_index, temperature, chunk_size=None
):
    """Sampled-negative cosine InfoNCE with memory bounded by ``chunk_size * (K+1) * D``.

    Args:
        predictions: (N, D) float.
        targets: (M, D) float; gets a gradient when it requires one.
        positive_index: (N,) int64 rows of ``targets``.
        negative_index: (N, K) int64 rows of ``targets``, duplicates allowed.
        temperature: float > 0.
        chunk_size: rows per chunk; default from :func:`default_chunk_size`.

    Returns:
        loss: (N,) float32 (float64 for float64 inputs); correct: (N,) bool.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(negative_index.shape[1] + 1, predictions.shape[1])
    return ChunkedContrastiveLoss.apply(
        predictions, targets, positive_index, negative_index, temperature, chunk_size
    )
