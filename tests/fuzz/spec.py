"""The fuzz suite's own, independent description of each JSON format: what a mutation must be refused for.

This is deliberately *not* the library's schema (``intervene/schemas``): it is a second, hand-written
reading of the formats, used as the oracle for "silent acceptance". A rule says, for the JSON paths
it matches, which JSON types are allowed and whether a change of value must be refused:

* ``types``: allowed JSON types (``int``, ``num`` = int or float, ``str``, ``bool``, ``null``, ``list``,
  ``dict``); a value of another type must be refused.
* ``req``: deleting the key must be refused.
* ``exact``: any other value must be refused (sizes checked against the files, checksums, names that
  tie the config to the tensors...).
* ``enum``: a string outside these values must be refused.
* ``free``: anything goes below this path (metadata, training records); ``open``: unknown keys allowed.

Paths are tuples of keys and list indices; in patterns ``#`` matches any index, ``*`` any key, and a
pattern matches a path of the same length. The first matching rule wins; paths no rule matches are
treated as ``free`` (only the loader's invariants are checked there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    pattern: tuple[str, ...]
    types: frozenset[str]
    req: bool = False
    exact: bool = False
    enum: tuple[str, ...] | None = None
    free: bool = False
    open: bool = False


def R(path: str, types: str = "", *flags: str, enum: tuple[str, ...] | None = None) -> Rule:
    return Rule(tuple(path.split(".")) if path else (), frozenset(types.split("|")) if types else frozenset(),
                "req" in flags, "exact" in flags, enum, "free" in flags, "open" in flags)


FINGERPRINT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
P = "interventions.#.params"
DIFF = [
    R("", "dict"),
    R("format_version", "int", "req", "exact"),
    R("library", "str", enum=("intervene",)),
    R("library_version", "str|null"), R("transformers_version", "str|null"),
    R("base_model", "dict"), R("base_model.name_or_path", "str|null"), R("base_model.revision", "str|null"),
    R("base_model.model_type", "str|null", enum=("llama",)),
    *[R(f"base_model.{k}", "int|null", "exact") for k in FINGERPRINT],
    R("interventions", "list", "req", "exact"), R("interventions.#", "dict", "exact"),
    R("interventions.#.type", "str", "req", "exact"), R("interventions.#.name", "str", "req", "exact"),
    R("interventions.#.sites", "list", "req", "exact"), R("interventions.#.sites.#", "str"),
    R("interventions.#.positions", "str|list|dict", enum=("all", "prompt", "generated", "last")),
    R("interventions.#.positions.#", "int"),
    R("interventions.#.positions.per_example", "list", "req"), R("interventions.#.positions.per_example.#", "list"),
    R("interventions.#.positions.per_example.#.#", "int"),
    R(P, "dict"),
    R(f"{P}.scale", "num"), R(f"{P}.value", "num|null"), R(f"{P}.alpha", "num"),
    R(f"{P}.heads", "list", "req"), R(f"{P}.heads.#", "list"), R(f"{P}.heads.#.#", "int"),
    R(f"{P}.fit", "dict", "free"), R(f"{P}.config", "dict", "free"),
    R(f"{P}.layer", "int", "req", "exact"), R(f"{P}.side", "str", "exact", enum=("output", "input")),
    R(f"{P}.hidden_size", "int", "req", "exact"), R(f"{P}.rank", "int|null", "exact"),
    R(f"{P}.use_entity", "bool", "exact"),
    R(f"{P}.latents", "list", "req"), R(f"{P}.latents.#", "int"), R(f"{P}.values", "list", "req"),
    R(f"{P}.values.#", "num"), R(f"{P}.activation", "str", "req", "exact"), R(f"{P}.k", "int|null", "exact"),
    R(f"{P}.d_sae", "int", "req"), R(f"{P}.d_in", "int", "req", "exact"), R(f"{P}.source", "str|null"),
    R("metadata", "dict", "free"),
    R("weights", "dict", "req", "exact"), R("weights.sha256", "str", "req", "exact"),
    R("weights.bytes", "int", "req", "exact"),
]

PROBE = [
    R("", "dict"),
    R("format", "str", "req", "exact"), R("format_version", "int", "req", "exact"),
    R("library_version", "str|null"), R("type", "str", "req", "exact"),
    R("params", "dict", "req"),
    *[R(f"params.{k}", "num") for k in ("C", "tol", "weight_decay", "consistency_weight", "confidence_weight",
                                         "var_weight", "neg_cov_weight")],
    R("params.Cs", "list|null"), R("params.Cs.#", "num"),
    *[R(f"params.{k}", "int") for k in ("cv", "seed", "chunk_bytes", "n_restarts", "history")],
    R("params.max_iter", "int|null"),
    *[R(f"params.{k}", "bool") for k in ("fit_intercept", "scale_by_variance", "erase_pseudolabel")],
    R("params.cv_scoring", "str", enum=("log_loss", "accuracy", "auroc")),
    R("params.solver", "str", enum=("auto", "newton", "lbfgs")),
    R("params.shrinkage", "str|num|null", enum=("auto",)),
    R("params.normalize", "str", enum=("burns", "meanonly", "none")), R("params.method", "str", enum=("vinc", "pca")),
    R("meta", "dict"), R("meta.*", "int|num|bool|str|null|list"), R("meta.*.#", "int|num|bool|str|null"),
    R("batch_shape", "list", "req", "exact"), R("batch_shape.#", "int", "exact"),
    R("tensors", "dict", "req", "exact"), R("tensors.*", "dict", "req", "exact"),
    R("tensors.*.shape", "list", "req", "exact"), R("tensors.*.shape.#", "int", "exact"),
    R("tensors.*.dtype", "str", "req", "exact"),
]

SAE = [
    R("", "dict"),
    # sparsify
    R("activation", "str", enum=("topk", "groupmax", "relu")), R("k", "int"), R("num_latents", "int", "exact"),
    R("expansion_factor", "int|null"), R("transcode", "bool", "exact"), R("skip_connection", "bool", "exact"),
    R("d_in", "int", "exact"), R("hookpoint", "str|null"), R("intervene_site", "str|null"),
    R("normalize_decoder", "bool|null"), R("multi_topk", "bool|null"), R("training", "", "free"),
    # SAELens
    R("architecture", "str", enum=("standard", "gated", "topk", "jumprelu", "transcoder", "skip_transcoder",
                                       "jumprelu_transcoder", "jumprelu_skip_transcoder")), R("d_sae", "int", "exact"), R("d_out", "int", "exact"),
    R("dtype", "str|null", enum=("float32", "float64", "float16", "bfloat16", "float", "double", "half",
                                 "torch.float32", "torch.float64", "torch.float16", "torch.bfloat16")),
    R("device", "", "free"), R("apply_b_dec_to_input", "bool"),
    R("normalize_activations", "str|bool|null", enum=("none",)),
    R("reshape_activations", "str|null", enum=("none", "hook_z")), R("rescale_acts_by_decoder_norm", "bool|null"),
    R("metadata", "dict"), R("metadata.sae_lens_version", "str|null"), R("metadata.sae_lens_training_version", "", "free"),
    R("metadata.hook_name", "str|null"), R("metadata.intervene_site", "str|null"),
    R("sae_lens_version", "str|null"), R("hook_point", "str|null"), R("hook_point_layer", "", "free"),
    R("activation_fn_str", "str|null", enum=("relu", "topk")), R("lr", "", "free"), R("seed", "", "free"),
]

ACTS = [
    R("", "dict"),
    R("format", "str", "req", "exact"), R("format_version", "int", "req", "exact"), R("key", "str", "req"),
    R("n", "int", "req", "exact"), R("sites", "list", "req", "exact"), R("sites.#", "str", "exact"),
    R("positions", "str|int|list"), R("positions.#", "int"),
    R("dtype", "str", "req", "exact"), R("shapes", "dict", "req", "exact"), R("shapes.*", "list", "exact"),
    R("shapes.*.#", "int", "exact"), R("model", "dict", "free"),
    R("shards", "list", "req", "exact"), R("shards.#", "dict", "exact"),
    *[R(f"shards.#.{k}", t, "req", "exact") for k, t in (("file", "str"), ("start", "int"), ("stop", "int"),
                                                         ("bytes", "int"), ("sha256", "str"))],
    R("complete", "bool", "exact"),
]

LATENTS = [
    R("", "dict"),
    R("format", "str", "req", "exact"), R("version", "int", "req", "exact"), R("site", "str", "req"),
    *[R(k, "int", "req", "exact") for k in ("ctx_len", "n_seq", "batch_size", "shard_width", "n_shards", "d_sae",
                                            "next_batch")],
    R("buffer_size", "int", "req"), R("n_parts", "int", "req"), R("peak_buffer", "int"),
    R("value_dtype", "str", "req", "exact"), R("tokens_digest", "str|null"), R("encoder", "dict", "free"),
    R("encoder_digest", "str|null"), R("encoder_source", "", "free"), R("model", "dict", "free"),
    R("done", "bool", "req", "exact"), R("files", "dict", "req", "exact"), R("files.*", "dict", "exact"),
    R("files.*.bytes", "int", "req", "exact"), R("files.*.sha256", "str", "req", "exact"),
]

DELPHI = [
    R("", "dict", "open"),
    R("cache_ctx_len", "int|null"), R("n_tokens", "int|null"), R("n_splits", "int|null"), R("batch_size", "int|null"),
    R("model_name", "str|null"), R("intervene", "dict|null", "free"),
]

REP = "representations.#"
PYVENE = [
    R("", "dict", "open"),
    R("intervention_constant_sources", "list|null", "exact"), R("intervention_constant_sources.#", "bool"),
    R("intervention_dimensions", "list|null"), R("intervention_dimensions.#", "int|null"),
    R("intervention_types", "list", "req", "exact"), R("intervention_types.#", "str", "exact"),
    R("mode", "str", enum=("parallel", "serial")),
    R("representations", "list", "req", "exact"), R(REP, "list|dict"),
    R(f"{REP}.0", "int"), R(f"{REP}.1", "str"), R(f"{REP}.2", "str", "exact"), R(f"{REP}.3", "int|null"),
    *[R(f"{REP}.{i}", "null", "exact") for i in (4, 5, 6, 7, 9, 10, 11, 12, 13)], R(f"{REP}.8", "", "free"),
    R("sorted_keys", "list|null", "exact"), R("sorted_keys.#", "str", "exact"), R("transformers_version", "", "free"),
]

SPECS: dict[str, list[Rule]] = {"diff": DIFF, "probe": PROBE, "sae": SAE, "acts": ACTS, "latents": LATENTS,
                                "latents_resume": LATENTS, "delphi": DELPHI, "pyvene": PYVENE}
# the JSON file each format's rules describe
SPEC_FILES = {"diff": "intervene_config.json", "probe": "probe.json", "sae": "cfg.json", "acts": "index.json",
              "latents": "index.json", "latents_resume": "index.json", "delphi": "model.layers.1/config.json",
              "pyvene": "config.json"}
FREE = Rule((), frozenset(), free=True)


def _match(pattern: tuple[str, ...], path: tuple[Any, ...]) -> bool:
    if len(pattern) != len(path):
        return False
    for p, x in zip(pattern, path):
        if p == "#":
            if not isinstance(x, int):
                return False
        elif p == "*":
            if not isinstance(x, str):
                return False
        elif str(x) != p:
            return False
    return True


def rule(fmt: str, path: tuple[Any, ...]) -> Rule:
    """The rule for ``path`` (a ``free`` rule below a free path or where none matches)."""
    rules = SPECS.get(fmt, [])
    for i in range(len(path) + 1):  # anything below a free path is free
        for r in rules:
            if r.free and _match(r.pattern, path[:i]):
                return FREE
    for r in rules:
        if _match(r.pattern, path):
            return r
    return FREE


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "num"
    return {str: "str", list: "list", dict: "dict"}.get(type(v), "other")


def type_ok(r: Rule, v: Any) -> bool:
    """Whether the rule allows ``v``'s JSON type (``num`` admits ints)."""
    if r.free or not r.types:
        return True
    t = json_type(v)
    return t in r.types or (t == "int" and "num" in r.types)
