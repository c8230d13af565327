"""Fused Triton kernels for the sampled-negative cosine InfoNCE loss, and their autograd.Function.

One program handles one prediction row: it streams that row's K+1 candidate target rows in blocks
of ``BLOCK_K`` rows by ``BLOCK_D`` columns, normalises on the fly and keeps an online log-sum-exp
in float32. The ``(N, K+1, D)`` gather never reaches global memory. The forward saves, for the
backward, the per-row log-sum-exp and prediction norm ``(N,)`` and the candidates' cosines and
norms ``(N, K+1)`` fp32: 8 (K+1) bytes a row, 13.2 MB for N=16384, K=100 (the bf16 gather at
D=1024 would be 3.4 GB). So the backward reads each candidate target row once instead of
recomputing the cosines from a second read: forward + backward read the gathered targets twice
in all. It reads the saved cosines in a first pass and, with the norms,
once per D tile in the second (a few KB a row, against (K+1) D elements of targets).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from colld_ds.kernels.chunked import EPS

# Maths. For one row, p = prediction (D,), t_0 = targets[positive], t_j = targets[negative[j-1]].
#   n_p = max(|p|, eps), n_j = max(|t_j|, eps)          (the clamp of F.cosine_similarity)
#   p_hat = p / n_p, t_hat_j = t_j / n_j, cos_j = p_hat . t_hat_j, l_j = cos_j / tau
#   L = lse(l) - l_0,   lse(l) = log sum_j exp(l_j) kept online: m' = max(m, max_j l_j),
#   s' = s * exp(m - m') + sum_j exp(l_j - m'), lse = m + log s.
# The forward stores cos_j and |t_j| (N, K+1), lse and |p| (N,).
# Backward, with g = dLoss/dL of the row:
#   c_j = dLoss/dl_j = g * (exp(l_j - lse) - [j == 0])
#   dLoss/dp_hat = sum_j c_j t_hat_j / tau, dLoss/dt_hat_j = c_j p_hat / tau.
#   Through x_hat = x / max(|x|, eps): dx = (dx_hat - [|x| > eps] (x_hat . dx_hat) x_hat) / n_x, so
#   dp   = (sum_j w_j t_j - [|p| > eps] * S * p_hat) / n_p,  w_j = c_j / (tau n_j),
#          S = p_hat . dLoss/dp_hat = sum_j c_j cos_j / tau;
#   dt_j = w_j * p_hat - u_j * t_j,  u_j = w_j [|t_j| > eps] cos_j / n_j   (atomically added:
#          a target row can be a candidate of many predictions, or twice of the same one).
# The backward program first walks the saved (K+1) cosines for S (no target is read), then walks
# D tiles: for each, it reads the K+1 target rows' tile once, recomputes c_j, w_j, u_j from the
# saved cosines and norms (a few flops, instead of an (N, K+1) scratch), accumulates dp for the
# tile in registers and scatters dt_j.


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
def _logit_grads(cos, j, valid, g, lse, inv_temp):
    """(BLOCK_K,) c_j = dLoss/dl_j of a candidate block, 0 where j > K."""
    c = g * (tl.exp(cos * inv_temp - lse) - tl.where(j == 0, 1.0, 0.0))
    return tl.where(valid, c, 0.0)


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
    cos_ptr,  # (N, K+1) fp32 out: cos_j, saved for backward
    tnorm_ptr,  # (N, K+1) fp32 out: |t_j| unclamped, saved for backward
    K,
    D,
    inv_temp,
    eps,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_ALIGN: tl.constexpr,
):
    D = D // D_ALIGN * D_ALIGN  # = D; tells the compiler D is a multiple of D_ALIGN
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
        t_norm = tl.sqrt(t_sq)
        cos = dot / (n_p * tl.maximum(t_norm, eps))
        tl.store(cos_ptr + row * (K + 1) + j, cos, mask=valid)
        tl.store(tnorm_ptr + row * (K + 1) + j, t_norm, mask=valid)
        logit = tl.where(valid, cos * inv_temp, float("-inf"))
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
    cos_ptr,  # (N, K+1) fp32 cos_j from forward
    tnorm_ptr,  # (N, K+1) fp32 |t_j| from forward
    grad_loss_ptr,  # (N,) fp32 dLoss/dL
    grad_pred_ptr,  # (N, D) fp32 out
    grad_tgt_ptr,  # (M, D) fp32 out, zero-initialised, atomically accumulated (if TARGETS_GRAD)
    K,
    D,
    inv_temp,
    eps,
    TARGETS_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_ALIGN: tl.constexpr,
):
    D = D // D_ALIGN * D_ALIGN  # = D; tells the compiler D is a multiple of D_ALIGN
    row = tl.program_id(0).to(tl.int64)
    pred_row = pred_ptr + row * D
    g = tl.load(grad_loss_ptr + row)
    lse = tl.load(lse_ptr + row)
    p_norm = tl.load(pnorm_ptr + row)
    n_p = tl.maximum(p_norm, eps)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)

    # Pass 1 over the saved cosines: S.
    S = 0.0
    for k0 in range(0, K + 1, BLOCK_K):
        j = k0 + offs_k
        valid = j <= K
        cos = tl.load(cos_ptr + row * (K + 1) + j, mask=valid, other=0.0)
        S += tl.sum(_logit_grads(cos, j, valid, g, lse, inv_temp) * cos, axis=0) * inv_temp
    radial = tl.where(p_norm > eps, S, 0.0)

    # Pass 2 over D tiles: dp for the tile, dt_j scattered.
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        p_hat = tl.load(pred_row + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32) / n_p
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K + 1, BLOCK_K):
            j = k0 + offs_k
            valid = j <= K
            cos = tl.load(cos_ptr + row * (K + 1) + j, mask=valid, other=0.0)
            t_norm = tl.load(tnorm_ptr + row * (K + 1) + j, mask=valid, other=1.0)
            n_t = tl.maximum(t_norm, eps)
            w = _logit_grads(cos, j, valid, g, lse, inv_temp) * inv_temp / n_t
            t_idx = _candidate_rows(pos_ptr, neg_ptr, row, j, K)
            tile_mask = valid[:, None] & d_mask[None, :]
            t_offs = t_idx[:, None] * D + (d0 + offs_d)[None, :]
            t = tl.load(tgt_ptr + t_offs, mask=tile_mask, other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * t, axis=0)
            if TARGETS_GRAD:
                u = tl.where(t_norm > eps, w * cos / n_t, 0.0)
                dt = w[:, None] * p_hat[None, :] - u[:, None] * t
                tl.atomic_add(grad_tgt_ptr + t_offs, dt, mask=tile_mask)
        tl.store(grad_pred_ptr + row * D + d0 + offs_d, (acc - radial * p_hat) / n_p, mask=d_mask)


def _block_sizes(K, D):
    """(BLOCK_K, BLOCK_D): a (<=32, <=128) tile of candidates by features."""
    return min(32, triton.next_power_of_2(K + 1)), min(128, triton.next_power_of_2(D))


def _num_warps(block_k, block_d, dtype, targets_grad=False):
    """Warps per program (one program per prediction row). With frozen targets (training's
    case) one warp for fp16/bf16: at N = 4096-16384, K = 100 it runs forward + backward 3-5x
    faster than 8 warps on an H200, where the (32, 128) tile at 8 warps reached a quarter of
    the copy bandwidth (results/kernel_tiles_cuda_bf16_narrow.json, _fp16.json); two for fp32,
    whose one-warp forward spills on sm_80 (255 registers, 232 bytes). When the backward also
    scatters target gradients: 8 for the full (32, 128) tile, 4 below; with 4 warps that tile
    is 32 values a thread and ptxas spills it on sm_80 (168 registers, 16 bytes), 8 warps hold
    it in 118-128 registers (benchmarks/kernel_resources.py)."""
    if targets_grad:
        return 8 if block_k * block_d >= 4096 else 4
    return 2 if dtype == torch.float32 else 1


def _d_align(D):
    """Largest power of two <= 16 dividing D. Triton specialises D on being a multiple of 16
    only; a tile of fp16 rows of D = 1000 (8 x 125) loads in 16-byte vectors all the same
    once the kernel knows D is a multiple of 8, which it does not otherwise: it then loads
    element by element, which holds a pointer per element and nearly doubles the registers."""
    return math.gcd(D, 16)


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of a Triton kernel: ``kernel[grid](**args)``.

    ``args`` maps every kernel parameter name, in the kernel's order, to its value (tensors,
    ints, floats, and the ``tl.constexpr`` values), so the launch and the ahead-of-time compile
    (:func:`triton_signature`, ``num_warps``) read the same arguments."""

    kernel: triton.JITFunction
    grid: tuple[int, ...]
    args: dict
    num_warps: int

    def run(self):
        if self.grid[0] > 0:
            self.kernel[self.grid](**self.args, num_warps=self.num_warps)


_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
}  # fmt: skip


def triton_signature(launch):
    """``(signature, constexprs, attrs)`` for ``triton.compile(ASTSource(launch.kernel, ...))``:
    what Triton's launcher derives from ``launch.args`` on CUDA, so an ahead-of-time compile
    builds the kernel a real launch would. A tensor is ``*<dtype>``, with ``tt.divisibility``
    16 when its data pointer is 16-byte aligned; an int is ``i32`` (``i64`` past 2**31), the
    constant 1 when it equals 1, divisible by 16 when it is; a float is ``fp32``; a
    ``tl.constexpr`` parameter is a constant. (tests/test_kernel_compile.py checks this against
    Triton's own specialisation.)"""
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, (name, value)) in enumerate(zip(launch.kernel.params, launch.args.items())):
        if param.name != name:
            raise ValueError(f"launch argument {name!r} is not kernel parameter {param.name!r}")
        divisible = False
        if param.is_constexpr or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
            continue
        if torch.is_tensor(value):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif type(value) is int:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        elif type(value) is float:
            signature[name] = "fp32"
        else:
            raise TypeError(f"kernel argument {name}: unsupported type {type(value).__name__}")
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def forward_launch(predictions, targets, positive_index, negative_index, temperature, blocks=None):
    """The forward kernel's launch, its outputs allocated: ``loss_ptr`` (N,) fp32,
    ``correct_ptr`` (N,) int8, and what the backward reads. Inputs as in
    :func:`contrastive_loss_triton`, already contiguous, indices int64."""
    (N, D), K = predictions.shape, negative_index.shape[1]
    block_k, block_d, *warps = blocks or _block_sizes(K, D)
    f32 = dict(dtype=torch.float32, device=predictions.device)
    args = dict(
        pred_ptr=predictions, tgt_ptr=targets, pos_ptr=positive_index, neg_ptr=negative_index,
        loss_ptr=torch.empty(N, **f32),
        correct_ptr=torch.empty(N, dtype=torch.int8, device=predictions.device),
        lse_ptr=torch.empty(N, **f32), pnorm_ptr=torch.empty(N, **f32),
        cos_ptr=torch.empty(N, K + 1, **f32), tnorm_ptr=torch.empty(N, K + 1, **f32),
        K=K, D=D, inv_temp=1.0 / temperature, eps=EPS, BLOCK_K=block_k, BLOCK_D=block_d,
        D_ALIGN=_d_align(D),
    )  # fmt: skip
    num_warps = warps[0] if warps else _num_warps(block_k, block_d, predictions.dtype)
    return KernelLaunch(_contrastive_fwd_kernel, (N,), args, num_warps)


def backward_launch(forward, grad_loss, targets_grad, num_warps=None):
    """The backward kernel's launch after ``forward`` (a :func:`forward_launch` that ran; its
    ``args`` may lack the outputs ``loss_ptr`` and ``correct_ptr``), its outputs allocated:
    ``grad_pred_ptr`` (N, D) fp32 and, if ``targets_grad``, ``grad_tgt_ptr`` (M, D) fp32 zeros.
    ``grad_loss``: (N,) dLoss/dloss; ``num_warps``: None for :func:`_num_warps`'s."""
    fwd = forward.args
    predictions, targets = fwd["pred_ptr"], fwd["tgt_ptr"]
    (N, D), K = predictions.shape, fwd["K"]
    f32 = dict(dtype=torch.float32, device=predictions.device)
    grad_p = torch.empty(N, D, **f32)
    args = dict(
        pred_ptr=predictions, tgt_ptr=targets, pos_ptr=fwd["pos_ptr"], neg_ptr=fwd["neg_ptr"],
        lse_ptr=fwd["lse_ptr"], pnorm_ptr=fwd["pnorm_ptr"], cos_ptr=fwd["cos_ptr"],
        tnorm_ptr=fwd["tnorm_ptr"], grad_loss_ptr=grad_loss.float().contiguous(),
        grad_pred_ptr=grad_p,
        grad_tgt_ptr=torch.zeros(targets.shape, **f32) if targets_grad else grad_p,
        K=K, D=D, inv_temp=fwd["inv_temp"], eps=EPS, TARGETS_GRAD=targets_grad,
        BLOCK_K=fwd["BLOCK_K"], BLOCK_D=fwd["BLOCK_D"], D_ALIGN=fwd["D_ALIGN"],
    )  # fmt: skip
    if num_warps is None:
        num_warps = _num_warps(fwd["BLOCK_K"], fwd["BLOCK_D"], predictions.dtype, targets_grad)
    return KernelLaunch(_contrastive_bwd_kernel, (N,), args, num_warps)


class TritonContrastiveLoss(torch.autograd.Function):
    """Autograd function; see :func:`contrastive_loss_triton` for the arguments."""

    @staticmethod
    def forward(ctx, predictions, targets, positive_index, negative_index, temperature, blocks):
        launch = forward_launch(
            predictions.contiguous(), targets.contiguous(), positive_index.contiguous().long(),
            negative_index.contiguous().long(), temperature, blocks,
        )  # fmt: skip
        launch.run()
        loss, correct = launch.args["loss_ptr"], launch.args["correct_ptr"].bool()
        saved = {n: v for n, v in launch.args.items() if n not in ("loss_ptr", "correct_ptr")}
        tensors = {name: value for name, value in saved.items() if torch.is_tensor(value)}
        ctx.save_for_backward(*tensors.values())
        ctx.tensor_names = list(tensors)
        ctx.launch = dataclasses.replace(launch, args={n: v for n, v in saved.items()
                                                       if n not in tensors})
        ctx.forced_warps = blocks[2] if blocks is not None and len(blocks) == 3 else None
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        tensors = dict(zip(ctx.tensor_names, ctx.saved_tensors))
        forward = dataclasses.replace(ctx.launch, args={**tensors, **ctx.launch.args})
        want_t = ctx.needs_input_grad[1]
        launch = backward_launch(forward, grad_loss, want_t, ctx.forced_warps)
        launch.run()
        grad_p = launch.args["grad_pred_ptr"].to(tensors["pred_ptr"].dtype)
        grad_t = launch.args["grad_tgt_ptr"].to(tensors["tgt_ptr"].dtype) if want_t else None
        return grad_p, grad_t, None, None, None, None


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
        blocks: optional (BLOCK_K, BLOCK_D) powers of two, or (BLOCK_K, BLOCK_D, num_warps)
            for both kernels, to force a tile (tests, benchmarks/kernel_tiles.py).

    Returns:
        loss: (N,) float32; correct: (N,) bool.
    """
    return TritonContrastiveLoss.apply(
        predictions, targets, positive_index, negative_index, temperature, blocks
    )
