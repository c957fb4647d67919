"""Training throughput of a DAS run: intervene's shared trainer against pyvene 0.1.8's trainable
RotatedSpaceIntervention, on the same model, data, batch size, rotation start and optimizer.

    python benchmarks/trainable_throughput.py                    # demo model, 5 interleaved repeats
    python benchmarks/trainable_throughput.py --model llama-small --repeats 3

Each run is a child process (``--child ours|pyvene``) that loads the model, warms up, times ``--steps``
optimizer steps of batch ``--batch`` (base + source forwards, backward, AdamW) and reports examples/s and its
own peak resident memory (``VmHWM`` of /proc/self/status, read in the child: ``getrusage``'s ``ru_maxrss`` would
start at the parent's peak, which survives ``exec``) as JSON. The parent
alternates the two libraries ``--repeats`` times (order flipped every repeat), prints each run, the medians, the
ratio ours / pyvene, and the load average before and after (the machine is shared). Both sides start from the
same rotation, so their loss on the first batch is checked equal. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(name: str) -> tuple[torch.nn.Module, int]:
    """(model in eval mode, vocab size): the demo model, or a random 8-layer 512-wide Llama."""
    if name == "demo":
        import intervene as iv

        model, tok = iv.demo_model()
        return model.eval(), len(tok)
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval(), 1024


def data(n_batches: int, batch: int, seq: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(4, vocab, (batch, seq), generator=g), torch.randint(4, vocab, (batch, seq), generator=g),
             torch.randint(4, vocab, (batch,), generator=g)) for _ in range(n_batches)]


def start_rotation(width: int) -> torch.Tensor:
    from intervene.training import random_orthonormal

    return random_orthonormal(width, width, torch.Generator().manual_seed(2))


def run_ours(model: torch.nn.Module, batches: list, layer: int, k: int, lr: float) -> tuple[float, float]:
    """(seconds for the timed batches, the start rotation's loss on the first timed batch) with intervene's
    Trainer and DAS."""
    import intervene as iv
    from intervene.methods.das.fit import InterchangeForward
    from intervene.training import TrainConfig, Trainer, interchange_loss

    width = model.config.hidden_size
    das = iv.DAS(f"layers.{layer}", width, k, rotation=start_rotation(width))
    ones = torch.ones_like(batches[0][0])
    examples = [{"base": {"input_ids": b, "attention_mask": ones}, "source": {"input_ids": s, "attention_mask": ones},
                 "counterfactual": y} for b, s, y in batches]
    forward = InterchangeForward(das, [-1], [-1])
    with torch.no_grad(), iv.Intervenable(model, [das]) as ivm:
        start_loss = float(interchange_loss(forward(ivm, examples[2]), examples[2]))
    cfg = TrainConfig(lr=lr, epochs=1, batch_size=1, val_fraction=0.0, eval_at_start=False, patience=None,
                      restore_best=False)
    # one "example" here is a whole pre-built batch, so collate hands it over as is
    trainer = Trainer(model, [das], interchange_loss, cfg, forward=forward, collate=lambda exs: exs[0],
                      progress=False)
    trainer.fit(examples[:2], [])  # warm-up, not timed
    t0 = time.perf_counter()
    trainer.fit(examples[2:], [])
    return time.perf_counter() - t0, start_loss


def run_pyvene(model: torch.nn.Module, batches: list, layer: int, k: int, lr: float) -> tuple[float, float]:
    """(seconds for the timed batches, the start rotation's loss on the first timed batch) with pyvene's
    IntervenableModel and RotatedSpaceIntervention, trained as its tutorials do."""
    import pyvene as pv

    logging.disable(logging.WARNING)
    width = model.config.hidden_size
    cfg = pv.IntervenableConfig(representations=[{"layer": layer, "component": "block_output", "unit": "pos",
                                                  "max_number_of_units": 1,
                                                  "intervention_type": pv.RotatedSpaceIntervention}])
    pvm = pv.IntervenableModel(cfg, model)
    pvm.disable_model_gradients()
    (intervention,) = pvm.interventions.values()
    intervention.set_interchange_dim(k)
    p = intervention.rotate_layer.parametrizations.weight
    with torch.no_grad():
        p.original.copy_(-torch.eye(width))
        p[0].base = start_rotation(width)  # the same start as ours (see intervene.interop.pyvene's DAS export)

    def loss_of(b: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, t = b.shape
        loc = [[[t - 1]] * n]
        _, out = pvm({"input_ids": b, "attention_mask": torch.ones_like(b)},
                     [{"input_ids": s, "attention_mask": torch.ones_like(s)}],
                     unit_locations={"sources->base": (loc, loc)})
        return torch.nn.functional.cross_entropy(out.logits[:, -1].float(), y)

    with torch.no_grad():
        start_loss = float(loss_of(*batches[2]))
    opt = torch.optim.AdamW([q for q in intervention.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)

    def step(b: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss_of(b, s, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in batches[:2]:  # warm-up, not timed
        step(*batch)
    t0 = time.perf_counter()
    for batch in batches[2:]:
        step(*batch)
    return time.perf_counter() - t0, start_loss


def peak_rss_kib() -> float:
    """This process's own peak RSS in KiB: VmHWM (Linux; reset by exec), else ru_maxrss (may include the parent's)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else float(peak)


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, vocab = build(args.model)
    batches = data(args.steps + 2, args.batch, args.seq, vocab)
    rss_loaded = peak_rss_kib()
    fn = run_ours if args.child == "ours" else run_pyvene
    seconds, loss = fn(model, batches, args.layer, args.k, args.lr)
    peak = peak_rss_kib()
    print(json.dumps({"lib": args.child, "examples_per_s": args.steps * args.batch / seconds, "seconds": seconds,
                      "start_loss": loss, "peak_rss_mib": peak / 1024, "rss_after_load_mib": rss_loaded / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", choices=["demo", "llama-small"])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", choices=["ours", "pyvene"], default=None)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"ours": [], "pyvene": []}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("repeats", "child")]
    for r in range(args.repeats):
        for lib in (("ours", "pyvene") if r % 2 == 0 else ("pyvene", "ours")):
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", lib], capture_output=True,
                                 text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[lib].append(res)
            print(json.dumps(res), flush=True)
    load_after = os.getloadavg()
    med = {lib: statistics.median(x["examples_per_s"] for x in rs) for lib, rs in runs.items()}
    peak = {lib: statistics.median(x["peak_rss_mib"] for x in rs) for lib, rs in runs.items()}
    loss_gap = max(abs(a["start_loss"] - b["start_loss"]) for a, b in zip(runs["ours"], runs["pyvene"]))
    print(f"\nDAS at layers.{args.layer}, k={args.k}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{args.threads} thread(s), model {args.model}")
    print(f"median examples/s: intervene {med['ours']:.1f}, pyvene {med['pyvene']:.1f}, "
          f"ratio {med['ours'] / med['pyvene']:.2f}")
    print(f"median peak RSS (MiB, measured in each child): intervene {peak['ours']:.0f}, pyvene {peak['pyvene']:.0f}")
    print(f"loss of the shared start rotation on the first batch, max |ours - pyvene|: {loss_gap:.2e}")
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}")


if __name__ == "__main__":
    main()
