"""A loopback OpenAI-compatible chat-completions server with a deterministic canned policy (tests only).

``POST /v1/chat/completions`` answers (``POST /v1/embeddings`` gives hashed bag-of-words vectors):

* explanation prompts (they contain ``<<marked>>`` tokens and ask what they have in common) with
  ``[EXPLANATION]: the word "X"``, X the most often marked token;
* intruder prompts with the example whose marks miss the most-marked word; simulation prompts with 10 on
  tokens equal to the explained word X, else 0;
* scoring prompts (``Explanation: ... the word "X"`` then ``Snippet i: ...`` lines): 1 for a snippet
  containing X (detection), or whose marked tokens are all X (when the system prompt is about
  marked tokens: fuzzing); one digit, or a list for several snippets. With ``logprobs`` it also
  returns ``top_logprobs`` for "1"/"0" (0.9 / 0.1 for the chosen answer).

``fail_next(n, status)`` makes the next ``n`` requests fail with ``status`` (429 carries
``Retry-After: 0``); ``delay`` slows every answer; ``max_inflight`` and ``arrivals`` record
concurrency and timing. Binds 127.0.0.1 on a free port; nothing leaves the machine.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_MARK = re.compile(r"<<(.*?)>>")
_WORD = re.compile(r'the word "([^"]+)"')
_SNIPPET = re.compile(r"^Snippet \d+: (.*)$", re.MULTILINE)


def canned_answer(messages: list[dict[str, str]]) -> tuple[str, list[int] | None]:
    """The policy: ``(text, per-snippet answers or None)``."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = "\n".join(m["content"] for m in messages if m["role"] == "user")
    if "intruder" in system:  # the example whose marks miss the word most examples mark
        marks = [set(w.strip() for span in _MARK.findall(line) for w in span.split())
                 for line in re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)]
        common = Counter(w for m in marks for w in m).most_common(1)
        odd = next((i for i, m in enumerate(marks) if common and common[0][0] not in m), 0)
        return f"They share one word.\n[RESPONSE]: {odd}", None
    if "predict how strongly" in system:  # 10 on the explained word, 0 elsewhere
        m = _WORD.search(user)
        toks = [json.loads(t) for t in re.findall(r"^\d+\t(.*)$", user, re.MULTILINE)]
        return json.dumps([10 if m and t.strip() == m.group(1) else 0 for t in toks]), None
    if "Explanation:" not in user:
        marked = Counter(w.strip() for w in _MARK.findall(user) for w in w.split() if w.strip())
        word = marked.most_common(1)[0][0] if marked else "nothing"
        return f'The marked tokens are all the same word.\n[EXPLANATION]: the word "{word}"', None
    m = _WORD.search(user.split("\n", 1)[0])
    word = m.group(1) if m else None
    fuzzing = "marked" in system
    answers = []
    for snippet in _SNIPPET.findall(user):
        if word is None:
            answers.append(0)
        elif fuzzing:
            marks = [w for span in _MARK.findall(snippet) for w in span.split()]
            answers.append(int(bool(marks) and all(w == word for w in marks)))
        else:
            answers.append(int(word in re.findall(r"\w+", snippet)))
    text = str(answers[0]) if len(answers) == 1 else json.dumps(answers)
    return text, answers


_INSTRUCTION = set("instruct retrieve sentences that could be related to the explanation query word".split())


def bag_of_words(text: str, dim: int = 64) -> list[float]:
    """``/v1/embeddings``: counts of the text's words (less the retrieval instruction's) hashed into ``dim`` bins."""
    import zlib

    vec = [0.0] * dim
    for w in re.findall(r"[a-z]+", text.lower()):
        if w not in _INSTRUCTION:
            vec[zlib.crc32(w.encode()) % dim] += 1.0
    return vec


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        srv = self.server
        payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with srv.lock:
            srv.arrivals.append(time.monotonic())
            srv.requests.append({"payload": payload, "auth": self.headers.get("Authorization")})
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
            fail = srv.failures.pop(0) if srv.failures else None
        try:
            if srv.delay:
                time.sleep(srv.delay)
            status, body, headers = self._answer(payload, fail)
        finally:
            # Counted as finished before the reply leaves: once the client reads it, its worker may send
            # the next request at once, which must not look like one request too many in flight.
            with srv.lock:
                srv.inflight -= 1
        self._send(status, body, headers)

    def _answer(self, payload: dict[str, Any], fail: int | None) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        if self.path.rstrip("/") == "/v1/embeddings" and fail is None:
            data = [{"object": "embedding", "index": i, "embedding": bag_of_words(t)}
                    for i, t in enumerate(payload.get("input", []))]
            return 200, {"object": "list", "data": data[::-1], "model": payload.get("model")}, None  # any order
        if self.path.rstrip("/") != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {self.path}"}}, None
        if fail is not None:
            return fail, {"error": {"message": f"injected {fail}"}}, {"Retry-After": "0"} if fail == 429 else None
        text, answers = canned_answer(payload.get("messages", []))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}
        if payload.get("logprobs"):
            p1 = 0.9 if answers and answers[0] == 1 else 0.1
            top = [{"token": "1", "logprob": math.log(p1)}, {"token": "0", "logprob": math.log(1 - p1)}]
            choice["logprobs"] = {"content": [{"token": text[:1], "logprob": math.log(max(p1, 1 - p1)),
                                               "top_logprobs": top}]}
        return 200, {"id": "chatcmpl-test", "object": "chat.completion", "model": payload.get("model"),
                     "choices": [choice]}, None


class OpenAIServer(ThreadingHTTPServer):
    """``start()`` serves from a daemon thread; ``url`` is the base URL (``.../v1``)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.failures: list[int] = []
        self.requests: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.delay = 0.0
        self.inflight = 0
        self.max_inflight = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def fail_next(self, n: int, status: int) -> None:
        with self.lock:
            self.failures += [status] * n

    def reset(self) -> None:
        with self.lock:
            self.failures.clear()
            self.requests.clear()
            self.arrivals.clear()
            self.delay, self.inflight, self.max_inflight = 0.0, 0, 0

    def start(self) -> OpenAIServer:
        threading.Thread(target=self.serve_forever, name="test-openai", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
