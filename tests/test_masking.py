"""Span masking: wav2vec 2.0 statistics, padding, determinism, and the analytic expectation."""

import itertools

import pytest
import torch

from colld_ds.models import compute_span_mask, expected_masked_fraction, utterance_span_masks


def _draw(lengths, max_frames, mask_prob, span, seed=0, min_masks=1):
    generator = torch.Generator().manual_seed(seed)
    return compute_span_mask(
        torch.tensor(lengths), max_frames, mask_prob, span, generator, min_masks
    )


@pytest.mark.parametrize(
    "length,mask_prob,span",
    [(50, 0.65, 10), (250, 0.65, 10), (37, 0.3, 5), (12, 0.65, 10), (64, 0.08, 4)],
)
def test_mean_masked_fraction_matches_analytic(length, mask_prob, span):
    draws = 4000
    mask = _draw([length] * draws, length + 7, mask_prob, span)
    observed = mask.float().sum(1).mean().item() / length
    expected = expected_masked_fraction(length, mask_prob, span)
    assert abs(observed - expected) <= 0.1 * expected, (observed, expected)
    if mask_prob * length / span >= 1:  # else min_masks dominates
        assert observed < mask_prob  # overlapping spans cover less than mask_prob


def test_expected_fraction_exact_small_cases():
    # n = 1 always (0.2 * 30 / 10 = 0.6 < 1, raised to min_masks=1): a span covers s/L on average.
    assert expected_masked_fraction(30, 0.2, 10) == pytest.approx(10 / 30)
    # n = 2 always (0.8 * 5 / 2 = 2): enumerate all pairs of starts in [0, 3].
    fractions = [
        len({s1, s1 + 1, s2, s2 + 1}) / 5 for s1, s2 in itertools.product(range(4), repeat=2)
    ]
    assert expected_masked_fraction(5, 0.8, 2) == pytest.approx(sum(fractions) / len(fractions))
    assert expected_masked_fraction(9, 0.65, 10) == 0.0


def test_never_masks_padding():
    lengths = [0, 3, 9, 10, 11, 25, 40, 40]
    for seed in range(50):
        mask = _draw(lengths, 40, 0.65, 10, seed=seed)
        assert mask.shape == (len(lengths), 40) and mask.dtype == torch.bool
        for row, length in zip(mask, lengths, strict=True):
            assert not row[length:].any()


def test_short_utterances_and_min_masks():
    mask = _draw([9, 10, 30], 30, 0.0, 10, min_masks=1)
    assert not mask[0].any()  # shorter than one span: no mask
    assert mask[1, :10].all()  # one possible start: exactly frames 0..9
    assert mask[2].sum() == 10  # mask_prob 0 still gets min_masks spans
    assert not _draw([30], 30, 0.0, 10, min_masks=0).any()


def test_deterministic_with_seed():
    lengths = [50, 31, 17]
    assert torch.equal(_draw(lengths, 50, 0.65, 10, seed=3), _draw(lengths, 50, 0.65, 10, seed=3))
    assert not torch.equal(
        _draw(lengths, 50, 0.65, 10, seed=3), _draw(lengths, 50, 0.65, 10, seed=4)
    )


def test_global_rng_when_no_generator():
    torch.manual_seed(0)
    first = compute_span_mask(torch.tensor([60, 45]), 60, 0.65, 10)
    torch.manual_seed(0)
    assert torch.equal(first, compute_span_mask(torch.tensor([60, 45]), 60, 0.65, 10))


def test_lengths_beyond_max_frames_fail_loudly():
    with pytest.raises(RuntimeError):
        _draw([80], 40, 0.65, 10)


def test_utterance_masks_do_not_depend_on_the_batch_or_padding():
    seeds = torch.tensor([11, 22, 33])
    together = utterance_span_masks(torch.tensor([60, 45, 30]), 70, 0.65, 10, seeds)
    alone = utterance_span_masks(torch.tensor([45]), 45, 0.65, 10, seeds[1:2])
    assert torch.equal(together[1, :45], alone[0])
    assert not together[1, 45:].any() and not together[2, 30:].any()
    # each row is compute_span_mask of that utterance alone, from its own seed
    expected = _draw([60], 60, 0.65, 10, seed=11)[0]
    assert torch.equal(together[0, :60], expected)
    assert together.float().mean() > 0.2                      # spans were drawn
