"""Sparse autoencoders and transcoders in the two common on-disk layouts, attached to a site.

Layouts read (looked up in the libraries' own loaders, not guessed):

* **EleutherAI sparsify** (and its predecessor ``sae``): a folder with ``cfg.json`` (``d_in``,
  ``k``, ``num_latents`` / ``expansion_factor``, ``activation``, ``transcode``, ``skip_connection``)
  and ``sae.safetensors`` with ``encoder.weight`` ``[d_sae, d_in]``, ``encoder.bias`` ``[d_sae]``,
  ``W_dec`` ``[d_sae, d_out]``, ``b_dec`` ``[d_out]`` and optionally ``W_skip`` ``[d_out, d_in]``.
  Encoding is ``topk(relu((x - b_dec) @ W_encᵀ + b_enc))`` (``b_dec`` is not subtracted for
  transcoders). Hub repos hold one such folder per hookpoint (``layers.6/``, ``layers.6.mlp/``);
  sparsify's hookpoint names coincide with our site names.
* **SAELens**: ``cfg.json`` (``d_in``, ``d_sae``, ``architecture`` in ``standard`` / ``jumprelu`` /
  ``topk`` / ``transcoder`` / ``jumprelu_transcoder`` / ``skip_transcoder``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``hook_name`` at the top level or under ``meta`` / ``metadata``) and
  ``sae_weights.safetensors`` with ``W_enc`` ``[d_in, d_sae]``, ``b_enc``, ``W_dec`` ``[d_sae, d_out]``,
  ``b_dec`` and, for JumpReLU, ``threshold`` ``[d_sae]``.

Decoders are linear (``z @ W_dec + b_dec``, plus ``x @ W_skipᵀ`` for skip transcoders), which is
what makes the exact latent clamp of :mod:`intervene.methods.sae_clamp.intervention` possible.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from intervene.errors import SAEFormatError, SiteError

Activation = Literal["relu", "jumprelu", "topk"]
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CFG_NAME = "cfg.json"
DEMO_SAE_DIR = Path(__file__).resolve().parent.parent / "assets" / "quirky-tiny-sae"
DEMO_SAE_ALIASES = ("demo", "quirky-tiny-sae")


class SAE(nn.Module):
    """A sparse autoencoder (or transcoder) with a linear decoder, attached to a site name.

    Tensors (buffers, so ``.to()`` moves them): ``W_enc`` ``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``,
    ``W_dec`` ``[d_sae, d_out]``, ``b_dec`` ``[d_out]``, optional ``threshold`` ``[d_sae]`` (JumpReLU)
    and ``W_skip`` ``[d_out, d_in]``. ``d_out == d_in`` for autoencoders.

    Args:
        activation: ``"relu"``, ``"jumprelu"`` (``relu(pre) * (pre > threshold)``) or ``"topk"``
            (the ``k`` largest of ``relu(pre)``).
        site: where it reads (``layers.6``, ``layers.6.mlp``...); ``output_site`` where a transcoder
            writes (``None`` for autoencoders: they write back where they read).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (autoencoders).
    """

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 activation: Activation = "relu", k: int | None = None, threshold: torch.Tensor | None = None,
                 site: str | None = None, output_site: str | None = None, apply_b_dec_to_input: bool = True,
                 W_skip: torch.Tensor | None = None, source: str | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        d_in, d_sae = W_enc.shape
        if b_enc.shape != (d_sae,) or W_dec.ndim != 2 or W_dec.shape[0] != d_sae or b_dec.shape != (W_dec.shape[1],):
            raise SAEFormatError(
                f"inconsistent SAE shapes: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)} (want [d_in, d_sae], [d_sae], "
                "[d_sae, d_out], [d_out])")
        if activation not in ("relu", "jumprelu", "topk"):
            raise SAEFormatError(f"unknown SAE activation {activation!r}; supported: relu, jumprelu, topk")
        if activation == "topk" and (k is None or not 0 < int(k) <= d_sae):
            raise SAEFormatError(f"a top-k SAE needs 0 < k <= d_sae={d_sae}, got k={k}")
        if activation == "jumprelu" and (threshold is None or threshold.shape != (d_sae,)):
            raise SAEFormatError(f"a JumpReLU SAE needs a threshold of shape [{d_sae}]")
        if apply_b_dec_to_input and W_dec.shape[1] != d_in:
            raise SAEFormatError("apply_b_dec_to_input needs d_out == d_in (transcoders do not subtract b_dec)")
        if W_skip is not None and W_skip.shape != (W_dec.shape[1], d_in):
            raise SAEFormatError(f"W_skip has shape {tuple(W_skip.shape)}, want [{W_dec.shape[1]}, {d_in}]")
        self.register_buffer("W_enc", W_enc.detach())
        self.register_buffer("b_enc", b_enc.detach())
        self.register_buffer("W_dec", W_dec.detach())
        self.register_buffer("b_dec", b_dec.detach())
        self.register_buffer("threshold", None if threshold is None else threshold.detach())
        self.register_buffer("W_skip", None if W_skip is None else W_skip.detach())
        self.activation: Activation = activation
        self.k = None if k is None else int(k)
        self.site = site
        self.output_site = output_site
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.source = source
        self.meta = dict(meta or {})

    # ---- shapes ------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def is_transcoder(self) -> bool:
        return self.output_site is not None or self.d_out != self.d_in or self.W_skip is not None

    @property
    def write_site(self) -> str | None:
        """Where decoded directions live: ``output_site`` for transcoders, else ``site``."""
        return self.output_site or self.site

    # ---- the maps ----------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations: ``[..., d_in] -> [..., d_sae]`` (float32 or the SAE's dtype)."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The nonlinearity on pre-activations ``[..., d_sae]`` (dense result, same shape)."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        vals, idx = torch.relu(pre).topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_in] -> [..., d_sae]`` (dense)."""
        return self.activate(self.pre_acts(x))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zero latents of ``x`` ``[n, d_in]`` as COO ``(rows [nnz], latents [nnz], values [nnz])``.

        Top-k SAEs never build the dense ``[n, d_sae]`` activation matrix.
        """
        pre = self.pre_acts(x)
        if self.activation == "topk":
            vals, idx = torch.relu(pre).topk(self.k, dim=-1, sorted=False)
            rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
            keep = vals > 0
            return rows[keep], idx[keep], vals[keep]
        z = self.activate(pre)
        rows, lat = z.nonzero(as_tuple=True)
        return rows, lat, z[rows, lat]

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_out]``: ``z @ W_dec + b_dec`` (+ ``x @ W_skipᵀ`` when given a skip)."""
        y = z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise SAEFormatError("this transcoder has a skip connection: pass x to decode(z, x)")
            y = y + x.to(self.W_skip.dtype) @ self.W_skip.T
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (autoencoders) or prediction of the output site (transcoders): ``[..., d_out]``."""
        return self.decode(self.encode(x), x)

    def decoder_direction(self, latent: int, unit: bool = True) -> torch.Tensor:
        """Row ``latent`` of ``W_dec`` (``[d_out]``), divided by its norm when ``unit``."""
        if not 0 <= int(latent) < self.d_sae:
            raise SAEFormatError(f"latent {latent} is out of range for an SAE with {self.d_sae} latents")
        v = self.W_dec[int(latent)].detach().float().clone()
        return v / v.norm().clamp_min(torch.finfo(torch.float32).tiny) if unit else v

    # ---- the model ---------------------------------------------------------------------------
    def check_model(self, model: nn.Module, site: str | None = None) -> None:
        """Raise ``SAEFormatError`` unless the site resolves on ``model`` with width ``d_in``
        (and, for transcoders, the output site with width ``d_out``)."""
        from intervene.sites import resolve_site

        pairs = [(site or self.site, self.d_in, "input")]
        if self.output_site is not None:
            pairs.append((self.output_site, self.d_out, "output"))
        for name, width, what in pairs:
            if name is None:
                raise SAEFormatError("this SAE is not attached to a site: pass site=... (e.g. 'layers.6')")
            try:
                s = resolve_site(model, name)
            except SiteError as e:
                raise SAEFormatError(f"the SAE's {what} site {name!r} does not resolve on this model: {e}") from e
            have = s.width if s.heads is None else s.heads[0] * s.heads[1]
            if have is not None and have != width:
                raise SAEFormatError(
                    f"SAE {self.source or ''} has {what} width {width} but site {name!r} of "
                    f"{type(model).__name__} has width {have}: wrong model or wrong site")

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (used in cache indexes and diffs)."""
        return {"kind": "sae", "source": self.source, "site": self.site, "output_site": self.output_site,
                "d_in": self.d_in, "d_sae": self.d_sae, "d_out": self.d_out, "activation": self.activation,
                "k": self.k, "apply_b_dec_to_input": self.apply_b_dec_to_input}

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation}{k}, site={self.site!r}"


# ---- site names ------------------------------------------------------------------------------
_TL = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out|attn\.hook_z)$")
_TL_TO_SITE = {"hook_resid_post": "layers.{}", "hook_resid_pre": "layers.{}:input", "hook_mlp_out": "layers.{}.mlp",
               "hook_attn_out": "layers.{}.attn", "attn.hook_z": "layers.{}.heads"}
_OURS = re.compile(r"^layers\.\d+(?::input|\.attn|\.mlp|\.heads)?$")


def site_from_hook_name(hook: str | None) -> str | None:
    """Our site name for a TransformerLens hook name (``blocks.6.hook_resid_post`` -> ``layers.6``),
    a sparsify hookpoint (``layers.6``, ``layers.6.mlp``) or one of our own names; ``None`` otherwise."""
    if not hook:
        return None
    if _OURS.match(hook):
        return hook
    m = _TL.match(hook)
    return _TL_TO_SITE[m.group(2)].format(m.group(1)) if m else None


# ---- loading ---------------------------------------------------------------------------------
def _read_cfg(folder: Path) -> dict[str, Any]:
    p = folder / CFG_NAME
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SAEFormatError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{p} must hold a JSON object")
    return cfg


def _weights_file(folder: Path) -> Path:
    for name in (SPARSIFY_WEIGHTS, SAELENS_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    others = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise SAEFormatError(f"no SAE weights in {folder}: expected {SPARSIFY_WEIGHTS} (sparsify) or "
                         f"{SAELENS_WEIGHTS} (SAELens); found {others}")


def _hook_of(cfg: dict[str, Any], keys: tuple[str, ...] = ("hookpoint", "hook_name", "hook_point")) -> str | None:
    for holder in (cfg, cfg.get("meta") or {}, cfg.get("metadata") or {}):
        for key in keys:
            if isinstance(holder, dict) and isinstance(holder.get(key), str):
                return holder[key]
    return None


def _need(t: dict[str, torch.Tensor], *keys: str, where: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in t]
    if missing:
        raise SAEFormatError(f"{where}: missing tensors {missing}; have {sorted(t)}")
    return [t[k] for k in keys]


def _from_sparsify(t: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> dict[str, Any]:
    if "encoder.weight" in t:
        W, b = _need(t, "encoder.weight", "encoder.bias", where=where)
    else:
        W, b = _need(t, "W_enc", "b_enc", where=where)
    W_dec, b_dec = _need(t, "W_dec", "b_dec", where=where)
    d_sae = int(b.shape[0])
    # sparsify stores the encoder as nn.Linear: [d_sae, d_in]; accept the transpose too.
    W_enc = W.T if W.shape[0] == d_sae and (W.shape[1] != d_sae or "encoder.weight" in t) else W
    act = cfg.get("activation", "topk")
    if act not in ("topk", "relu"):
        raise SAEFormatError(f"{where}: sparsify activation {act!r} is not supported (topk, relu)")
    k = cfg.get("k") if act == "topk" else None
    transcode = bool(cfg.get("transcode", False))
    if "d_in" in cfg and int(cfg["d_in"]) != W_enc.shape[0]:
        raise SAEFormatError(f"{where}: cfg.json says d_in={cfg['d_in']} but the encoder has {W_enc.shape[0]}")
    return dict(W_enc=W_enc, b_enc=b, W_dec=W_dec, b_dec=b_dec, activation=act, k=k,
                apply_b_dec_to_input=not transcode and W_dec.shape[1] == W_enc.shape[0],
                W_skip=t.get("W_skip"), transcoder=transcode)


_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
                 "transcoder": "relu", "jumprelu_transcoder": "jumprelu", "skip_transcoder": "relu"}


def _from_saelens(t: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> dict[str, Any]:
    arch = cfg.get("architecture", "standard")
    if arch not in _SAELENS_ARCH:
        raise SAEFormatError(f"{where}: SAELens architecture {arch!r} is not supported "
                             f"(supported: {sorted(_SAELENS_ARCH)})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEFormatError(f"{where}: normalize_activations={norm!r} rescales each input nonlinearly; only "
                             "'none' is supported (fold the scaling factor into the weights first)")
    if cfg.get("finetuning_scaling_factor"):
        raise SAEFormatError(f"{where}: finetuning_scaling_factor is not supported")
    W_enc, b_enc, W_dec, b_dec = _need(t, "W_enc", "b_enc", "W_dec", "b_dec", where=where)
    if "d_in" in cfg and "d_sae" in cfg and tuple(W_enc.shape) != (int(cfg["d_in"]), int(cfg["d_sae"])):
        raise SAEFormatError(f"{where}: W_enc has shape {tuple(W_enc.shape)}, cfg.json says "
                             f"[d_in={cfg['d_in']}, d_sae={cfg['d_sae']}]")
    act = _SAELENS_ARCH[arch]
    transcoder = "transcoder" in arch
    if act == "jumprelu":
        (thr,) = _need(t, "threshold", where=where)
    else:
        thr = None
    if arch == "skip_transcoder":
        _need(t, "W_skip", where=where)
    return dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation=act,
                k=cfg.get("k") if act == "topk" else None, threshold=thr,
                apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder,
                W_skip=t.get("W_skip"), transcoder=transcoder, output_hook=_hook_of(cfg, ("hook_name_out",)))


def load_sae_folder(folder: str | Path, site: str | None = None, output_site: str | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    source: str | None = None, hookpoint: str | None = None) -> SAE:
    """Load one SAE from a local folder (``cfg.json`` + weights); layout detected from the files.

    Sparsify transcoders name the module they *replace* (``layers.6.mlp``): that becomes the
    ``output_site``, and the input site must be given as ``site`` (e.g. the MLP's input path).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    wfile = _weights_file(folder)
    cfg = _read_cfg(folder)
    where = str(wfile)
    try:
        t = load_file(str(wfile), device=str(device))
    except (SafetensorError, OSError) as e:
        raise SAEFormatError(f"could not read {wfile}: {e}") from e
    if "encoder.weight" in t or (wfile.name == SPARSIFY_WEIGHTS and "W_enc" not in t):
        parts = _from_sparsify(t, cfg, where)
        layout = "sparsify"
    elif "W_enc" in t and ("d_sae" in cfg or "architecture" in cfg or wfile.name == SAELENS_WEIGHTS):
        parts = _from_saelens(t, cfg, where)
        layout = "saelens"
    elif "W_enc" in t and ("k" in cfg or "num_latents" in cfg or "expansion_factor" in cfg):
        parts = _from_sparsify(t, cfg, where)
        layout = "sparsify"
    else:
        raise SAEFormatError(
            f"{where}: unknown SAE layout (tensors {sorted(t)}, cfg keys {sorted(cfg)}). Expected sparsify "
            f"({SPARSIFY_WEIGHTS}: encoder.weight, encoder.bias, W_dec, b_dec; cfg.json with d_in and k) or "
            f"SAELens ({SAELENS_WEIGHTS}: W_enc, b_enc, W_dec, b_dec[, threshold]; cfg.json with d_in, d_sae, "
            "architecture)")
    hook = _hook_of(cfg) or hookpoint or folder.name
    out_hook = parts.pop("output_hook", None)
    transcoder = parts.pop("transcoder")
    if transcoder and layout == "sparsify":
        output_site = output_site or site_from_hook_name(hook)
    else:
        site = site or site_from_hook_name(hook)
        if transcoder:
            output_site = output_site or site_from_hook_name(out_hook)
    meta = {"layout": layout, "cfg": cfg, "hook_name": hook, "transcoder": transcoder}
    sae = SAE(**parts, site=site, output_site=output_site, source=source or str(folder), meta=meta)
    return sae.to(dtype=dtype) if dtype is not None else sae
