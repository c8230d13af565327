"""The dense per-utterance path against the naive reference."""

import pytest
import torch

from colld_ds.objectives import sample_negatives
from colld_ds.kernels import contrastive_loss
from colld_ds.kernels.dense import contrastive_loss_dense
from colld_ds.kernels.reference import contrastive_loss_reference


def utterance_batch(lengths, num_frames, dim, num_negatives, dtype=torch.float32, seed=0,
                    shuffle=True):
    """Anchors at random valid frames, negatives drawn by the objective's own sampler."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    valid = torch.arange(num_frames) < lengths[:, None]
    anchors = valid & (torch.rand(valid.shape, generator=generator) < 0.5)
    batch_index, frame_index = anchors.nonzero(as_tuple=True)
    if shuffle:                                     # rows in any order, not utterance-sorted
        order = torch.randperm(len(batch_index), generator=generator)
        batch_index, frame_index = batch_index[order], frame_index[order]
    negatives = sample_negatives(lengths, batch_index, frame_index, num_frames, num_negatives,
                                 generator=generator)
    predictions = torch.randn(len(batch_index), dim, generator=generator, dtype=dtype)
    targets = torch.randn(len(lengths) * num_frames, dim, generator=generator, dtype=dtype)
    return predictions, targets, batch_index * num_frames + frame_index, negatives


@pytest.mark.parametrize("num_negatives,dim", [(1, 5), (7, 37), (40, 16)])
@pytest.mark.parametrize("targets_grad", [False, True])
def test_dense_matches_reference(num_negatives, dim, targets_grad):
    predictions, targets, positive, negatives = utterance_batch([9, 4, 12], 12, dim,
                                                                num_negatives)
    weights = torch.rand(len(positive))               # grad_output != 1
    results = []
    for fn in (contrastive_loss_reference,
               lambda *args: contrastive_loss_dense(*args, num_frames=12)):
        p = predictions.clone().requires_grad_()
        t = targets.clone().requires_grad_(targets_grad)
        loss, correct = fn(p, t, positive, negatives, 0.1)
        (loss * weights).sum().backward()
        results.append((loss.detach(), correct, p.grad, t.grad))
    (ref_loss, ref_correct, ref_dp, ref_dt), (loss, correct, dp, dt) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(correct, ref_correct)
    torch.testing.assert_close(dp, ref_dp, rtol=1e-5, atol=1e-6)
    if targets_grad:
        torch.testing.assert_close(dt, ref_dt, rtol=1e-5, atol=1e-6)


def test_dense_gradcheck_float64():
    predictions, targets, positive, negatives = utterance_batch([5, 3], 5, 4, 3,
                                                                dtype=torch.float64)
    predictions.requires_grad_()
    targets.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, t: contrastive_loss_dense(p, t, positive, negatives, 0.5, num_frames=5)[0],
        (predictions, targets))


def test_dense_refuses_a_negative_from_another_utterance():
    predictions, targets, positive, negatives = utterance_batch([6, 6], 6, 8, 3)
    negatives[0, 0] = (positive[0] + 6) % 12           # the other utterance
    with pytest.raises(ValueError, match="outside the utterance"):
        contrastive_loss_dense(predictions, targets, positive, negatives, 0.1, num_frames=6)


def test_public_function_dispatches_dense_on_cpu_when_frames_are_given(monkeypatch):
    predictions, targets, positive, negatives = utterance_batch([6, 6], 6, 8, 3)
    calls = []
    monkeypatch.setattr("colld_ds.kernels.contrastive_loss_dense",
                        lambda *args, **kwargs: calls.append("dense") or (None, None))
    monkeypatch.setattr("colld_ds.kernels.contrastive_loss_chunked",
                        lambda *args, **kwargs: calls.append("chunked") or (None, None))
    contrastive_loss(predictions, targets, positive, negatives, 0.1, num_frames=6)
    contrastive_loss(predictions, targets, positive, negatives, 0.1)
    assert calls == ["dense", "chunked"]
