"""``intervene bake MODEL DIFF --out DIR [--push REPO]`` and ``intervene push DIFF REPO``."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from intervene.command import LOGIN_HINT, MODEL_HELP, add_progress_argument, guard, progress_of

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: Any) -> None:
    """Add ``bake`` and ``push`` to the ``intervene`` command."""
    p = subparsers.add_parser("bake", help="write a diff into a copy of the model's weights (exact, or refused)",
                              description="Bake a diff into the weights: the result loads with vanilla "
                                          "AutoModelForCausalLM.from_pretrained and gives the hooked logits. "
                                          "Edits that cannot be exact are refused, with the reason.")
    p.add_argument("model", help=f"the base model: {MODEL_HELP}")
    p.add_argument("diff", help="the intervene diff: a directory (e.g. written by `iti fit`) or a Hub repo id")
    p.add_argument("--out", required=True, help="directory to save the baked model to")
    p.add_argument("--push", metavar="REPO", help="also upload the baked model to this Hub repo (one commit)")
    p.add_argument("--revision", help="revision of the diff on the Hub")
    p.add_argument("--push-revision", help="branch to push to (created from main if missing)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="dtype to load and bake the model in (default auto)")
    p.add_argument("--private", action="store_true", help="create the pushed repo as private")
    p.add_argument("--token", help="Hub token (default: the logged-in one, or HF_TOKEN)")
    add_progress_argument(p)
    p.set_defaults(func=guard(run_bake))

    q = subparsers.add_parser("push", help="upload a diff directory to the Hugging Face Hub as one commit",
                              description="Upload a diff directory (intervene_config.json, "
                                          "intervene_weights.safetensors and its README.md card; a card is written "
                                          "if missing) to a Hub repo as one commit. Needs a Hub token.")
    q.add_argument("diff", help="diff directory (intervene_config.json + intervene_weights.safetensors)")
    q.add_argument("repo", help="Hub repo id, e.g. user/steer-truth (created if missing)")
    q.add_argument("--revision", help="branch to push to (created from main if missing)")
    q.add_argument("--private", action="store_true", help="create the repo as private")
    q.add_argument("--token", help="Hub token (default: the logged-in one, or HF_TOKEN)")
    q.add_argument("--message", help="commit message (default: 'Upload intervene diff')")
    q.set_defaults(func=guard(run_push))


def resolve_model(name: str) -> str:
    """``demo`` -> the shipped demo model's directory; a missing directory or Hub repo: one-line error."""
    from intervene.assets import model_source

    return model_source(name)


def require_token(token: str | None) -> None:
    """Fail before any work when no Hub token is available (an upload would fail after it)."""
    if token:
        return
    from huggingface_hub import get_token

    if not get_token():
        raise PermissionError(f"pushing needs a Hugging Face Hub token and none is set: {LOGIN_HINT}")


def _load_model(name: str, dtype: str, progress: bool = True) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intervene.assets import quiet_loading

    kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    with quiet_loading(progress):
        model = AutoModelForCausalLM.from_pretrained(name, **({"dtype": "auto"} | kw)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # a model directory without a tokenizer bakes fine
    return model, tokenizer


def run_bake(args: argparse.Namespace) -> int:
    from intervene.bake import bake_with_report
    from intervene.hubio import resolve_diff_dir, upload_dir
    from intervene.intervenable import Intervenable
    from intervene.publish import STALE_WEIGHTS, save_baked

    if args.push:
        require_token(args.token)
    diff = resolve_diff_dir(args.diff, revision=args.revision, token=args.token)  # before the (slow) model
    model, tokenizer = _load_model(resolve_model(args.model), args.dtype, progress_of(args))
    ivm = Intervenable.load(diff, model, attach=False)
    baked, report = bake_with_report(ivm.model, ivm.interventions)
    out = save_baked(baked, report, args.out, tokenizer=tokenizer, metadata=ivm.metadata, repo_id=args.push)
    flags = ", ".join(f"{k}={v}" for k, v in report.config_flags.items()) or "none"
    print(f"baked {len(report.interventions)} intervention(s) into {out}: {len(report.edited)} tensor(s) edited, "
          f"{len(report.created)} bias(es) created, config flags: {flags}. It loads with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}).")
    if args.push:
        info = upload_dir(out, args.push, private=args.private, token=args.token, revision=args.push_revision,
                          commit_message="Upload model with baked interventions (intervene)", delete_stale=STALE_WEIGHTS)
        print(f"pushed to {args.push} ({getattr(info, 'oid', info)})")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from intervene.cards import diff_card
    from intervene.diff_format import (
        CARD_NAME,
        CONFIG_NAME,
        WEIGHTS_NAME,
        committed_weights,
        read_config,
        read_weights,
    )
    from intervene.hubio import upload_dir

    src = Path(args.diff)
    if not src.is_dir():
        raise FileNotFoundError(f"no such diff directory: {args.diff}")
    config = read_config(src)  # a diff, not some other folder: checked before anything is uploaded
    read_weights(src)
    weights = committed_weights(src)
    require_token(args.token)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(src / CONFIG_NAME, Path(tmp) / CONFIG_NAME)
        shutil.copy2(weights, Path(tmp) / WEIGHTS_NAME)  # the checked file (a killed save's may be staged)
        card = src / CARD_NAME
        if card.is_file():
            shutil.copy2(card, Path(tmp) / CARD_NAME)
        else:
            (Path(tmp) / CARD_NAME).write_text(diff_card(config, repo_id=args.repo))
        info = upload_dir(tmp, args.repo, private=args.private, token=args.token, revision=args.revision,
                          commit_message=args.message or "Upload intervene diff")
    print(f"pushed {src} to {args.repo} ({getattr(info, 'oid', info)})")
    return 0
