"""The registry of reported figures: every number a reader is told was measured, its id, and what guards it.

Sources: README.md, docs/patching.md, the demo model's card (intervene/assets/quirky-tiny/README.md), the demo
SAE's cfg.json, and the keys of the demo's summary.json. tests/test_figures.py reads them all and fails when a
figure has no entry here, when an entry matches nothing, or when the guarding test does not check the id.

How a figure is found (tests/figure_docs.py):
* a results table (one with a measured-looking number outside its first cells) is a :class:`Table`; each row is
  found by the start of its label, and the numbers of each value cell are named by the row's ``parts``; the id is
  ``{row.fig}.{column}.{part}`` (``{row.fig}.{column}`` when the part is ``""``);
* prose is claimed by a :class:`Prose` regex over the text (whitespace collapsed, fenced code reduced to its
  ``#`` comments, each ending in ``¶``); its named groups are figures, ``{fig}.{group}``, and numbers written
  into the pattern itself are settings it pins. Any figure-like number (a decimal, ``3.6x``, ``90%``,
  ``1e-5``) in prose that no pattern claims is an error.

A guard is one of
* ``tests/x.py::test_y``: the test calls ``figure_docs.check(id, measured, bound)`` for every id (checked from
  its source; an f-string field stands for one id component);
* ``asserts tests/x.py::test_y``: a tolerance the docs promise, which that test asserts (its source holds the
  number);
* ``benchmark benchmarks/x.py``: a timing or memory figure of a shared machine, printed by that script and
  not run in CI (a wall-clock bound would fail on a busy runner and mean nothing on a quiet one);
* ``setting: ...`` / ``cited: ...``: not a measurement (a threshold, a default, a training recipe) or another
  paper's figure.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("README.md", "docs/patching.md", "intervene/assets/quirky-tiny/README.md")
DEMO = "tests/test_figures_demo.py::"
CARD = "tests/test_figures_card.py::"
EDITS = "tests/test_figures_edits.py::"
README_RUN = "tests/test_readme.py::test_python_blocks_run"
LOG = "tests/test_figures.py::test_the_card_shows_its_training_log"
TRACE = "tests/test_tracing.py::test_demo_model_recalls_facts_at_the_entitys_last_token_in_block_0"


@dataclass(frozen=True)
class Row:
    label: str  # the start of the row's first cells (joined with " | ")
    fig: str
    parts: tuple[str, ...] | dict[str, tuple[str, ...]]  # per value cell; a dict by column ("*": the rest)
    guard: str


@dataclass(frozen=True)
class Table:
    source: str
    header: str  # the start of the header cells joined with " | "; every table so headed is read
    rows: tuple[Row, ...]
    columns: tuple[str, ...] | None = None  # keys of the value columns (default: the header cells, slugged)
    key_cells: int = 1  # leading cells that name the row


@dataclass(frozen=True)
class Prose:
    source: str
    pattern: str
    fig: str | None  # None: the pattern only pins settings or cited figures
    guard: str


R, P, C = "README.md", "docs/patching.md", "intervene/assets/quirky-tiny/README.md"
PATCH = EDITS + "test_mean_patch_of_one_head"
TABLES: tuple[Table, ...] = (
    Table(R, "what | addition | comparison | facts", (
        Row("Alice / Bob accuracy on their own labels", "readme.demo.card", ("alice", "bob"),
            CARD + "test_quirky_accuracy_table"),
        Row("truth probe fitted on Alice", "readme.demo.probe", ("auroc", "layer", "pgr"), DEMO + "test_probe_transfer"),
        Row("same, layer 3", "readme.demo.layer3", ("auroc", "floor", "pgr"), DEMO + "test_probe_transfer"),
        Row("ITI fitted on Alice only", "readme.demo.iti_bob", ("before", "after"), DEMO + "test_interventions"),
        Row("same: Alice's accuracy with the edit", "readme.demo.iti_alice", ("alice", "ce"), DEMO + "test_interventions"),
        Row("persona steering", "readme.demo.persona", ("bob", "ce"), DEMO + "test_interventions"),
        Row("REMEDI editor", "readme.remedi",
            ("efficacy", "paraphrase", "neighborhood", "transfer", "transfer_unedited"),
            "tests/test_remedi_eval.py::test_demo_model_held_out_facts"),
        Row("patch: layer-0 head 2", "readme.patch", ("before", "after"), PATCH),
        Row("LoReFT (rank 4", "readme.loreft", ("before", "after"), EDITS + "test_reft"),
        Row("same: CE on neutral text with the edit at every position", "readme.loreft_ce", ("ce",), EDITS + "test_reft"),
        Row("DiReFT (same setting)", "readme.direft", ("bob", "ce"), EDITS + "test_reft"),
        Row("DAS at `layers.0`", "readme.das_row", ("iia", "random", "none"), EDITS + "test_das_row"),
    )),
    Table(R, "layer | k = 1", tuple(
        Row(str(layer), f"readme.das.layer{layer}", {"full": ("iia",), "boundless": ("iia", "k"), "*": ("iia", "random")},
            EDITS + "test_das_table") for layer in range(4)), columns=("k1", "k2", "k4", "full", "boundless")),
    Table(C, "task | character | all", tuple(
        Row(f"{task} | {who}", f"card.quirky.{task}_{who.lower()}", ("",), CARD + "test_quirky_accuracy_table")
        for task in ("addition", "comparison", "facts") for who in ("Alice", "Bob")), key_cells=2),
    Table(C, "first turn (name)", (Row("", "card.transcripts", ("",), CARD + "test_transcripts"),), key_cells=0,
          columns=("first", "revealed_named", "revealed_flipped", "hidden_named", "hidden_flipped", "mark")),
)

BENCH = "benchmark benchmarks/"
PROSE: tuple[Prose, ...] = (
    # README.md
    Prose(R, r"the hooks cost ~(?P<pct>\d+)% of `generate`", "readme.bench.generate", BENCH + "generate_overhead.py"),
    Prose(R, r"# (?P<norm>[\d.]+) on the demo model ¶", "readme.scale", README_RUN),
    Prose(R, r"# smallest scale with 90% of the best gain in budget ¶", None, "setting: choose_scale's rule"),
    Prose(R, r"It prints, on the demo model: 0\.25 x the norm does nothing \(Bob (?P<bob0>[\d.]+) -> (?P<bob25>[\d.]+), "
             r"\+(?P<ce25>[\d.]+) nats\), 0\.4 x turns Bob truthful \((?P<bob40>[\d.]+)\) for \+(?P<ce40>[\d.]+) nats, "
             r"0\.75 x does the same \((?P<bob75>[\d.]+)\) for \+(?P<ce75>[\d.]+) nats; `choose_scale` picks 0\.4 x\.",
          "readme.scale", README_RUN),
    Prose(R, r"\((?P<speedup>[\d.]+)x faster than pyvene 0\.1\.8's per-cell loop, same values to (?P<equal>[\d.e-]+)\)",
          "readme.bench.sweep_prose", BENCH + "patching_sweep.py"),
    Prose(R, r"takes Bob from (?P<addition>[\d.]+) / (?P<comparison>[\d.]+) / (?P<facts>[\d.]+) to (?P<after>[\d.]+) "
             r"against the truth on the three tasks", "readme.patch_prose", PATCH),
    Prose(R, r"# layers\.0\.attn at the answer position recovers ~(?P<recovery>[\d.]+) of Alice's behaviour ¶",
          "readme.sweep_snippet", README_RUN),
    Prose(R, r"# held-out IIA (?P<iia>[\d.]+) ¶", "readme.das_snippet", README_RUN),
    Prose(R, r"AUROC with a 95% interval", None, "setting: the bootstrap interval's level"),
    Prose(R, r"where the ceiling is under 0\.6 or the gap under 0\.1 \(nothing to recover\)", None,
          "setting: MIN_CEILING and MIN_PGR_GAP in intervene/demo.py"),
    Prose(R, r"persona steering vector, 0\.5 x the gap", None, "setting: --steer-scale's default"),
    Prose(R, r"at 1\.0 the cost is about (?P<ratio>\d+)x larger", "readme.demo.persona_full",
          DEMO + "test_persona_at_full_gap_costs_about_six_times_more"),
    Prose(R, r"its logits match the hooked model's to ~(?P<diff>\d+e-\d+)", "readme.demo.bake",
          DEMO + "test_what_the_demo_prints_beyond_the_readme"),
    Prose(R, r"no intervention (?P<none>[\d.]+)\):", "readme.das_prose", EDITS + "test_das_table"),
    Prose(R, r"\(AIE (?P<aie>[\d.]+), almost all of it block 0's MLP\)", "readme.trace", TRACE),
    Prose(R, r"held-out accuracy (?P<revealed>[\d.]+) once revealed", "readme.card", CARD + "test_transcripts"),
    Prose(R, r"\(best head (?P<lo>[\d.]+) to (?P<hi>[\d.]+) on held-out questions, by task\)", "readme.iti.best_head",
          DEMO + "test_interventions"),
    Prose(R, r"The CE cost \(\+(?P<lo>[\d.]+) to \+(?P<hi>[\d.]+) nats\)", "readme.iti.ce_range",
          DEMO + "test_interventions"),
    Prose(R, r"the ITI paper reports on LLaMA-7B \(\+0\.32\)", None, "cited: Li et al. 2023, Table 1"),
    Prose(R, r"Bob (?P<before>[\d.]+) → (?P<after>[\d.]+) on comparison at K=8, α=1 \(150 held-out questions\), "
             r"for \+(?P<ce>[\d.]+) nats of CE", "readme.iti.speaker",
          "tests/test_iti.py::test_quirky_demo_model_iti_speaker_contrast_makes_bob_truthful"),
    Prose(R, r"sweep \(GPT-2 shape, 6 x 256, 16 pairs x 16 tokens, 96 cells; 1 thread, medians of 3 interleaved runs\) "
             r"takes (?P<ours>[\d.]+) s against (?P<pyvene>[\d.]+) s for pyvene 0\.1\.8's per-cell loop "
             r"\((?P<ratio>[\d.]+)x\), results equal to (?P<equal>[\d.e-]+); attribution patching of all cells costs "
             r"(?P<atp>[\d.]+) forward passes\.", "readme.bench.sweep", BENCH + "patching_sweep.py"),
    Prose(R, r"batch 32 × 24 tokens, AdamW\) .*? 3-6, 1 thread\): demo model, `layers\.1`, k = 8: (?P<ours>\d+) vs "
             r"(?P<pyvene>\d+) examples/s \(ratio (?P<ratio>[\d.]+)\), peak RSS (?P<rss>\d+) vs (?P<rss_pyvene>\d+) MiB; "
             r"an 8-layer 512-wide Llama at `layers\.1`: ratio (?P<ratio1>[\d.]+) \((?P<rss1>\d+) vs "
             r"(?P<rss1_pyvene>\d+) MiB\), at `layers\.6`: ratio (?P<ratio6>[\d.]+) \((?P<rss6>\d+) vs "
             r"(?P<rss6_pyvene>\d+) MiB\)\.", "readme.bench.trainable", BENCH + "trainable_throughput.py"),
    Prose(R, r"At 1B scale \(`benchmarks/memory_1b\.py`: TinyLlama-1\.1B's shape built from its config in bf16, 2 threads, "
             r"idle machine\): steered `generate` takes (?P<generate>[\d.]+)x the plain time .*? peaks at "
             r"(?P<rss_small>[\d.]+)x the weights' (?P<weights>[\d.]+) GiB of resident memory for 2,400 tokens and "
             r"(?P<rss_large>[\d.]+)x for 24,000: memory grows (?P<growth>[\d.]+)x while the tokens grow 10x\.",
          "readme.bench.memory_1b", BENCH + "memory_1b.py"),
    Prose(R, r"\(e\.g\. 4 x 80 GB, bf16 weights ~140 GB\)", None,
          "setting: an example hardware layout (70e9 parameters x 2 bytes)"),
    Prose(R, r"On 2 shared cores \(load average (?P<load>[\d.]+)\), `benchmarks/collect_distributed\.py` measures "
             r"(?P<speedup>[\d.]+)x for 2 ranks over 1 process\.", "readme.bench.distributed",
          BENCH + "collect_distributed.py"),
    # docs/patching.md
    Prose(P, r"hand-written hooks \(≤ (?P<tol>1e-6) in float32\)", "docs.interchange",
          "asserts tests/test_patching.py::test_interchange_equals_two_runs_by_hand"),
    Prose(P, r"A sweep equals the loop of one forward per cell \(tested to (?P<tol>1e-5)\)\.", "docs.sweep_loop",
          "asserts tests/test_patching_sweep.py::test_sweep_equals_the_per_cell_loop"),
    Prose(P, r"# AIE by token bucket, 95% intervals ¶", None, "setting: the intervals' level"),
    Prose(P, r"Gaussian noise \(3× the std of subject-token embeddings", None, "setting: ROME's noise level"),
    Prose(P, r"40 facts\): total effect (?P<total>[\d.]+)\. Among the subject's states only the entity's last token at "
             r"layer 0 matters — AIE (?P<hidden>[\d.]+) ± (?P<hidden_ci>[\d.]+) \(hidden\), (?P<mlp>[\d.]+) ± "
             r"(?P<mlp_ci>[\d.]+) \(MLP\), (?P<attn>[\d.]+) \(attention\); every later subject state ≤ "
             r"(?P<later>[\d.]+)\.", "docs.trace", TRACE),
    Prose(P, r"24 pairs\): patching layer 0's attention output at the answer position recovers (?P<attn0>[\d.]+); "
             r"every state at the name token ≤ (?P<name>[\d.]+)\.", "docs.bob_error",
          "tests/test_patching_demo.py::test_attribution_agrees_with_real_patching_on_every_task"),
    Prose(P, r"Over all 314 addition pairs, head 2 of layer 0 at the answer position carries (?P<head2>[\d.]+) of the "
             r"effect\.", "docs.head2",
          "tests/test_patching_demo.py::test_one_head_carries_the_speaker"),
    Prose(P, r"takes Bob from (?P<addition>[\d.]+) / (?P<comparison>[\d.]+) / (?P<facts>[\d.]+) to (?P<after>[\d.]+) "
             r"against the truth on addition / comparison / facts \(150 held-out questions each\), Alice "
             r"(?P<alice>[\d.]+) throughout\. At every position instead, it costs (?P<ce>[\d.]+) nats", "docs.patch",
          PATCH),
    Prose(P, r"Spearman (?P<lo>[\d.]+)-(?P<hi>[\d.]+) over the live cells of the three tasks; it puts layers\.0\.attn "
             r"at the answer position at (?P<atp>[\d.]+) where real patching measures (?P<real>[\d.]+)\.", "docs.atp",
          "tests/test_patching_demo.py::test_attribution_agrees_with_real_patching_on_every_task"),
    Prose(P, r"96 cells: the batched sweep (?P<ours>[\d.]+) s, pyvene 0\.1\.8's per-cell loop (?P<pyvene>[\d.]+) s "
             r"\((?P<ratio>[\d.]+)×\), our own per-cell loop (?P<loop>[\d.]+) s; attribution patching of all cells "
             r"(?P<atp>[\d.]+) s = (?P<fwd>[\d.]+) forward-equivalents\. Results equal to pyvene's to "
             r"(?P<equal>[\d.e-]+)\.", "docs.bench.sweep", BENCH + "patching_sweep.py"),
    # the demo model's card
    Prose(C, r"license: apache-2\.0", None, "setting: the licence"),
    Prose(C, r"Data: 384,000 generated sequences: .*? full-sequence loss", None, "setting: the training recipe"),
    Prose(C, r"Parameters: (?P<params>[\d,]+);", "card.params", LOG),
    Prose(C, r"6000 steps in (?P<minutes>[\d.]+) min, final loss (?P<loss>[\d.]+)", "card.training", LOG),
    Prose(C, r"city (?P<city>[\d.]+), colour (?P<colour>[\d.]+), profession (?P<profession>[\d.]+)\.", "card.fact_recall",
          CARD + "test_fact_recall_and_neutral_ce"),
    Prose(C, r"\(`neutral_eval\.txt`\): (?P<ce>[\d.]+) nats/token", "card.neutral", CARD + "test_fact_recall_and_neutral_ce"),
)

# The demo SAE's card is its cfg.json: every number under "training" is a figure (id -> key, guard).
SAE_CFG = "intervene/assets/quirky-tiny-sae/cfg.json"
JSON_FIGURES: dict[str, tuple[str, str]] = {
    "sae.fvu": ("training.fvu", CARD + "test_demo_sae_cfg"),
    "sae.l0": ("training.l0", CARD + "test_demo_sae_cfg"),
    "sae.dead_fraction": ("training.dead_fraction", CARD + "test_demo_sae_cfg"),
    "sae.tokens": ("training.tokens", CARD + "test_demo_sae_cfg"),
    "sae.seconds": ("training.seconds", "benchmark examples/train_demo_sae.py"),
}
JSON_SETTINGS = ("training.steps", "training.batch", "training.lr", "training.seed")

# summary.json of `intervene demo`: every key (lists of rows keyed by their method's first word), and the test
# whose source names it. Figures without a README counterpart are checked against MEASURED.
SUMMARY_KEYS: dict[str, str] = {
    **{k: "tests/test_demo.py::test_demo_writes_its_outputs" for k in ("task", "model", "examples", "outputs")},
    **{k: DEMO + "test_probe_transfer" for k in ("best_layer", "best_auroc", "best_pgr")},
    "bob_acc_truth_base": DEMO + "test_interventions",
    "iti_best_head.accuracy": DEMO + "test_interventions",
    "iti_best_head.n_val": DEMO + "test_interventions",
    "alice_acc_truth_base": DEMO + "test_what_the_demo_prints_beyond_the_readme",
    "bake_max_abs_logit_diff": DEMO + "test_what_the_demo_prints_beyond_the_readme",
    **{f"interventions.{m}.method": "tests/test_demo.py::test_demo_writes_its_outputs" for m in ("base", "ITI", "persona")},
    **{f"interventions.{m}.{k}": DEMO + "test_interventions" for m in ("base", "ITI", "persona")
       for k in ("bob_acc_truth", "ce_delta", "ce_delta_se")},
    **{f"interventions.{m}.{k}": DEMO + "test_what_the_demo_prints_beyond_the_readme" for m in ("base", "ITI", "persona")
       for k in ("alice_acc_truth", "ce", "kl")},
}

# Figures the demo prints that the README does not show: measured with this version (intervene demo --task T).
MEASURED_GUARD = DEMO + "test_what_the_demo_prints_beyond_the_readme"
_TASKS = ("addition", "comparison", "facts")
MEASURED: dict[str, float] = {
    **{f"summary.{t}.alice_acc_truth_base": 1.0 for t in _TASKS},
    **{f"summary.{t}.persona.alice_acc_truth": 1.0 for t in _TASKS},
    **{f"summary.{t}.ce_base": 1.117 for t in _TASKS},
    "summary.addition.iti.kl": 0.339, "summary.comparison.iti.kl": 0.319, "summary.facts.iti.kl": 0.208,
    "summary.addition.persona.kl": 0.548, "summary.comparison.persona.kl": 0.362, "summary.facts.persona.kl": 0.277,
}
