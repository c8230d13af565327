"""SUPERB-style frozen-feature probe: phone (PER) and character (CER) recognition with CTC.

Every transformer layer of a frozen model, `(L, T, D)` per utterance, standardised per
dimension, goes through a learnable softmax-weighted layer sum and a linear CTC head (optionally
a BiLSTM first), trained with the same budget, batches and seed for every model; the state is
chosen on a held-out split, and error rates are corpus-level Levenshtein distances over
espeak-ng phones and case-folded characters. The steps, the tokenisation and why it is
hand-written: `docs/probe.md`.
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein
from torch import Tensor, nn

from colld_ds.data import decode_wave, expand_urls, read_samples

TASKS = {"per": "phones", "cer": "text"}  # error rate -> the json field its targets come from
_STRESS = {"\u02c8", "\u02cc"}  # ˈ ˌ
_LANGUAGE_SWITCH = re.compile(r"\([a-z-]+\)")  # espeak-ng: (en) ... (vi)

# An encoder: (wave (B, S), wave_lengths (B,)) -> (layers L x (B, T, D), frame_lengths (B,)).
Encoder = Callable[[Tensor, Tensor], tuple[list[Tensor], Tensor]]


@dataclass(kw_only=True)
class ProbeConfig:
    """The probe budget, identical for every model."""

    steps: int = 1000
    """Optimiser steps per (model, task)."""
    batch_size: int = 8
    """Utterances per step (drawn with replacement)."""
    lr: float = 1e-2
    """Adam learning rate (constant; SUPERB's phoneme-recognition value for its linear head)."""
    dropout: float = 0.5
    """Dropout on the weighted sum during training: a probe-training split of a few dozen
    utterances is memorised without it (measured: Whisper base, 30 espeak-ng utterances, PER
    0.66 -> 0.59, CER 1.28 -> 0.94)."""
    lstm_hidden: int = 0
    """BiLSTM units per direction before the output layer; 0 = a linear head on the weighted
    sum (SUPERB's phoneme-recognition probe; cheap on CPU). A BiLSTM (e.g. 64) measures what
    a small context model can read out, at ~10x the cost; lower ``lr`` with it."""
    seed: int = 0
    """Seeds the head's initialisation and the batch order."""
    select_every: int = 0
    """With a held-out selection split (``run_probe(dev=...)``): score the probe's error rate on
    it every this many steps and at the end, and keep the best state (early stopping on a
    held-out criterion); 0: keep the last state."""
    patience: int = 0
    """With ``select_every``: stop once this many checks in a row have not lowered the best
    held-out rate (``steps`` is then the most it trains); 0: train all ``steps``. The held-out
    rate of a linear CTC probe keeps falling slowly and noisily for thousands of steps
    (benchmarks/results/quality_whisper_demo_probe3000.md), so a fixed budget can rank models
    by how fast a probe reads them rather than by what it can read."""
    restarts: int = 4
    """Probes started from different seeds, each trained ``restart_steps`` steps; the one with
    the lowest training loss over its last half of them goes on to ``steps``. A linear CTC
    probe sometimes stalls near the all-blank loss for hundreds of steps, depending on its
    initial state alone (measured: Whisper base teacher, 1 probe seed of 4 stalled at every lr
    tried): without restarts one stalled probe passes for unreadable features."""
    restart_steps: int = 100
    """Steps of each restart before the choice (at most half of ``steps``, so that the chosen
    probe's held-out checks still have steps to choose from; counted in ``steps`` for it)."""

    def __post_init__(self) -> None:
        if self.select_every < 0 or self.patience < 0:
            raise ValueError(f"probe select_every and patience: must be >= 0, got "
                             f"{self.select_every} and {self.patience}")
        for name in ("steps", "batch_size", "restarts", "restart_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe {name}: must be >= 1, got {getattr(self, name)}")
        if self.lstm_hidden < 0 or not self.lr > 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"probe lstm_hidden must be >= 0, lr > 0 and 0 <= dropout < 1, "
                             f"got {self.lstm_hidden}, {self.lr} and {self.dropout}")


class ProbeUnavailable(Exception):
    """The shards cannot be probed (no phones or no text); the message says why."""


# --- tokens --------------------------------------------------------------------------------------


def phone_tokens(phones: str) -> list[str]:
    """espeak-ng IPA (or space-separated phones) -> phone tokens (`docs/probe.md`)."""
    tokens: list[str] = []
    for char in unicodedata.normalize("NFD", _LANGUAGE_SWITCH.sub(" ", phones)):
        category = unicodedata.category(char)
        if char in _STRESS:
            continue
        if category in ("Mn", "Me", "Lm"):          # combining mark or modifier letter: ː ʲ ̃ ʰ
            if tokens:
                tokens[-1] += char
        elif category[0] in "LN":                   # a phone, or a tone digit
            tokens.append(char)
    return [unicodedata.normalize("NFC", token) for token in tokens]


def char_tokens(text: str) -> list[str]:
    """Transcript -> character tokens: NFC, case-folded, no punctuation/symbols, ' ' between
    words."""
    kept = "".join(" " if c.isspace() else c
                   for c in unicodedata.normalize("NFC", text).casefold()
                   if unicodedata.category(c)[0] not in "PS")
    return list(" ".join(kept.split()))


TOKENIZERS = {"per": phone_tokens, "cer": char_tokens}


# --- data ----------------------------------------------------------------------------------------


@dataclass
class ProbeUtterance:
    key: str
    lang: str
    wave: np.ndarray
    """(S,) float32 16 kHz, the whole utterance."""
    targets: dict[str, list[str]]
    """Task ("per", "cer") -> reference tokens."""


def read_probe_split(shards: str, max_utterances: int | None = None) -> list[ProbeUtterance]:
    """Every utterance of ``shards`` (the first ``max_utterances``) with its phone and
    character tokens. ProbeUnavailable naming the sample when one has no ``phones`` or ``text``
    (or they give no tokens)."""
    utterances = []
    for sample in read_samples(expand_urls(shards)):
        if max_utterances is not None and len(utterances) >= max_utterances:
            break
        meta = json.loads(sample["json"])
        where = f"sample {sample['__key__']} in {sample.get('__url__')}"
        targets = {}
        for task, field_name in TASKS.items():
            if not meta.get(field_name):
                raise ProbeUnavailable(
                    f"{where} has no {field_name!r}: {task.upper()} needs "
                    + ("espeak-ng phonemes (`colld prep synth` writes them; make-shards takes a "
                       "`phones` column)" if field_name == "phones" else "a transcript"))
            targets[task] = TOKENIZERS[task](meta[field_name])
            if not targets[task]:
                raise ProbeUnavailable(f"{where}: {field_name} {meta[field_name]!r} has no "
                                       f"{task.upper()} tokens")
        utterances.append(ProbeUtterance(sample["__key__"], str(meta.get("lang", "unknown")),
                                         decode_wave(sample), targets))
    return utterances


def extract_features(encoder: Encoder, utterances: Sequence[ProbeUtterance],
                     batch_size: int) -> list[Tensor]:
    """Whole utterances in order, ``batch_size`` at a time -> one fp32 (L, T_i, D) tensor of
    valid frames per utterance."""
    features = []
    for start in range(0, len(utterances), batch_size):
        chunk = [u.wave for u in utterances[start:start + batch_size]]
        lengths = torch.tensor([w.shape[0] for w in chunk], dtype=torch.int64)
        wave = torch.zeros(len(chunk), int(lengths.max()))
        for row, w in zip(wave, chunk):
            row[: w.shape[0]] = torch.from_numpy(np.ascontiguousarray(w))
        with torch.no_grad():
            layers, frame_lengths = encoder(wave, lengths)
            stacked = torch.stack([layer.float() for layer in layers], dim=1)  # (B, L, T, D)
        features += [stacked[b, :, : int(frame_lengths[b])].clone() for b in range(len(chunk))]
    return features


# --- the probe -----------------------------------------------------------------------------------


class CTCProbe(nn.Module):
    """Softmax-weighted sum of L standardised layers of width D, dropout, optional BiLSTM,
    linear to V + 1 (blank 0)."""

    def __init__(self, num_layers: int, dim: int, vocab_size: int, lstm_hidden: int,
                 dropout: float):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.dropout = nn.Dropout(dropout)
        self.lstm = (nn.LSTM(dim, lstm_hidden, batch_first=True, bidirectional=True)
                     if lstm_hidden else None)
        self.out = nn.Linear(2 * lstm_hidden if lstm_hidden else dim, vocab_size + 1)

    @property
    def layer_weights(self) -> list[float]:
        return torch.softmax(self.layer_logits.detach(), 0).tolist()

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        """features (B, L, T, D) standardised, lengths (B,) -> log-probabilities
        (B, T, V + 1)."""
        weights = torch.softmax(self.layer_logits, 0)
        x = self.dropout(torch.einsum("l,bltd->btd", weights, features))     # (B, T, D)
        if self.lstm is not None:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            x, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                                    total_length=features.shape[2])
        return torch.log_softmax(self.out(x), dim=-1)


def _pad(features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """L x ... -> (B, L, T_max, D) zero-padded, (B,) lengths."""
    lengths = torch.tensor([f.shape[1] for f in features], dtype=torch.int64)
    batch = features[0].new_zeros(len(features), features[0].shape[0], int(lengths.max()),
                                  features[0].shape[2])
    for row, f in zip(batch, features):
        row[:, : f.shape[1]] = f
    return batch, lengths


def standardise(train: Sequence[Tensor], *others: Sequence[Tensor]) -> None:
    """In place: every layer and dimension of ``train`` and ``others`` (each (L, T_i, D))
    minus the mean, over the std, of all frames of ``train``; std floored at 1e-5 so that a
    constant dimension stays finite."""
    total = sum(f.double().sum(1) for f in train)
    squares = sum((f.double() ** 2).sum(1) for f in train)
    frames = sum(f.shape[1] for f in train)
    mean = total / frames                                                # (L, D)
    std = (squares / frames - mean**2).clamp_min(0).sqrt().clamp_min(1e-5)
    mean, std = mean.float()[:, None], std.float()[:, None]              # (L, 1, D)
    for features in (train, *others):
        for f in features:
            f.sub_(mean).div_(std)


class ProbeTraining(NamedTuple):
    probe: CTCProbe
    """In eval mode: the last state, or the best one on the selection split."""
    losses: list[float]
    """The CTC loss of every step of the chosen probe."""
    selection: list[tuple[int, float]]
    """(step, held-out error rate) at every check; empty without a selection split."""
    restart_losses: list[float]
    """Each restart's mean training loss over the last half of its ``restart_steps`` (the
    lowest was chosen); empty without restarts."""


class _ProbeRun:
    """One probe with its optimiser, batch generator and losses, trained step by step."""

    def __init__(self, features: Sequence[Tensor], targets: Sequence[Tensor], vocab_size: int,
                 config: ProbeConfig, seed: int):
        torch.manual_seed(seed)                     # initial state and dropout masks
        num_layers, _, dim = features[0].shape
        self.features, self.targets, self.batch_size = features, targets, config.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.probe = CTCProbe(num_layers, dim, vocab_size, config.lstm_hidden, config.dropout)
        self.optimizer = torch.optim.Adam(self.probe.parameters(), lr=config.lr)
        self.ctc = nn.CTCLoss(blank=0, zero_infinity=True)
        self.losses: list[float] = []

    def step(self) -> None:
        rows = torch.randint(len(self.features), (self.batch_size,),
                             generator=self.generator).tolist()
        batch, lengths = _pad([self.features[i] for i in rows])
        labels = [self.targets[i] for i in rows]
        log_probs = self.probe(batch, lengths)                            # (B, T, V + 1)
        loss = self.ctc(log_probs.transpose(0, 1), torch.cat(labels), lengths,
                        torch.tensor([len(t) for t in labels]))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())


def train_probe(features: Sequence[Tensor], targets: Sequence[Tensor], vocab_size: int,
                config: ProbeConfig,
                select: Callable[[CTCProbe], float] | None = None) -> ProbeTraining:
    """Train a CTCProbe on ``features`` (each (L, T_i, D), standardised) and ``targets``
    (each (N_i,) int64 in 1..V). With ``config.restarts`` > 1, that many probes (seeds
    ``seed * restarts + r``) train ``restart_steps`` steps and the one with the lowest loss
    goes on. ``select`` (probe in eval mode -> held-out error rate) is called every
    ``config.select_every`` steps after that and at the end (or when ``config.patience`` checks
    in a row brought no lower rate); the state with the lowest rate (the earliest of equals) is
    the one returned."""
    restart_losses: list[float] = []
    if config.restarts > 1:
        runs = []
        for restart in range(config.restarts):
            runs.append(_ProbeRun(features, targets, vocab_size, config,
                                  config.seed * config.restarts + restart))
            for _ in range(min(config.restart_steps, config.steps // 2) or 1):
                runs[-1].step()
        restart_losses = [float(np.mean(run.losses[len(run.losses) // 2:])) for run in runs]
        run = runs[int(np.argmin(restart_losses))]
    else:
        run = _ProbeRun(features, targets, vocab_size, config, config.seed)
    selection: list[tuple[int, float]] = []
    best: tuple[float, dict[str, Tensor]] | None = None
    checks_without_gain = 0
    for step in range(len(run.losses) + 1, config.steps + 1):
        run.step()
        if select is not None and config.select_every and (
                step % config.select_every == 0 or step == config.steps):
            score = select(run.probe.eval())
            run.probe.train()
            selection.append((step, score))
            if best is None or score < best[0]:
                best = (score, {k: v.clone() for k, v in run.probe.state_dict().items()})
                checks_without_gain = 0
            else:
                checks_without_gain += 1
                if checks_without_gain == config.patience:
                    break
    if best is not None:
        run.probe.load_state_dict(best[1])
    return ProbeTraining(run.probe.eval(), run.losses, selection, restart_losses)


def greedy_decode(log_probs: Tensor, length: int) -> list[int]:
    """(T, V + 1) -> token ids 1..V: argmax per frame over the first ``length`` frames,
    repeats collapsed, blanks (0) removed."""
    best = torch.unique_consecutive(log_probs[:length].argmax(-1))
    return best[best != 0].tolist()


def decode(probe: CTCProbe, features: Sequence[Tensor], batch_size: int) -> list[list[int]]:
    """Greedy CTC hypotheses (token ids) for every utterance of ``features``."""
    hypotheses = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch, lengths = _pad(features[start:start + batch_size])
            log_probs = probe(batch, lengths)
            hypotheses += [greedy_decode(lp, int(n)) for lp, n in zip(log_probs, lengths)]
    return hypotheses


def error_rates(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
                langs: Sequence[str]) -> dict[str, float]:
    """Corpus-level token error rates: ``{"overall": e, lang: e, ...}``, each the Levenshtein
    edits summed over utterances / the reference tokens summed over the same utterances."""
    edits: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for hypothesis, reference, lang in zip(hypotheses, references, langs, strict=True):
        distance = Levenshtein.distance(list(reference), list(hypothesis))
        for group in ("overall", lang):
            edits[group] = edits.get(group, 0) + distance
            tokens[group] = tokens.get(group, 0) + len(reference)
    return {group: edits[group] / tokens[group] for group in ["overall", *sorted(set(langs))]}


# --- the probe over several models -------------------------------------------------------------


@dataclass
class ProbeTasks:
    """What the probe learns, fixed by the probe-training split: per task ("per", "cer") the
    vocabulary (sorted tokens; id = index + 1, 0 is the CTC blank) and each utterance's target
    ids."""

    vocabularies: dict[str, list[str]]
    train_targets: dict[str, list[Tensor]]

    @classmethod
    def from_split(cls, train: Sequence[ProbeUtterance]) -> ProbeTasks:
        vocabularies = {task: sorted({t for u in train for t in u.targets[task]})
                        for task in TASKS}
        ids = {task: {token: i + 1 for i, token in enumerate(vocab)}
               for task, vocab in vocabularies.items()}
        targets = {task: [torch.tensor([ids[task][t] for t in u.targets[task]]) for u in train]
                   for task in TASKS}
        return cls(vocabularies, targets)

    def rates(self, task: str, probe: CTCProbe, features: Sequence[Tensor],
              utterances: Sequence[ProbeUtterance], batch_size: int) -> dict[str, float]:
        """Greedy-decoded error rates of ``probe`` on ``features`` of ``utterances``."""
        hypotheses = [[self.vocabularies[task][i - 1] for i in h]
                      for h in decode(probe, features, batch_size)]
        return error_rates(hypotheses, [u.targets[task] for u in utterances],
                           [u.lang for u in utterances])


@dataclass
class ProbeSplits:
    """One model's standardised features of the probe splits (``extract_splits``)."""

    train: list[Tensor]
    test: list[Tensor]
    dev: list[Tensor] | None = None


def extract_splits(encoder: Encoder, train: Sequence[ProbeUtterance],
                   test: Sequence[ProbeUtterance], dev: Sequence[ProbeUtterance] | None = None,
                   batch_size: int = 4) -> ProbeSplits:
    """Features of every split, standardised with the training split's statistics."""
    splits = ProbeSplits(extract_features(encoder, train, batch_size),
                         extract_features(encoder, test, batch_size),
                         extract_features(encoder, dev, batch_size) if dev else None)
    standardise(splits.train, splits.test, *([splits.dev] if splits.dev else []))
    return splits


def score_model(splits: ProbeSplits, tasks: ProbeTasks, test: Sequence[ProbeUtterance],
                config: ProbeConfig, dev: Sequence[ProbeUtterance] | None = None
                ) -> dict[str, Any]:
    """Train and score one model's probe for every task: ``{"rates": {task: {group: rate}},
    "layer_weights", "final_train_loss", "selection", "restart_losses"}`` (per task). With
    ``dev`` (and ``config.select_every``) the probe state is chosen by the dev error rate."""
    result: dict[str, Any] = {"rates": {}, "layer_weights": {}, "final_train_loss": {},
                              "selection": {}, "restart_losses": {}}
    for task in TASKS:
        select = None
        if dev and splits.dev is not None and config.select_every:
            def select(probe: CTCProbe, task: str = task) -> float:
                return tasks.rates(task, probe, splits.dev, dev, config.batch_size)["overall"]
        training = train_probe(splits.train, tasks.train_targets[task],
                               len(tasks.vocabularies[task]), config, select)
        result["rates"][task] = tasks.rates(task, training.probe, splits.test, test,
                                            config.batch_size)
        result["layer_weights"][task] = training.probe.layer_weights
        result["final_train_loss"][task] = float(
            np.mean(training.losses[-max(1, config.steps // 10):]))
        result["selection"][task] = training.selection
        result["restart_losses"][task] = training.restart_losses
    return result


def run_probe(encoders: dict[str, Encoder], train: Sequence[ProbeUtterance],
              test: Sequence[ProbeUtterance], config: ProbeConfig, train_shards: str,
              batch_size: int = 4, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and score the PER and CER probes of every model of ``encoders`` (row name ->
    Encoder). Returns ``{"probe": {...}, "probe_details": {...}}`` (the report schema)."""
    if not train or not test:
        raise ProbeUnavailable("the probe-training split or the held-out split is empty")
    tasks = ProbeTasks.from_split(train)
    langs = [u.lang for u in test]
    models: dict[str, dict[str, dict[str, float]]] = {}
    details: dict[str, Any] = {
        "config": asdict(config),
        "features": "transformer layers 1..K (student) / 1..L (teacher), no front-end output",
        "train_utterances": len(train),
        "test_utterances": {lang: langs.count(lang) for lang in sorted(set(langs))},
        "vocabulary": {task: len(v) for task, v in tasks.vocabularies.items()},
        "unseen_test_tokens": unseen_test_tokens(tasks, test),
        "layer_weights": {}, "final_train_loss": {}, "seconds": {},
    }
    for name, encoder in encoders.items():
        start = time.perf_counter()
        scored = score_model(extract_splits(encoder, train, test, batch_size=batch_size),
                             tasks, test, config)
        models[name] = scored["rates"]
        details["layer_weights"][name] = scored["layer_weights"]
        details["final_train_loss"][name] = scored["final_train_loss"]
        details["seconds"][name] = time.perf_counter() - start
        log(f"[colld] probe {name}: PER {models[name]['per']['overall']:.3f}, "
            f"CER {models[name]['cer']['overall']:.3f} ({details['seconds'][name]:.1f} s)")
    return {"probe": {"train_shards": train_shards, "steps": config.steps,
                      "languages": sorted(set(langs)), "models": models},
            "probe_details": details}


def unseen_test_tokens(tasks: ProbeTasks, test: Sequence[ProbeUtterance]) -> dict[str, float]:
    """Per task, the fraction of test tokens absent from the probe's vocabulary."""
    known = {task: set(vocab) for task, vocab in tasks.vocabularies.items()}
    return {task: sum(t not in known[task] for u in test for t in u.targets[task])
            / sum(len(u.targets[task]) for u in test) for task in TASKS}


# --- report ------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_probe_markdown(report: dict[str, Any], plot_name: str | None) -> list[str]:
    """The probe section of the eval report (``report["probe"]`` present or
    ``report["probe_skipped"]`` saying why not)."""
    lines = ["## Frozen-feature probe (SUPERB-style CTC): PER and CER", ""]
    if "probe" not in report:
        return lines + [f"No probe: {report['probe_skipped']}", ""]
    probe, details = report["probe"], report["probe_details"]
    config = details["config"]
    head = (f"1-layer BiLSTM ({config['lstm_hidden']} per direction) + linear"
            if config["lstm_hidden"] else "linear")
    tests = ", ".join(f"{lang} {n}" for lang, n in details["test_utterances"].items())
    lines += [
        f"Trained on `{probe['train_shards']}` ({details['train_utterances']} utterances), "
        f"scored on the held-out shards (whole utterances: {tests}). Features: "
        f"{details['features']}, standardised, softmax-weighted sum; head: {head}; CTC, "
        f"{probe['steps']} Adam steps, lr {config['lr']}, batch {config['batch_size']}, dropout "
        f"{config['dropout']}, seed {config['seed']}, the same for every model; greedy "
        "decoding. Error rates in % (corpus level: edits / reference tokens; above 100 when "
        "the probe inserts more than it gets right). `teacher` is the ceiling, `random` the "
        "floor.", "",
        f"Vocabulary: {details['vocabulary']['per']} phones, {details['vocabulary']['cer']} "
        f"characters; held-out tokens never seen in probe training: "
        f"{_percent(details['unseen_test_tokens']['per'])} % of phones, "
        f"{_percent(details['unseen_test_tokens']['cer'])} % of characters.", "",
    ]
    columns = ["overall", *probe["languages"]]
    for task, title in (("per", "PER"), ("cer", "CER")):
        lines += [f"**{title} (%)**", "", "| model | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        lines += [f"| {name} | " + " | ".join(_percent(rates[task][c]) for c in columns) + " |"
                  for name, rates in probe["models"].items()]
        lines.append("")
    lines += ["Learned layer weights (softmax; layer 1 first) and the mean CTC loss of the last "
              "10 % of training steps:", "",
              "| model | PER layer weights | CER layer weights | PER loss | CER loss |",
              "|---|---|---|---|---|"]
    for name, weights in details["layer_weights"].items():
        loss = details["final_train_loss"][name]
        lines.append(f"| {name} | " + " | ".join(" ".join(f"{w:.2f}" for w in weights[t])
                                                 for t in TASKS)
                     + f" | {loss['per']:.3f} | {loss['cer']:.3f} |")
    lines.append("")
    if plot_name:
        lines += [f"![PER and CER per language]({plot_name})", ""]
    return lines


def plot_error_rates(probe: dict[str, Any], path: Path) -> None:
    """Grouped bars: PER and CER (two panels) per language and overall, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = ["overall", *probe["languages"]]
    models = list(probe["models"])
    width = 0.8 / len(models)
    fig, axes = plt.subplots(2, 1, figsize=(max(5.0, 0.9 * len(columns) + 2), 6), sharex=True,
                             layout="constrained")
    for ax, (task, title) in zip(axes, (("per", "PER"), ("cer", "CER"))):
        for m, name in enumerate(models):
            values = [100 * probe["models"][name][task][c] for c in columns]
            ax.bar(np.arange(len(columns)) + (m - (len(models) - 1) / 2) * width, values,
                   width, label=name)
        ax.set_ylabel(f"{title} (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(models), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    axes[1].set_xticks(range(len(columns)), columns)
    fig.suptitle(f"CTC probe, {probe['steps']} steps, per language")
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


__all__ = ["CTCProbe", "ProbeConfig", "ProbeUnavailable", "ProbeUtterance", "char_tokens",
           "decode", "error_rates", "extract_features", "format_probe_markdown",
           "greedy_decode", "phone_tokens", "plot_error_rates",
           "read_probe_split", "run_probe", "standardise", "train_probe"]
