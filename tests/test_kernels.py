"""Tests of the contrastive loss kernels against the naive reference and a hand computation.

The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU. That variable must be set before
triton is imported, so they run in one subprocess (``run_triton_cases``) whose per-case results
the ``test_triton_*`` tests read; the rest of this process never imports triton.
"""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.harness import peak_bytes
from colld_ds.kernels import contrastive_loss, resolve_backend
from colld_ds.kernels.chunked import contrastive_loss_chunked
from colld_ds.kernels.reference import contrastive_loss_reference

REPO = Path(__file__).resolve().parents[1]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make_inputs(n, m, d, k, dtype, targets_grad, tiny_rows=False, seed=0, device="cpu"):
    """Random (predictions (n, d), targets (m, d), positive (n,), negatives (n, k)) on ``device``.

    Every row with k > 1 has a duplicated negative. ``tiny_rows`` exercises the eps clamp of the
    norms: prediction 0 and target 1 are zero, prediction 1 and target 2 have norms below eps, and
    targets 1 and 2 are every row's first negatives."""
    g = torch.Generator().manual_seed(seed)
    p, t = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    pos = torch.randint(0, m, (n,), generator=g)
    neg = torch.randint(0, m, (n, k), generator=g)
    if tiny_rows:
        p[0], t[1], neg[:, 0] = 0.0, 0.0, 1
        p[1], t[2], neg[:, min(1, k - 1)] = 1e-10 * p[1], 1e-10 * t[2], 2
    if k > 1:
        neg[:, -1] = neg[:, 0]
    p, t = p.to(device, dtype).requires_grad_(), t.to(device, dtype).requires_grad_(targets_grad)
    return p, t, pos.to(device), neg.to(device)


def mismatches(name, actual, expected, rtol):
    """Error lines for the first entries where |actual - expected| > rtol * max(|expected| of the
    row, 0.01); empty when they agree. Scaling by the row keeps near-zero entries of a row from
    failing; the floor does the same for rows whose exact gradient is 0 (positive == negative)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs()
    scale = scale.amax(dim=-1, keepdim=True) if expected.dim() == 2 else scale.max()
    bad = ((actual - expected).abs() > rtol * scale.clamp_min(0.01)).nonzero().tolist()
    lines = [f"{name}: {len(bad)} of {expected.numel()} mismatch (rtol {rtol})"] if bad else []
    for idx in bad[:5]:
        got, want = actual[tuple(idx)], expected[tuple(idx)]
        lines.append(f"  {name}{idx}: got {got:.6g}, want {want:.6g}")
    return lines


def compare_with_reference(loss_fn, inputs, temperature=0.1):
    """Errors of ``loss_fn`` vs the reference: loss, correct, and the gradients of
    ``(loss * weights).sum()`` (so grad_output != 1) wrt predictions and, if required, targets."""
    p, t, pos, neg = inputs
    rtol = RTOL[p.dtype]
    weights = torch.linspace(0.5, 2.0, len(p), dtype=torch.float64)
    wrt = (p, t) if t.requires_grad else (p,)
    results = []
    for fn in (loss_fn, contrastive_loss_reference):
        loss, correct = fn(p, t, pos, neg, temperature)
        grads = torch.autograd.grad((loss * weights.to(loss.device, loss.dtype)).sum(), wrt)
        results.append((loss.detach(), correct, grads))
    (loss, correct, grads), (ref_loss, ref_correct, ref_grads) = results
    errors = [] if loss.dtype == ref_loss.dtype else [f"loss dtype {loss.dtype}"]
    errors += mismatches("loss", loss, ref_loss, rtol)
    errors += mismatches("correct", correct, ref_correct, 0.0)
    for name, grad, ref in zip(("grad_predictions", "grad_targets"), grads, ref_grads):
        errors += [f"{name} dtype {grad.dtype}"] if grad.dtype != ref.dtype else []
        errors += mismatches(name, grad, ref, rtol)
    return errors


def hand_example():
    """N=2, D=3, K=2, tau=0.5: row 0 picks its positive; row 1's positive is orthogonal to it and
    is also one of its negatives (a tie, so not correct). Returns (inputs, loss, correct)."""
    p = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    pos, neg = torch.tensor([0, 3]), torch.tensor([[1, 3], [2, 3]])
    # Row 0: cos = (1, 0, 0) -> logits (2, 0, 0).
    # Row 1: cos = (0, 2/sqrt(6), 0) -> logits (0, 4/sqrt(6), 0).
    l1 = 4 / math.sqrt(6)
    loss = torch.tensor([math.log(math.exp(2) + 2) - 2, math.log(2 + math.exp(l1))])
    return (p, t, pos, neg, 0.5), loss, [True, False]


def hand_example_errors(loss_fn):
    inputs, want_loss, want_correct = hand_example()
    loss, correct = loss_fn(*inputs)
    errors = [] if loss.dtype == torch.float32 else [f"loss dtype {loss.dtype}"]
    errors += mismatches("loss", loss.detach(), want_loss, 1e-6)
    return errors + ([] if correct.tolist() == want_correct else [f"correct {correct.tolist()}"])


@pytest.mark.parametrize("loss_fn", [contrastive_loss, contrastive_loss_reference])
def test_hand_computed_example(loss_fn):
    errors = hand_example_errors(loss_fn)
    assert not errors, "\n".join(errors)


def test_reference_forward_is_cosine_similarity():
    """The reference's clamped normalisation gives F.cosine_similarity's logits, tiny rows too."""
    p, t, pos, neg = make_inputs(6, 8, 37, 4, torch.float32, targets_grad=False, tiny_rows=True)
    index = torch.cat([pos[:, None], neg], dim=1)
    logits = torch.nn.functional.cosine_similarity(p[:, None], t[index], dim=-1, eps=1e-8) / 0.1
    want = torch.logsumexp(logits, dim=1) - logits[:, 0]
    torch.testing.assert_close(contrastive_loss_reference(p, t, pos, neg, 0.1)[0], want)


def test_cpu_dispatch_and_forced_backends():
    p, t, pos, neg = make_inputs(5, 6, 8, 3, torch.float32, targets_grad=False)
    assert resolve_backend("auto", p, None) == "chunked"
    assert resolve_backend("auto", p, 6) == "dense"
    assert resolve_backend("chunked", p, 6) == "chunked"
    assert type(contrastive_loss(p, t, pos, neg, 0.1)[0].grad_fn).__name__.startswith("Chunked")
    with pytest.raises(ValueError, match="needs num_frames"):
        contrastive_loss(p, t, pos, neg, 0.1, backend="dense")
    with pytest.raises(ValueError, match="choose one of"):
        contrastive_loss(p, t, pos, neg, 0.1, backend="cuda")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("targets_grad", [True, False], ids=["targets_grad", "targets_frozen"])
def test_chunked_matches_reference(dtype, targets_grad):
    """Four chunks of 3 rows (the last one short), duplicates, zero and below-eps vectors."""
    inputs = make_inputs(10, 12, 37, 6, dtype, targets_grad, tiny_rows=True)
    errors = compare_with_reference(
        lambda *a: contrastive_loss_chunked(*a, chunk_size=3), inputs
    )
    assert not errors, "\n".join(errors)


def empty_batch_errors(loss_fn):
    """N = 0 (a batch with no masked frame): empty outputs, zero gradients."""
    p = torch.randn(0, 8, requires_grad=True)
    t = torch.randn(5, 8, requires_grad=True)
    loss, correct = loss_fn(p, t, torch.zeros(0, dtype=torch.long), torch.zeros(0, 3).long(), 0.1)
    errors = [] if loss.shape == correct.shape == (0,) else [f"shapes {loss.shape} {correct.shape}"]
    grad_p, grad_t = torch.autograd.grad(loss.sum(), (p, t))
    return errors + ([] if grad_p.shape == (0, 8) and not grad_t.any() else ["gradients"])


def test_chunked_empty_batch():
    errors = empty_batch_errors(contrastive_loss_chunked)
    assert not errors, "\n".join(errors)


def test_chunked_gradcheck_float64():
    p, t, pos, neg = make_inputs(7, 9, 5, 4, torch.float64, targets_grad=True, seed=1)
    fn = lambda p, t: contrastive_loss_chunked(p, t, pos, neg, 0.2, chunk_size=2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p, t))


def test_chunked_peak_memory_does_not_scale_with_n_k_d():
    """Forward + backward peak allocator bytes: the naive path holds the (N, K+1, D) gather
    (N*(K+1)*D*4 bytes); the chunked path holds one (C, K+1, D) chunk and (N, D)-sized grads."""
    n, k, d, chunk = 512, 50, 64, 16
    p, t, pos, neg = make_inputs(n, n, d, k, torch.float32, targets_grad=True)
    gather_bytes = n * (k + 1) * d * 4

    def run(fn):
        return peak_bytes(lambda: fn(p, t, pos, neg, 0.1)[0].sum().backward(), torch.device("cpu"))

    naive = run(contrastive_loss_reference)
    chunked = run(lambda *a: contrastive_loss_chunked(*a, chunk_size=chunk))
    assert naive > gather_bytes
    assert chunked < gather_bytes / 4, (chunked, naive, gather_bytes)


# name -> (dtype, N, M, D, K, targets_grad, tiny_rows, blocks); blocks None = production sizes
# (BLOCK_K <= 32, BLOCK_D <= 128), otherwise forced small to exercise many tiles.
TRITON_CASES = {
    "fp32_D37_K1": ("float32", 6, 8, 37, 1, True, False, None),
    "fp32_D100_K40_frozen_targets": ("float32", 4, 10, 100, 40, False, False, None),
    "fp32_D100_K70_small_blocks": ("float32", 4, 9, 100, 70, True, False, (16, 32)),
    "fp32_D300_tiny_rows": ("float32", 4, 6, 300, 5, True, True, None),
    "fp32_D1000_K3": ("float32", 3, 5, 1000, 3, True, False, None),
    "fp16_D100_K40": ("float16", 4, 10, 100, 40, True, False, None),
    "bf16_D100_K40": ("bfloat16", 4, 10, 100, 40, True, False, None),
    "bf16_D37_K1_frozen_targets": ("bfloat16", 5, 7, 37, 1, False, True, None),
}


def run_triton_cases():
    """Subprocess entry point (TRITON_INTERPRET=1): one JSON line per case."""
    from colld_ds.kernels.contrastive import contrastive_loss_triton

    forced = functools.partial(contrastive_loss, backend="triton")
    hand = {"name": "hand_computed", "errors": hand_example_errors(forced)}
    print("CASE " + json.dumps(hand), flush=True)
    empty = {"name": "empty_batch", "errors": empty_batch_errors(forced)}
    print("CASE " + json.dumps(empty), flush=True)
    for name, (dtype, n, m, d, k, targets_grad, tiny_rows, blocks) in TRITON_CASES.items():
        inputs = make_inputs(n, m, d, k, getattr(torch, dtype), targets_grad, tiny_rows)
        if blocks is None:  # through the public function
            loss_fn = forced
            grad_fn = type(forced(*inputs, 0.1)[0].grad_fn).__name__
            errors = [] if grad_fn.startswith("Triton") else [f"dispatched to {grad_fn}"]
        else:
            loss_fn = functools.partial(contrastive_loss_triton, blocks=blocks)
            errors = []
        errors += compare_with_reference(loss_fn, inputs)
        print("CASE " + json.dumps({"name": name, "errors": errors}), flush=True)


@pytest.fixture(scope="module")
def triton_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", "import test_kernels; test_kernels.run_triton_cases()"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            case = json.loads(line[5:])
            results[case["name"]] = case["errors"]
    return results, proc.stderr[-3000:]


# Triton 3.6's interpreter (the GPU machines' version) converts a 1-element numpy array to int,
# which numpy 2.x refuses: every kernel fails there with this message before computing anything.
INTERPRETER_NUMPY_BREAK = "only 0-dimensional arrays can be converted to Python scalars"


@pytest.mark.parametrize("case", ["hand_computed", "empty_batch", *TRITON_CASES])
def test_triton_interpreted_matches_reference(triton_results, case):
    results, stderr = triton_results
    if case not in results and INTERPRETER_NUMPY_BREAK in stderr:
        pytest.skip("this Triton's interpreter does not run with this numpy (Triton 3.6 with "
                    "numpy 2.x); test_triton_on_cuda_matches_reference covers a GPU")
    assert case in results, f"the Triton subprocess did not report {case}:\n{stderr}"
    assert not results[case], "\n".join(results[case])


# name -> (dtype, N, M, D, K, targets_grad, tiny_rows): production D and K, production tiles.
CUDA_CASES = {
    "fp32_D1000_K100": ("float32", 256, 600, 1000, 100, True, False),
    "fp32_D768_K1_tiny_rows": ("float32", 64, 80, 768, 1, True, True),
    "fp16_D1024_K50": ("float16", 256, 500, 1024, 50, True, False),
    "fp16_D1000_K512_frozen_targets": ("float16", 64, 700, 1000, 512, False, False),
    "bf16_D1280_K100": ("bfloat16", 128, 300, 1280, 100, True, False),
    "bf16_D1024_K100_frozen_targets": ("bfloat16", 256, 500, 1024, 100, False, True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CUDA_CASES)
def test_triton_on_cuda_matches_reference(case):
    """The compiled kernels on a real GPU, through ``contrastive_loss``'s CUDA dispatch."""
    dtype, n, m, d, k, targets_grad, tiny_rows = CUDA_CASES[case]
    inputs = make_inputs(n, m, d, k, getattr(torch, dtype), targets_grad, tiny_rows,
                         device="cuda")
    grad_fn = type(contrastive_loss(*inputs, 0.1)[0].grad_fn).__name__
    assert grad_fn.startswith("Triton"), f"dispatched to {grad_fn}"
    errors = compare_with_reference(contrastive_loss, inputs)
    assert not errors, "\n".join(errors)
