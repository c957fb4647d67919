"""Inspecting knowledge with a REMEDI editor: which attribute does the model encode for an entity?

The paper's "inspecting" half: an editor maps an attribute to the direction that *makes* an entity have
it, so an entity whose representation already points along ``d(a)`` is read as having ``a``. For each
item (an entity and ``k`` candidate attributes, each stated by a context sentence):

* ``h_e``: the entity's state at the editor's site at its last token (in the item's ``prompt`` if given, else the
  entity run alone);
* ``d(a)``: the editor's direction for candidate ``a`` (``editor(h_attr(a)[, h_e])``);
* score ``sim(h_e, d(a))`` (cosine by default, or dot), after z-scoring entity states and directions
  over the dataset as the paper does; the prediction is the best-scoring candidate.

Controls, as in the paper: the **identity** editor (``d(a) = h_attr(a)``: is the learned map needed, or
does raw attribute similarity already classify?) and **shuffled labels** (the learned scores against a
seeded permutation of the gold labels: the chance level for this label distribution).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.methods.remedi.intervention import Remedi
from intervene.methods.remedi.states import (
    attribute_states,
    entity_states,
    layer_means,
    pad_id_of,
    prompt_entity_tokens,
    unwrap,
)

__all__ = ["attribute_scores", "classification_metrics", "inspect_attributes", "quirky_items"]


def _entity_reps(model: nn.Module, tok: Any, site: str, items: Sequence[Mapping[str, Any]], batch_size: int
                 ) -> torch.Tensor:
    if all(it.get("prompt") for it in items):
        seqs, pos = prompt_entity_tokens(tok, [it["prompt"] for it in items], [it["entity"] for it in items])
        return layer_means(model, site, seqs, [list(p) for p in pos], pad_id_of(tok), batch_size)
    return entity_states(model, tok, site, [it["entity"] for it in items], batch_size)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


@torch.no_grad()
def attribute_scores(remedi: Remedi, model: nn.Module, tok: Any, items: Sequence[Mapping[str, Any]],
                     editor: str = "learned", similarity: str = "cosine", normalize: bool = True,
                     batch_size: int = 32) -> torch.Tensor:
    """Scores ``[n_items, k]`` of how strongly each entity's state encodes each candidate attribute.

    Args:
        items: dicts with ``entity``, ``contexts`` (``k`` sentences), ``attributes`` (``k`` substrings of
            them) and optionally ``prompt`` (the entity's state is then read there).
        editor: ``"learned"`` (the REMEDI editor) or ``"identity"`` (``d(a) = h_attr(a)``).
        similarity: ``"cosine"`` or ``"dot"``. normalize: z-score states and directions first.
    """
    if editor not in ("learned", "identity") or similarity not in ("cosine", "dot"):
        raise ValueError("editor must be 'learned' or 'identity', similarity 'cosine' or 'dot'")
    base = unwrap(model)
    k = len(items[0]["contexts"])
    if any(len(it["contexts"]) != k or len(it["attributes"]) != k for it in items):
        raise ValueError("every item needs the same number of candidate contexts and attributes")
    h_e = _entity_reps(base, tok, remedi.site, items, batch_size)  # [n, H]
    ctx = [c for it in items for c in it["contexts"]]
    attrs = [a for it in items for a in it["attributes"]]
    h_a = attribute_states(base, tok, remedi.site, ctx, attrs, batch_size)  # [n*k, H]
    if editor == "identity":
        d = h_a
    else:
        p = next(remedi.editor.parameters())
        ent = h_e.repeat_interleave(k, 0).to(p.device, p.dtype) if remedi.use_entity else None
        d = remedi.editor(h_a.to(p.device, p.dtype), ent).float().cpu()
    h_e, d = h_e.cpu(), d.cpu()
    if normalize:
        h_e, d = _zscore(h_e), _zscore(d)
    d = d.view(len(items), k, -1)
    if similarity == "cosine":
        return torch.nn.functional.cosine_similarity(h_e[:, None, :], d, dim=-1)
    return torch.einsum("nh,nkh->nk", h_e, d)


def classification_metrics(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in ``labels`` or ``pred``) of integer predictions."""
    pred, labels = pred.long().cpu(), labels.long().cpu()
    f1s = []
    for c in torch.unique(torch.cat([pred, labels])).tolist():
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((pred == labels).double().mean()), "macro_f1": sum(f1s) / max(1, len(f1s))}


def inspect_attributes(remedi: Remedi, model: nn.Module, tok: Any, items: Sequence[Mapping[str, Any]],
                       similarity: str = "cosine", normalize: bool = True, seed: int = 0, batch_size: int = 32
                       ) -> dict[str, Any]:
    """Classify each item's attribute from the entity's state; with the identity and shuffled-label controls.

    Items carry a gold ``label`` (index into their candidates). Returns ``{"learned", "identity",
    "shuffled_labels"}`` each with ``accuracy`` and ``macro_f1``, plus ``chance`` (``1/k``) and ``n``.
    """
    labels = torch.tensor([int(it["label"]) for it in items])
    out: dict[str, Any] = {"n": len(items), "chance": 1.0 / len(items[0]["contexts"])}
    preds = {}
    for name in ("learned", "identity"):
        scores = attribute_scores(remedi, model, tok, items, name, similarity, normalize, batch_size)
        preds[name] = scores.argmax(-1)
        out[name] = classification_metrics(preds[name], labels)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))
    out["shuffled_labels"] = classification_metrics(preds["learned"], labels[perm])
    return out


def quirky_items(split: str = "test", relations: Sequence[str] | None = None, world_seed: int | None = None
                 ) -> list[dict[str, Any]]:
    """Inspection items over the quirky world: for each entity (of ``split``, as in ``remedi_samples``) and
    relation, every value of the relation as a candidate ("Zorvath lives in Tokyo.") and the true one as label."""
    from intervene.data import quirky_world

    ws = quirky_world.WORLD_SEED if world_seed is None else world_seed
    w = quirky_world.world(ws)
    items = []
    for e in w.entities:
        if quirky_world._split_of(f"remedi:{e}", ws) != split:
            continue
        for r in relations or sorted(quirky_world.RELATIONS):
            prompt = quirky_world.fact_prompts(e, r)[0]
            values = list(quirky_world.VALUES[r])
            items.append({"entity": e, "relation": r, "prompt": prompt,
                          "contexts": [f"{prompt} {v}." for v in values], "attributes": values,
                          "label": values.index(w.facts[e][r])})
    return items
