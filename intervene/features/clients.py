"""Language-model clients for explaining and scoring latents: a local ``transformers`` model, or any
OpenAI-compatible HTTP endpoint (vLLM, llama.cpp server, OpenAI, ...).

A client takes chat messages (``[{"role": "system" | "user" | "assistant", "content": str}]``) and
offers ``generate`` (text), ``generate_many`` (a batch; failures come back as ``None``) and
``choice_probs`` (normalised probabilities of single-token answers such as ``"1"``/``"0"``, or
``None`` when the backend cannot give them).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from intervene.errors import ClientError

Messages = list[dict[str, str]]


class Client:
    """Base class: subclasses implement :meth:`generate` (and, if they can, :meth:`choice_probs`)."""

    def generate(self, messages: Messages, max_tokens: int = 256) -> str:
        raise NotImplementedError

    def generate_many(self, batch: Sequence[Messages], max_tokens: int = 256) -> list[str | None]:
        """One answer per conversation, in order; a failed request gives ``None`` (see ``errors``)."""
        out: list[str | None] = []
        for m in batch:
            try:
                out.append(self.generate(m, max_tokens))
            except ClientError as e:
                self.errors.append(str(e))
                out.append(None)
        return out

    def choice_probs(self, messages: Messages, choices: Sequence[str]) -> list[float] | None:
        """``P(choice)`` for each single-token choice as the answer's first token, normalised over ``choices``."""
        return None

    def choice_probs_many(self, batch: Sequence[Messages], choices: Sequence[str]) -> list[list[float] | None]:
        """:meth:`choice_probs` for each conversation, in order."""
        return [self.choice_probs(m, choices) for m in batch]

    @property
    def errors(self) -> list[str]:
        if not hasattr(self, "_errors"):
            self._errors: list[str] = []
        return self._errors


# ---- local transformers model ------------------------------------------------------------------
class TransformersClient(Client):
    """Greedy generation with a local causal LM; uses the tokenizer's chat template when it has one,
    else the messages' contents joined by blank lines. Prompts longer than the model's context are
    cut from the left (the instructions at the end survive)."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 64) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> TransformersClient:
        """Load a local directory, a Hub id, or ``demo`` (the shipped quirky model)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from intervene.assets import resolve_model_name

        path = resolve_model_name(name)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, tok, **kwargs)

    def render(self, messages: Messages) -> str:
        """The prompt text: the chat template with a generation prompt, or plain concatenation."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"].strip() for m in messages) + "\n"

    def _context(self) -> int:
        cfg = self.model.config
        for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(cfg, k, None):
                return int(getattr(cfg, k))
        return 2048

    def _ids(self, messages: Messages, room: int) -> torch.Tensor:
        text = self.render(messages)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        ids = self.tokenizer(text, add_special_tokens=not templated, return_tensors="pt", verbose=False)["input_ids"]
        keep = max(1, self._context() - room)
        return ids[:, -keep:].to(next(self.model.parameters()).device)

    @torch.no_grad()
    def generate(self, messages: Messages, max_tokens: int | None = None) -> str:
        n = min(int(max_tokens or self.max_new_tokens), self.max_new_tokens)
        ids = self._ids(messages, room=n)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def choice_probs(self, messages: Messages, choices: Sequence[str]) -> list[float] | None:
        ids = self._ids(messages, room=1)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
        first = []
        for c in choices:
            toks = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if not toks:
                return None
            first.append(toks[0])
        p = torch.softmax(logits[first], dim=0)
        return p.tolist()


# ---- OpenAI-compatible HTTP --------------------------------------------------------------------
class _RateLimiter:
    """At most ``rate`` request starts per second across threads (evenly spaced)."""

    def __init__(self, rate: float | None, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self.interval = 0.0 if not rate else 1.0 / float(rate)
        self.clock, self.sleep = clock, sleep
        self.lock = threading.Lock()
        self.next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = self.clock()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            self.sleep(start - now)


class OpenAIClient(Client):
    """Chat completions against an OpenAI-compatible endpoint (``{base_url}/chat/completions``), stdlib only.

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` (vLLM) or ``https://api.openai.com/v1``.
        model: the model name the server expects.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        max_retries: retries of 408/409/429/5xx answers and connection errors, with exponential
            backoff (``backoff * 2**attempt`` seconds, at most ``max_backoff``; a ``Retry-After``
            header wins when present).
        max_workers: concurrent requests in :meth:`generate_many`.
        requests_per_second: client-side rate limit shared by all threads (``None``: none).
    """

    RETRY_STATUS = (408, 409, 429)

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, max_retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 8.0, timeout: float = 60.0, max_workers: int = 4,
                 requests_per_second: float | None = None, temperature: float = 0.0,
                 extra_body: dict[str, Any] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.max_retries, self.backoff, self.max_backoff = int(max_retries), float(backoff), float(max_backoff)
        self.timeout, self.max_workers, self.temperature = float(timeout), int(max_workers), float(temperature)
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        self._limiter = _RateLimiter(requests_per_second, time.monotonic, sleep)
        self._lock = threading.Lock()
        self.n_requests = 0
        self.n_retries = 0

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps({"model": self.model, "temperature": self.temperature, **self.extra_body, **payload}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.n_retries += 1
            self._limiter.wait()
            with self._lock:
                self.n_requests += 1
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                last = f"HTTP {e.code}: {detail}"
                if e.code not in self.RETRY_STATUS and e.code < 500:
                    raise ClientError(f"{self.url}: {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last, retry_after = f"{type(e).__name__}: {e}", None
            if attempt < self.max_retries:
                wait = min(self.max_backoff, self.backoff * 2 ** attempt)
                try:
                    wait = min(self.max_backoff, float(retry_after)) if retry_after else wait
                except ValueError:
                    pass
                self._sleep(wait)
        raise ClientError(f"{self.url}: giving up after {self.max_retries + 1} attempts ({last})")

    def generate(self, messages: Messages, max_tokens: int = 256) -> str:
        out = self._post({"messages": messages, "max_tokens": int(max_tokens)})
        try:
            return out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise ClientError(f"{self.url}: malformed answer {str(out)[:200]}") from e

    def generate_many(self, batch: Sequence[Messages], max_tokens: int = 256) -> list[str | None]:
        def one(m: Messages) -> str | None:
            try:
                return self.generate(m, max_tokens)
            except ClientError as e:
                with self._lock:
                    self.errors.append(str(e))
                return None

        if self.max_workers <= 1 or len(batch) <= 1:
            return [one(m) for m in batch]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(one, batch))

    def choice_probs_many(self, batch: Sequence[Messages], choices: Sequence[str]) -> list[list[float] | None]:
        if self.max_workers <= 1 or len(batch) <= 1:
            return [self.choice_probs(m, choices) for m in batch]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda m: self.choice_probs(m, choices), batch))

    def choice_probs(self, messages: Messages, choices: Sequence[str]) -> list[float] | None:
        try:
            out = self._post({"messages": messages, "max_tokens": 1, "logprobs": True, "top_logprobs": 10})
            top = out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (ClientError, KeyError, IndexError, TypeError) as e:
            with self._lock:
                self.errors.append(f"choice_probs: {e}")
            return None
        import math

        mass = [0.0] * len(choices)
        for item in top:
            tok = str(item.get("token", "")).strip().lower()
            for i, c in enumerate(choices):
                if tok == c.strip().lower():
                    mass[i] += math.exp(float(item["logprob"]))
        total = sum(mass)
        return [m / total for m in mass] if total > 0 else None


def make_client(spec: str, model: str | None = None, api_key: str | None = None, **kwargs: Any) -> Client:
    """``local:MODEL`` (a directory, Hub id or ``demo``) or ``openai:URL`` (then ``model=`` names the model)."""
    kind, _, target = spec.partition(":")
    if kind == "local" and target:
        return TransformersClient.from_pretrained(target, **kwargs)
    if kind == "openai" and target:
        return OpenAIClient(target, model or "default", api_key=api_key, **kwargs)
    raise ClientError(f"unknown client {spec!r}: use local:MODEL or openai:URL")
