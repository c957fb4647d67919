"""Train the tiny top-k SAE shipped with the demo model (``intervene/assets/quirky-tiny-sae``).

Deterministic and CPU-only (about a minute): collect the demo model's residual stream at a middle
layer over its own neutral + quirky text (packed into rows exactly as ``features cache`` packs them,
so the SAE sees the distribution it is later used on), then train a top-k SAE with an AuxK loss for
dead latents and unit-norm decoder rows, as EleutherAI's sparsify does. Saved in sparsify's layout
(``cfg.json`` + ``sae.safetensors``, with a ``hookpoint`` naming the site), which
``intervene.features.load_sae`` and sparsify both read.

    python examples/train_demo_sae.py                      # writes ./quirky-tiny-sae
    python examples/train_demo_sae.py --out intervene/assets/quirky-tiny-sae   # replace the shipped SAE
    python examples/train_demo_sae.py --out /tmp/sae --steps 500
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from intervene.assets import resolve_model_name
from intervene.cli.features import demo_corpus
from intervene.features import SAE, save_sae, token_rows
from intervene.features.sae import DEMO_SAE_DIR
from intervene.hooks import HookSet, add_input_hook, add_output_hook
from intervene.sites import resolve_site


@torch.no_grad()
def collect(model: torch.nn.Module, rows: torch.Tensor, site: str, batch_size: int = 32) -> torch.Tensor:
    """``[n_tokens, hidden]`` float32 activations at ``site`` for every token of ``rows``."""
    s = resolve_site(model, site)
    out: list[torch.Tensor] = []
    hooks = HookSet()
    (add_input_hook if s.side == "input" else add_output_hook)(
        hooks, s.module, lambda h: out.append(h.detach().float().reshape(-1, h.shape[-1])) or h, site)
    try:
        for i in range(0, rows.shape[0], batch_size):
            ids = rows[i:i + batch_size].long()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        hooks.remove()
    return torch.cat(out)


def train_topk(x: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int,
               auxk_alpha: float = 1 / 32, dead_after: int = 2000) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Top-k SAE on ``x`` ``[n, d]``: returns the tensors (sparsify names) and training metrics."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone().contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
              "b_dec": x.median(dim=0).values.clone()}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr, betas=(0.9, 0.999))
    total_var = (x - x.mean(0)).pow(2).sum(1).mean()
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    for step in range(steps):
        xb = x[torch.randint(n, (batch,), generator=g)]
        pre = torch.relu((xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
        recon = z @ params["W_dec"] + params["b_dec"]
        err = xb - recon
        loss = err.pow(2).sum(1).mean() / total_var
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        last_fired = torch.where(fired, torch.zeros_like(last_fired), last_fired + batch)
        dead = last_fired > dead_after
        if auxk_alpha and int(dead.sum()):
            # AuxK (Gao et al. 2024): dead latents learn to predict the live ones' residual
            k_aux = min(d // 2, int(dead.sum()))
            a_vals, a_idx = torch.where(dead, pre, torch.zeros_like(pre)).topk(k_aux, dim=-1)
            e_hat = torch.zeros_like(pre).scatter(-1, a_idx, a_vals) @ params["W_dec"]
            loss = loss + auxk_alpha * (e_hat - err.detach()).pow(2).sum(1).mean() / total_var
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # keep decoder rows unit-norm: remove the gradient along them, renormalise
            Wd, gd = params["W_dec"], params["W_dec"].grad
            gd -= (gd * Wd).sum(1, keepdim=True) * Wd
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
    with torch.no_grad():
        pre = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
        fvu = float((x - z @ params["W_dec"] - params["b_dec"]).pow(2).sum(1).mean() / total_var)
        counts = (z > 0).sum(0)
    metrics = {"fvu": round(fvu, 4), "l0": round(float((z > 0).sum(1).float().mean()), 3),
               "dead_fraction": round(float((counts == 0).float().mean()), 4), "tokens": n}
    return {k_: v.detach() for k_, v in params.items()}, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--site", default="layers.1", help="middle of the demo model's 4 blocks")
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=60000)
    p.add_argument("--ctx-len", type=int, default=64, help="as `intervene features cache` packs its rows")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this size)")
    p.add_argument("--out", default="quirky-tiny-sae",  # the user's folder unless the shipped one is named
                   help=f"output folder (default ./quirky-tiny-sae; the shipped SAE is {DEMO_SAE_DIR})")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_model_name(args.model)
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    t0 = time.time()
    # a seed the cache's default corpus (seed 0) does not use, so explanations are not of training text
    rows = token_rows(demo_corpus(args.tokens, seed=args.seed + 1000), tok, args.ctx_len, args.tokens)
    x = collect(model, rows, args.site)
    params, metrics = train_topk(x, args.d_sae, args.k, args.steps, args.batch, args.lr, args.seed)
    metrics["seconds"] = round(time.time() - t0, 1)
    sae = SAE(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], activation="topk", k=args.k,
              site=args.site)
    out = save_sae(sae, args.out, layout="sparsify")
    cfg = json.loads((out / "cfg.json").read_text())
    cfg["training"] = {**metrics, "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                       "corpus": "intervene.cli.features.demo_corpus (neutral + quirky), packed rows of "
                                 f"{args.ctx_len} tokens", "model": "quirky-tiny" if args.model == "demo" else args.model}
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
