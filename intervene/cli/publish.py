"""``intervene bake MODEL DIFF --out DIR [--push REPO]`` and ``intervene push DIFF REPO``."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bake", help="write a diff into a copy of the model's weights (exact, or refused)",
                              description="Bake a diff into the weights: the result loads with vanilla "
                                          "AutoModelForCausalLM.from_pretrained and gives the hooked logits.")
    p.add_argument("model", help="base model: local directory, Hub id, or 'demo'")
    p.add_argument("diff", help="intervene diff: directory or Hub repo")
    p.add_argument("--out", required=True, help="directory to save the baked model to")
    p.add_argument("--push", metavar="REPO", help="also upload the baked model to this Hub repo (one commit)")
    p.add_argument("--revision", help="revision of the diff on the Hub")
    p.add_argument("--push-revision", help="branch to push to (created from main if missing)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto", help="dtype to load and bake the model in")
    p.add_argument("--private", action="store_true", help="create the pushed repo as private")
    p.add_argument("--token", help="Hub token (default: the logged-in one)")
    p.set_defaults(func=run_bake)

    q = subparsers.add_parser("push", help="upload a diff directory to the Hub as one commit")
    q.add_argument("diff", help="diff directory (intervene_config.json + intervene_weights.safetensors)")
    q.add_argument("repo", help="Hub repo id, e.g. user/steer-truth")
    q.add_argument("--revision", help="branch to push to (created from main if missing)")
    q.add_argument("--private", action="store_true", help="create the repo as private")
    q.add_argument("--token", help="Hub token (default: the logged-in one)")
    q.add_argument("--message", help="commit message")
    q.set_defaults(func=run_push)


def resolve_model(name: str) -> str:
    """``demo`` -> the shipped demo model's directory (when that module is present); else ``name``."""
    try:
        from intervene.assets import resolve_model_name
    except ImportError:
        return name
    return resolve_model_name(name)


def _load_model(name: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(name, **({"dtype": "auto"} | kw)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # a model directory without a tokenizer bakes fine
    return model, tokenizer


def run_bake(args: argparse.Namespace) -> int:
    from intervene.bake import bake_with_report
    from intervene.errors import InterveneError
    from intervene.hubio import upload_dir
    from intervene.intervenable import Intervenable
    from intervene.publish import STALE_WEIGHTS, save_baked

    try:
        model, tokenizer = _load_model(resolve_model(args.model), args.dtype)
        ivm = Intervenable.load(args.diff, model, revision=args.revision, token=args.token, attach=False)
        baked, report = bake_with_report(ivm.model, ivm.interventions)
        out = save_baked(baked, report, args.out, tokenizer=tokenizer, metadata=ivm.metadata, repo_id=args.push)
    except InterveneError as e:
        print(f"intervene bake: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    flags = ", ".join(f"{k}={v}" for k, v in report.config_flags.items()) or "none"
    print(f"baked {len(report.interventions)} intervention(s) into {out}: {len(report.edited)} tensor(s) edited, "
          f"{len(report.created)} bias(es) created, config flags: {flags}")
    if args.push:
        info = upload_dir(out, args.push, private=args.private, token=args.token, revision=args.push_revision,
                          commit_message="Upload model with baked interventions (intervene)", delete_stale=STALE_WEIGHTS)
        print(f"pushed to {args.push} ({getattr(info, 'oid', info)})")
    return 0


def run_push(args: argparse.Namespace) -> int:
    from intervene.cards import diff_card
    from intervene.command import one_line
    from intervene.diff_format import (
        CARD_NAME,
        CONFIG_NAME,
        WEIGHTS_NAME,
        committed_weights,
        read_config,
        read_weights,
    )
    from intervene.errors import InterveneError
    from intervene.hubio import upload_dir

    src = Path(args.diff)
    try:
        config = read_config(src)  # a diff, not some other folder: checked before anything is uploaded
        read_weights(src)
        weights = committed_weights(src)
    except InterveneError as e:
        print(f"intervene push: error: {one_line(e)}", file=sys.stderr)
        return 1
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
