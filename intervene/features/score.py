"""Score explanations: can a language model, given only the explanation, tell where the latent fires?

* **Detection**: held-out windows, activating and not, shown as plain text; the model answers
  whether each contains the described feature.
* **Fuzzing**: windows with some tokens highlighted — correctly (activating windows, marked where the
  latent fires) or wrongly (the same windows marked on silent tokens, and non-activating windows
  marked at random); the model answers whether the highlighting matches the explanation.

Each sample is a binary classification; metrics are accuracy, balanced accuracy, precision, recall,
F1 and, when the client gives probabilities, AUROC. Samples whose answer could not be parsed are
counted (``n_failed``) and left out of the metrics.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from intervene.features.clients import Client, Messages
from intervene.features.examples import Example, LatentExamples
from intervene.features.explain import Explanation, TokenText, example_text

DETECTION_SYSTEM = """You check explanations of a language model's hidden features. You get an explanation of a feature
and a numbered list of text snippets. Decide, for each snippet, whether the feature described by the explanation is
present in it (1) or not (0)."""

FUZZING_SYSTEM = """You check explanations of a language model's hidden features. You get an explanation of a feature
and a numbered list of text snippets in which some tokens are marked like <<this>>. Decide, for each snippet, whether
ALL the marked tokens match the explanation (1) or not (0)."""


@dataclass
class Sample:
    """One classification item: the text shown, the truth (``label``), and the model's answer."""

    text: str
    label: int
    kind: str
    quantile: int | None
    span: tuple[int, int, int]
    prediction: int | None = None
    probability: float | None = None


@dataclass
class ScoreResult:
    latent: int
    scorer: str
    explanation: str
    metrics: dict[str, float | int | None]
    samples: list[Sample] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"latent": self.latent, "scorer": self.scorer, "explanation": self.explanation,
                "metrics": self.metrics, "samples": [asdict(s) for s in self.samples]}


def binary_metrics(labels: Sequence[int], predictions: Sequence[int | None],
                   probabilities: Sequence[float | None] | None = None) -> dict[str, float | int | None]:
    """Accuracy, balanced accuracy, precision, recall, F1 (and AUROC when every kept sample has a
    probability and both classes occur) over the samples with a prediction."""
    kept = [i for i, p in enumerate(predictions) if p is not None]
    y = [int(labels[i]) for i in kept]
    p = [int(predictions[i]) for i in kept]
    tp = sum(1 for a, b in zip(y, p) if a == 1 and b == 1)
    tn = sum(1 for a, b in zip(y, p) if a == 0 and b == 0)
    fp = sum(1 for a, b in zip(y, p) if a == 0 and b == 1)
    fn = sum(1 for a, b in zip(y, p) if a == 1 and b == 0)
    n = len(y)

    def div(a: float, b: float) -> float | None:
        return a / b if b else None

    tpr, tnr = div(tp, tp + fn), div(tn, tn + fp)
    prec = div(tp, tp + fp)
    f1 = div(2 * tp, 2 * tp + fp + fn)
    bal = None if tpr is None or tnr is None else (tpr + tnr) / 2
    out: dict[str, float | int | None] = {
        "n": len(labels), "n_failed": len(labels) - n, "accuracy": div(tp + tn, n), "balanced_accuracy": bal,
        "precision": prec, "recall": tpr, "f1": f1, "tp": tp, "tn": tn, "fp": fp, "fn": fn, "auroc": None}
    if probabilities is not None:
        probs = [probabilities[i] for i in kept]
        if probs and all(q is not None for q in probs) and 0 < sum(y) < n:
            from intervene.probes.metrics import auroc

            out["auroc"] = float(auroc(y, probs))
    return out


_LIST = re.compile(r"\[([^\[\]]*)\]")
_BIT = re.compile(r"\b(1|0|yes|no|true|false)\b", re.IGNORECASE)


def parse_answers(answer: str | None, n: int) -> list[int | None]:
    """``n`` binary answers from a reply: a list ``[1, 0, ...]`` for several samples, or one 1/0/yes/no."""
    if answer is None:
        return [None] * n
    for m in _LIST.finditer(answer):
        try:
            vals = json.loads(f"[{m.group(1)}]")
        except json.JSONDecodeError:
            continue
        if len(vals) == n and all(v in (0, 1, True, False) for v in vals):
            return [int(v) for v in vals]
    if n == 1:
        m = _BIT.search(answer)
        if m:
            return [1 if m.group(1).lower() in ("1", "yes", "true") else 0]
    return [None] * n


class Scorer:
    """Shared machinery: build samples, ask ``client`` (``n_per_prompt`` samples per request), parse, score.

    With ``n_per_prompt=1`` and a client that gives probabilities (``use_probs``), each sample costs
    one next-token query and the prediction is ``P("1") >= 0.5``.
    """

    name = "scorer"
    system = ""
    question = ""

    def __init__(self, client: Client, tokenizer: Any, n_per_prompt: int = 1, use_probs: bool = True,
                 seed: int = 0, max_tokens: int = 32) -> None:
        self.client = client
        self.text = TokenText(tokenizer)
        self.n_per_prompt = max(1, int(n_per_prompt))
        self.use_probs = use_probs
        self.seed = int(seed)
        self.max_tokens = int(max_tokens)

    def samples(self, ex: LatentExamples) -> list[Sample]:
        raise NotImplementedError

    def prompt(self, explanation: str, batch: Sequence[Sample]) -> Messages:
        listing = "\n".join(f"Snippet {i}: {s.text}" for i, s in enumerate(batch, 1))
        if len(batch) == 1:
            ask = f"{self.question} Answer with a single digit, 1 (yes) or 0 (no).\nAnswer:"
        else:
            ask = (f"{self.question} Answer for each snippet with a list of {len(batch)} digits, 1 (yes) or 0 (no), "
                   "like [1, 0, ...].\nAnswer:")
        user = f"Explanation: {explanation}\n\n{listing}\n\n{ask}"
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def score(self, explanation: Explanation | str, ex: LatentExamples | None = None) -> ScoreResult:
        return self.score_many([(explanation, ex)])[0]

    def score_many(self, items: Sequence[tuple[Explanation | str, LatentExamples | None]]) -> list[ScoreResult]:
        """Score several latents; all requests go to the client together (concurrently for HTTP clients)."""
        jobs: list[tuple[int, list[Sample], Messages]] = []
        per: list[tuple[int, str, list[Sample]]] = []
        for k, (latent, text, ex) in enumerate(labelled(items)):
            samples = self.samples(ex)
            random.Random(f"{self.seed}-{latent}-{self.name}").shuffle(samples)
            per.append((latent, text, samples))
            for i in range(0, len(samples), self.n_per_prompt):
                batch = samples[i:i + self.n_per_prompt]
                jobs.append((k, batch, self.prompt(text, batch)))
        pending = []
        single = [j for j in jobs if self.use_probs and len(j[1]) == 1]
        got = dict(zip(map(id, single), self.client.choice_probs_many([m for _, _, m in single], ["1", "0"])))
        for job in jobs:
            _, batch, msgs = job
            probs = got.get(id(job))
            if probs is not None:
                batch[0].probability = float(probs[0])
                batch[0].prediction = int(probs[0] >= 0.5)
            else:
                pending.append((batch, msgs))
        answers = self.client.generate_many([m for _, m in pending], self.max_tokens)
        for (batch, _), answer in zip(pending, answers):
            for s, a in zip(batch, parse_answers(answer, len(batch))):
                s.prediction = a
        out = []
        for latent, text, samples in per:
            metrics = binary_metrics([s.label for s in samples], [s.prediction for s in samples],
                                     [s.probability for s in samples])
            out.append(ScoreResult(latent, self.name, text, metrics, samples))
        return out


def _sample(e: Example, text: str, label: int, kind: str | None = None) -> Sample:
    return Sample(text, label, kind or e.kind, e.quantile, e.span)


class DetectionScorer(Scorer):
    """Does the snippet contain the feature? Activating held-out windows are 1, non-activating 0."""

    name = "detection"
    system = DETECTION_SYSTEM
    question = "Does the snippet contain the feature?"

    def samples(self, ex: LatentExamples) -> list[Sample]:
        plain = [False]
        return ([_sample(e, example_text(e, self.text, marked=plain * len(e.tokens)), 1) for e in ex.score_activating]
                + [_sample(e, example_text(e, self.text, marked=plain * len(e.tokens)), 0)
                   for e in ex.score_nonactivating])


class FuzzingScorer(Scorer):
    """Is the highlighting right? Activating windows marked where the latent fires are 1; the other
    half of them marked on as many silent tokens, and non-activating windows marked at random, are 0.

    Args:
        highlight_threshold: mark a token when its activation is ``>= highlight_threshold * the window's
            maximum`` (and wrong marks go only on tokens at or below that level). ``0`` (default) marks every
            firing token; ``0.3`` is delphi's threshold (``examples_to_samples``), for scores comparable with it.
        n_wrong: how many tokens a wrongly marked window gets: as many as that window fires on
            (``"per_example"``), or delphi's ``ceil`` of the mean over the activating windows (``"mean"``).
    """

    name = "fuzzing"
    system = FUZZING_SYSTEM
    question = "Do all the marked tokens match the explanation?"

    def __init__(self, client: Client, tokenizer: Any, *, highlight_threshold: float = 0.0,
                 n_wrong: str = "per_example", **kwargs: Any) -> None:
        super().__init__(client, tokenizer, **kwargs)
        if not 0.0 <= float(highlight_threshold) <= 1.0 or n_wrong not in ("per_example", "mean"):
            raise ValueError("highlight_threshold must be in [0, 1] and n_wrong 'per_example' or 'mean'")
        self.highlight_threshold = float(highlight_threshold)
        self.n_wrong = n_wrong

    def marked(self, e: Example) -> list[bool]:
        """The correct highlighting of ``e`` (at ``highlight_threshold``)."""
        return highlighted(e, self.highlight_threshold)

    def samples(self, ex: LatentExamples) -> list[Sample]:
        rng = random.Random(f"fuzz-{self.seed}-{ex.latent}")
        out = []
        act = list(ex.score_activating)
        thr = self.highlight_threshold
        counts = [max(1, sum(self.marked(e))) for e in act] or [1]
        if self.n_wrong == "mean":
            fired = [sum(a != 0 for a in e.acts) for e in act]
            counts = [max(1, math.ceil(sum(fired) / len(fired)))] * len(act) if act else [1]
        for i, e in enumerate(act):
            if i % 2 == 0:
                out.append(_sample(e, example_text(e, self.text, marked=self.marked(e)), 1, "correct"))
            else:
                marks = _random_marks(e, counts[i], rng, thr)
                out.append(_sample(e, example_text(e, self.text, marked=marks), 0, "wrong"))
        for e in ex.score_nonactivating:
            k = rng.choice(counts)
            out.append(_sample(e, example_text(e, self.text, marked=_random_marks(e, k, rng, thr)), 0))
        return out


def highlighted(e: Example, threshold: float = 0.0) -> list[bool]:
    """Tokens of ``e`` to mark: firing ones (``threshold=0``), or those at ``>= threshold * max`` (delphi's rule)."""
    if threshold <= 0:
        return [a > 0 for a in e.acts]
    level = threshold * e.max_act
    return [a > 0 and a >= level for a in e.acts]


def _random_marks(e: Example, k: int, rng: random.Random, threshold: float = 0.0) -> list[bool]:
    """``k`` random tokens that the correct highlighting would not mark (at or below ``threshold * max``)."""
    level = threshold * e.max_act
    idx = [i for i, a in enumerate(e.acts) if a <= level] or list(range(len(e.acts)))
    chosen = set(rng.sample(idx, min(k, len(idx))))
    return [i in chosen for i in range(len(e.acts))]


SCORERS: dict[str, type[Scorer]] = {"detection": DetectionScorer, "fuzzing": FuzzingScorer}


def labelled(items: Sequence[tuple[Explanation | str, LatentExamples | None]]
              ) -> list[tuple[int, str, LatentExamples]]:
    """``(latent, explanation text, examples)`` for each ``(explanation, examples)`` item; an
    :class:`Explanation` brings its own examples when none are given."""
    out = []
    for expl, ex in items:
        if isinstance(expl, Explanation):
            ex = ex or expl.examples
            text, latent = expl.text, expl.latent
        else:
            text, latent = str(expl), ex.latent if ex is not None else -1
        if ex is None:
            raise ValueError("scoring needs the latent's examples (LatentExamples)")
        out.append((latent, text, ex))
    return out
