"""The EleutherAI sparsify layout (``cfg.json`` + ``sae.safetensors``), read and written with sparsify's math.

From sparsify's ``SparseCoder`` / ``fused_encoder``: ``pre = relu((x - b_dec) @ encoder.weightᵀ + encoder.bias)``
(``b_dec`` is not subtracted for transcoders), then ``topk``: the ``k`` largest of ``pre``; or ``groupmax``: the
latents split into ``k`` contiguous groups of ``num_latents / k`` and the largest of each group kept. Decoding is
``z @ W_dec + b_dec`` (+ ``x @ W_skipᵀ`` with a skip connection). ``b_dec`` and ``W_skip`` have ``d_in`` rows, so
a sparsify SAE or transcoder always writes as wide as it reads.

Config keys: ``activation``, ``k``, ``num_latents`` / ``expansion_factor``, ``transcode``, ``skip_connection``
and ``d_in`` are read; ``normalize_decoder`` and ``multi_topk`` only steer training; ``hookpoint`` is ours.
Any other key is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from intervene.errors import SAEFormatError
from intervene.schemas.base import validate
from intervene.schemas.sae import SparsifyCfg

_READ = {"activation", "k", "num_latents", "expansion_factor", "transcode", "skip_connection", "d_in", "hookpoint",
         "intervene_site"}
_TRAINING_ONLY = {"normalize_decoder", "multi_topk",
                  "training"}  # "training": the provenance record examples/train_demo_sae.py adds


def parse_sparsify(t: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """SAE constructor arguments (plus ``transcoder`` and ``hook``) from sparsify tensors and config."""
    unknown = sorted(set(cfg) - _READ - _TRAINING_ONLY)
    if unknown:
        raise SAEFormatError(f"{where}: sparsify cfg.json keys {unknown} are not understood; refusing rather than "
                             "ignoring them")
    validate(SparsifyCfg, cfg, SAEFormatError, where)
    names = ("encoder.weight", "encoder.bias") if "encoder.weight" in t else ("W_enc", "b_enc")
    want = {*names, "W_dec", "b_dec"} | ({"W_skip"} if cfg.get("skip_connection") or "W_skip" in t else set())
    missing, extra = sorted(want - set(t)), sorted(set(t) - want)
    if missing or extra:
        raise SAEFormatError(f"{where}: sparsify SAE tensors: missing {missing}, not understood {extra}")
    W, b, W_dec, b_dec = t[names[0]], t[names[1]], t["W_dec"], t["b_dec"]
    d_sae = b.shape[0]
    # sparsify stores the encoder as nn.Linear: [d_sae, d_in]; our own older files may hold W_enc [d_in, d_sae].
    W_enc = W.T if names[0] == "encoder.weight" else W
    if W_enc.shape[1] != d_sae:
        raise SAEFormatError(f"{where}: encoder {tuple(W.shape)} does not match its bias [{d_sae}]")
    act = cfg.get("activation", "topk")
    # "relu" is not sparsify's: older intervene versions wrote it; kept readable, never written again.
    if act not in ("topk", "groupmax", "relu"):
        raise SAEFormatError(f"{where}: sparsify activation {act!r} is not supported (topk, groupmax)")
    k = int(cfg.get("k", 32)) if act != "relu" else None
    if act == "groupmax" and (k is None or k <= 0 or d_sae % k):
        raise SAEFormatError(f"{where}: groupmax needs num_latents ({d_sae}) divisible by k ({k})")
    n_lat = cfg.get("num_latents") or 0
    if n_lat and int(n_lat) != d_sae:
        raise SAEFormatError(f"{where}: cfg.json says num_latents={n_lat} but the encoder has {d_sae}")
    if not n_lat and cfg.get("expansion_factor") is not None and int(cfg["expansion_factor"]) * W_enc.shape[0] != d_sae:
        raise SAEFormatError(f"{where}: expansion_factor={cfg['expansion_factor']} with d_in={W_enc.shape[0]} "
                             f"does not give the encoder's {d_sae} latents")
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != W_enc.shape[0]:
        raise SAEFormatError(f"{where}: cfg.json says d_in={cfg['d_in']} but the encoder has {W_enc.shape[0]}")
    transcode = bool(cfg.get("transcode", False))
    return dict(W_enc=W_enc, b_enc=b, W_dec=W_dec, b_dec=b_dec, activation=act, k=k,
                apply_b_dec_to_input=not transcode and W_dec.shape[1] == W_enc.shape[0],
                W_skip=t.get("W_skip"), transcoder=transcode, hook=cfg.get("hookpoint"),
                input_hook=cfg.get("intervene_site"))


def sparsify_files(sae: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and ``cfg.json`` that sparsify loads into the same map; ``SAEFormatError`` where it has none."""
    if sae.activation not in ("topk", "groupmax"):
        raise SAEFormatError(f"sparsify has only top-k and groupmax SAEs, not {sae.activation!r}; save with "
                             "layout='saelens'")
    if sae.d_out != sae.d_in:
        raise SAEFormatError(f"sparsify SAEs write as wide as they read (d_out {sae.d_out} != d_in {sae.d_in})")
    if sae.apply_b_dec_to_input == sae.is_transcoder:
        raise SAEFormatError("sparsify subtracts b_dec from the input exactly when the SAE is not a transcoder; "
                             f"this one has apply_b_dec_to_input={sae.apply_b_dec_to_input}")
    tensors = {"encoder.weight": sae.W_enc.T, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    cfg = {"activation": sae.activation, "expansion_factor": max(1, sae.d_sae // sae.d_in), "normalize_decoder": True,
           "num_latents": sae.d_sae, "k": sae.k, "multi_topk": False, "skip_connection": sae.W_skip is not None,
           "transcode": sae.is_transcoder, "d_in": sae.d_in, "hookpoint": sae.output_site or sae.site}
    if sae.is_transcoder and sae.site:
        cfg["intervene_site"] = sae.site  # sparsify names only the module a transcoder replaces
    return tensors, cfg
