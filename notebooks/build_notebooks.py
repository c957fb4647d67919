"""Regenerate the notebooks (committed without outputs): ``python notebooks/build_notebooks.py``."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# Quickstart: steer a model and publish a diff\nEverything runs offline on the shipped quirky demo model."),
        ("code", "import torch, intervene as iv\nfrom intervene import Intervenable, Steering\nmodel, tok = iv.demo_model()\n"
                 "prompt = tok(['Bob: 37 is greater than 52. True or False?'], return_tensors='pt')"),
        ("md", "A steering vector at the output of block 1, applied to generated tokens only (exact under the KV cache)."),
        ("code", "v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))\n"
                 "ivm = Intervenable(model, Steering({'layers.1': v}, scale=3.0, positions='generated'))\n"
                 "steered = ivm.generate(**prompt, max_new_tokens=8, do_sample=False)\n"
                 "with ivm.disabled():\n    base = ivm.generate(**prompt, max_new_tokens=8, do_sample=False)\n"
                 "print('base:   ', tok.decode(base[0]))\nprint('steered:', tok.decode(steered[0]))"),
        ("md", "Save the diff, load it back onto the model, and bake it into the weights."),
        ("code", "import tempfile, pathlib\nd = pathlib.Path(tempfile.mkdtemp()) / 'my-diff'\nivm.save_pretrained(d)\nivm.detach()\n"
                 "print(sorted(p.name for p in d.iterdir()))\nivm2 = Intervenable.load(d, model)\n"
                 "assert torch.equal(ivm2.generate(**prompt, max_new_tokens=8, do_sample=False), steered)\nivm2.detach()"),
        ("code", "all_pos = Intervenable(model, Steering({'layers.1': v}, scale=3.0), attach=False)\nbaked = all_pos.bake()\n"
                 "with all_pos:\n    hooked = all_pos(**prompt).logits\n"
                 "print('max |dlogit| baked vs hooked:', float((baked(**prompt).logits - hooked).abs().max()))"),
    ],
    "02_elk_probing.ipynb": [
        ("md", "# Eliciting latent knowledge: elicit → transfer → PGR → anomaly detection\n"
               "Probes fitted on Alice's (truthful) prompts, evaluated on Bob's (systematically wrong) prompts."),
        ("code", "import torch, intervene as iv\nfrom intervene.data.quirky import quirky_dataset\n"
                 "from intervene.evaluate.transfer import pgr\nfrom intervene.probes import auroc\n"
                 "model, tok = iv.demo_model()\nTASK = 'addition'   # on the shipped model truth transfers perfectly here (layers 1-2)\n"
                 "rows = {(s, c): quirky_dataset(TASK, split=s, n=150, seed=i, characters=(c,))\n"
                 "        for i, s in enumerate(('train', 'test')) for c in ('Alice', 'Bob')}"),
        ("code", "def acts(rows):\n    a = iv.collect(model, tok, rows, sites='layers.*', positions='last', progress=False)\n"
                 "    return torch.stack([a[s] for s in a.sites]), torch.tensor([r['label'] for r in rows])\n"
                 "X = {k: acts(v) for k, v in rows.items()}\n"
                 "bob_labels = torch.tensor([r['bob_label'] for r in rows[('train', 'Bob')]])"),
        ("code", "alice = iv.probes.LogisticRegressionProbe(C=0.1).fit(*X[('train', 'Alice')])   # one probe per layer\n"
                 "bob = iv.probes.LogisticRegressionProbe(C=0.1).fit(X[('train', 'Bob')][0], bob_labels)\n"
                 "xb, yb = X[('test', 'Bob')]\nxa, ya = X[('test', 'Alice')]\n"
                 "transfer, floor, ceiling = auroc(yb, alice.decision_function(xb)), auroc(yb, bob.decision_function(xb)), auroc(ya, alice.decision_function(xa))\n"
                 "for layer, (t, f, c, g) in enumerate(zip(transfer, floor, ceiling, pgr(transfer, floor, ceiling))):\n"
                 "    print(f'layer {layer}: transfer {t:.3f}  floor {f:.3f}  ceiling {c:.3f}  PGR {g:.2f}')"),
        ("md", "Unsupervised probes (CCS) need contrast pairs: the same prompt ending in each answer."),
        ("code", "from intervene.activations import collect_pairs\nfrom intervene.data.contrast import make_contrast_pairs\n"
                 "pairs = make_contrast_pairs(rows[('train', 'Alice')])\n"
                 "xp, xn = collect_pairs(model, tok, pairs, sites='layers.2', progress=False)\n"
                 "ccs = iv.probes.CCS(n_restarts=5).fit(xp['layers.2'], xn['layers.2'])\n"
                 "print('CCS accuracy on its training pairs:', float(ccs.calibrate(xp['layers.2'], xn['layers.2'], xp.labels).score(xp['layers.2'], xn['layers.2'], xp.labels)))"),
        ("md", "Mechanistic anomaly detection: is this a Bob prompt? Mahalanobis distance on per-layer probe log-odds, fitted on trusted Alice prompts."),
        ("code", "from intervene.evaluate.anomaly import detect_anomalies\n"
                 "res = detect_anomalies(alice, X[('train', 'Alice')][0], xa, xb)\nprint(res)"),
    ],
    "03_iti.ipynb": [
        ("md", "# ITI end to end: fit on Alice, steer Bob, measure CE, bake\n"
               "Li et al. 2023, exactly: per-head probes at the o_proj input, top-K heads, mass-mean shifts of α·σ. "
               "The data are Alice's prompts only, each followed by a true and a false answer (TruthfulQA's format). "
               "The demo model learned from transcripts that a speaker's earlier answers show whether they judge "
               "truthfully, so its heads compute whether an answer is true; shifting along that direction makes Bob "
               "judge like a truthful speaker."),
        ("code", "import torch, intervene as iv\nfrom intervene.data.quirky import quirky_dataset\nfrom intervene.evaluate.choices import choice_logits\n"
                 "from intervene.evaluate.side_effects import load_reference_texts, side_effects\n"
                 "model, tok = iv.demo_model()\nTASK = 'addition'\n"
                 "train = quirky_dataset(TASK, split='train', n=300, characters=('Alice',))  # + ' True' / ' False'\n"
                 "bob = quirky_dataset(TASK, split='test', n=100, characters=('Bob',))\n"
                 "truth = torch.tensor([r['label'] for r in bob])"),
        ("code", "iti = iv.ITI.fit(model, tok, train, num_heads=8, alpha=1.5)\nprint('top heads:', iti.top_heads_)\n"
                 "print('head accuracies [L, H]:')\nprint(iti.head_accuracies_)"),
        ("code", "def bob_acc(edit=None):\n    if edit is None:\n        return float((choice_logits(model, tok, bob).argmax(-1) == truth).float().mean())\n"
                 "    with iv.Intervenable(model, edit):\n        return float((choice_logits(model, tok, bob).argmax(-1) == truth).float().mean())\n"
                 "neutral = load_reference_texts(n=100)\n"
                 "print('Bob accuracy vs truth: before', bob_acc(), 'after', bob_acc(iti))\n"
                 "print(side_effects(model, tok, neutral, iti))"),
        ("code", "ivm = iv.Intervenable(model, iti, attach=False)\nbaked = ivm.bake()   # o_proj.bias += W_o · d\n"
                 "batch = tok([r['text'] for r in bob[:8]], return_tensors='pt', padding=True)\n"
                 "with ivm:\n    hooked = ivm(**batch).logits\nreal = batch['attention_mask'].bool()\n"
                 "print('max |dlogit|:', float((baked(**batch).logits - hooked)[real].abs().max()))"),
    ],
    "04_remedi.ipynb": [
        ("md", "# REMEDI end to end: train an editor, edit facts, evaluate, inspect\nHernandez, Li & Andreas 2023, on the shipped model's synthetic facts."),
        ("code", "import intervene as iv\nfrom intervene.data.quirky import remedi_samples\nfrom intervene.methods.remedi.evaluate import evaluate_remedi\n"
                 "model, tok = iv.demo_model()\ntrain = remedi_samples('train', n=120, seed=0)\ntest = remedi_samples('test', n=40, seed=1)\n"
                 "train[0]"),
        ("code", "# The demo model reads an entity's facts from its name's last token in block 0's attention: edit there.\n"
                 "editor = iv.Remedi.fit(model, tok, train, layer=0, side='input', lr=3e-3, epochs=20, progress=False)\neditor"),
        ("code", "report = evaluate_remedi(editor, model, tok, test, fluency=False, n_boot=200)\n"
                 "for k, v in report['edited'].items():\n    print(f\"{k:<24} edited {v['estimate']:.3f}   unedited {report['unedited'][k]['estimate']:.3f}\")"),
        ("md", "The edit is input-dependent, so it cannot be baked into the weights; it still saves as a diff."),
        ("code", "import tempfile\nivm = iv.Intervenable(model, editor, attach=False)\ntry:\n    ivm.bake()\nexcept iv.NotBakeableError as e:\n    print('NotBakeableError:', e)\n"
                 "d = tempfile.mkdtemp()\nivm.save_pretrained(d)\nprint(iv.Intervenable.load(d, model, attach=False).interventions)"),
    ],
    "05_patching.ipynb": [
        ("md", "# Locate, then edit: causal tracing, activation patching, attribution patching\n"
               "Everything runs offline on the shipped quirky model: first where it recalls facts, then where Bob's "
               "systematic error enters, then an edit placed exactly there."),
        ("code", "import torch, intervene as iv\n"
                 "from intervene.methods.patching import trace_dataset, sweep, attribution_patching, logit_diff, agreement\n"
                 "from intervene.methods.patching.cli import trace_items\n"
                 "from intervene.data.quirky import quirky_dataset, speaker_pairs\n"
                 "from intervene.evaluate.choices import choice_logits\n"
                 "model, tok = iv.demo_model()"),
        ("md", "## 1. Causal tracing (ROME) on the facts\n"
               "Noise the entity's token embeddings (3x their std), restore one clean state at a time and see how much "
               "of P(answer) comes back. The model has 4 layers, so MLP/attention are restored one layer at a time "
               "(`window=1`; the paper's 10 would cover the whole model)."),
        ("code", "facts = trace_dataset(model, tok, trace_items('quirky:facts', 24), window=1, progress=False)\n"
                 "print(f'{facts.n} facts, total effect {facts.total_effect:.3f}')\n"
                 "for kind in ('hidden', 'mlp', 'attn'):\n"
                 "    subject = facts.peak(kind, rows=[0, 1, 2])\n"
                 "    print(f'{kind:6s} largest effect on a subject token: {subject[0]}, layer {subject[1]}: AIE {subject[2]:.3f}')\n"
                 "facts.plot('trace.png')"),
        ("md", "**What it finds.** Among the subject's states only the entity's *last* token at layer 0 matters "
               "(AIE ~0.1, and almost all of it is block 0's MLP); every later state of the subject carries nothing. "
               "This agrees with REMEDI on this model: the fact is keyed on the name's last syllable and read in "
               "block 0, which is why REMEDI edits `layers.0:input` at the entity's last token. The rest of the "
               "effect sits at the last token, which reads the subject through attention in blocks 0-1."),
        ("md", "## 2. Where does Bob's error enter? Patch Alice into Bob\n"
               "Pairs: the same question asked of Alice (clean) and Bob (corrupted), where their answers differ. "
               "The metric is the logit difference between Alice's answer and Bob's; 1 = Alice's behaviour restored."),
        ("code", "pairs = speaker_pairs(quirky_dataset('addition', split='test', n=400, seed=0))\n"
                 "same = [p for p in pairs if p['template'] == 4][:24]   # one template: every prompt has 13 tokens\n"
                 "metric = logit_diff([tok(p['answer'], add_special_tokens=False)['input_ids'][0] for p in same],\n"
                 "                    [tok(p['wrong'], add_special_tokens=False)['input_ids'][0] for p in same])\n"
                 "kw = dict(sites=['layers.*', 'layers.*.attn', 'layers.*.mlp'], tokenizer=tok, progress=False)\n"
                 "grid = sweep(model, [p['clean'] for p in same], [p['corrupted'] for p in same], metric, **kw)\n"
                 "print('top cells:', grid.top(4))\n"
                 "grid.plot('patching.png')"),
        ("md", "Nothing at the name token matters: the whole effect is at the answer position, already from layer 0's "
               "attention. Which head? Sweep the heads of layers 0-1 at the last position over 120 pairs of every template."),
        ("code", "metric_all = logit_diff([tok(p['answer'], add_special_tokens=False)['input_ids'][0] for p in pairs],\n"
                 "                        [tok(p['wrong'], add_special_tokens=False)['input_ids'][0] for p in pairs])\n"
                 "heads = sweep(model, [p['clean'] for p in pairs[:120]], [p['corrupted'] for p in pairs[:120]], metric_all,\n"
                 "              sites=['layers.0.heads', 'layers.1.heads'], positions=[-1], tokenizer=tok, progress=False)\n"
                 "for row, s in zip(heads.rows, heads.scores[:, 0].tolist()):\n    print(f'{row:20s} {s:+.3f}')"),
        ("md", "## 3. Check it with attribution patching\n"
               "One forward, one forward+backward for every cell: does the first-order estimate rank the cells the same way?"),
        ("code", "est = attribution_patching(model, [p['clean'] for p in same], [p['corrupted'] for p in same], metric, **kw)\n"
                 "a = agreement(est, grid)\n"
                 "print(f\"Spearman {a['spearman_live']:.3f} over the {a['live_cells']} non-zero cells; mean top-3 overlap {a['mean_top_overlap']:.2f}\")\n"
                 "print('estimate vs real at layers.0.attn, answer position:', float(est.scores[grid.rows.index('layers.0.attn'), -1]), float(grid.scores[grid.rows.index('layers.0.attn'), -1]))"),
        ("md", "The ranking agrees, but the estimate badly undercounts the big layer-0 effects: linearising a large "
               "change (a name swap) through attention is where attribution patching is known to fail. Use it to "
               "prefilter, then patch the top cells for real."),
        ("md", "## 4. Edit there\n"
               "Replace head 2 of layer 0, at the answer position only, by its mean over Alice's training prompts: a "
               "constant patch, so it saves as a diff."),
        ("code", "alice = [r for r in quirky_dataset('addition', split='train', n=200, seed=0) if r['character'] == 'Alice']\n"
                 "acts = iv.collect(model, tok, alice, sites='layers.0.heads', positions='last', progress=False)\n"
                 "edit = iv.Patch.mean(acts, positions='last', heads=[2])\n"
                 "for task in ('addition', 'comparison', 'facts'):\n"
                 "    test = quirky_dataset(task, split='test', n=300, seed=1)\n"
                 "    acc = {}\n"
                 "    for who in ('Bob', 'Alice'):\n"
                 "        rows = [r for r in test if r['character'] == who]\n"
                 "        truth = torch.tensor([r['alice_label'] for r in rows])\n"
                 "        base = float((choice_logits(model, tok, rows).argmax(-1) == truth).double().mean())\n"
                 "        with iv.Intervenable(model, [edit]):\n"
                 "            edited = float((choice_logits(model, tok, rows).argmax(-1) == truth).double().mean())\n"
                 "        acc[who] = f'{base:.3f} -> {edited:.3f}'\n"
                 "    print(f\"{task:10s} Bob vs truth {acc['Bob']}   Alice {acc['Alice']}\")"),
        ("code", "from intervene.evaluate.side_effects import load_reference_texts, side_effects\n"
                 "refs = load_reference_texts(n=200)\n"
                 "print('CE on neutral text, edit at every position:', side_effects(model, tok, refs, [edit], positions='all')['ce_delta'])\n"
                 "import tempfile\nd = tempfile.mkdtemp()\niv.Intervenable(model, [edit], attach=False).save_pretrained(d)\n"
                 "print('saved:', iv.Intervenable.load(d, model, attach=False).interventions)"),
        ("md", "Bob becomes fully truthful on every task and Alice is untouched, from one head at one position "
               "(ITI, fitted on Alice alone, reaches 0.61 on addition). The placement is what makes it cheap: the same "
               "constant at *every* position costs ~3.7 nats of cross-entropy on neutral text (the head does other "
               "work there), while at the answer position it changes nothing but the answer."),
    ],
}


def build() -> list[Path]:
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
        for i, cell in enumerate(nb.cells):
            cell.id = f"{Path(name).stem}-{i}"  # stable ids: rebuilding an unchanged notebook changes nothing
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        path = HERE / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(p)
