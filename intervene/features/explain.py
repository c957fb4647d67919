"""Explain a latent from its highlighted examples by asking a language model (delphi-style ``<<token>>``).

>>> ex = sample_examples(cache, latent=7)
>>> Explainer(client, tokenizer).explain(ex).text
'numbers right after "is greater than"'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from intervene.features.clients import Client, Messages
from intervene.features.examples import Example, LatentExamples

EXPLAIN_SYSTEM = """You study the hidden features of a language model. Each feature fires on some tokens of a text.
You are shown text snippets; the tokens on which the feature fires are marked like <<this>>, and runs of consecutive
marked tokens are marked together <<like this>>.
Describe in one short phrase what the marked tokens have in common, taking their context into account.
- Be concise and specific; no lists of alternatives.
- Do not mention the << >> markers.
- End your answer with a line of the form
[EXPLANATION]: your description"""


class TokenText:
    """Token ids -> one display string per token, such that joining them gives the decoded text.

    Each token's string is what decoding one more token adds to the text so far, so spacing is right
    for byte-level BPE, SentencePiece and word-level tokenizers alike.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    def __call__(self, ids: Sequence[int]) -> list[str]:
        out, prev = [], ""
        for i in range(len(ids)):
            cur = self._decode(ids[: i + 1])
            out.append(cur[len(prev):] if cur.startswith(prev) else self._decode(ids[i:i + 1]))
            prev = cur
        return out


def highlight(tokens: Sequence[str], marked: Sequence[bool], left: str = "<<", right: str = ">>") -> str:
    """Join token strings, wrapping each run of marked tokens in ``left``/``right``.

    A run's leading whitespace stays outside the markers (``the << cat>>`` reads as ``the <<cat>>``).
    """
    out, run = [], []
    for tok, m in zip(tokens, marked):
        if m:
            run.append(tok)
            continue
        if run:
            out.append(_wrap("".join(run), left, right))
            run = []
        out.append(tok)
    if run:
        out.append(_wrap("".join(run), left, right))
    return "".join(out)


def _wrap(text: str, left: str, right: str) -> str:
    stripped = text.lstrip()
    return text[: len(text) - len(stripped)] + left + stripped + right


def example_text(ex: Example, text: TokenText, threshold: float = 0.0, marked: Sequence[bool] | None = None) -> str:
    """The window's text with the latent's firing tokens (``act > threshold``) highlighted.

    ``marked`` overrides which tokens are highlighted (the fuzzing scorer's wrong highlights)."""
    m = [a > threshold for a in ex.acts] if marked is None else list(marked)
    return highlight(text(ex.tokens), m).replace("\n", "\\n")


def explanation_prompt(examples: Sequence[Example], text: TokenText, show_activations: bool = False,
                       threshold_frac: float = 0.0) -> Messages:
    """Chat messages asking for an explanation of ``examples`` (highlighted; activations 0-10 optional).

    ``threshold_frac`` hides activations below that fraction of the examples' maximum.
    """
    top = max((e.max_act for e in examples), default=0.0)
    thr = threshold_frac * top
    lines = []
    for i, e in enumerate(examples, 1):
        lines.append(f"Example {i}: {example_text(e, text, thr)}")
        if show_activations and top > 0:
            toks = text(e.tokens)
            acts = [f'("{t.strip()}", {round(10 * a / top)})' for t, a in zip(toks, e.acts) if a > thr]
            lines.append("Activations: " + ", ".join(acts))
    user = "\n".join(lines) + "\n\nWhat do the marked tokens have in common?"
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


_EXPL = re.compile(r"\[EXPLANATION\]\s*:?\s*(.*)", re.IGNORECASE)


def parse_explanation(answer: str | None) -> str:
    """The text after the last ``[EXPLANATION]:``; else the answer's last non-empty line (max 200 chars)."""
    if not answer:
        return ""
    hits = [m.group(1).strip() for m in _EXPL.finditer(answer) if m.group(1).strip()]
    if hits:
        return hits[-1][:200]
    lines = [ln.strip() for ln in answer.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


@dataclass
class Explanation:
    """A latent's explanation with what produced it (the prompt, the raw answer, the examples)."""

    latent: int
    text: str
    raw: str | None
    prompt: Messages = field(repr=False)
    examples: LatentExamples | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"latent": self.latent, "explanation": self.text, "raw": self.raw, "prompt": self.prompt,
                "examples": None if self.examples is None else self.examples.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Explanation:
        ex = LatentExamples.from_json(d["examples"]) if d.get("examples") else None
        return cls(int(d["latent"]), d["explanation"], d.get("raw"), d.get("prompt") or [], ex)


class Explainer:
    """Builds the explanation prompt from a latent's ``explain`` examples and asks ``client``.

    Args:
        max_examples: at most this many examples go into the prompt (strongest first).
        show_activations: also list each marked token with its activation on a 0-10 scale.
        threshold_frac: highlight only tokens above this fraction of the maximum activation.
    """

    def __init__(self, client: Client, tokenizer: Any, max_examples: int = 20, show_activations: bool = False,
                 threshold_frac: float = 0.0, max_tokens: int = 128) -> None:
        self.client = client
        self.text = TokenText(tokenizer)
        self.max_examples = int(max_examples)
        self.show_activations = show_activations
        self.threshold_frac = float(threshold_frac)
        self.max_tokens = int(max_tokens)

    def prompt(self, ex: LatentExamples) -> Messages:
        shown = sorted(ex.explain, key=lambda e: -e.max_act)[: self.max_examples]
        return explanation_prompt(shown, self.text, self.show_activations, self.threshold_frac)

    def explain(self, ex: LatentExamples) -> Explanation:
        return self.explain_many([ex])[0]

    def explain_many(self, examples: Sequence[LatentExamples]) -> list[Explanation]:
        """One explanation per latent; latents without examples get an empty explanation (no request)."""
        prompts = [self.prompt(ex) for ex in examples]
        todo = [i for i, ex in enumerate(examples) if ex.explain]
        answers = self.client.generate_many([prompts[i] for i in todo], self.max_tokens)
        raw: dict[int, str | None] = dict(zip(todo, answers))
        return [Explanation(ex.latent, parse_explanation(raw.get(i)), raw.get(i), prompts[i], ex)
                for i, ex in enumerate(examples)]
