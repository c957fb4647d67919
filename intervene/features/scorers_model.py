"""Scorers that run a model directly, after delphi's surprisal and embedding scorers.

* **Surprisal**: does the explanation make the held-out windows more predictable? A local causal LM reads each
  window after a prompt with the explanation and after the same prompt with an uninformative one ("Various
  unrelated sentences.", delphi's); a window's score is the mean per-token loss saved by the explanation.
* **Embedding**: does the explanation retrieve the activating windows? The explanation (behind delphi's
  retrieval instruction) and each window are embedded; a window's score is their cosine similarity.

Both report the AUROC of the score for activating (1) against non-activating (0) windows. Embeddings come from
a local model (:class:`TransformersEmbedder`: mean-pooled last hidden states, as sentence-transformers pools) or
an OpenAI-compatible ``/embeddings`` endpoint (:class:`OpenAIEmbedder`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import torch

from intervene.errors import ClientError
from intervene.features.examples import LatentExamples
from intervene.features.explain import Explanation, TokenText
from intervene.features.score import Sample, ScoreResult, labelled

SURPRISAL_PREFIX = ("The following is a description of a feature of text, followed by sentences that contain "
                    "it.\nDescription: {}\nSentences:\n")
NO_EXPLANATION = "Various unrelated sentences."
EMBEDDING_QUERY = "Instruct: Retrieve sentences that could be related to the explanation.\nQuery:"


def _auroc_metrics(samples: Sequence[Sample]) -> dict[str, Any]:
    from intervene.probes.metrics import auroc

    kept = [s for s in samples if s.probability is not None]
    y = [s.label for s in kept]
    value = float(auroc(y, [s.probability for s in kept])) if kept and 0 < sum(y) < len(y) else None
    return {"n": len(samples), "n_failed": len(samples) - len(kept), "auroc": value}


def _windows(ex: LatentExamples, text: TokenText) -> list[Sample]:
    out = []
    for label, group in ((1, ex.score_activating), (0, ex.score_nonactivating)):
        for e in group:
            out.append(Sample("".join(text(e.tokens)), label, e.kind, e.quantile, e.span))
    return out


class SurprisalScorer:
    """Mean per-token loss a window saves when the prompt holds the explanation (``model``: a causal LM)."""

    name = "surprisal"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.text = model.eval(), tokenizer, TokenText(tokenizer)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def losses(self, prefix: str, texts: Sequence[str]) -> list[float]:
        """Mean cross-entropy (nats) of each text's tokens after ``prefix``."""
        dev = next(self.model.parameters()).device
        pre = self.tokenizer(prefix)["input_ids"]
        out = []
        for i in range(0, len(texts), self.batch_size):
            seqs = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i:i + self.batch_size]]
            width = len(pre) + max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(seqs):  # right padding: positions of real tokens stay as without padding
                ids[j, :len(pre) + len(s)] = torch.tensor(pre + s)
                mask[j, :len(pre) + len(s)] = 1
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            for j, s in enumerate(seqs):
                # the text's tokens sit at len(pre) .. len(pre)+len(s)-1, predicted from one position earlier
                out.append(float(-logp[j, len(pre) - 1:len(pre) - 1 + len(s)].mean()) if s else float("nan"))
        return out

    def score(self, explanation: Explanation | str, ex: LatentExamples | None = None) -> ScoreResult:
        return self.score_many([(explanation, ex)])[0]

    def score_many(self, items: Sequence[tuple[Explanation | str, LatentExamples | None]]) -> list[ScoreResult]:
        from tqdm.auto import tqdm

        out = []
        base: dict[str, float] = {}
        for latent, text, ex in tqdm(labelled(items), desc="surprisal", disable=len(items) < 5):
            samples = _windows(ex, self.text)
            todo = [s.text for s in samples if s.text not in base]
            base.update(zip(todo, self.losses(SURPRISAL_PREFIX.format(NO_EXPLANATION), todo)))  # reused across latents
            with_expl = self.losses(SURPRISAL_PREFIX.format(text), [s.text for s in samples])
            for s, loss in zip(samples, with_expl):
                s.probability = base[s.text] - loss  # nats per token saved by the explanation
            out.append(ScoreResult(latent, self.name, text, _auroc_metrics(samples), samples))
        return out


# ---- embeddings --------------------------------------------------------------------------------
class TransformersEmbedder:
    """Texts -> unit vectors ``[n, d]``: the mean of a local model's last hidden states over real tokens."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 512) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, int(max_length)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_length)
        mask = batch["attention_mask"].to(dev)
        out = self.model(input_ids=batch["input_ids"].to(dev), attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[-1].float()
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()


class OpenAIEmbedder:
    """Texts -> unit vectors from an OpenAI-compatible ``{base_url}/embeddings`` endpoint (stdlib only)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url, self.model, self.api_key, self.timeout = base_url.rstrip("/") + "/embeddings", model, api_key, timeout

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps({"model": self.model, "input": list(texts)}).encode()
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode())
            rows = sorted(data["data"], key=lambda d: d["index"])
            vecs = torch.tensor([r["embedding"] for r in rows], dtype=torch.float32)
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError, KeyError, TypeError,
                ValueError) as e:
            raise ClientError(f"{self.url}: {type(e).__name__}: {e}") from e
        if vecs.shape[0] != len(texts):
            raise ClientError(f"{self.url}: {vecs.shape[0]} embeddings for {len(texts)} texts")
        return torch.nn.functional.normalize(vecs, dim=-1)


class EmbeddingScorer:
    """Cosine similarity of each window to the explanation (``embed``: texts -> ``[n, d]`` vectors)."""

    name = "embedding"

    def __init__(self, embed: Callable[[Sequence[str]], torch.Tensor], tokenizer: Any) -> None:
        self.embed, self.text = embed, TokenText(tokenizer)

    def score(self, explanation: Explanation | str, ex: LatentExamples | None = None) -> ScoreResult:
        return self.score_many([(explanation, ex)])[0]

    def score_many(self, items: Sequence[tuple[Explanation | str, LatentExamples | None]]) -> list[ScoreResult]:
        out = []
        for latent, text, ex in labelled(items):
            samples = _windows(ex, self.text)
            vecs = torch.nn.functional.normalize(self.embed([EMBEDDING_QUERY + text] + [s.text for s in samples])
                                                 .float(), dim=-1)
            for s, sim in zip(samples, (vecs[1:] @ vecs[0]).tolist()):
                s.probability = float(sim)
            out.append(ScoreResult(latent, self.name, text, _auroc_metrics(samples), samples))
        return out
