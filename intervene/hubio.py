"""Hub transport for diffs through the real ``huggingface_hub`` client: fetch one, upload a folder.

Part of the core because ``Intervenable.load("user/repo", model)`` and ``ivm.push_to_hub`` are: it knows
the diff's file names and nothing else. Publishing baked models (cards, stale weights) is
:mod:`intervene.publish`. Downloads honour ``revision``, ``token`` and the usual cache /
``HF_ENDPOINT`` / offline settings; uploads go in one commit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intervene.cards import diff_card
from intervene.diff_format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, read_config, save_diff
from intervene.errors import DiffFormatError, DiffNotFoundError

if TYPE_CHECKING:
    from torch import nn

    from intervene.intervention import Intervention


OFFLINE_HINT = "the Hub could not be reached to look for a repo of that name"


def looks_like_path(name: str) -> bool:
    """``name`` can only be a local path, never a Hub id (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, ``x/``)."""
    return (name.startswith((".", "/", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1
            or name.strip() != name or " " in name)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_hub_file(repo_id: str, filename: str, what: str, revision: str | None = None,
                   token: str | bool | None = None) -> None:
    """Raise a one-line ``FileNotFoundError`` unless ``repo_id`` (not a local directory) is a Hub repo
    holding ``filename`` -- in the local cache, or by one request without retries.

    Called before transformers' or snapshot_download's own lookups, which retry a name that is not on
    the Hub for tens of seconds when the network is down and then answer with a page of traceback.
    """
    if looks_like_path(repo_id):
        raise FileNotFoundError(f"no such {what} directory: {repo_id}")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
            return
    except HFValidationError:
        raise FileNotFoundError(f"no such {what} directory: {repo_id} (nor is it a valid Hub repo id)") from None
    if _offline():
        raise FileNotFoundError(f"no such {what} directory: {repo_id} (HF_HUB_OFFLINE is set and the Hub cache "
                                "has no repo of that name)")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), token=token, timeout=10)
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no such {what} directory or Hub repo: {repo_id} (for a private or gated "
                                "repo, log in: `hf auth login` or HF_TOKEN)") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id} has no {filename}: it is not a {what}") from None
    except Exception as e:  # noqa: BLE001 -- connection errors of whichever HTTP client is installed
        if getattr(getattr(e, "response", None), "status_code", None) is not None:
            raise
        raise FileNotFoundError(f"no such {what} directory: {repo_id}, and {OFFLINE_HINT} "
                                f"({type(e).__name__}; offline?)") from None


def resolve_diff_dir(repo_or_dir: str | Path, revision: str | None = None, token: str | bool | None = None) -> Path:
    """A local directory holding the diff: ``repo_or_dir`` itself, or a Hub snapshot of it."""
    path = Path(repo_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DiffFormatError(f"{path} is a file; a diff is a directory holding {CONFIG_NAME}")
    repo_id = str(repo_or_dir)
    if looks_like_path(repo_id):
        raise DiffNotFoundError(f"no such diff directory: {repo_id} (a diff is a folder written by save_pretrained "
                                "or `intervene ... fit`, or a Hub repo id)")
    if _offline():
        try:  # a diff fetched before is in the cache; anything else cannot be a Hub repo now
            return _snapshot(repo_id, revision, token)
        except DiffNotFoundError:
            raise DiffNotFoundError(f"no such diff directory: {repo_id} (HF_HUB_OFFLINE is set and the Hub "
                                    "cache has no repo of that name)") from None
    return _snapshot(repo_id, revision, token)


def _snapshot(repo_id: str, revision: str | None, token: str | bool | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        local = snapshot_download(repo_id, revision=revision, token=token,
                                  allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    except RevisionNotFoundError as e:
        raise DiffNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise DiffNotFoundError(f"no diff directory {repo_id!r} and no Hub repo {repo_id!r} (or no access to it: "
                                "pass token=... or log in with `hf auth login`)") from e
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        raise DiffNotFoundError(f"no such diff directory: {repo_id}, and {OFFLINE_HINT} (offline, and it is not "
                                "in the Hub cache)") from e
    snapshot = Path(local)
    if not (snapshot / CONFIG_NAME).is_file():
        raise DiffNotFoundError(f"Hub repo {repo_id!r} (revision {revision or 'main'}) has no {CONFIG_NAME}: "
                                "it is not an intervene diff")
    return snapshot


def upload_dir(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
               commit_message: str | None = None, revision: str | None = None, create_repo: bool = True,
               delete_stale: tuple[str, ...] = ()) -> Any:
    """Upload every file under ``folder`` to ``repo_id`` as exactly one commit.

    Uses ``create_commit`` rather than ``upload_folder``: with ``hf_xet`` installed the latter may
    split a large folder into several commits. Creates the repo and, for ``revision``, the branch
    (from ``main``) when missing. Remote files matching ``delete_stale`` (glob patterns) that this
    upload does not replace are deleted in the same commit (e.g. old weight shards, which
    ``from_pretrained`` would otherwise still pick up). Returns the ``CommitInfo``.
    """
    import fnmatch

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != "main" and not revision.startswith("refs/") \
            and not _is_commit_hash(revision):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    ops: list[Any] = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                      for p in sorted(folder.rglob("*")) if p.is_file()]
    if delete_stale:
        new = {op.path_in_repo for op in ops}
        remote = api.list_repo_files(repo_id, revision=revision)
        ops += [CommitOperationDelete(path_in_repo=f) for f in remote
                if f not in new and any(fnmatch.fnmatchcase(f, pat) for pat in delete_stale)]
    return api.create_commit(repo_id, operations=ops, revision=revision,
                             commit_message=commit_message or f"Upload {len(ops)} files with intervene")


def _is_commit_hash(rev: str) -> bool:
    return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


def push_diff(model: nn.Module, interventions: Sequence[Intervention], repo_id: str,
              metadata: Mapping[str, Any] | None = None, private: bool = False, token: str | None = None,
              commit_message: str | None = None, revision: str | None = None, create_repo: bool = True) -> Any:
    """Save ``interventions`` (fitted on ``model``) as a diff with a card and upload it to ``repo_id``
    (branch ``revision``) as one commit; returns the ``CommitInfo``."""
    with tempfile.TemporaryDirectory() as tmp:
        d = save_diff(Path(tmp), model, list(interventions), metadata, card=False)
        (d / CARD_NAME).write_text(diff_card(read_config(d), repo_id=repo_id))
        return upload_dir(tmp, repo_id, private=private, token=token, revision=revision, create_repo=create_repo,
                          commit_message=commit_message or "Upload intervene diff")
