"""Erasing the quirky speaker: does removing *who answers* from a layer make Bob answer like Alice?

The quirky demo model answers truthfully after prompts naming Alice and with a systematic error after
prompts naming Bob (:mod:`intervene.data.quirky`). A LEACE eraser fitted on one site's activations with
the speaker as the concept leaves no linear trace of the name there. Where the model reads the speaker
linearly from that site, Bob's answers should move toward Alice's; the cost is measured as the CE of
the edited model on neutral text (:func:`intervene.evaluate.side_effects.side_effects`).

Scores (on test questions where Alice and Bob disagree, so moving means changing the answer):

* ``bob_as_alice`` — Bob's prompts answered with Alice's (true) label, before and after;
* ``bob_matches_model_alice`` — Bob's answer equal to the model's own unedited answer on the same
  question asked of Alice;
* ``alice_truthful`` — Alice's prompts answered truthfully (an erasure may also move Alice toward Bob);
* ``ce_delta`` / ``kl`` — nats per token on the reference texts, with the eraser at every position.

Measured on the demo model (``intervene erase quirky demo``: addition, erasers fitted on the last token of
300 train questions × 2 speakers, applied at every position; 160 of 200 test questions disagree; CE base
1.077 nats on 100 reference texts):

    site              Bob answers as Alice   Alice truthful   CE +nats    KL
    layers.0          0.000 -> 1.000         1.000 -> 0.938   0.140       0.138
    layers.1          0.000 -> 0.988         1.000 -> 1.000   0.227       0.226
    layers.2          0.000 -> 0.206         1.000 -> 1.000   0.805       0.795
    layers.3          0.000 -> 0.000         1.000 -> 1.000   0.087       0.078
    layers.0.heads    0.000 -> 0.931         1.000 -> 1.000   0.151       0.148
    layers.1.heads    0.000 -> 0.000         1.000 -> 1.000   0.005       0.004

Erasing the speaker from the residual works through block 1, partly after block 2, not after block 3:
by then the answer itself is written, which is not a linear function of the speaker. Fitted on every token instead
(``--collect-positions all``) the erasers barely move Bob (at most 0.013) at a CE cost under 0.05: most
tokens carry no speaker signal, so the fitted direction is not the one the answer position uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from intervene.data.quirky import quirky_dataset
from intervene.evaluate.choices import choice_logits
from intervene.evaluate.side_effects import load_reference_texts, side_effects
from intervene.intervenable import Intervenable
from intervene.methods.leace.config import ConceptErasureConfig
from intervene.methods.leace.intervention import ConceptErasure


def _answers(model: Any, tok: Any, rows: Sequence[dict], erasers: Sequence[Any]) -> torch.Tensor:
    """The model's answer per row (``[n]`` label indices) with ``erasers`` attached."""
    if not erasers:
        return choice_logits(model, tok, rows).argmax(-1)
    with Intervenable(model, list(erasers)):
        return choice_logits(model, tok, rows).argmax(-1)


def speaker_erasure(model: Any, tok: Any, site: str, fit_rows: Sequence[dict], eval_rows: Sequence[dict],
                    ref_texts: Sequence[str], config: ConceptErasureConfig | None = None,
                    batch_size: int = 16) -> dict[str, Any]:
    """Fit a speaker eraser at ``site`` on ``fit_rows`` and score it on ``eval_rows`` (both characters).

    Returns the scores of the module docstring (``*_before`` / ``*_after``), ``ce_base``, ``ce_delta``,
    ``kl``, the number of disagreeing questions ``n_disagree`` and the fitted eraser's ``rank``.
    """
    eraser = ConceptErasure.fit(model, tok, fit_rows, site, config, label_field="character",
                                batch_size=batch_size, name="speaker_erasure")
    bob = [r for r in eval_rows if r["character"] == "Bob" and r["alice_label"] != r["bob_label"]]
    keys = {(r["question_id"], r["template"]) for r in bob}
    alice = [r for r in eval_rows if r["character"] == "Alice" and (r["question_id"], r["template"]) in keys]
    alice_of = {(r["question_id"], r["template"]): i for i, r in enumerate(alice)}
    if not bob or len(alice) != len(bob):
        raise ValueError("eval_rows need both characters of each question, with some disagreeing questions")
    pair = torch.tensor([alice_of[(r["question_id"], r["template"])] for r in bob])
    truth_bob = torch.tensor([r["alice_label"] for r in bob])
    truth_alice = torch.tensor([r["alice_label"] for r in alice])
    out: dict[str, Any] = {"site": site, "n_disagree": len(bob), "rank": eraser.fit_info_["rank"][site]}
    base_alice = _answers(model, tok, alice, [])
    for tag, edits in (("before", []), ("after", [eraser])):
        ans_bob = _answers(model, tok, bob, edits)
        ans_alice = base_alice if not edits else _answers(model, tok, alice, edits)
        out[f"bob_as_alice_{tag}"] = float((ans_bob == truth_bob).double().mean())
        out[f"bob_matches_model_alice_{tag}"] = float((ans_bob == base_alice[pair]).double().mean())
        out[f"alice_truthful_{tag}"] = float((ans_alice == truth_alice).double().mean())
    cost = side_effects(model, tok, list(ref_texts), [eraser], batch_size=batch_size)
    out.update({k: cost[k] for k in ("ce_base", "ce_delta", "kl")})
    return out


def speaker_erasure_sweep(model: Any, tok: Any, sites: Sequence[str], task: str = "addition", n_fit: int = 300,
                          n_eval: int = 200, n_ref: int = 100, seed: int = 0,
                          config: ConceptErasureConfig | None = None) -> list[dict[str, Any]]:
    """:func:`speaker_erasure` at each of ``sites`` on quirky ``task``: erasers fitted on ``n_fit`` train
    questions (both characters), scored on ``n_eval`` test questions and ``n_ref`` reference texts."""
    fit_rows = quirky_dataset(task, split="train", n=n_fit, seed=seed)
    eval_rows = quirky_dataset(task, split="test", n=n_eval, seed=seed)
    ref = load_reference_texts(n=n_ref)
    return [speaker_erasure(model, tok, s, fit_rows, eval_rows, ref, config) for s in sites]
