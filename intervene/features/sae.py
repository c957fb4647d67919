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

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from intervene.errors import SAEFormatError, SiteError
from intervene.features.hooknames import TL_HOOKS, hook_site, site_from_hook_name
from intervene.safeio import Root

Activation = Literal["relu", "jumprelu", "topk", "groupmax"]
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
        activation: ``"relu"``, ``"jumprelu"`` (``relu(pre) * (pre > threshold)``), ``"topk"``
            (the ``k`` largest of ``relu(pre)``) or ``"groupmax"`` (sparsify's: ``relu(pre)`` split into
            ``k`` contiguous groups of ``d_sae / k`` latents, the largest of each group kept).
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
        if activation not in ("relu", "jumprelu", "topk", "groupmax"):
            raise SAEFormatError(f"unknown SAE activation {activation!r}; supported: relu, jumprelu, topk, groupmax")
        if activation in ("topk", "groupmax") and (k is None or not 0 < int(k) <= d_sae):
            raise SAEFormatError(f"a {activation} SAE needs 0 < k <= d_sae={d_sae}, got k={k}")
        if activation == "groupmax" and d_sae % int(k):
            raise SAEFormatError(f"a groupmax SAE needs d_sae ({d_sae}) divisible by k ({k})")
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
        vals, idx = self._select(pre)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k / groupmax: the kept values and their latent indices, ``[..., k]`` each."""
        act = torch.relu(pre)
        if self.activation == "topk":
            return act.topk(self.k, dim=-1, sorted=False)
        vals, idx = act.unflatten(-1, (self.k, -1)).max(dim=-1)  # one winner per contiguous group
        return vals, idx + torch.arange(0, self.d_sae, self.d_sae // self.k, device=pre.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_in] -> [..., d_sae]`` (dense)."""
        return self.activate(self.pre_acts(x))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zero latents of ``x`` ``[n, d_in]`` as COO ``(rows [nnz], latents [nnz], values [nnz])``.

        Top-k and groupmax SAEs never build the dense ``[n, d_sae]`` activation matrix.
        """
        pre = self.pre_acts(x)
        if self.activation in ("topk", "groupmax"):
            vals, idx = self._select(pre)
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


# ---- loading ---------------------------------------------------------------------------------
MAX_WEIGHTS_BYTES = 1 << 42
# How many dimensions each tensor of either layout has (checked before any shape arithmetic).
_NDIM = {"W_enc": 2, "encoder.weight": 2, "b_enc": 1, "encoder.bias": 1, "W_dec": 2, "b_dec": 1, "threshold": 1,
         "log_threshold": 1, "W_skip": 2, "b_gate": 1, "b_mag": 1, "r_mag": 1}


def _read_cfg(root: Root) -> dict[str, Any]:
    if not root.exists(CFG_NAME):
        return {}
    cfg = root.read_json(CFG_NAME)
    if not isinstance(cfg, dict):
        raise SAEFormatError.at(root.path / CFG_NAME, None, "a JSON object", type(cfg).__name__)
    return cfg


def _weights_file(root: Root) -> str:
    names = root.listdir()
    for name in (SPARSIFY_WEIGHTS, SAELENS_WEIGHTS):
        if name in names:
            return name
    found = [n for n in names if n.endswith(".safetensors")]
    if len(found) == 1:
        return found[0]
    raise SAEFormatError(f"no SAE weights in {root.path}: expected {SPARSIFY_WEIGHTS} (sparsify) or "
                         f"{SAELENS_WEIGHTS} (SAELens); found {names[:20]}", path=root.path, field="weights")


def _check_tensors(t: dict[str, torch.Tensor], where: str, derived: bool = False) -> None:
    """Floating, finite tensors of the expected rank (``derived``: after the loaders' own arithmetic,
    which must not have overflowed either, e.g. ``exp(log_threshold)``)."""
    from intervene.tensorfile import check_tensor

    for name, v in t.items():
        if v is None or not isinstance(v, torch.Tensor):
            continue
        field = f"{'derived ' if derived else ''}tensor {name!r}"
        check_tensor(v, SAEFormatError, where, field)
        if name in _NDIM and v.ndim != _NDIM[name]:
            raise SAEFormatError.at(where, field, f"{_NDIM[name]} dimensions", list(v.shape))


def _translate(hook: str | None, model: nn.Module | None, raw_ok: bool, what: str, where: str
               ) -> tuple[str | None, nn.Module | None]:
    """``(site, norm to fold)`` for a hook name; raw module paths pass through only when ``raw_ok``."""
    if not hook:
        return None, None
    found = hook_site(hook, model)
    if found is not None:
        return found.site, found.norm
    if raw_ok:  # SAELens on a HF model (model_class_name AutoModelForCausalLM): a module's output
        return hook, None
    raise SAEFormatError(f"{where}: the {what} hook {hook!r} is not a TransformerLens hook this loader translates "
                         f"({', '.join(TL_HOOKS)}); pass site=... / output_site=...")


def _fold_norm(parts: dict[str, Any], norm: nn.Module, transcoder: bool) -> None:
    """Rewrite ``parts`` so the SAE reads the norm's output ``y = n * w + b`` instead of TransformerLens's
    normalized ``n`` (and, for an autoencoder, writes there too). Exact: ``n = (y - b) / w``."""
    from intervene.features.hooknames import norm_affine

    W_enc = parts["W_enc"]
    w, b = (v.to(W_enc.dtype) for v in norm_affine(norm, W_enc.shape[0]))
    if not bool((w != 0).all()):
        raise SAEFormatError("the norm has a zero gain: its input cannot be recovered from its output")
    bw = b / w
    if parts["apply_b_dec_to_input"]:  # y - (w*b_dec + b) = w * (n - b_dec)
        parts["b_dec"] = parts["b_dec"] * w + b
        parts["W_dec"] = parts["W_dec"] * w
    else:
        parts["b_enc"] = parts["b_enc"] - bw @ W_enc
        if transcoder:
            if parts.get("W_skip") is not None:
                parts["b_dec"] = parts["b_dec"] - bw @ parts["W_skip"].T
                parts["W_skip"] = parts["W_skip"] / w
        else:
            parts["W_dec"], parts["b_dec"] = parts["W_dec"] * w, parts["b_dec"] * w + b
    parts["W_enc"] = W_enc / w[:, None]


def load_sae_folder(folder: str | Path, site: str | None = None, output_site: str | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    source: str | None = None, hookpoint: str | None = None, model: nn.Module | None = None) -> SAE:
    """Load one SAE from a local folder (``cfg.json`` + weights); layout detected from the files.

    SAELens hook names are translated with TransformerLens's semantics (:mod:`intervene.features.hooknames`);
    the ones that are module paths (``hook_resid_mid``, ``hook_mlp_in``, ``ln2.hook_normalized``) need ``model``.
    An explicit ``site`` is taken as is (no translation, no fold).

    Sparsify transcoders name the module they *replace* (``layers.6.mlp``): that becomes the
    ``output_site``, and the input site must be given as ``site`` (e.g. the MLP's input path).
    """
    from intervene.features.saelens import parse_saelens
    from intervene.features.sparsify import parse_sparsify
    from intervene.tensorfile import load_tensors

    folder = Path(folder)
    root = Root(folder, SAEFormatError)
    wname = _weights_file(root)
    wfile = folder / wname
    cfg = _read_cfg(root)
    where = str(wfile)
    t, _, _ = load_tensors(root, wname, MAX_WEIGHTS_BYTES)
    _check_tensors(t, where)
    sparsify_cfg = "k" in cfg or "num_latents" in cfg or "expansion_factor" in cfg
    if "encoder.weight" in t or (wfile.name == SPARSIFY_WEIGHTS and "W_enc" not in t):
        layout, parts = "sparsify", parse_sparsify(t, cfg, where)
    elif "W_enc" in t and ("d_sae" in cfg or "architecture" in cfg or wfile.name == SAELENS_WEIGHTS):
        layout, parts = "saelens", parse_saelens(t, cfg, where)
    elif "W_enc" in t and sparsify_cfg:
        layout, parts = "sparsify", parse_sparsify(t, cfg, where)
    else:
        raise SAEFormatError(
            f"{where}: unknown SAE layout (tensors {sorted(t)}, cfg keys {sorted(cfg)}). Expected sparsify "
            f"({SPARSIFY_WEIGHTS}: encoder.weight, encoder.bias, W_dec, b_dec; cfg.json with d_in and k) or "
            f"SAELens ({SAELENS_WEIGHTS}: W_enc, b_enc, W_dec, b_dec[, threshold]; cfg.json with d_in, d_sae, "
            "architecture)")
    hook = parts.pop("hook") or hookpoint or folder.name
    out_hook, in_hook = parts.pop("output_hook", None), parts.pop("input_hook", None)
    raw_ok = parts.pop("model_class_name", None) == "AutoModelForCausalLM"
    transcoder = parts.pop("transcoder")
    if layout == "sparsify":
        site = site or in_hook or (None if transcoder else site_from_hook_name(hook))
        if transcoder:
            output_site = output_site or site_from_hook_name(hook)
    else:
        if site is None:
            site, norm = _translate(hook, model, raw_ok, "input", where)
            if norm is not None:
                _fold_norm(parts, norm, transcoder)
        if transcoder and output_site is None:
            output_site, norm = _translate(out_hook, model, raw_ok, "output", where)
            if norm is not None:
                raise SAEFormatError(f"{where}: a transcoder writing to {out_hook!r} (a norm's normalized value) "
                                     "is not supported")
    _check_tensors(parts, where, derived=True)
    dtypes = {v.dtype for v in parts.values() if isinstance(v, torch.Tensor)}
    if len(dtypes) > 1:  # the maps would mix precisions (or fail): SAELens casts to cfg dtype, sparsify has one
        raise SAEFormatError.at(where, "tensors", "one floating dtype for every tensor", sorted(map(str, dtypes)))
    if not all(x is None or isinstance(x, str) for x in (site, output_site)):
        raise SAEFormatError.at(where, "hook", "a site name", site if not isinstance(site, str) else output_site)
    meta = {"layout": layout, "cfg": cfg, "hook_name": hook, "transcoder": transcoder}
    sae = SAE(**parts, site=site, output_site=output_site, source=source or str(folder), meta=meta)
    sae = sae.to(device=device)
    return sae.to(dtype=dtype) if dtype is not None else sae
