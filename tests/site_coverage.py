"""Site coverage over transformers' causal-LM types: ``python -m tests.site_coverage`` rewrites
``docs/site_coverage.md``; ``tests/test_site_coverage.py`` asserts the floor.

For every type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` that builds tiny (:mod:`tests.coverage_build`)
and is decoder-only, steering at ``layers.1``, ``layers.1:input``, ``layers.1.attn``, ``layers.1.mlp`` and
``layers.1.heads`` must equal a plain PyTorch hook written here that adds the same vector to the same
module (bit for bit), and must change the logits. Three checks that do not trust intervene's choice of
modules come on top:

* block 0's output is what transformers itself reports as ``hidden_states[1]``;
* block 1's output minus its input is exactly attn + mlp (the two sites are what the block writes);
* the heads module's input has ``n_heads * head_dim`` features, and its output is what the attention
  site outputs (or, after a post-norm, what it reads).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as T
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import intervene as iv
from intervene.errors import InterveneError
from tests.coverage_build import IDS, BuildError, build, causal_lm_types

SITES = ("layers.1", "layers.1:input", "layers.1.attn", "layers.1.mlp", "layers.1.heads")
DOC = Path(__file__).resolve().parent.parent / "docs" / "site_coverage.md"


@dataclass
class Result:
    """One model type: ``status`` is exact / refused / wrong / out of scope / not buildable."""

    model_type: str
    status: str
    reason: str = ""
    seconds: float = 0.0


def out_of_scope(model_type: str) -> str | None:
    """Why a type is not a decoder-only LM, judged from transformers' own classes (or ``None``)."""
    try:
        if getattr(CONFIG_MAPPING[model_type](), "is_encoder_decoder", False):
            return "encoder-decoder: its causal-LM class is the decoder half, built to cross-attend to an encoder"
    except Exception:  # noqa: BLE001 - a default config that does not validate is judged by the class below
        pass
    cls = getattr(T, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if cls is not None and "is_decoder" in inspect.getsource(cls.__init__):
        return ("encoder architecture (or a seq2seq decoder) that transformers runs causally only with "
                "config.is_decoder=True")
    return None


# ---- plain PyTorch references: no intervene code below this line but the site lookup -----------
def _first(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


def _hooked_logits(model: torch.nn.Module, path: str, side: str, vec: torch.Tensor) -> torch.Tensor:
    """Logits with ``vec`` added to ``path``'s output (or first input) by a hand-written hook."""
    mod = model.get_submodule(path)
    if side == "output":
        def post(_m, _a, out):
            return out + vec if isinstance(out, torch.Tensor) else type(out)((out[0] + vec, *out[1:]))
        handle = mod.register_forward_hook(post)
    else:
        def pre(_m, args, kwargs):
            if args:
                return (args[0] + vec, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vec}
        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(input_ids=IDS).logits
    finally:
        handle.remove()


def _capture(model: torch.nn.Module, paths: dict[str, tuple[str, str]]) -> tuple[dict[str, torch.Tensor], Any]:
    """``{key: activation}`` for ``{key: (path, "input"|"output")}`` in one plain forward pass."""
    got: dict[str, torch.Tensor] = {}
    handles = []

    def post(key: str):
        def fn(_m, _a, out) -> None:
            got.setdefault(key, _first(out).detach().clone())  # blocks may add in place later
        return fn

    def pre(key: str):
        def fn(_m, args, kwargs) -> None:
            got.setdefault(key, (args[0] if args else kwargs["hidden_states"]).detach().clone())
        return fn

    for key, (path, side) in paths.items():
        mod = model.get_submodule(path)
        if side == "output":
            handles.append(mod.register_forward_hook(post(key)))
        else:
            handles.append(mod.register_forward_pre_hook(pre(key), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=IDS, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return got, out


def _resid(t: torch.Tensor, h: int) -> torch.Tensor:
    return t.reshape(IDS.shape[0], -1, h).double()


def _post_ln(model: torch.nn.Module, block_path: str, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor,
             m: torch.Tensor, h: int, tol: float) -> bool:
    """Post-LN: block 1 has a module reading ``x + attn`` (N1) and one reading ``N1(...) + mlp`` whose
    output is the block's output (N2)."""
    block = model.get_submodule(block_path)
    paths = {f"{k}:{r}": (f"{block_path}.{r}", k) for r, _ in block.named_modules() if r for k in ("input", "output")}
    got, _ = _capture(model, paths)
    acts = {k: _resid(v, h) for k, v in got.items() if v.numel() == x.numel() and v.shape[-1] == h}
    n1 = [r for k, v in acts.items() if k.startswith("input:") and float((v - x - a).abs().max()) <= tol
          for r in [k[6:]]]
    for r1 in n1:
        o1 = acts.get(f"output:{r1}")
        for k, v in acts.items():
            if k.startswith("input:") and o1 is not None and float((v - o1 - m).abs().max()) <= tol:
                out2 = acts.get(f"output:{k[6:]}")
                if out2 is not None and float((out2 - y).abs().max()) <= tol:
                    return True
    return False


def _semantic_problems(model: torch.nn.Module, sites: dict[str, Any]) -> list[str]:
    h = sites["layers.1"].width
    block0 = sites["layers.1"].module_path.rsplit(".", 1)[0] + ".0"
    heads = sites["layers.1.heads"]
    paths = {"b0": (block0, "output"), "in": (sites["layers.1"].module_path, "input"),
             "out": (sites["layers.1"].module_path, "output"),
             "attn": (sites["layers.1.attn"].module_path, "output"), "attn_in": (sites["layers.1.attn"].module_path,
                                                                                  "input"),
             "mlp": (sites["layers.1.mlp"].module_path, "output"), "heads_in": (heads.module_path, "input"),
             "heads_out": (heads.module_path, "output")}
    got, out = _capture(model, paths)
    problems = []
    hs = getattr(out, "hidden_states", None)
    if hs is not None:
        ref = hs[1] if len(hs) == 3 else hs[0]  # 2 blocks: with or without the embedding entry
        b0 = got["b0"][:, -ref.shape[1]:] if got["b0"].ndim == 3 else got["b0"]  # CPM-Ant drops its prompt tokens
        if not torch.equal(ref, b0):
            problems.append("block 0's output is not transformers' hidden_states entry for it")
    x, y, a, m = (_resid(got[k], h) for k in ("in", "out", "attn", "mlp"))
    tol = 1e-5 * max(float(t.abs().max()) for t in (x, y, a, m))
    basis = torch.stack([a.reshape(-1), m.reshape(-1)], 1)  # out - in = α attn + β mlp, α β constants
    coef = torch.linalg.lstsq(basis, (y - x).reshape(-1, 1)).solution
    off = float((basis @ coef - (y - x).reshape(-1, 1)).abs().max())
    if off > tol and not _post_ln(model, sites["layers.1"].module_path, x, y, a, m, h, tol):
        problems.append(f"block 1's output minus its input is not a constant times attn plus a constant times mlp, "
                        f"nor a post-LN block around them (off by {off:.2e})")
    n, d = heads.heads
    if got["heads_in"].shape[-1] != n * d:
        problems.append(f"the heads module takes {got['heads_in'].shape[-1]} features, not {n} x {d}")
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    try:
        n_cfg = getattr(cfg, "num_attention_heads", None)
    except Exception:  # noqa: BLE001 - per-layer attribute
        n_cfg = None
    if isinstance(n_cfg, int) and getattr(cfg, "per_layer_config", None) in (None, []) and n != n_cfg:
        problems.append(f"{n} heads, but the config says num_attention_heads={n_cfg}")
    ho = _resid(got["heads_out"], h)
    if not (torch.equal(ho, a) or torch.equal(ho, _resid(got["attn_in"], h))):
        problems.append("the heads module's output is neither the attention site's output nor what it reads")
    return problems


def check(model_type: str) -> Result:
    """Build one type and run every check on it (out-of-scope types too: the doc says how they fare)."""
    why = out_of_scope(model_type)
    res = _check(model_type)
    if why is not None:
        fared = "resolves exactly anyway" if res.status == "exact" else f"{res.status}: {res.reason[:160]}"
        return Result(model_type, "out of scope", f"{why} (intervene: {fared})", res.seconds)
    return res


def _check(model_type: str) -> Result:
    t0 = time.perf_counter()
    try:
        model = build(model_type)
    except BuildError as e:
        return Result(model_type, "not buildable", str(e), time.perf_counter() - t0)
    try:
        sites = {s: iv.resolve_site(model, s) for s in SITES}
    except InterveneError as e:
        return Result(model_type, "refused", " ".join(str(e).split()), time.perf_counter() - t0)
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    g = torch.Generator().manual_seed(0)
    problems = []
    for name, site in sites.items():
        width = site.heads[0] * site.heads[1] if site.heads else site.width
        v = torch.randn(width, generator=g)
        with iv.Intervenable(model, iv.Steering({name: v.view(site.heads) if site.heads else v})) as ivm:
            with torch.no_grad():
                ours = ivm(input_ids=IDS).logits
        ref = _hooked_logits(model, site.module_path, site.side, v)
        if not torch.equal(ours, ref):
            problems.append(f"{name}: differs from the reference hook by {float((ours - ref).abs().max()):.2e}")
        elif torch.equal(ours, base):
            problems.append(f"{name}: the edit changed nothing")
    problems += _semantic_problems(model, sites)
    status = "wrong" if problems else "exact"
    return Result(model_type, status, "; ".join(problems), time.perf_counter() - t0)


def run_all(types: list[str] | None = None) -> list[Result]:
    return [check(t) for t in (types or causal_lm_types())]


def summary(results: list[Result]) -> tuple[int, int]:
    """``(exact, in-scope buildable)``."""
    scope = [r for r in results if r.status in ("exact", "refused", "wrong")]
    return sum(r.status == "exact" for r in scope), len(scope)


_CAUSES = (
    ("one residual writer per block (state-space / mixer-only layers), so no attention + MLP pair",
     ("writes one thing",)),
    ("the residual itself is scaled or gated, or more than two branches write it", ("no two submodule outputs",)),
    ("several residual streams (hyper-connections, AltUp) or a sequence-first layout", ("several residual streams",)),
    ("a looped block stack", ("looped",)),
    ("the candidate block list is not one residual stream (XLM keeps attention and FFN layers in separate lists)",
     ("is not one residual stream",)),
    ("no Linear attention output projection, or no head count", ("is not a Linear layer", "n_heads x head_dim")),
)


def render(results: list[Result], seconds: float) -> str:
    exact, total = summary(results)
    oos = [r for r in results if r.status == "out of scope"]
    oos_exact = sum("resolves exactly anyway" in r.reason for r in oos)
    oos_built = sum("not buildable" not in r.reason for r in oos)
    lines = [
        "# Site coverage over transformers' causal-LM types",
        "",
        f"Generated by `python -m tests.site_coverage` (transformers {T.__version__}, torch {torch.__version__}); "
        "the test `tests/test_site_coverage.py` checks the same thing against a floor.",
        "",
        "Every type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built tiny from its default config "
        "(`tests/coverage_build.py`: hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 256, 4 experts). "
        "*Exact* means `layers.1`, `layers.1:input`, `layers.1.attn`, `layers.1.mlp` and `layers.1.heads` "
        "all resolve, steering each equals a hand-written PyTorch hook on the same module bit for bit and "
        "changes the logits, block 0's output is transformers' own `hidden_states` entry, block 1's output "
        "minus its input is attn + mlp (each times a constant where the family has residual multipliers; "
        "or, post-LN, added before each of the block's two norms), and the heads view has the config's "
        "head count.",
        "",
        f"**Coverage: {exact} / {total} decoder-only types that build resolve exactly "
        f"({100 * exact / max(total, 1):.1f}%).** Counting the out-of-scope types that build too: "
        f"{exact + oos_exact} / {total + oos_built}. Run time {seconds:.0f} s.",
        "",
        "Refusals by cause (a type counts once, under its first unresolved site):",
        "",
    ]
    refused = [r for r in results if r.status == "refused"]
    for cause, keys in _CAUSES:
        hits = [r.model_type for r in refused if any(k in r.reason for k in keys)]
        if hits:
            lines.append(f"* {cause}: {len(hits)} ({', '.join(hits)})")
    lines.append("")
    for status, title in (("refused", "Refused (a clear error names what could not be resolved)"),
                          ("wrong", "Resolved but failing a check"),
                          ("out of scope", "Out of scope (not decoder-only)"),
                          ("not buildable", "Not buildable tiny from the default config, offline"),
                          ("exact", "Exact")):
        rows = [r for r in results if r.status == status]
        if not rows:
            continue
        lines += [f"## {title}: {len(rows)}", ""]
        if status == "exact":
            lines += [", ".join(f"`{r.model_type}`" for r in rows), ""]
            continue
        lines += ["| model_type | why |", "|---|---|"]
        lines += [f"| `{r.model_type}` | {r.reason.replace('|', '/')} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    T.logging.set_verbosity_error()
    t0 = time.perf_counter()
    results = run_all()
    seconds = time.perf_counter() - t0
    text = render(results, seconds)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text + "\n")
    exact, total = summary(results)
    print(f"coverage {exact}/{total}; wrote {DOC}")


if __name__ == "__main__":
    main()
