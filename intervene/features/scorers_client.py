"""Scorers that ask a chat client, after delphi's intruder and simulation scorers.

* **Intruder** (no explanation needed): ``n_shown - 1`` activating windows, highlighted where the latent fires
  (at delphi's ``0.3 * max`` threshold by default), and one non-activating window with as many random tokens
  highlighted, in random order; the model names the intruder (``[RESPONSE]: i``). Score: the fraction found
  (chance is ``1 / n_shown``). Activating windows are drawn cycling through the quantiles, as delphi does.
* **Simulation**: given the explanation, the model predicts every token's activation on a 0-10 scale (one JSON
  list per window). Score: Pearson correlation between predicted and true activations over all windows
  concatenated (delphi's ``all`` aggregate), and over the activating windows alone. The prediction here is the
  model's JSON answer (delphi's JSON mode), not an expected value over log-probabilities.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from intervene.features.clients import Client, Messages
from intervene.features.examples import Example, LatentExamples
from intervene.features.explain import Explanation, TokenText, example_text
from intervene.features.score import Sample, ScoreResult, _random_marks, highlighted, labelled

INTRUDER_SYSTEM = """You are shown numbered text examples. In all but one of them, the marked tokens (<<like this>>)
are where one hidden feature of a language model fires; in the remaining example, the intruder, the marked tokens
were chosen at random. Find the intruder. Think briefly about what the genuine examples share, then end with a line
[RESPONSE]: <number of the intruder example>"""

SIMULATION_SYSTEM = """You predict how strongly a hidden feature of a language model fires on each token of a text,
given an explanation of the feature. Activations run from 0 (not at all) to 10 (as strongly as it ever fires);
most tokens are 0."""

_RESPONSE = re.compile(r"\[RESPONSE\]:\s*(-?\d+)")
_LIST = re.compile(r"\[[^\[\]]*\]")


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; ``None`` when either side is constant (delphi reports 0 there; undefined is honest)."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else None




class IntruderScorer:
    """Find the randomly highlighted window among ``n_shown`` (see the module docstring)."""

    name = "intruder"

    def __init__(self, client: Client, tokenizer: Any, n_shown: int = 5, highlight_threshold: float = 0.3,
                 seed: int = 42, max_tokens: int = 256) -> None:
        if n_shown < 2:
            raise ValueError("n_shown must be at least 2 (one intruder and one genuine example)")
        self.client, self.text = client, TokenText(tokenizer)
        self.n_shown, self.threshold, self.seed, self.max_tokens = int(n_shown), float(highlight_threshold), seed, max_tokens

    def prompt(self, texts: Sequence[str]) -> Messages:
        listing = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
        return [{"role": "system", "content": INTRUDER_SYSTEM},
                {"role": "user", "content": f"{listing}\n\nWhich example is the intruder?"}]

    def _trials(self, ex: LatentExamples, rng: random.Random) -> list[tuple[list[Example], int]]:
        by_q: dict[int, list[Example]] = {}
        for e in ex.score_activating:
            by_q.setdefault(e.quantile or 0, []).append(e)
        if not by_q or not ex.score_nonactivating:
            return []
        order = sorted(by_q, reverse=True)
        trials = []
        for j, intruder in enumerate(ex.score_nonactivating):
            pool = by_q[order[j % len(order)]]
            shown = rng.sample(pool, min(self.n_shown - 1, len(pool)))
            at = rng.randint(0, len(shown))
            trials.append((shown[:at] + [intruder] + shown[at:], at))
        return trials

    def score(self, explanation: Explanation | str | None, ex: LatentExamples | None = None) -> ScoreResult:
        return self.score_many([(explanation or "", ex)])[0]

    def score_many(self, items: Sequence[tuple[Explanation | str, LatentExamples | None]]) -> list[ScoreResult]:
        jobs, per = [], []
        for latent, text, ex in labelled(items):
            rng = random.Random(f"{self.seed}-{latent}-intruder")
            samples = []
            for shown, at in self._trials(ex, rng):
                genuine = [e for i, e in enumerate(shown) if i != at]
                n_wrong = max(1, sum(sum(highlighted(e, self.threshold)) for e in genuine) // max(1, len(genuine)))
                texts = [example_text(e, self.text, marked=_random_marks(e, n_wrong, rng, self.threshold) if i == at
                                      else highlighted(e, self.threshold)) for i, e in enumerate(shown)]
                s = Sample("\n".join(texts), at, "intruder", None, shown[at].span)
                samples.append(s)
                jobs.append((s, self.prompt(texts)))
            per.append((latent, text, samples))
        answers = self.client.generate_many([m for _, m in jobs], self.max_tokens)
        for (s, _), answer in zip(jobs, answers):
            m = _RESPONSE.search(answer or "")
            s.prediction = int(m.group(1)) if m and 0 <= int(m.group(1)) < self.n_shown else None
        out = []
        for latent, text, samples in per:
            ok = [s.prediction == s.label for s in samples if s.prediction is not None]
            metrics = {"n": len(samples), "n_failed": len(samples) - len(ok),
                       "accuracy": sum(ok) / len(ok) if ok else None, "chance": 1 / self.n_shown}
            out.append(ScoreResult(latent, self.name, text, metrics, samples))
        return out


class SimulationScorer:
    """Predict per-token activations from the explanation; Pearson correlation with the truth."""

    name = "simulation"

    def __init__(self, client: Client, tokenizer: Any, max_tokens: int = 512) -> None:
        self.client, self.text, self.max_tokens = client, TokenText(tokenizer), int(max_tokens)

    def prompt(self, explanation: str, tokens: Sequence[str]) -> Messages:
        listing = "\n".join(f"{i}\t{json.dumps(t)}" for i, t in enumerate(tokens))
        user = (f"Explanation: {explanation}\n\nTokens (index, token):\n{listing}\n\nAnswer with a JSON list of "
                f"{len(tokens)} integers from 0 to 10, one per token, in order.")
        return [{"role": "system", "content": SIMULATION_SYSTEM}, {"role": "user", "content": user}]

    @staticmethod
    def parse(answer: str | None, n: int) -> list[float] | None:
        for m in _LIST.finditer(answer or ""):
            try:
                vals = json.loads(m.group(0))
            except json.JSONDecodeError:
                continue
            if len(vals) == n and all(isinstance(v, (int, float)) for v in vals):
                return [min(10.0, max(0.0, float(v))) for v in vals]
        return None

    def score(self, explanation: Explanation | str, ex: LatentExamples | None = None) -> ScoreResult:
        return self.score_many([(explanation, ex)])[0]

    def score_many(self, items: Sequence[tuple[Explanation | str, LatentExamples | None]]) -> list[ScoreResult]:
        jobs, per = [], []
        for latent, text, ex in labelled(items):
            windows = [(e, 1) for e in ex.score_activating] + [(e, 0) for e in ex.score_nonactivating]
            rows = []
            for e, label in windows:
                toks = self.text(e.tokens)
                s = Sample(example_text(e, self.text, marked=[False] * len(toks)), label, e.kind, e.quantile, e.span)
                rows.append((s, e))
                jobs.append((s, e, self.prompt(text, toks)))
            per.append((latent, text, rows))
        answers = self.client.generate_many([m for _, _, m in jobs], self.max_tokens)
        predicted: dict[int, list[float] | None] = {}
        for (s, e, _), answer in zip(jobs, answers):
            predicted[id(s)] = self.parse(answer, len(e.tokens))
        out = []
        for latent, text, rows in per:
            done = [(s, e, predicted[id(s)]) for s, e in rows if predicted[id(s)] is not None]
            for s, _, p in done:
                s.probability = max(p) / 10.0  # the window's strongest predicted activation, for inspection
            true = [a for _, e, _ in done for a in e.acts]
            pred = [a for _, _, p in done for a in p]
            act_true = [a for s, e, _ in done if s.label == 1 for a in e.acts]
            act_pred = [a for s, _, p in done if s.label == 1 for a in p]
            metrics = {"n": len(rows), "n_failed": len(rows) - len(done),
                       "correlation": pearson(true, pred) if true else None,
                       "correlation_activating": pearson(act_true, act_pred) if act_true else None}
            out.append(ScoreResult(latent, self.name, text, metrics, [s for s, _ in rows]))
        return out
