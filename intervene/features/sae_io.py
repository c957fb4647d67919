"""Where SAE files come from and go: local folders, Hub repos, the shipped demo SAE; saving in either layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from intervene.features.sae import (
    CFG_NAME,
    DEMO_SAE_ALIASES,
    DEMO_SAE_DIR,
    SAE,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    SAEFormatError,
    load_sae_folder,
)
from intervene.fileio import atomic_write, atomic_write_bytes, dir_lock, sweep_temporaries


def load_sae(name: str | Path, site: str | None = None, *, hookpoint: str | None = None,
             model: nn.Module | None = None, output_site: str | None = None, revision: str | None = None,
             token: str | bool | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from a local folder, a Hub repo (``owner/name``), or ``"demo"`` (the shipped one).

    Args:
        name: folder, Hub repo id, or ``demo``.
        site: our site name it reads (``layers.6``); defaults to the SAE's ``hook_name`` (SAELens,
            TransformerLens names translated) or its sparsify hookpoint folder name.
        hookpoint: subfolder of a multi-SAE folder or repo (sparsify: ``layers.6``; SAELens: the
            folder holding ``cfg.json``). Defaults to ``site`` when the root has no ``cfg.json``.
        model: when given, the site and widths are checked against it (``SAEFormatError`` on mismatch); SAELens
            hooks that are module paths (``hook_resid_mid``, ``hook_mlp_in``, ``ln2.hook_normalized``) need it.
        revision, token: for Hub repos (passed to ``huggingface_hub.snapshot_download``).
    """
    source = str(name)
    if source in DEMO_SAE_ALIASES:
        name = DEMO_SAE_DIR
        if not (DEMO_SAE_DIR / CFG_NAME).is_file():
            raise SAEFormatError(f"the demo SAE is missing from {DEMO_SAE_DIR}; rebuild it with "
                                 "examples/train_demo_sae.py")
    path = Path(name).expanduser()
    if not path.exists():
        path = _download(str(name), hookpoint or site, revision, token)
    folder = _pick_folder(path, hookpoint or site, source)
    _inside(path, folder)
    sae = load_sae_folder(folder, site=site, output_site=output_site, dtype=dtype, device=device,
                          source=source, hookpoint=hookpoint, model=model)
    if model is not None:
        sae.check_model(model)
    return sae


def _inside(path: Path, folder: Path) -> None:
    """The chosen SAE folder must be the given directory or inside it (a symlinked subfolder may not lead out)."""
    import os

    top, real = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real != top and top not in real.parents:
        raise SAEFormatError.at(folder, None, f"an SAE folder inside {path}", note=f"it leads to {real}")


def _pick_folder(path: Path, sub: str | None, source: str) -> Path:
    if path.is_file():
        raise SAEFormatError(f"{path} is a file; pass the folder that holds {CFG_NAME} and the weights")
    if sub is not None and ("\0" in sub or ".." in Path(sub).parts or Path(sub).is_absolute()):
        raise SAEFormatError.at(path, "hookpoint", "a subfolder name inside the SAE directory", sub)
    if sub is not None and (path / sub / CFG_NAME).is_file() and not (path / CFG_NAME).is_file():
        return path / sub
    if (path / CFG_NAME).is_file() or any(path.glob("*.safetensors")):
        return path
    candidates = sorted(p.parent.relative_to(path).as_posix() for p in path.rglob(CFG_NAME))
    if len(candidates) == 1 and sub is None:
        return path / candidates[0]
    hint = f" (no {sub!r} among them)" if sub else "; pass hookpoint=... or site=..."
    raise SAEFormatError(f"{source} holds several or no SAEs: {candidates or 'none'}{hint}")


def _download(repo_id: str, sub: str | None, revision: str | None, token: str | bool | None) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise SAEFormatError(f"no SAE folder at {repo_id!r} (and it is not a Hub repo id 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    pats = [CFG_NAME, "*.safetensors"]
    if sub:
        pats += [f"{sub}/{CFG_NAME}", f"{sub}/*.safetensors"]
    try:
        # Only configs and weights: repos of many SAEs can be large, so fetch the one asked for
        # (plus the root's files, which are small when the root is not itself an SAE).
        local = snapshot_download(repo_id, revision=revision, token=token,
                                  allow_patterns=pats if sub else [CFG_NAME, "*.safetensors", f"*/{CFG_NAME}"])
    except RevisionNotFoundError as e:
        raise SAEFormatError(f"Hub repo {repo_id!r} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise SAEFormatError(f"no Hub repo {repo_id!r} (or no access to it: pass token=...)") from e
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        raise SAEFormatError(f"could not fetch {repo_id!r} (offline and not cached?): {e}") from e
    local_path = Path(local)
    if sub is None and not (local_path / CFG_NAME).is_file():
        subs = sorted(p.parent.name for p in local_path.glob(f"*/{CFG_NAME}"))
        if len(subs) == 1:
            return _download(repo_id, subs[0], revision, token)
    return local_path


def save_sae(sae: SAE, folder: str | Path, layout: Literal["sparsify", "saelens"] | None = None) -> Path:
    """Write ``sae`` as ``cfg.json`` + weights in the sparsify or SAELens layout, such that that library loads the
    same map (checked against both in the tests). The site goes into ``hookpoint`` / ``hook_name`` (TransformerLens
    names for SAELens). A layout that cannot express the SAE is refused with ``SAEFormatError`` (sparsify has only
    top-k / groupmax SAEs that write as wide as they read; SAELens has no groupmax, no top-k transcoder).
    ``layout=None`` picks sparsify for top-k / groupmax SAEs sparsify can express, else SAELens.
    """
    from safetensors.torch import save_file

    from intervene.features.saelens import saelens_files
    from intervene.features.sparsify import sparsify_files

    if layout is None:
        try:
            sparsify_files(sae)
            layout = "sparsify"
        except SAEFormatError:
            layout = "saelens"
    if layout not in ("sparsify", "saelens"):
        raise SAEFormatError(f"unknown layout {layout!r}: 'sparsify' or 'saelens'")
    tensors, cfg = sparsify_files(sae) if layout == "sparsify" else saelens_files(sae)
    wname = SPARSIFY_WEIGHTS if layout == "sparsify" else SAELENS_WEIGHTS
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(cfg, indent=2) + "\n"
    with dir_lock(folder, exclusive=True):
        sweep_temporaries(folder, (wname, CFG_NAME))
        atomic_write(folder / wname, lambda tmp: save_file(clean, tmp))
        atomic_write_bytes(folder / CFG_NAME, text)
    return folder
