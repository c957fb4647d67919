"""Read and write pyvene intervention directories (``config.json`` + ``intkey_*.bin``).

A trained DAS exports as pyvene's ``RotatedSpaceIntervention`` (:func:`export_pyvene`). Only the kinds with an
exact intervene equivalent import: constant-source
``AdditionIntervention`` / ``SubtractionIntervention`` (-> :class:`Steering`) and
``ZeroIntervention`` over the first ``k`` dimensions (-> one :class:`DirectionalAblation` per
coordinate axis, which together zero exactly those coordinates). pyvene stores positions at call
time (``unit_locations``), not in the directory, so the importer takes ``positions`` (default:
every position, which is what pyvene does without ``unit_locations``).

Safety: pyvene's ``.bin`` files are pickles. They are read only here, only with
``torch.load(weights_only=True)`` (tensors and plain containers, no code), and never by
``Intervenable.load``. Class names in pyvene's config are matched against a fixed allowlist,
never imported.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from intervene.errors import (
    DiffFormatError,
    DiffNotFoundError,
    InteropError,
    InterventionError,
    SiteError,
    UnsupportedModelError,
)
from intervene.intervenable import Intervenable
from intervene.intervention import Intervention
from intervene.methods.steering.intervention import DirectionalAblation, Steering
from intervene.positions import PositionsSpec
from intervene.safeio import Root
from intervene.schemas.base import validate
from intervene.schemas.interop import DEFAULTS, FIELDS, PyveneConfig, Representation
from intervene.sites import Site, block_path, family_of, num_layers, resolve_site
from intervene.tensorfile import check_tensor

# pyvene's abstract components that name the same activations as our canonical sites (eval mode)
COMPONENTS = {"block_output": "layers.{}", "block_input": "layers.{}:input", "mlp_output": "layers.{}.mlp",
              "attention_output": "layers.{}.attn", "attention_value_output": "layers.{}.heads"}
_TYPE = re.compile(r"^<class '(?:pyvene\.models\.interventions\.)?(\w+)'>$")
_FIELDS = FIELDS
# Representation fields that change what is edited and have no equivalent here (group_key only groups call-time
# sources, which constant sources do not have).
_UNSUPPORTED = ("low_rank_dimension", "intervention_type", "intervention", "subspace_partition",
                "intervention_link_key", "moe_key", "source_representation", "hidden_source_representation",
                "latent_dim")
MAX_ZERO_DIMS = 256
MAX_BIN_BYTES = 1 << 30


def _local_dir(dir_or_repo: str | Path, revision: str | None, token: str | bool | None) -> Path:
    path = Path(dir_or_repo).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(dir_or_repo), revision=revision, token=token,
                                      allow_patterns=["config.json", "intkey_*.bin"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError) as e:
        raise DiffNotFoundError(f"no pyvene directory or Hub repo at {dir_or_repo!r}: {e}") from e


def _representation(raw: Any, where: Path, i: int) -> dict[str, Any]:
    """One representation (a list in field order or a dict), pyvene's defaults filled in, checked."""
    if isinstance(raw, list):
        raw = dict(zip(_FIELDS, raw))
    rep = validate(Representation, {**DEFAULTS, **raw}, DiffFormatError, where, f"representations[{i}]")
    return rep.model_dump()


def _key(rep: dict[str, Any], seen: dict[str, int]) -> str:
    """pyvene's file key for a representation (``IntervenableModel._get_representation_key``)."""
    c, u, n = str(rep["component"]), str(rep["unit"]).replace(".", "_"), rep["max_number_of_units"]
    proposal = f"comp_{c.replace('.', '_')}_unit_{u}_nunit_{n}" if "." in c else \
        f"layer_{rep['layer']}_comp_{c}_unit_{u}_nunit_{n}"
    seen[proposal] = seen.get(proposal, -1) + 1
    return f"{proposal}#{seen[proposal]}"


def _site_for(model: nn.Module, rep: dict[str, Any]) -> str:
    comp = str(rep["component"])
    if comp in COMPONENTS:
        return COMPONENTS[comp].format(int(rep["layer"]))
    path, _, side = comp.rpartition(".")
    if side not in ("input", "output") or not path:
        raise InterventionError(f"pyvene component {comp!r} has no intervene site (supported: "
                                f"{sorted(COMPONENTS)} or a module path ending in .input/.output)")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return canonical_site(model, f"{path}:{side}")


def canonical_site(model: nn.Module, raw: str) -> str:
    """The canonical name of a raw ``module.path:side`` site when one names the same activation."""
    site = resolve_site(model, raw)
    try:
        fam = family_of(model)
        for i in range(num_layers(model)):
            _, block = block_path(model, i)
            if site.module is block:
                return f"layers.{i}" if site.side == "output" else f"layers.{i}:input"
            if site.side == "output" and not fam.attn_writer and site.module is block.get_submodule(fam.attn_out):
                return f"layers.{i}.attn"
            if site.side == "input" and site.module is block.get_submodule(fam.attn_out):
                return f"layers.{i}.heads"
            if site.side == "output" and not fam.mlp_writer and site.module is block.get_submodule(fam.mlp_out):
                return f"layers.{i}.mlp"
    except Exception:  # unknown family: the raw path is still a valid site
        pass
    return raw


def _load_bin(root: Root, name: str) -> dict[str, Any]:
    """A pyvene ``.bin`` state dict: read through ``root`` (a regular file inside the directory, bounded), then
    unpickled with ``weights_only=True`` (tensors and plain containers only, never code)."""
    if not root.exists(name):
        raise DiffFormatError.at(root.path / name, None, "the file pyvene saves for this intervention",
                                 note="missing from the pyvene directory")
    data = root.read_bytes(name, MAX_BIN_BYTES)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not tensors / plain containers
        raise DiffFormatError(f"{name} is not a plain tensor state dict (refused to unpickle it): "
                              f"{type(e).__name__}: {str(e)[:200]}", path=root.path / name) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise DiffFormatError.at(root.path / name, None, "a state dict", type(state).__name__)
    return state


def _scalar(state: dict[str, Any], key: str, where: Path) -> int | None:
    v = state.get(key)
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.numel() != 1 or v.dtype.is_floating_point or v.dtype == torch.bool:
        raise DiffFormatError.at(where, key, "an integer scalar tensor", v)
    return int(v)


def _source(state: dict[str, Any], where: Path, width: int, dim: int | None) -> tuple[torch.Tensor, int]:
    """The constant source vector ``[width]`` and how many leading coordinates pyvene edits with it."""
    if set(state) - {"source_representation", "embed_dim", "interchange_dim"}:
        raise DiffFormatError.at(where, "state", "source_representation, embed_dim, interchange_dim", sorted(state))
    src = state.get("source_representation")
    if not isinstance(src, torch.Tensor) or src.numel() == 0:
        raise DiffFormatError.at(where, "source_representation", "a non-empty tensor", type(src).__name__)
    check_tensor(src, DiffFormatError, where, "source_representation", (width,))
    embed, inter = _scalar(state, "embed_dim", where), _scalar(state, "interchange_dim", where)
    if embed is not None and embed != (dim or width):
        raise DiffFormatError.at(where, "embed_dim", f"{dim or width} (intervention_dimensions)", embed)
    k = inter if inter is not None else (dim or width)
    if not 1 <= k <= width:
        raise DiffFormatError.at(where, "interchange_dim", f"1..{width} coordinates", k)
    return src.detach().float(), k


def _width(model: nn.Module, site: str) -> int:
    s: Site = resolve_site(model, site)
    if s.heads is not None:
        return s.heads[0] * s.heads[1]
    if s.width is not None:
        return s.width
    raise InterventionError(f"cannot tell the width of site {site!r}")


def import_pyvene(dir_or_repo: str | Path, model: nn.Module, positions: PositionsSpec = "all",
                  revision: str | None = None, token: str | bool | None = None, attach: bool = True) -> Intervenable:
    """Build an :class:`Intervenable` from a pyvene-saved intervention directory (or Hub repo).

    Each pyvene representation becomes one intervention named after its pyvene key. Raises
    ``InterventionError`` naming any representation with no exact equivalent (trainable or
    low-rank interventions, per-head units, sources given at call time).
    """
    root_dir = _local_dir(dir_or_repo, revision, token)
    root = Root(root_dir, DiffFormatError)
    cfg_path = root.path / "config.json"
    if not root.exists("config.json"):
        raise DiffNotFoundError(f"{root.path} has no config.json: not a pyvene intervention directory",
                                path=root.path, field="config.json")
    config = validate(PyveneConfig, root.read_json("config.json"), DiffFormatError, cfg_path)
    reps = [_representation(r, cfg_path, i) for i, r in enumerate(config.representations)]
    n = len(reps)
    dims = config.intervention_dimensions if config.intervention_dimensions is not None else [None] * n
    constant = config.intervention_constant_sources if config.intervention_constant_sources is not None else [True] * n
    for field, got in (("intervention_types", config.intervention_types), ("intervention_dimensions", dims),
                       ("intervention_constant_sources", constant)):
        if len(got) != n:
            raise DiffFormatError.at(cfg_path, field, f"one entry per representation ({n})", len(got))
    seen: dict[str, int] = {}
    keys = [_key(rep, seen) for rep in reps]
    if config.sorted_keys is not None and list(config.sorted_keys) != keys:
        raise DiffFormatError.at(cfg_path, "sorted_keys", f"the keys of the representations {keys[:4]}",
                                 config.sorted_keys[:4])
    out: list[Intervention] = []
    for i, (rep, type_str, dim, const, key) in enumerate(zip(reps, config.intervention_types, dims, constant, keys)):
        field = f"representations[{i}]"
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", key)[:100]
        m = _TYPE.match(str(type_str))
        kind = m.group(1) if m else str(type_str)
        if kind not in ("AdditionIntervention", "SubtractionIntervention", "ZeroIntervention"):
            raise InteropError.at(cfg_path, f"intervention_types[{i}]", "an intervention with an exact intervene "
                                  "equivalent (Addition-, Subtraction-, ZeroIntervention)", kind,
                                  note=f"pyvene {kind} ({key}) has no exact intervene equivalent")
        extras = [f for f in _UNSUPPORTED if rep.get(f) is not None]
        if extras or rep["unit"] != "pos" or (rep["max_number_of_units"] or 1) != 1:
            raise InteropError.at(cfg_path, field, "unit='pos', one unit, no subspaces / low rank / links / "
                                  "per-representation interventions", {"unit": rep["unit"], "extras": extras},
                                  note=f"pyvene {key}")
        try:
            site = _site_for(model, rep)
            width = _width(model, site)
        except (InterventionError, SiteError, UnsupportedModelError) as e:
            raise InteropError(f"{cfg_path}: {field}: component {rep['component']!r}: {e}", path=cfg_path,
                               field=field) from None
        if dim is not None and dim > width:
            raise InteropError.at(cfg_path, f"intervention_dimensions[{i}]", f"at most the site's width {width}", dim)
        if kind == "ZeroIntervention":
            k = width if dim is None else dim
            if k > MAX_ZERO_DIMS:
                raise InteropError.at(cfg_path, f"intervention_dimensions[{i}]", f"at most {MAX_ZERO_DIMS} "
                                      "coordinates to zero (each becomes one axis ablation)", k)
            out += [DirectionalAblation(torch.eye(width)[j], sites=site, positions=positions, name=f"{name}_zero{j}")
                    for j in range(k)]
            continue
        if not const:
            raise InteropError.at(cfg_path, f"intervention_constant_sources[{i}]", "a constant source",
                                  const, note="sources given at call time have no intervene equivalent")
        bin_name = f"intkey_{key}.bin"
        vec, k = _source(_load_bin(root, bin_name), root.path / bin_name, width, dim)
        vec = torch.cat([vec[:k], torch.zeros(width - k)])  # pyvene edits only the first k coordinates
        out.append(Steering({site: vec}, scale=-1.0 if kind == "SubtractionIntervention" else 1.0,
                            positions=positions, name=name))
    ivm = Intervenable(model, out, attach=False)
    ivm.metadata = {"imported_from": "pyvene", "source": str(dir_or_repo)}
    return ivm.attach() if attach else ivm


_ADDITION = "<class 'pyvene.models.interventions.AdditionIntervention'>"
_ROTATED = "<class 'pyvene.models.interventions.RotatedSpaceIntervention'>"


def _das_entry(model: nn.Module, iv: Intervention, site: Site) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    """pyvene's ``RotatedSpaceIntervention`` for a trained DAS: its rotation set as the trivialization's ``base``
    with the parameter at ``-I`` (where the matrix exponential is exactly ``I``), so pyvene computes our ``W``
    bit for bit; the component must be one of pyvene's abstract ones for this family."""
    width = int(iv.width)  # type: ignore[attr-defined]
    comp = next((c for c, pattern in COMPONENTS.items() if site.layer is not None
                 and pattern.format(site.layer) == site.name), None)
    if comp is None:
        raise InterventionError(f"{iv.name}: pyvene's DAS takes abstract components ({sorted(COMPONENTS)}); site "
                                f"{site.name!r} has none")
    try:
        from pyvene.models.intervenable_modelcard import type_to_module_mapping
    except ImportError:  # pyvene is not installed: write the directory anyway
        type_to_module_mapping = None
    if type_to_module_mapping is not None and type(model) not in type_to_module_mapping:
        raise InterventionError(f"{iv.name}: pyvene 0.1.8 maps no components for {type(model).__name__}")
    rep = dict.fromkeys(_FIELDS)
    rep.update(layer=site.layer, component=comp, unit="pos", max_number_of_units=1)
    w = iv.weight().detach().float().cpu().contiguous()  # type: ignore[attr-defined]
    state = {"embed_dim": torch.tensor(width), "interchange_dim": torch.tensor(int(iv.k)),  # type: ignore[attr-defined]
             "rotate_layer.parametrizations.weight.original": -torch.eye(width),
             "rotate_layer.parametrizations.weight.0.base": w}
    return rep, state, int(iv.k)  # type: ignore[attr-defined]


def export_pyvene(ivm: Intervenable, directory: str | Path) -> Path:
    """Write ``ivm``'s interventions as a pyvene directory that ``pyvene.IntervenableModel.load(directory, model)``
    reads.

    * steering → constant-source ``AdditionIntervention`` at module-path components, applied where pyvene applies
      them without ``unit_locations``: every position (export positions ``"all"``);
    * a trained :class:`~intervene.methods.das.DAS` → ``RotatedSpaceIntervention`` (same rotation, ``k`` as its
      interchange dimension) at pyvene's abstract component for the site (``block_output`` for ``layers.{i}``
      ...); pyvene then takes the source run and ``unit_locations`` at call time, as our
      ``das.interchange(...)`` does. Boundless DAS does not export (pyvene's mask has another edge at 0).

    Raises ``InterventionError`` for anything else.
    """
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    resolved = ivm.resolve()
    entries: list[tuple[dict[str, Any], dict[str, torch.Tensor], int, str, bool]] = []
    for iv in ivm.interventions:
        if iv.type_name == "das":
            for site in resolved[iv.name].values():
                rep, state, dim = _das_entry(ivm.model, iv, site)
                entries.append((rep, state, dim, _ROTATED, False))
            continue
        if iv.type_name != "steering":
            raise InterventionError(f"{iv.name} ({iv.type_name}) has no pyvene equivalent; steering and DAS export")
        if iv.positions.kind != "all":
            raise InterventionError(f"{iv.name}: pyvene takes positions at call time (unit_locations); export "
                                    "positions='all' and pass unit_locations to pyvene yourself")
        for concrete, site in resolved[iv.name].items():
            vec = iv._vec(concrete, torch.empty(0, dtype=torch.float32)).reshape(-1).clone()  # noqa: SLF001
            rep = dict.fromkeys(_FIELDS)
            rep.update(layer=0, component=f"{site.module_path}.{site.side}", unit="pos", max_number_of_units=1)
            state = {"embed_dim": torch.tensor(vec.numel()), "interchange_dim": torch.tensor(vec.numel()),
                     "source_representation": vec}
            entries.append((rep, state, vec.numel(), _ADDITION, True))
    seen: dict[str, int] = {}
    keys = []
    for rep, state, _, _, _ in entries:
        key = _key(rep, seen)
        keys.append(key)
        torch.save(state, directory / f"intkey_{key}.bin")  # pyvene's format: a tensor-only state dict
    config = {
        "intervention_constant_sources": [e[4] for e in entries],
        "intervention_dimensions": [e[2] for e in entries],
        "intervention_types": [e[3] for e in entries],
        "mode": "parallel",
        "representations": [[e[0][f] for f in _FIELDS] for e in entries],
        "sorted_keys": keys,
        "transformers_version": transformers.__version__,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


__all__: Sequence[str] = ["COMPONENTS", "canonical_site", "export_pyvene", "import_pyvene"]
