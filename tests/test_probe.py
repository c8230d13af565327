"""The CTC probe (colld_ds/probe.py): tokens, greedy decoding, corpus-level error rates, and
that a probe learns a linearly decodable task and not noise."""

import pytest
import torch

from colld_ds.formats import SAMPLE_RATE
from colld_ds.probe import (ProbeConfig, ProbeUnavailable, char_tokens, decode, error_rates,
                            greedy_decode, phone_tokens, read_probe_split, train_probe)
from colld_ds.data_prep.shards import write_audio_shards


def test_phone_tokens_of_espeak_ipa():
    # Strings as espeak-ng --ipa prints them (words separated by spaces, stress marks inline).
    assert phone_tokens("kwˈiːn stˈaf") == ["k", "w", "iː", "n", "s", "t", "a", "f"]
    assert phone_tokens("bˌudʲit kˈɑtʃʲ") == ["b", "u", "dʲ", "i", "t", "k", "ɑ", "t", "ʃʲ"]
    assert phone_tokens("pəhˈũc ɡˈãndʰi") == ["p", "ə", "h", "ũ", "c", "ɡ", "ã", "n", "dʰ", "i"]
    assert phone_tokens("t̪ˈaraf ʔhdˈaːf") == ["t̪", "a", "r", "a", "f", "ʔ", "h", "d", "aː", "f"]
    # Vietnamese tone digits are tokens; espeak's language switches are dropped.
    assert phone_tokens("tˈa1m (en)ˈa7lbə1m(vi)") == ["t", "a", "1", "m", "a", "7", "l", "b",
                                                       "ə", "1", "m"]
    # Space-separated phones (the generated-audio corpus) give the same tokens.
    assert phone_tokens("p a t o") == phone_tokens("pato") == ["p", "a", "t", "o"]
    # Precomposed and decomposed nasal vowels are one and the same token.
    assert phone_tokens("\u00e3") == phone_tokens("a\u0303") == ["\u00e3"]


def test_char_tokens_fold_case_and_drop_punctuation():
    assert char_tokens("Hello,  World!") == list("hello world")
    assert char_tokens(" Привет — мир. ") == list("привет мир")
    assert char_tokens("पहुँच.") == ["प", "ह", "ु", "ँ", "च"]   # code points


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    frames = torch.tensor([0, 1, 1, 0, 1, 2, 2, 0, 3])   # argmax per frame; the 9th is padding
    log_probs = torch.nn.functional.one_hot(frames, 4).float().log()
    assert greedy_decode(log_probs, 8) == [1, 1, 2]
    assert greedy_decode(log_probs, 9) == [1, 1, 2, 3]


def _levenshtein(a, b):
    """Textbook dynamic programme, the independent reference."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_error_rates_are_corpus_level_per_language():
    references = [["k", "a", "t", "s"], ["o"], ["m", "i"]]
    hypotheses = [["k", "a", "t"], ["u"], ["m", "i", "i"]]     # 1 deletion, 1 sub, 1 insertion
    rates = error_rates(hypotheses, references, ["aa", "aa", "bb"])
    # aa: (1 + 1) edits / (4 + 1) tokens = 0.4 (a mean of utterance rates would be 0.625).
    assert rates == pytest.approx({"overall": 3 / 7, "aa": 0.4, "bb": 0.5})
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = [str(t) for t in torch.randint(0, 4, (int(torch.randint(1, 12, (1,),
                                                                    generator=generator)),),
                                           generator=generator).tolist()]
        b = [str(t) for t in torch.randint(0, 4, (int(torch.randint(0, 12, (1,),
                                                                    generator=generator)),),
                                           generator=generator).tolist()]
        assert error_rates([b], [a], ["x"])["x"] == pytest.approx(_levenshtein(a, b) / len(a))


def _separable_task(n, informative, seed, vocab=6, layers=3, dim=8):
    """Utterances of 3-7 tokens (no token twice in a row), each held for 2-5 frames; with
    ``informative``, layer 2 adds a fixed class mean to its noise (a linearly decodable frame
    class), every other layer is pure noise. -> features L x (L, T, D), targets (N,)."""
    generator = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(vocab, dim, generator=torch.Generator().manual_seed(99))
    features, targets = [], []
    for _ in range(n):
        length = int(torch.randint(3, 8, (1,), generator=generator))
        labels = [int(torch.randint(1, vocab + 1, (1,), generator=generator))]
        while len(labels) < length:
            label = int(torch.randint(1, vocab + 1, (1,), generator=generator))
            if label != labels[-1]:
                labels.append(label)
        frames = torch.cat([torch.full((int(torch.randint(2, 6, (1,), generator=generator)),),
                                       label) for label in labels])
        x = torch.randn(layers, len(frames), dim, generator=generator)
        if informative:
            x[1] += means[frames - 1]
        features.append(x)
        targets.append(torch.tensor(labels))
    return features, targets


def _per(config, informative):
    train_features, train_targets = _separable_task(64, informative, seed=0)
    test_features, test_targets = _separable_task(32, informative, seed=1)
    probe, losses, _, _ = train_probe(train_features, train_targets, 6, config)
    hypotheses = decode(probe, test_features, batch_size=5)
    return (error_rates([[str(i) for i in h] for h in hypotheses],
                        [[str(i) for i in t.tolist()] for t in test_targets], ["x"] * 32)["x"],
            probe, losses)


# Dropout 0.5 (the default) on an 8-wide feature is mostly noise; the linear case runs without.
@pytest.mark.parametrize("config", [ProbeConfig(steps=200, dropout=0.0),
                                    ProbeConfig(steps=150, lstm_hidden=16)],
                         ids=["linear", "bilstm"])
def test_probe_learns_a_linearly_decodable_task_and_not_noise(config):
    torch.set_num_threads(1)
    per, probe, losses = _per(config, informative=True)
    assert per < 0.05
    assert max(range(3), key=lambda i: probe.layer_weights[i]) == 1   # the informative layer
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
    noise_per, _, _ = _per(config, informative=False)
    assert noise_per > 0.5


def test_probe_stops_after_patience_checks_without_a_lower_held_out_rate():
    """Scripted held-out rates 0.5, 0.4, 0.45, 0.41, 0.4 (equal is no gain), 0.3: with patience
    3 the probe stops at the 5th check (step 50) and returns the state of the 2nd (step 20);
    without patience it trains all 100 steps and keeps the 6th."""
    features, targets = _separable_task(16, informative=True, seed=0)
    for patience, checks, best_step in ((3, 5, 20), (0, 10, 60)):
        rates = iter([0.5, 0.4, 0.45, 0.41, 0.4, 0.3, 0.35, 0.36, 0.37, 0.38])
        states = {}

        def select(probe):
            states[len(states) + 1] = {k: v.clone() for k, v in probe.state_dict().items()}
            return next(rates)

        config = ProbeConfig(steps=100, select_every=10, patience=patience, restarts=1,
                             dropout=0.0)
        trained = train_probe(features, targets, 6, config, select)
        assert [step for step, _ in trained.selection] == [10 * (i + 1) for i in range(checks)]
        assert len(trained.losses) == 10 * checks
        returned = trained.probe.state_dict()
        assert all(torch.equal(returned[k], v) for k, v in states[best_step // 10].items())


def test_probe_config_refuses_an_empty_budget():
    with pytest.raises(ValueError, match="steps"):
        ProbeConfig(steps=0)


def test_read_probe_split_tokenises_and_names_a_sample_without_phones(tmp_path):
    import numpy as np


    wave = np.zeros(SAMPLE_RATE, dtype=np.float32)
    good = [{"utt_id": "a1", "wave": wave, "lang": "en", "text": "Hi, you.",
             "phones": "hˈaɪ juː"}]
    write_audio_shards(good, str(tmp_path / "good"), progress=False)
    [utterance] = read_probe_split(str(tmp_path / "good"))
    assert utterance.lang == "en" and utterance.wave.shape == (SAMPLE_RATE,)
    assert utterance.targets == {"per": ["h", "a", "ɪ", "j", "uː"], "cer": list("hi you")}
    write_audio_shards(good + [{"utt_id": "b2", "wave": wave, "lang": "en", "text": "No."}],
                       str(tmp_path / "bad"), progress=False)
    with pytest.raises(ProbeUnavailable, match="b2 .*no 'phones': PER needs"):
        read_probe_split(str(tmp_path / "bad"))
