"""elk-style runs: fit one probe per layer on contrast pairs, evaluate on held-out data and transfer.

What the ``intervene elicit | eval | sweep`` commands call; usable from Python too:

>>> result = elicit(ElicitConfig(model="demo", dataset="quirky:addition", net="lr", character="Alice"),
...                 out="runs/alice")
>>> evaluate_run("runs/alice", "demo", "quirky:addition", character="Bob")   # transfer to Bob

A run folder holds ``config.json``, ``probes/layers.{i}/`` (the probes' own save format) and
``eval.csv`` (``layer, auroc, auroc_lower, auroc_upper, acc, cal_acc, ece`` on the held-out split);
``evaluate_run`` adds ``eval_<name>.csv``. Features: contrast-pair probes (``ccs``, ``crc``) see
``(x_pos, x_neg)`` and are Platt-calibrated on the training labels (which fixes their sign); the
supervised ones (``lr``, ``mean-diff``, ``lda``) see the difference ``x_pos - x_neg``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from intervene.activations.distributed import is_main_process
from intervene.assets import load_model
from intervene.data.contrast import ContrastPairs, make_contrast_pairs, question_id
from intervene.data.loaders import dataset_slug, load_dataset_rows

NETS = {"lr": "logistic_regression", "mean-diff": "mean_diff", "lda": "lda", "ccs": "ccs", "crc": "crc"}
EVAL_COLUMNS = ("layer", "auroc", "auroc_lower", "auroc_upper", "acc", "cal_acc", "ece")
_METRICS = {"auroc": "auroc", "acc": "accuracy", "cal_acc": "calibrated_accuracy", "ece": "ece"}


@dataclass
class ElicitConfig:
    """Everything that defines an elicit run (saved as the run's ``config.json``)."""

    model: str
    dataset: str
    net: str = "lr"
    layers: list[int] | None = None  # None: every layer
    max_train: int | None = None
    max_test: int | None = None
    character: str | None = None
    labels: str = "truth"  # or "character": fit on what the persona says
    templates: str | None = None  # a built-in set or a format string; None: the dataset's default
    positions: str = "last"
    batch_size: int = 16
    seed: int = 0
    n_bootstrap: int = 1000
    net_kwargs: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool = True


@dataclass
class ElicitResult:
    """A finished run: the probes by layer, the held-out metrics (one dict per layer) and the folder."""

    config: ElicitConfig
    probes: dict[int, Any]
    eval_rows: list[dict[str, float]]
    run_dir: Path | None

    @property
    def best(self) -> dict[str, float]:
        """The held-out row with the highest AUROC."""
        return max(self.eval_rows, key=lambda r: (r["auroc"] == r["auroc"], r["auroc"]))


# ---- model, data, features ------------------------------------------------------------------------
def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(name)).name or str(name)).strip("-") or "model"


def make_probe(net: str, seed: int = 0, **kwargs: Any) -> Any:
    """A fresh probe for a CLI net name (``lr``, ``mean-diff``, ``lda``, ``ccs``, ``crc``)."""
    import intervene.probes as probes

    if net not in NETS:
        raise ValueError(f"unknown net {net!r}; choose from {sorted(NETS)}")
    cls = probes.lookup_probe(NETS[net])
    if "seed" in cls._param_names() and "seed" not in kwargs:
        kwargs["seed"] = seed
    return cls(**kwargs)


def labels_for(pairs: ContrastPairs, against: str) -> torch.Tensor:
    """``truth``: the ``label`` column; ``character``: what each row's persona says (``character_label``,
    else ``alice_label``/``bob_label`` by ``character``)."""
    if against == "truth":
        return pairs.labels
    if against != "character":
        raise ValueError(f"labels must be 'truth' or 'character', got {against!r}")
    if "character_label" in pairs.meta:
        return pairs.relabel("character_label").labels
    if "character" in pairs.meta:
        missing = {f"{c.lower()}_label" for c in pairs.column("character")} - set(pairs.meta)
        if missing:
            raise ValueError(f"labels 'character' need the columns {sorted(missing)}")
        vals = [pairs.meta[f"{c.lower()}_label"][i] for i, c in enumerate(pairs.column("character"))]
        return torch.tensor([int(v) for v in vals], dtype=torch.int64)
    raise ValueError("labels 'character' need rows with a 'character' (and its '<name>_label') field")


def _pairs(rows: list[dict], cfg: ElicitConfig, what: str) -> ContrastPairs:
    if not rows:
        raise ValueError(f"no {what} rows for {cfg.dataset}" + (f" with character {cfg.character}" if cfg.character else ""))
    return make_contrast_pairs(rows, cfg.templates, seed=cfg.seed)


def features(model: Any, tok: Any, pairs: ContrastPairs, layers: Sequence[int], cfg: ElicitConfig
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_pos, x_neg)``, each ``[L, N, D]``, at the configured positions of every layer."""
    from intervene.activations import collect_pairs

    pos, neg = collect_pairs(model, tok, pairs, [f"layers.{i}" for i in layers], positions=cfg.positions,
                             span="answer" if cfg.positions == "mean" else None, batch_size=cfg.batch_size,
                             cache_dir=cfg.cache_dir, progress=cfg.progress, padding_side="left")
    return pos.stack(), neg.stack()


def _inputs(probe: Any, xp: torch.Tensor, xn: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (xp, xn) if probe.n_inputs == 2 else (xp - xn,)


def fit_probes(net: str, xp: torch.Tensor, xn: torch.Tensor, y: torch.Tensor, seed: int = 0,
               **kwargs: Any) -> Any:
    """One probe per layer, fitted in one batched call on ``[L, N, D]`` contrast-pair features."""
    if y.numel() and (int(y.min()) == int(y.max())):
        raise ValueError("the training labels have a single class; a probe needs both")
    probe = make_probe(net, seed, **kwargs)
    if probe.n_inputs == 2:
        return probe.fit(xp, xn).calibrate(xp, xn, y)
    return probe.fit(xp - xn, y)


def eval_rows(probes: dict[int, Any], xp: torch.Tensor, xn: torch.Tensor, y: torch.Tensor,
              n_bootstrap: int = 1000, seed: int = 0) -> list[dict[str, float]]:
    """Held-out metrics per layer (``EVAL_COLUMNS``); ``xp``/``xn`` are ``[L, N, D]`` in ``probes``' order."""
    from intervene.evaluate.transfer import transfer_eval

    rows = []
    for k, (layer, probe) in enumerate(probes.items()):
        x = _inputs(probe, xp[k], xn[k])
        res = transfer_eval(probe, x if len(x) == 2 else x[0], y, metrics=tuple(_METRICS.values()),
                            n_bootstrap=n_bootstrap, seed=seed)
        row: dict[str, float] = {"layer": layer}
        for col, metric in _METRICS.items():
            row[col] = float(res[metric].estimate)
            if col == "auroc":
                row["auroc_lower"], row["auroc_upper"] = float(res[metric].lower), float(res[metric].upper)
        rows.append(row)
    return rows


# ---- files ----------------------------------------------------------------------------------------
def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV written here, numbers parsed back."""
    def parse(v: str) -> Any:
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with Path(path).open(newline="") as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _save_run(out: Path, cfg: ElicitConfig, probes: dict[int, Any], rows: list[dict], extra: dict) -> None:
    from intervene.version import __version__

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for layer, probe in probes.items():
        files[str(layer)] = str(Path(probe.save(out / "probes" / f"layers.{layer}")).relative_to(out))
    meta = {"command": "elicit", "intervene_version": __version__, **asdict(cfg),
            "features": "pair" if next(iter(probes.values())).n_inputs == 2 else "diff", "probes": files, **extra}
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    write_csv(out / "eval.csv", rows, EVAL_COLUMNS)


# ---- the commands ----------------------------------------------------------------------------------
def elicit(cfg: ElicitConfig, out: str | Path | None = None, model: Any = None, tok: Any = None,
           rows: tuple[list[dict], list[dict]] | None = None) -> ElicitResult:
    """Fit a probe per layer on ``cfg.dataset``'s train split and evaluate it on the test split.

    ``model``/``tok`` skip loading ``cfg.model``; ``rows`` = ``(train, test)`` skips loading the dataset
    (the sweep's pooled dataset). Writes the run folder when ``out`` is given.
    """
    from intervene.sites import num_layers

    if cfg.net not in NETS:
        raise ValueError(f"unknown net {cfg.net!r}; choose from {sorted(NETS)}")
    if model is None:
        model, tok = load_model(cfg.model, cfg.dtype, cfg.device, cfg.progress)
    layers = list(range(num_layers(model))) if cfg.layers is None else list(cfg.layers)
    if rows is None:
        rows = (load_dataset_rows(cfg.dataset, "train", cfg.max_train, cfg.seed, cfg.character),
                load_dataset_rows(cfg.dataset, "test", cfg.max_test, cfg.seed, cfg.character))
    train, test = _pairs(rows[0], cfg, "train"), _pairs(rows[1], cfg, "test")
    xp, xn = features(model, tok, train, layers, cfg)
    batched = fit_probes(cfg.net, xp, xn, labels_for(train, cfg.labels), cfg.seed, **cfg.net_kwargs)
    probes = {layer: batched[k] for k, layer in enumerate(layers)}
    tp, tn = features(model, tok, test, layers, cfg)
    results = eval_rows(probes, tp, tn, labels_for(test, "truth"), cfg.n_bootstrap, cfg.seed)
    run_dir = Path(out) if out is not None else None
    if run_dir is not None and is_main_process():  # under torchrun every rank holds the same probes; one writes
        from intervene.diff_format import fingerprint

        _save_run(run_dir, cfg, probes, results, {"n_train": len(train), "n_test": len(test), "layers": layers,
                                                  "base_model": fingerprint(model)})
    return ElicitResult(cfg, probes, results, run_dir)


def load_run(run: str | Path) -> tuple[dict[str, Any], dict[int, Any]]:
    """A run's config and its probes by layer."""
    from intervene.errors import ProbeFormatError, ProbeNotFoundError
    from intervene.probes import load_probe
    from intervene.safeio import Root

    run = Path(run)
    path = run / "config.json"
    if not path.is_file():
        raise ProbeNotFoundError(f"{run} is not an elicit run (no config.json)", path=path)
    root = Root(run, ProbeFormatError)  # the run's files, and only those: a probe path may not lead out
    config = root.read_json("config.json")
    table = config.get("probes") if isinstance(config, dict) else None
    if not isinstance(table, dict) or not all(isinstance(k, str) and k.isdigit() and isinstance(v, str)
                                              for k, v in table.items()):
        raise ProbeFormatError.at(path, "probes", "an object {layer: probe path inside the run}", table)
    probes = {int(layer): load_probe(root.resolve(rel, f"probes.{layer}")) for layer, rel in table.items()}
    return config, probes


def eval_name(dataset: str, character: str | None = None, against: str = "truth") -> str:
    return "_".join([dataset_slug(dataset)] + ([character] if character else [])
                    + ([against] if against != "truth" else []))


def evaluate_run(run: str | Path, model_name: str, dataset: str, character: str | None = None,
                 against: str = "truth", name: str | None = None, max_examples: int | None = None,
                 model: Any = None, tok: Any = None, progress: bool = True) -> tuple[list[dict], Path]:
    """Transfer: the run's probes on ``dataset``'s test split (``character``'s rows); writes ``eval_<name>.csv``.

    ``against="truth"`` scores the probes against the ``label`` column, ``"character"`` against what
    the persona says.
    """
    config, probes = load_run(run)
    known = {f.name for f in fields(ElicitConfig)}
    cfg = ElicitConfig(**{k: v for k, v in config.items() if k in known})
    cfg.model, cfg.dataset, cfg.character, cfg.progress = model_name, dataset, character, progress
    if model is None:
        model, tok = load_model(model_name, cfg.dtype, cfg.device, cfg.progress)
    rows = load_dataset_rows(dataset, "test", max_examples, cfg.seed, character)
    pairs = _pairs(rows, cfg, "test")
    layers = sorted(probes)
    xp, xn = features(model, tok, pairs, layers, cfg)
    results = eval_rows({k: probes[k] for k in layers}, xp, xn, labels_for(pairs, against), cfg.n_bootstrap, cfg.seed)
    path = Path(run) / f"eval_{name or eval_name(dataset, character, against)}.csv"
    if is_main_process():
        write_csv(path, results, EVAL_COLUMNS)
    return results, path


SUMMARY_COLUMNS = ("model", "dataset", "net", "best_layer", *EVAL_COLUMNS[1:], "run_dir")


def sweep(models: Sequence[str], datasets: Sequence[str], cfg: ElicitConfig, out: str | Path,
          add_pooled: bool = False) -> list[dict[str, Any]]:
    """:func:`elicit` on every model x dataset (plus all datasets pooled); writes ``out/summary.csv``.

    Runs go to ``out/<model>/<dataset>``; the summary has one row per run at its best held-out layer.
    """
    out = Path(out)
    data = {ds: (load_dataset_rows(ds, "train", cfg.max_train, cfg.seed, cfg.character),
                 load_dataset_rows(ds, "test", cfg.max_test, cfg.seed, cfg.character)) for ds in datasets}
    if add_pooled:
        # Tag each row with its source; question ids stay distinct across datasets.
        data["pooled"] = tuple([{**r, "source": ds, "question_id": f"{ds}/{question_id(r, i)}"}
                                for ds in datasets for i, r in enumerate(data[ds][k])] for k in (0, 1))
    summary = []
    for model_name in models:
        model, tok = load_model(model_name, cfg.dtype, cfg.device, cfg.progress)
        for ds, rows in data.items():
            run_cfg = ElicitConfig(**{**asdict(cfg), "model": model_name, "dataset": ds})
            run_dir = out / model_slug(model_name) / dataset_slug(ds)
            res = elicit(run_cfg, run_dir, model, tok, rows)
            best = res.best
            summary.append({"model": model_name, "dataset": ds, "net": cfg.net, "best_layer": best["layer"],
                            **{k: best[k] for k in EVAL_COLUMNS[1:]}, "run_dir": str(run_dir)})
        del model, tok
    if is_main_process():
        write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    return summary
