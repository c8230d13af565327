"""Fused Triton kernels for the sampled-negative cosine InfoNCE loss, and their autograd.Function.

One program handles one prediction row: it streams that row's K+1 candidate target rows in blocks
of ``BLOCK_K`` rows by ``BLOCK_D`` columns, normalises on the fly and keeps an online log-sum-exp
in float32. Neither the ``(N, K+1, D)`` gather nor the ``(N, K+1)`` logits reach global memory in
the forward; it saves per-row log-sum-exp and prediction norm ``(N,)`` for the backward.
"""

import torch
import triton
import triton.language as tl

from kernels.chunked import EPS

# Maths. For one row, p = prediction (D,), t_0 = targets[positive], t_j = targets[negative[j-1]].
#   n_p = max(|p|, eps), n_j = max(|t_j|, eps)          (the clamp of F.cosine_similarity)
#   p_hat = p / n_p, t_hat_j = t_j / n_j, cos_j = p_hat . t_hat_j, l_j = cos_j / tau
#   L = lse(l) - l_0,   lse(l) = log sum_j exp(l_j) kept online: m' = max(m, max_j l_j),
#   s' = s * exp(m - m') + sum_j exp(l_j - m'), lse = m + log s.
# Backward, with g = dLoss/dL of the row:
#   c_j = dLoss/dl_j = g * (exp(l_j - lse) - [j == 0])
#   dLoss/dp_hat = sum_j c_j t_hat_j / tau, dLoss/dt_hat_j = c_j p_hat / tau.
#   Through x_hat = x / max(|x|, eps): dx = (dx_hat - [|x| > eps] (x_hat . dx_hat) x_hat) / n_x, so
#   dp   = (sum_j w_j t_j - [|p| > eps] * S * p_hat) / n_p,  w_j = c_j / (tau n_j),
#          S = p_hat . dLoss/dp_hat = sum_j c_j cos_j / tau;
#   dt_j = w_j * p_hat - u_j * t_j,  u_j = w_j [|t_j| > eps] cos_j / n_j   (atomically added:
#          a target row can be a candidate of many predictions, or twice of the same one).
# The backward program first walks the K+1 rows to get w_j and u_j (stored to an (N, K+1) scratch),
# then walks D tiles, accumulating dp for the tile over all j in registers and scattering dt_j.


@triton.jit
def _candidate_rows(pos_ptr, neg_ptr, row, j, K):
    """Target row of candidate j of ``row``: j == 0 the positive, j >= 1 negative j-1."""
    neg = tl.load(neg_ptr + row * K + tl.maximum(j - 1, 0), mask=(j >= 1) & (j <= K), other=0)
    return tl.where(j == 0, tl.load(pos_ptr + row), neg)


@triton.jit
def _candidate_stats(
    pred_row, tgt_ptr, t_idx, valid, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    """(BLOCK_K,) dot products with the row's prediction and squared norms of a candidate block."""
    offs_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        p = tl.load(pred_row + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        t = tl.load(
            tgt_ptr + t_idx[:, None] * D + (d0 + offs_d)[None, :],
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        dot += tl.sum(t * p[None, :], axis=1)
        sq += tl.sum(t * t, axis=1)
    return dot, sq


@triton.jit
def _contrastive_fwd_kernel(
    pred_ptr,  # (N, D) predictions, fp32/fp16/bf16, contiguous
    tgt_ptr,  # (M, D) targets, contiguous
    pos_ptr,  # (N,) int64 positive rows
    neg_ptr,  # (N, K) int64 negative rows
    loss_ptr,  # (N,) fp32 out: lse - l_0
    correct_ptr,  # (N,) int8 out: l_0 > max_j>0 l_j
    lse_ptr,  # (N,) fp32 out, saved for backward
    pnorm_ptr,  # (N,) fp32 out: |p| unclamped, saved for backward
    K,
    D,
    inv_temp,
    eps,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pred_row = pred_ptr + row * D
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        p = tl.load(pred_row + d0 + offs_d, mask=d0 + offs_d < D, other=0.0).to(tl.float32)
        sq += p * p
    p_norm = tl.sqrt(tl.sum(sq, axis=0))
    n_p = tl.maximum(p_norm, eps)

    m = float("-inf")
    s = 0.0
    l_pos = 0.0
    max_neg = float("-inf")
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K + 1, BLOCK_K):
        j = k0 + offs_k
        valid = j <= K
        t_idx = _candidate_rows(pos_ptr, neg_ptr, row, j, K)
        dot, t_sq = _candidate_stats(pred_row, tgt_ptr, t_idx, valid, D, BLOCK_K, BLOCK_D)
        logit = dot / (n_p * tl.maximum(tl.sqrt(t_sq), eps)) * inv_temp
        logit = tl.where(valid, logit, float("-inf"))
        l_pos += tl.sum(tl.where(j == 0, logit, 0.0), axis=0)
        max_neg = tl.maximum(max_neg, tl.max(tl.where(j > 0, logit, float("-inf")), axis=0))
        m_new = tl.maximum(m, tl.max(logit, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, lse - l_pos)
    tl.store(correct_ptr + row, (l_pos > max_neg).to(tl.int8))
    tl.store(lse_ptr + row, lse)
    tl.store(pnorm_ptr + row, p_norm)


@triton.jit
def _contrastive_bwd_kernel(
    pred_ptr,  # (N, D) predictions, contiguous
    tgt_ptr,  # (M, D) targets, contiguous
    pos_ptr,  # (N,) int64
    neg_ptr,  # (N, K) int64
    lse_ptr,  # (N,) fp32 from forward
    pnorm_ptr,  # (N,) fp32 |p| from forward
    grad_loss_ptr,  # (N,) fp32 dLoss/dL
    w_ptr,  # (N, K+1) fp32 scratch: w_j
    u_ptr,  # (N, K+1) fp32 scratch: u_j (unused unless TARGETS_GRAD)
    grad_pred_ptr,  # (N, D) fp32 out
    grad_tgt_ptr,  # (M, D) fp32 out, zero-initialised, atomically accumulated (if TARGETS_GRAD)
    K,
    D,
    inv_temp,
    eps,
    TARGETS_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pred_row = pred_ptr + row * D
    g = tl.load(grad_loss_ptr + row)
    lse = tl.load(lse_ptr + row)
    p_norm = tl.load(pnorm_ptr + row)
    n_p = tl.maximum(p_norm, eps)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)

    # Pass 1 over the candidates: w_j, u_j and S.
    S = 0.0
    for k0 in range(0, K + 1, BLOCK_K):
        j = k0 + offs_k
        valid = j <= K
        t_idx = _candidate_rows(pos_ptr, neg_ptr, row, j, K)
        dot, t_sq = _candidate_stats(pred_row, tgt_ptr, t_idx, valid, D, BLOCK_K, BLOCK_D)
        t_norm = tl.sqrt(t_sq)
        n_t = tl.maximum(t_norm, eps)
        cos = dot / (n_p * n_t)
        c = g * (tl.exp(cos * inv_temp - lse) - tl.where(j == 0, 1.0, 0.0))
        c = tl.where(valid, c, 0.0)
        S += tl.sum(c * cos, axis=0) * inv_temp
        w = c * inv_temp / n_t
        tl.store(w_ptr + row * (K + 1) + j, w, mask=valid)
        if TARGETS_GRAD:
            u = tl.where(t_norm > eps, w * cos / n_t, 0.0)
            tl.store(u_ptr + row * (K + 1) + j, u, mask=valid)
    radial = tl.where(p_norm > eps, S, 0.0)
    tl.debug_barrier()  # the scratch written above is read back by other threads below

    # Pass 2 over D tiles: dp for the tile, dt_j scattered.
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        p_hat = tl.load(pred_row + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32) / n_p
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K + 1, BLOCK_K):
            j = k0 + offs_k
            valid = j <= K
            t_idx = _candidate_rows(pos_ptr, neg_ptr, row, j, K)
            tile_mask = valid[:, None] & d_mask[None, :]
            t_offs = t_idx[:, None] * D + (d0 + offs_d)[None, :]
            t = tl.load(tgt_ptr + t_offs, mask=tile_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + row * (K + 1) + j, mask=valid, other=0.0)
            acc += tl.sum(w[:, None] * t, axis=0)
            if TARGETS_GRAD:
                u = tl.load(u_ptr + row * (K + 1) + j, mask=valid, other=0.0)
                dt = w[:, None] * p_hat[None, :] - u[:, None] * t
                tl.atomic_add(grad_tgt_ptr + t_offs, dt, mask=tile_mask)
        tl.store(grad_pred_ptr + row * D + d0 + offs_d, (acc - radial * p_hat) / n_p, mask=d_mask)


def _block_sizes(K, D):
    """(BLOCK_K, BLOCK_D): a (<=32, <=128) tile of candidates by features."""
    return min(32, triton.next_power_of_2(K + 1)), min(128, triton.next_power_of_2(D))


class TritonContrastiveLoss(torch.autograd.Function):
    """Autograd function; see :func:`contrastive_loss_triton` for the arguments."""

    @staticmethod
    def forward(ctx, predictions, targets, positive_index, negative_index, temperature, blocks):
        predictions, targets = predictions.contiguous(), targets.contiguous()
        positive_index = positive_index.contiguous().long()
        negative_index = negative_index.contiguous().long()
        (N, D), K = predictions.shape, negative_index.shape[1]
        block_k, block_d = blocks or _block_sizes(K, D)
        f32 = dict(dtype=torch.float32, device=predictions.device)
        loss, lse, p_norm = (torch.empty(N, **f32) for _ in range(3))
        correct = torch.empty(N, dtype=torch.int8, device=predictions.device)
        if N > 0:
            _contrastive_fwd_kernel[(N,)](
                predictions, targets, positive_index, negative_index, loss, correct, lse, p_norm,
                K, D, 1.0 / temperature, EPS, BLOCK_K=block_k, BLOCK_D=block_d,
            )  # fmt: skip
        ctx.save_for_backward(predictions, targets, positive_index, negative_index, lse, p_norm)
        ctx.temperature, ctx.blocks = temperature, (block_k, block_d)
        correct = correct.bool()
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        predictions, targets, positive_index, negative_index, lse, p_norm = ctx.saved_tensors
        (N, D), K = predictions.shape, negative_index.shape[1]
        want_t = ctx.needs_input_grad[1]
        f32 = dict(dtype=torch.float32, device=predictions.device)
        w = torch.empty(N, K + 1, **f32)
        u = torch.empty(N, K + 1, **f32) if want_t else w
        grad_p = torch.empty(N, D, **f32)
        grad_t = torch.zeros(targets.shape, **f32) if want_t else grad_p
        if N > 0:
            _contrastive_bwd_kernel[(N,)](
                predictions, targets, positive_index, negative_index, lse, p_norm,
                grad_loss.float().contiguous(), w, u, grad_p, grad_t,
                K, D, 1.0 / ctx.temperature, EPS,
                TARGETS_GRAD=want_t, BLOCK_K=ctx.blocks[0], BLOCK_D=ctx.blocks[1],
            )  # fmt: skip
        grad_t = grad_t.to(targets.dtype) if want_t else None
        return grad_p.to(predictions.dtype), grad_t, None, None, None, None


def contrastive_loss_triton(
    predictions, targets, positive_index, negative_index, temperature, blocks=None
):
    """Sampled-negative cosine InfoNCE by the fused Triton kernels.

    Args:
        predictions: (N, D) fp32/fp16/bf16.
        targets: (M, D) same device; gets a gradient when it requires one.
        positive_index: (N,) int64 rows of ``targets``.
        negative_index: (N, K) int64 rows of ``targets``, duplicates allowed.
        temperature: float > 0.
        blocks: optional (BLOCK_K, BLOCK_D) powers of two, to force small tiles in tests.

    Returns:
        loss: (N,) float32; correct: (N,) bool.
    """
    return TritonContrastiveLoss.apply(
        predictions, targets, positive_index, negative_index, temperature, blocks
    )
