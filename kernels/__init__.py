"""Negative-sampled cosine InfoNCE loss: fused Triton kernels on CUDA, chunked PyTorch elsewhere.

- ``kernels/contrastive.py``: Triton forward/backward and their autograd.Function.
- ``kernels/dense.py``: PyTorch path for utterance-local negatives (one batched matmul).
- ``kernels/chunked.py``: PyTorch path whose memory does not grow with ``N*K*D``.
- ``kernels/reference.py``: the naive gather, for tests and benchmarks.
"""

import importlib.util
import os

from kernels.chunked import contrastive_loss_chunked
from kernels.dense import contrastive_loss_dense

__all__ = ["contrastive_loss", "use_triton"]


def use_triton(predictions) -> bool:
    """Triton when the inputs are on CUDA and triton imports, or when ``COLLD_FORCE_TRITON=1``
    (tests run it on CPU under ``TRITON_INTERPRET=1``)."""
    if os.environ.get("COLLD_FORCE_TRITON") == "1":
        return True
    return predictions.is_cuda and importlib.util.find_spec("triton") is not None


def contrastive_loss(predictions, targets, positive_index, negative_index, temperature: float,
                     num_frames: int | None = None):
    """Cosine-similarity InfoNCE with sampled negatives.

    Dispatch: Triton on CUDA; elsewhere the dense per-utterance path when ``num_frames`` is given
    (candidates of a row all lie in its positive's utterance; targets utterance-major with
    ``num_frames`` rows per utterance), else the chunked path.

    Args:
        predictions: (N, D) fp32/fp16/bf16, usually requires grad.
        targets: (M, D) teacher features flattened over the batch; may or may not require grad.
        positive_index: (N,) int64 row of ``targets`` that is the positive of each prediction.
        negative_index: (N, K) int64 rows of ``targets`` used as negatives (duplicates allowed).
        temperature: float > 0.
        num_frames: T, when every candidate row lies in the utterance of its positive.

    Returns:
        loss: (N,) float32, ``logsumexp_j(l_j) - l_0`` with ``l_0 = cos(p, t_pos) / temperature``
            and ``l_k = cos(p, t_neg_k) / temperature``; norms clamped at 1e-8 as in
            ``torch.nn.functional.cosine_similarity``. Computed in float32 whatever the input dtype
            (float64 inputs, as in gradcheck, stay float64 on the PyTorch path).
        correct: (N,) bool, the positive logit strictly above every negative logit (no grad).
    """
    if use_triton(predictions):
        from kernels.contrastive import contrastive_loss_triton

        return contrastive_loss_triton(
            predictions, targets, positive_index, negative_index, temperature
        )
    if num_frames is not None and predictions.shape[0] > 0:
        return contrastive_loss_dense(
            predictions, targets, positive_index, negative_index, temperature, num_frames
        )
    return contrastive_loss_chunked(
        predictions, targets, positive_index, negative_index, temperature
    )
