"""Site coverage over transformers' causal-LM types: ``python -m tests.site_coverage`` rewrites
``docs/site_coverage.md``; ``tests/test_site_coverage.py`` asserts the floor.

For every type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` that builds tiny (:mod:`tests.coverage_build`)
and is decoder-only, steering at ``layers.1``, ``layers.1:input``, ``layers.1.attn``, ``layers.1.mlp`` and
``layers.1.heads`` must equal a plain PyTorch hook written here that adds the same vector to the same
module (bit for bit), and must change the logits. Where block 1 of a hybrid stack has no attention or no
MLP (a Mamba or MoE-only layer of Nemotron-H), that kind is checked at the first other block that has
it. The checks of :mod:`tests.site_reference`, which do not trust intervene's choice of modules, come on
top: block 0 against ``hidden_states``; every resolved block's output reconstructed from its input and
writers; the heads view; and every part claimed absent.

Status: *exact* (every kind resolves and passes), *exact where present* (the kinds the architecture has
resolve and pass; the others are absent from every block, each claim checked: Mamba has no MLP,
RWKV-4 no heads), *refused* (a clear error), *wrong* (resolved but failing a check: a bug).
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
from intervene.sites import in_table, layer_parts, num_layers
from intervene.sites.discovery import discover
from tests import site_reference as ref
from tests.coverage_build import IDS, BuildError, build, causal_lm_types

SITES = ("layers.1", "layers.1:input", "layers.1.attn", "layers.1.mlp", "layers.1.heads")
KINDS = ("attn", "mlp", "heads")
EXACT_WHERE_PRESENT = "exact where present"
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


def _layer_for(model: torch.nn.Module, kind: str) -> tuple[int | None, str]:
    """``(block to check kind at, "")``: block 1, or where block 1 lacks the part (a hybrid stack) the first
    block after it (then block 0) that has it; ``(None, why)`` when every block lacks it. Raises the
    ``SiteError`` of block 1, or of the first other block that cannot resolve it, otherwise."""
    n = num_layers(model)
    absent_why, errors = "", []
    for i in [1, *range(2, n), 0]:
        try:
            iv.resolve_site(model, f"layers.{i}.{kind}")
            return i, ""
        except iv.SiteError as e:
            if kind not in layer_parts(model, i).absent:
                if i == 1:
                    raise
                errors.append(e)
            else:
                absent_why = absent_why or " ".join(str(e).split())
    if errors:
        raise errors[0]
    return None, absent_why


def _absence_problems(model: torch.nn.Module, blocks: str, h: int) -> list[str]:
    """Every part a block claims it lacks, checked on its own: no MLP means its one writer mixes tokens, no
    attention that it does not, no heads that the config declares none."""
    problems = []
    for i in range(num_layers(model)):
        p = layer_parts(model, i)
        writer = p.attn if "mlp" in p.absent else p.mlp if "attn" in p.absent else None
        if writer is not None:
            mixes = ref.mixes_tokens(model, f"{blocks}.{i}", writer, h)
            if mixes is not ("mlp" in p.absent):
                problems.append(f"block {i} claims no {'MLP' if 'mlp' in p.absent else 'attention'}, but its writer "
                                f"{writer} {'does not mix' if mixes is False else 'mixes' if mixes else 'ignores'} tokens")
        if "heads" in p.absent and "attn" not in p.absent and not ref.declares_no_heads(model):
            problems.append(f"block {i} claims its attention has no heads, but the config declares a head count")
    return problems


def _semantic_problems(model: torch.nn.Module, sites: dict[str, Any], layers: dict[str, int]) -> list[str]:
    h = sites["layers.1"].width
    blocks = sites["layers.1"].module_path.rsplit(".", 1)[0]
    n = num_layers(model)
    between = discover(model).between[0] if not in_table(model) and n > 1 else 1.0
    problems = [p for p in [ref.block0_problem(model, blocks, between)] if p]
    for i in range(n):  # every block whose writers resolve, not only the ones steered
        p = layer_parts(model, i)
        if p.steps or (p.attn is not None and p.mlp is not None):
            problems += [q for q in [ref.block_problem(model, f"{blocks}.{i}", i, h)] if q]
    problems += _absence_problems(model, blocks, h)
    if "heads" in layers:
        i = layers["heads"]
        problems += ref.heads_problems(model, sites[f"layers.{i}.heads"], iv.resolve_site(model, f"layers.{i}.attn"))
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
        sites = {s: iv.resolve_site(model, s) for s in SITES[:2]}
        layers, absent = {}, {}
        for kind in KINDS:
            i, why = _layer_for(model, kind)
            if i is None:
                absent[kind] = why
            else:
                layers[kind] = i
                sites[f"layers.{i}.{kind}"] = iv.resolve_site(model, f"layers.{i}.{kind}")
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
        want = ref.hooked_logits(model, site.module_path, site.side, v)
        if not torch.equal(ours, want):
            problems.append(f"{name}: differs from the reference hook by {float((ours - want).abs().max()):.2e}")
        elif torch.equal(ours, base):
            problems.append(f"{name}: the edit changed nothing")
    problems += _semantic_problems(model, sites, layers)
    moved = ", ".join(f"{k} at block {i}" for k, i in layers.items() if i != 1)
    if problems:
        return Result(model_type, "wrong", "; ".join(problems), time.perf_counter() - t0)
    if absent:
        lacks = "; ".join(f"no {k}: {why}" for k, why in absent.items())
        return Result(model_type, EXACT_WHERE_PRESENT, lacks + (f" (checked {moved})" if moved else ""),
                      time.perf_counter() - t0)
    return Result(model_type, "exact", f"checked {moved}" if moved else "", time.perf_counter() - t0)


def run_all(types: list[str] | None = None) -> list[Result]:
    return [check(t) for t in (types or causal_lm_types())]


def summary(results: list[Result]) -> tuple[int, int, int]:
    """``(exact, exact where present, in-scope buildable)``: the second counts types whose every part
    resolves exactly but parts their architecture lacks in every block (not included in the first)."""
    scope = [r for r in results if r.status in ("exact", EXACT_WHERE_PRESENT, "refused", "wrong")]
    return (sum(r.status == "exact" for r in scope), sum(r.status == EXACT_WHERE_PRESENT for r in scope),
            len(scope))


_CAUSES = (
    ("several residual streams (hyper-connections, AltUp) or a sequence-first layout", ("several residual streams",)),
    ("a looped block stack", ("looped",)),
    ("the candidate block list is not one residual stream (XLM keeps attention and FFN layers in separate lists)",
     ("is not one residual stream",)),
    ("the MLP branch is split across modules added together (no module outputs it)", ("is split across",)),
    ("more than one attention + MLP pair per block (LongCat-Flash: two of each and a shortcut MoE)",
     ("token mixers after per-position ones",)),
    ("attention and MLP do not write the residual themselves (Zamba: a shared transformer feeds the Mamba mixer)",
     ("reach the residual only through",)),
    ("no Linear attention output projection, or no head count", ("is not a Linear layer", "n_heads x head_dim",
                                                                 "declares no head count")),
    ("no exact reconstruction of the block's output from its submodules",
     ("nor reconstruct it step by step", "several sets of submodule outputs", "several pairs of submodules")),
)


def _pct(k: int, n: int) -> str:
    return f"{100 * k / max(n, 1):.1f}%"


def render(results: list[Result], seconds: float) -> str:
    exact, present, total = summary(results)
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
        "changes the logits, block 0's output is transformers' own `hidden_states` entry, every resolved "
        "block's output is reconstructed from its input and its writers (attn + mlp, each times a constant "
        "where the family has residual multipliers, or post-LN around them; for blocks intervene follows "
        "step by step, every step with the gains it measured: scaled or gated residuals, a third writer), "
        "and the heads view has the config's head count. Where block 1 of a hybrid stack has no attention "
        "or no MLP (Nemotron-H's Mamba and MoE layers), that kind is checked at the first block that has it.",
        "",
        "`layers.{i}.attn` is the block's token-mixing branch: attention, or in a state-space layer the mixer "
        "in its place (as for Jamba's Mamba layers). *Exact where present* means every part the architecture "
        "has resolves and passes all of the above, and the parts it lacks in every block refuse with a "
        "`SiteError` saying so, each claim checked on its own (no MLP: the block's one writer mixes tokens; "
        "no attention: it does not; no heads: the config declares no head count).",
        "",
        f"**Coverage: {exact} / {total} decoder-only types that build resolve exactly ({_pct(exact, total)}).** "
        f"Counting also the types exact on every part their architecture has: {exact + present} / {total} "
        f"({_pct(exact + present, total)}). Counting the out-of-scope types that build too (exact only): "
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
                          (EXACT_WHERE_PRESENT, "Exact where present (parts the architecture lacks refuse, "
                                                "saying so)"),
                          ("out of scope", "Out of scope (not decoder-only)"),
                          ("not buildable", "Not buildable tiny from the default config, offline"),
                          ("exact", "Exact")):
        rows = [r for r in results if r.status == status]
        if not rows:
            continue
        lines += [f"## {title}: {len(rows)}", ""]
        if status == "exact":
            lines += [", ".join(f"`{r.model_type}`" + (f" ({r.reason})" if r.reason else "") for r in rows), ""]
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
    exact, present, total = summary(results)
    print(f"coverage {exact}/{total} exact, {exact + present}/{total} exact where present; wrote {DOC}")


if __name__ == "__main__":
    main()
