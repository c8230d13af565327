"""Negative-sampled cosine InfoNCE loss: fused Triton kernels on CUDA, chunked PyTorch elsewhere.

- ``kernels/contrastive.py``: Triton forward/backward and their autograd.Function.
- ``kernels/dense.py``: PyTorch path for utterance-local negatives (one batched matmul).
- ``kernels/chunked.py``: PyTorch path whose memory does not grow with ``N*K*D``.
- ``kernels/reference.py``: the naive gather, for tests and benchmarks.

Installed, this folder is ``colld_ds.kernels``. From a checkout whose root is on ``sys.path``
(``python -m`` in it, launch.sh's ``PYTHONPATH``) it is also importable as top-level ``kernels``,
the import name of Hugging Face's ``kernels`` package, which transformers (>= 5.25) requires and
imports: imported under that name, this module hands over to the installed package
(:func:`_hand_over_to_installed_kernels`).
"""

import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path


def _hand_over_to_installed_kernels() -> None:
    """Replace this module in ``sys.modules["kernels"]`` by the ``kernels`` package found on
    ``sys.path`` without this checkout's root, if one is installed: ``import kernels`` returns
    what ``sys.modules`` holds once the import ends, so transformers gets Hugging Face's package.
    The rest of this file still runs, into a module object that nothing keeps."""
    root = Path(__file__).resolve().parent.parent
    others = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    spec = PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        return  # none installed: transformers finds no version here and leaves `kernels` alone
    installed = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = installed
    spec.loader.exec_module(installed)


if __name__ == "kernels":
    _hand_over_to_installed_kernels()

from colld_ds.kernels.chunked import contrastive_loss_chunked
from colld_ds.kernels.dense import contrastive_loss_dense

__all__ = ["BACKENDS", "contrastive_loss", "resolve_backend"]

BACKENDS = ("auto", "triton", "dense", "chunked")


def resolve_backend(backend: str, predictions, num_frames: int | None) -> str:
    """The path ``contrastive_loss`` takes: ``auto`` = ``triton`` when the inputs are on CUDA
    and triton imports, else ``dense`` when ``num_frames`` is given, else ``chunked``. A forced
    ``triton`` off CUDA runs only under ``TRITON_INTERPRET=1`` (the CPU tests)."""
    if backend not in BACKENDS:
        raise ValueError(f"contrastive backend {backend!r}: choose one of {list(BACKENDS)}")
    if backend == "dense" and num_frames is None:
        raise ValueError("the dense contrastive backend needs num_frames (utterance-local "
                         "negatives); use 'chunked' or 'auto'")
    if backend != "auto":
        return backend
    if predictions.is_cuda and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "dense" if num_frames is not None else "chunked"


def contrastive_loss(predictions, targets, positive_index, negative_index, temperature: float,
                     num_frames: int | None = None, backend: str = "auto"):
    """Cosine-similarity InfoNCE with sampled negatives.

    Dispatch (``resolve_backend``): Triton on CUDA; elsewhere the dense per-utterance path when
    ``num_frames`` is given (candidates of a row all lie in its positive's utterance; targets
    utterance-major with ``num_frames`` rows per utterance), else the chunked path. ``backend``
    forces one of ``triton``, ``dense``, ``chunked``.

    Args:
        predictions: (N, D) fp32/fp16/bf16, usually requires grad.
        targets: (M, D) teacher features flattened over the batch; may or may not require grad.
        positive_index: (N,) int64 row of ``targets`` that is the positive of each prediction.
        negative_index: (N, K) int64 rows of ``targets`` used as negatives (duplicates allowed).
        temperature: float > 0.
        num_frames: T, when every candidate row lies in the utterance of its positive.
        backend: ``auto`` (default), ``triton``, ``dense`` or ``chunked``.

    Returns:
        loss: (N,) float32, ``logsumexp_j(l_j) - l_0`` with ``l_0 = cos(p, t_pos) / temperature``
            and ``l_k = cos(p, t_neg_k) / temperature``; norms clamped at 1e-8 as in
            ``torch.nn.functional.cosine_similarity``. Computed in float32 whatever the input dtype
            (float64 inputs, as in gradcheck, stay float64 on the PyTorch path).
        correct: (N,) bool, the positive logit strictly above every negative logit (no grad).
    """
    path = resolve_backend(backend, predictions, num_frames)
    if path == "triton":
        from colld_ds.kernels.contrastive import contrastive_loss_triton

        return contrastive_loss_triton(
            predictions, targets, positive_index, negative_index, temperature
        )
    if path == "dense" and predictions.shape[0] > 0:
        return contrastive_loss_dense(
            predictions, targets, positive_index, negative_index, temperature, num_frames
        )
    return contrastive_loss_chunked(
        predictions, targets, positive_index, negative_index, temperature
    )
