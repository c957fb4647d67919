"""A loopback test double of the Hugging Face Hub HTTP API (the part ``huggingface_hub`` 2.x uses).

Serves, for model repos, exactly what the real client calls for: ``create_repo``,
``create_branch``, ``list_repo_refs``, ``repo_info``/``model_info`` (``/api/models/{repo}[/revision/{rev}]``),
``list_repo_tree`` (used by ``snapshot_download``), the ``preupload`` and NDJSON ``commit``
endpoints (regular uploads only: every file is answered ``"regular"``, so neither LFS nor Xet is
involved), ``validate-yaml`` (README front matter), ``whoami-v2`` and file downloads
``/{repo}/resolve/{rev}/{path}`` (HEAD/GET with ``ETag``, ``X-Repo-Commit``, ``Content-Length``, ranges).
Errors carry the ``X-Error-Code`` headers (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) that make ``huggingface_hub`` raise its own typed errors.

State is in memory: repos -> commits (full file snapshots, 40-hex ids) and refs (branches).
Every request is logged in ``server.requests`` so tests can count commits or check tokens.
Binds 127.0.0.1 on a free port; nothing leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_API_OPS = ("revision", "tree", "preupload", "commit", "branch", "refs")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    """What git (and the Hub) call a regular file's oid: sha1 of ``blob {len}\\0{data}``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit
        self.extra = extra or {}


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit:
        sha = self.refs.get(rev, rev)
        if sha not in self.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return self.commits[sha]


class HubState:
    """Repos and their history; every mutation happens under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self._counter = itertools.count()

    def new_commit(self, repo: Repo, parent: Commit | None, message: str, files: dict[str, bytes]) -> Commit:
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_id}\0{next(self._counter)}\0{message}\0{parent.sha if parent else ''}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha(files[path]).encode())
        c = Commit(digest.hexdigest(), parent.sha if parent else None, message, dict(files),
                   datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
        repo.commits[c.sha] = c
        return c

    def repo(self, repo_id: str) -> Repo:
        r = self.repos.get(repo_id)
        if r is None:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return r


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response sets Content-Length
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read server.requests instead
        pass

    # ---- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        self.server.requests.append({"method": method, "path": url.path, "query": url.query,
                                     "authorization": self.headers.get("Authorization")})
        try:
            with self.server.state.lock:
                self._route(method, url.path, parse_qs(url.query), body)
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, json.dumps({"error": e.message, **e.extra}).encode(), headers, head=method == "HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # ---- routing -------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        state = self.server.state
        if path == "/api/whoami-v2" and method == "GET":
            return self._json(200, {"type": "user", "name": "intervene-tester", "fullname": "Test User",
                                    "orgs": [], "auth": {"accessToken": {"role": "write"}}})
        if path == "/api/agent-harnesses" and method == "GET":  # the client's agent detection
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path.startswith("/api/models/"):
            raw = path[len("/api/models/"):].split("/")
            repo_id, op, rest = self._split_api(raw)
            repo = state.repo(repo_id)
            return self._api(method, repo, op, rest, query, body)
        raw = path.lstrip("/").split("/")
        for n in (2, 1):  # "ns/name/resolve/..." or "name/resolve/..."
            if len(raw) > n + 1 and raw[n] == "resolve" and method in ("GET", "HEAD"):
                repo = state.repo("/".join(raw[:n]))
                return self._resolve(method, repo, unquote(raw[n + 1]), unquote("/".join(raw[n + 2:])))
        raise HubError(404, None, f"{method} {path} is not implemented by the test Hub")

    def _split_api(self, raw: list[str]) -> tuple[str, str | None, list[str]]:
        if len(raw) >= 3 and raw[2] in _API_OPS:
            return "/".join(raw[:2]), raw[2], raw[3:]
        if len(raw) == 2 and "/".join(raw) in self.server.state.repos:
            return "/".join(raw), None, []
        if len(raw) >= 2 and raw[1] in _API_OPS:
            return raw[0], raw[1], raw[2:]
        return "/".join(raw), None, []

    def _api(self, method: str, repo: Repo, op: str | None, rest: list[str], query: dict, body: bytes) -> None:
        if op is None and method == "GET":
            return self._json(200, self._info(repo, repo.resolve("main")))
        if op == "revision" and method == "GET":
            return self._json(200, self._info(repo, repo.resolve(unquote("/".join(rest)))))
        if op == "tree" and method == "GET":
            commit = repo.resolve(unquote(rest[0]) if rest else "main")
            prefix = unquote("/".join(rest[1:])).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(200, self._tree(commit, prefix, recursive))
        if op == "refs" and method == "GET":
            return self._json(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                                                  for b, s in sorted(repo.refs.items())], "tags": [], "converts": []})
        if op == "branch" and method == "POST":
            return self._create_branch(repo, unquote("/".join(rest)), json.loads(body or b"{}"))
        if op == "branch" and method == "DELETE":
            repo.refs.pop(unquote("/".join(rest)), None)
            return self._json(200, {})
        if op == "preupload" and method == "POST":
            commit = repo.resolve(unquote("/".join(rest)))
            files = json.loads(body)["files"]
            return self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha(commit.files[f["path"]]) if f["path"] in commit.files else None}
                for f in files]})
        if op == "commit" and method == "POST":
            if query.get("create_pr"):
                raise HubError(400, None, "the test Hub does not support pull requests")
            return self._commit(repo, unquote("/".join(rest)), body)
        raise HubError(404, None, f"{method} /api/models/{repo.repo_id}/{op} is not implemented by the test Hub")

    # ---- endpoints -----------------------------------------------------------------------------
    def _create_repo(self, payload: dict) -> None:
        if payload.get("type") not in (None, "model"):
            raise HubError(400, None, "the test Hub only hosts model repos")
        name, org = payload["name"], payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        state = self.server.state
        url = f"{self.server.url}/{repo_id}"
        if repo_id in state.repos:
            # the Hub answers 409 with the repo's url, which create_repo(exist_ok=True) returns
            raise HubError(409, None, "You already created this model repo", extra={"url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        first = state.new_commit(repo, None, "initial commit", {".gitattributes": _GITATTRIBUTES})
        repo.refs["main"] = first.sha
        state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.refs:
            raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.refs[branch] = start.sha
        self._json(200, {})

    def _validate_yaml(self, payload: dict) -> None:
        content: str = payload.get("content", "")
        errors = []
        if content.startswith("---") and content.find("\n---", 3) < 0:
            errors.append({"message": "README.md front matter is not closed by '---'"})
        self._json(200 if not errors else 400, {"errors": errors, "warnings": []})

    def _commit(self, repo: Repo, rev: str, body: bytes) -> None:
        if rev not in repo.refs:
            if rev in repo.commits:
                raise HubError(400, None, "commits can only be made to a branch")
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        head = repo.commits[repo.refs[rev]]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and parent != head.sha:
            raise HubError(412, None, f"parent commit {parent} is not the head of {rev}")
        files = dict(head.files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, None, "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            elif key != "header":
                raise HubError(400, None, f"the test Hub does not support {key!r} operations (LFS/Xet)")
        message = header.get("summary", "")
        commit = self.server.state.new_commit(repo, head, message, files)
        repo.refs[rev] = commit.sha
        self.server.commits.append((repo.repo_id, rev, commit.sha, message))
        self._json(200, {"commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{commit.sha}",
                         "commitOid": commit.sha, "pullRequestUrl": None})

    def _info(self, repo: Repo, commit: Commit) -> dict:
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
                "sha": commit.sha, "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "lastModified": commit.date, "createdAt": commit.date,
                "siblings": [{"rfilename": p, "size": len(d), "blobId": git_blob_sha(d)}
                             for p, d in sorted(commit.files.items())]}

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        base = f"{prefix}/" if prefix else ""
        paths = sorted(p for p in commit.files if p.startswith(base))
        if prefix and not paths:
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist", commit.sha)
        out, folders = [], set()
        for p in paths:
            rel = p[len(base):]
            if "/" in rel and not recursive:
                folders.add(base + rel.split("/", 1)[0])
                continue
            if recursive:
                parts = rel.split("/")[:-1]
                folders.update(base + "/".join(parts[: k + 1]) for k in range(len(parts)))
            data = commit.files[p]
            out.append({"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)})
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                for f in sorted(folders)]
        return out

    def _resolve(self, method: str, repo: Repo, rev: str, path: str) -> None:
        commit = repo.resolve(rev)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {rev}", commit.sha)
        headers = {"ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        status, rng = 200, self.headers.get("Range")
        if rng and rng.startswith("bytes=") and method == "GET":
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream", head=method == "HEAD")


class HubServer(ThreadingHTTPServer):
    """The server; ``start()`` serves from a daemon thread, ``url`` is its endpoint."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = HubState()
        self.requests: list[dict[str, Any]] = []
        self.commits: list[tuple[str, str, str, str]] = []  # (repo, branch, sha, message)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def reset(self) -> None:
        with self.state.lock:
            self.state.repos.clear()
            self.requests.clear()
            self.commits.clear()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """A repo's files at ``rev`` (for assertions)."""
        with self.state.lock:
            return dict(self.state.repo(repo_id).resolve(rev).files)


def patch_hub_client(monkeypatch: Any, url: str, home: Any) -> None:
    """Point ``huggingface_hub`` (and so ``transformers``) at ``url`` with a private cache in ``home``.

    ``huggingface_hub`` reads ``HF_ENDPOINT`` and the cache paths into ``constants`` at import
    time, so the environment alone is not enough: the constants are patched too.
    """
    import huggingface_hub.constants as C

    home = str(home)
    cache = f"{home}/hub"
    env = {"HF_ENDPOINT": url, "HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": "hf_intervene_test_token", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for name, value in {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HOME": home, "HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache,
                        "HF_TOKEN_PATH": f"{home}/token", "HF_STORED_TOKENS_PATH": f"{home}/stored_tokens",
                        "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False}.items():
        if hasattr(C, name):
            monkeypatch.setattr(C, name, value)
