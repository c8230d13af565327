"""Objectives against hand computations and statistical expectations."""

import math
import warnings

import numpy as np
import pytest
import torch

from colld_ds.config import ConfigError, ObjectiveConfig, load_config
from colld_ds.distill import position_mean
from colld_ds.layer_map import LayerPair
from colld_ds.models import frame_mask
from colld_ds.objectives import build_objective, sample_negatives
from colld_ds.objectives.base import utterance_norm
from colld_ds.objectives.colld import ShortUtteranceWarning, same_position_negatives


def identity_objective(name: str, dim: int, position_frames: int = 0, **kwargs):
    """An objective over the single pair s1 -> t1 whose head is the identity map (targets as
    they are unless ``target_norm`` is given)."""
    kwargs.setdefault("target_norm", "none")
    objective = build_objective(ObjectiveConfig(name=name, **kwargs), [LayerPair(1, 1)], dim, dim,
                                position_frames=position_frames)
    head = objective.heads["s1_t1"]
    with torch.no_grad():
        head.weight.copy_(torch.eye(dim))
        head.bias.zero_()
    return objective


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))


@pytest.mark.parametrize("anchor_frames, anchors", [("masked", [1, 3]), ("all", [0, 1, 2, 3])])
def test_colld_loss_equals_hand_computation(anchor_frames, anchors):
    student = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.5]]])   # (1, 4, 2)
    teacher = torch.tensor([[[0.5, 0.5], [1.0, 1.0], [0.0, -2.0], [3.0, 1.0]]])
    frame_mask = torch.ones(1, 4, dtype=torch.bool)
    mask_time = torch.tensor([[False, True, False, True]])
    objective = identity_objective("colld", 2, temperature=0.5, num_negatives=2,
                                   anchor_frames=anchor_frames)

    torch.manual_seed(3)
    selection = objective.select_frames(frame_mask, mask_time)
    assert selection.frame_index.tolist() == anchors
    negatives = selection.negatives                                          # rows of (4, 2)
    output = objective([student], {1: teacher}, selection)
    assert output.count.item() == len(anchors)

    losses, hits = [], []
    for anchor, negative_rows in zip(anchors, negatives.tolist()):
        s = student[0, anchor].tolist()
        logits = [cosine(s, teacher[0, anchor].tolist()) / 0.5]
        logits += [cosine(s, teacher[0, row].tolist()) / 0.5 for row in negative_rows]
        losses.append(math.log(sum(math.exp(x) for x in logits)) - logits[0])
        hits.append(all(logits[0] > x for x in logits[1:]))
        assert anchor not in negative_rows
    assert output.loss.item() == pytest.approx(sum(losses) / len(anchors), rel=1e-6)
    assert output.metrics["acc/s1_t1"].item() == pytest.approx(sum(hits) / len(anchors))


def test_an_utterance_with_fewer_other_frames_than_negatives_warns():
    objective = identity_objective("colld", 2, num_negatives=5)
    mask_time = torch.zeros(2, 8, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective.select_frames(frame_mask(torch.tensor([8, 6]), 8), mask_time)   # 5 others
    with pytest.warns(ShortUtteranceWarning, match="objective.num_negatives: 5 .*fewer than 6"):
        objective.select_frames(frame_mask(torch.tensor([8, 5]), 8), mask_time)   # 4 others


def test_negatives_exclude_positive_and_padding_and_cover_the_rest():
    frame_lengths = torch.tensor([7, 3])
    batch_index = torch.tensor([0, 0, 1, 1])
    frame_index = torch.tensor([0, 6, 1, 2])
    negatives = sample_negatives(frame_lengths, batch_index, frame_index, num_frames=9,
                                 num_negatives=4000,
                                 generator=torch.Generator().manual_seed(0))
    for row, (b, t) in enumerate(zip(batch_index.tolist(), frame_index.tolist())):
        drawn = negatives[row] - b * 9                # frame index within utterance b
        allowed = set(range(frame_lengths[b].item())) - {t}
        assert set(drawn.tolist()) == allowed         # never t, never padding, every other frame
        counts = torch.bincount(drawn, minlength=9)[sorted(allowed)].float()
        assert (counts / counts.mean() - 1).abs().max() < 0.15   # uniform


def test_same_position_negatives_by_hand():
    frame_lengths = torch.tensor([5, 3, 4])                      # T = 6
    batch_index = torch.tensor([0, 0, 1, 2])
    frame_index = torch.tensor([1, 4, 2, 3])
    fallback = torch.tensor([[2, 3], [0, 1], [6, 7], [12, 13]])   # same-utterance rows
    rows = same_position_negatives(frame_lengths, batch_index, frame_index, 6, fallback)
    assert rows.tolist() == [[6 + 1, 12 + 1],     # (0, 1): utterances 1 and 2 at frame 1
                             [0, 1],              # (0, 4): both shorter -> fallback columns
                             [12 + 2, 0 + 2],     # (1, 2): utterances 2 and 0
                             [0 + 3, 13]]         # (2, 3): utterance 0; 1 is shorter: column 1


def test_position_negatives_join_the_loss_and_refuse_the_dense_backend():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mask = frame_mask(torch.tensor([6, 4]), 6)
    objective = identity_objective("colld", 4, num_negatives=3, position_negatives=True,
                                   temperature=0.5)
    selection = objective.select_frames(mask, torch.zeros(2, 6, dtype=torch.bool))
    assert selection.negatives.shape == (10, 4) and selection.num_frames is None
    flat_teacher = teacher.reshape(12, 4)
    for row, (b, t) in enumerate(zip(selection.batch_index.tolist(),
                                     selection.frame_index.tolist())):
        extra = selection.negatives[row, 3].item()
        assert extra == ((1 - b) * 6 + t if t < [6, 4][1 - b] else selection.negatives[row, 0])
    output = objective([student], {1: teacher}, selection)
    logits = torch.stack([torch.cosine_similarity(
        student.reshape(12, 4)[selection.rows].unsqueeze(1),
        flat_teacher[torch.cat([selection.rows.unsqueeze(1), selection.negatives], 1)], dim=-1)
        / 0.5])[0]
    expected = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="objective.position_negatives"):
        load_config(None, {"objective.position_negatives": True,
                           "objective.contrastive_backend": "dense"})


@pytest.mark.filterwarnings("ignore::colld_ds.objectives.colld.ShortUtteranceWarning")
def test_padding_never_enters_the_loss():
    torch.manual_seed(0)
    student = torch.randn(2, 12, 8)
    teacher = torch.randn(2, 12, 8)
    frame_mask = torch.arange(12) < torch.tensor([[12], [5]])
    teacher[~frame_mask] = float("nan")              # any use of a padded frame poisons the loss
    mask_time = torch.ones(2, 12, dtype=torch.bool)  # also asks to mask padding: must be ignored
    for name, backend in (("colld", "dense"), ("colld", "chunked"), ("l2l", "auto"),
                          ("distilhubert", "auto")):
        for target_norm in ("none", "utterance"):
            objective = identity_objective(name, 8, num_negatives=30, target_norm=target_norm,
                                           contrastive_backend=backend)
            states = student.clone().requires_grad_()
            output = objective([states], {1: teacher},
                               objective.select_frames(frame_mask, mask_time))
            output.loss.backward()
            assert torch.isfinite(output.loss), (name, backend, target_norm)
            assert torch.isfinite(states.grad).all(), (name, backend, target_norm)
            assert states.grad[~frame_mask].abs().sum() == 0       # padding gets no gradient


def test_infonce_is_log_k_plus_one_for_independent_student_and_teacher():
    """Independent random directions in D=2048: cosines ~ N(0, 1/D), so with temperature 0.1 the
    logits have variance 1/(0.01 D) ~ 0.05 and E[loss] = ln(K+1) + O(variance/2) ~ +0.5%."""
    torch.manual_seed(0)
    num_negatives, dim = 50, 2048
    student, teacher = torch.randn(4, 100, dim), torch.randn(4, 100, dim)
    frame_mask = torch.ones(4, 100, dtype=torch.bool)
    mask_time = torch.rand(4, 100) < 0.5
    objective = identity_objective("colld", dim, temperature=0.1, num_negatives=num_negatives)
    output = objective([student], {1: teacher}, objective.select_frames(frame_mask, mask_time))
    assert output.loss.item() == pytest.approx(math.log(num_negatives + 1), rel=0.02)
    assert output.metrics["acc/s1_t1"].item() < 0.1


def test_colld_loss_falls_when_student_copies_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 50, 16)
    frame_mask = torch.ones(2, 50, dtype=torch.bool)
    mask_time = torch.rand(2, 50) < 0.5
    objective = identity_objective("colld", 16, temperature=0.1, num_negatives=20)
    output = objective([teacher.clone()], {1: teacher},
                       objective.select_frames(frame_mask, mask_time))
    assert output.loss.item() < 0.05 and output.metrics["acc/s1_t1"].item() == 1.0


@pytest.mark.parametrize("name,distance", [("l2l", "l1"), ("l2l", "mse"), ("distilhubert", "l1")])
def test_regression_losses_equal_hand_computation(name, distance):
    student = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[2.0, 2.0], [1.0, -1.0], [0.0, 0.0]]])
    frame_mask = torch.tensor([[True, True, False]])
    objective = identity_objective(name, 2, distance=distance, cosine_weight=0.5)
    output = objective([student], {1: teacher}, objective.select_frames(frame_mask, frame_mask))
    pairs = [([1.0, 2.0], [2.0, 2.0]), ([0.0, 1.0], [1.0, -1.0])]
    diffs = [a - b for s, t in pairs for a, b in zip(s, t)]
    dist = (sum(map(abs, diffs)) if distance == "l1" else sum(d * d for d in diffs)) / len(diffs)
    cosines = [cosine(s, t) for s, t in pairs]
    if name == "l2l":
        cos_term = sum(1 - c for c in cosines) / 2
    else:
        cos_term = sum(-math.log(1 / (1 + math.exp(-c))) for c in cosines) / 2
    assert output.loss.item() == pytest.approx(dist + 0.5 * cos_term, rel=1e-6)


@pytest.mark.parametrize("name,backend", [("l2l", "auto"), ("distilhubert", "auto"),
                                          ("colld", "chunked")])
def test_objective_step_never_reads_device_values(name, backend):
    """With the frame selection drawn on the CPU, an objective's forward and backward never
    read a value back from the device (on a GPU: no host synchronisation). Meta tensors hold
    no values, so any such read (``.item()``, ``nonzero``, a data-dependent shape) raises."""
    lengths, num_frames, dim = torch.tensor([40, 31, 12]), 40, 16
    frame_mask = torch.arange(num_frames) < lengths[:, None]
    mask_time = torch.rand(3, num_frames, generator=torch.Generator().manual_seed(0)) < 0.5
    objective = build_objective(
        ObjectiveConfig(name=name, num_negatives=5, contrastive_backend=backend),
        [LayerPair(1, 2), LayerPair(2, 4)], dim, dim)
    selection = objective.select_frames(frame_mask, mask_time, seeds=torch.arange(3))
    objective = objective.to("meta")
    hidden = [torch.empty(3, num_frames, dim, device="meta", requires_grad=True)
              for _ in range(2)]
    teacher = {layer: torch.empty(3, num_frames, dim, device="meta") for layer in (2, 4)}
    output = objective(hidden, teacher, selection.to("meta"))
    (output.loss * output.count).backward()
    assert output.count.device.type == "meta" and hidden[0].grad is not None
    assert selection.count == int(frame_mask.sum())     # every objective scores all frames


def test_utterance_norm_equals_instance_norm_over_each_utterances_valid_frames():
    torch.manual_seed(0)
    features = torch.randn(2, 7, 5) * 3 + 10
    features[1, 4:] = float("nan")                       # padding: never read
    lengths = [7, 4]
    frame_mask = torch.arange(7) < torch.tensor(lengths)[:, None]
    normed = utterance_norm(features, frame_mask)
    for b, length in enumerate(lengths):
        valid = features[b, :length].T.unsqueeze(0)       # (1, D, T): torch's instance norm
        expected = torch.nn.functional.instance_norm(valid, eps=1e-5)[0].T
        assert torch.allclose(normed[b, :length], expected, atol=1e-5)
    assert torch.equal(normed[1, 4:], torch.zeros(3, 5))


def test_colld_target_norm_scores_normalised_targets():
    """With target_norm utterance, the loss is the plain loss on instance-normalised targets."""
    torch.manual_seed(1)
    student = torch.randn(2, 6, 4)
    teacher = torch.randn(2, 6, 4) + 5.0
    frame_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    mask_time = torch.ones(2, 6, dtype=torch.bool)
    plain = identity_objective("colld", 4, num_negatives=3)
    normed = identity_objective("colld", 4, num_negatives=3, target_norm="utterance")
    torch.manual_seed(2)
    selection = normed.select_frames(frame_mask, mask_time)
    expected_targets = teacher.clone()
    for b, length in enumerate([6, 4]):
        valid = teacher[b, :length]
        expected_targets[b, :length] = (valid - valid.mean(0)) / torch.sqrt(
            valid.var(0, unbiased=False) + 1e-5)
    with_norm = normed([student], {1: teacher}, selection).loss
    by_hand = plain([student], {1: expected_targets}, selection).loss
    assert with_norm.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert with_norm.item() != pytest.approx(plain([student], {1: teacher}, selection).loss.item(),
                                             rel=1e-3)


@pytest.mark.parametrize("name", ["colld", "l2l"])
def test_utterance_position_targets_by_hand(name):
    """``target_norm: utterance_position``: each utterance standardised over its valid frames
    (numpy), then minus the mean of its frame index; padding 0; the loss sees exactly that."""
    torch.manual_seed(0)
    lengths, num_frames, dim = [6, 4], 6, 3
    teacher = torch.randn(2, num_frames, dim) * 3 + 1
    mask = frame_mask(torch.tensor(lengths), num_frames)
    objective = identity_objective(name, dim, position_frames=8, num_negatives=2,
                                   target_norm="utterance_position")
    mean = torch.randn(1, 8, dim)
    objective.set_position_mean(mean)
    expected = np.zeros((2, num_frames, dim))
    for b, length in enumerate(lengths):
        x = teacher[b, :length].double().numpy()
        standardised = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
        expected[b, :length] = standardised - mean[0, :length].double().numpy()
    targets = objective.normalise_targets({1: teacher}, mask)[1]
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-4, atol=1e-5)
    # the loss compares the student with these targets: a student equal to them scores best
    student = torch.from_numpy(expected).float()
    selection = objective.select_frames(mask, torch.zeros(2, num_frames, dtype=torch.bool))
    reference = identity_objective(name, dim, num_negatives=2)
    assert objective([student], {1: teacher}, selection).loss.item() == pytest.approx(
        reference([student], {1: student}, selection).loss.item(), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="longer than the 8 of position_mean"):
        objective.normalise_targets({1: torch.zeros(1, 9, dim)}, torch.ones(1, 9, dtype=bool))


def test_position_mean_by_hand():
    """``distill.position_mean`` against numpy: the first utterances' standardised features,
    averaged per frame index over the utterances long enough to have it."""
    torch.manual_seed(0)
    lengths = [[5, 3], [4, 2]]                          # two batches of two utterances
    targets, utterances = [], []
    for batch_lengths in lengths:
        num_frames = max(batch_lengths)
        mask = frame_mask(torch.tensor(batch_lengths), num_frames)
        features = [torch.randn(2, num_frames, 3).masked_fill(~mask.unsqueeze(-1), 0.0)
                    for _ in range(2)]
        targets.append(([f.half() for f in features], torch.tensor(batch_lengths)))
        utterances += [[f[b, :n].half().double().numpy() for f in features]
                       for b, n in enumerate(batch_lengths)]
    mean = position_mean(iter(targets), num_frames=6, num_utterances=3,
                         device=torch.device("cpu"))
    assert mean.shape == (2, 6, 3)
    for layer in range(2):
        sums, counts = np.zeros((6, 3)), np.zeros(6)
        for features in utterances[:3]:                     # the first 3 utterances only
            x = features[layer]
            sums[:len(x)] += (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
            counts[:len(x)] += 1
        expected = sums / np.maximum(counts, 1)[:, None]
        np.testing.assert_allclose(mean[layer].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert mean[:, 5:].abs().sum() == 0                     # no utterance reaches frame 5
