"""intervene: exact, fast, safe inference-time interventions on HuggingFace transformers.

The public API, re-exported from where each name lives (docs/architecture.md maps the tree):

* the core — :class:`Intervenable`, :class:`Intervention`, sites, positions, the registry, errors;
* methods, one package each under ``intervene.methods`` — :class:`Steering`,
  :class:`DirectionalAblation`, :class:`ITI`, :class:`Remedi`, :class:`LatentClamp`;
* activations (:func:`collect`), probes (``intervene.probes``), SAEs (``intervene.features``),
  baking (``Intervenable.bake``, :mod:`intervene.bake`) and publishing (:func:`bake_and_push`), the demo
  model (:func:`demo_model`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from intervene.autoload import ensure_builtins, set_builtin_loader
from intervene.version import __version__

# The package is lazy (PEP 562): `import intervene` imports neither torch nor transformers, so the
# `intervene` command answers --help and --version at once. A public name is imported on first use;
# the imports below are what type checkers and tests/test_layering.py read, and _EXPORTS says the same
# at run time (tests/test_public_api.py checks that the two agree).
if TYPE_CHECKING:
    import intervene.probes as probes
    from intervene.activations import Activations, collect
    from intervene.assets import demo_model
    from intervene.errors import (
        DiffFormatError,
        DiffNotFoundError,
        IncompatibleModelError,
        InteropError,
        InterveneError,
        InterveneFileError,
        InterventionError,
        NotBakeableError,
        PositionsError,
        SAEFormatError,
        SiteError,
        UncheckedFileWarning,
        UnsupportedModelError,
    )
    from intervene.features.sae import SAE
    from intervene.features.sae_io import load_sae
    from intervene.intervenable import Intervenable
    from intervene.intervention import Intervention
    from intervene.methods.das import DAS, BoundlessDAS, DASConfig
    from intervene.methods.iti import ITI, ITIConfig
    from intervene.methods.leace import ConceptErasure, ConceptErasureConfig
    from intervene.methods.patching import Noise, Patch, interchange
    from intervene.methods.reft import DiReFT, LoReFT, ReFTConfig
    from intervene.methods.remedi import Remedi, RemediConfig
    from intervene.methods.sae_clamp import LatentClamp, steering_from_sae
    from intervene.methods.steering import DirectionalAblation, Steering
    from intervene.positions import Positions
    from intervene.publish import bake_and_push
    from intervene.registry import MethodSpec, register, register_method, registered_methods, registered_types
    from intervene.sites import (
        Family,
        Site,
        expand_sites,
        register_family,
        resolve_site,
        resolve_sites,
        site_names,
    )
    from intervene.training import TrainConfig, Trainer, TrainResult


def _register_builtin_methods() -> None:
    import intervene.methods  # noqa: F401  (each method package registers its types)


# Whatever reads the registry (loading a diff, baking) registers the built-in methods first, however
# the caller imported us (intervene/autoload.py says why the core cannot import them itself).
set_builtin_loader(_register_builtin_methods)

_EXPORTS: dict[str, str] = {
    "probes": "intervene.probes",
    "Activations": "intervene.activations",
    "collect": "intervene.activations",
    "demo_model": "intervene.assets",
    "DiffFormatError": "intervene.errors",
    "DiffNotFoundError": "intervene.errors",
    "IncompatibleModelError": "intervene.errors",
    "InterveneError": "intervene.errors",
    "InterveneFileError": "intervene.errors",
    "InteropError": "intervene.errors",
    "UncheckedFileWarning": "intervene.errors",
    "InterventionError": "intervene.errors",
    "NotBakeableError": "intervene.errors",
    "PositionsError": "intervene.errors",
    "SAEFormatError": "intervene.errors",
    "SiteError": "intervene.errors",
    "UnsupportedModelError": "intervene.errors",
    "SAE": "intervene.features.sae",
    "load_sae": "intervene.features.sae_io",
    "Intervenable": "intervene.intervenable",
    "Intervention": "intervene.intervention",
    "ITI": "intervene.methods.iti",
    "ITIConfig": "intervene.methods.iti",
    "Noise": "intervene.methods.patching",
    "Patch": "intervene.methods.patching",
    "interchange": "intervene.methods.patching",
    "DAS": "intervene.methods.das",
    "BoundlessDAS": "intervene.methods.das",
    "DASConfig": "intervene.methods.das",
    "ConceptErasure": "intervene.methods.leace",
    "ConceptErasureConfig": "intervene.methods.leace",
    "DiReFT": "intervene.methods.reft",
    "LoReFT": "intervene.methods.reft",
    "ReFTConfig": "intervene.methods.reft",
    "TrainConfig": "intervene.training",
    "Trainer": "intervene.training",
    "TrainResult": "intervene.training",
    "Remedi": "intervene.methods.remedi",
    "RemediConfig": "intervene.methods.remedi",
    "LatentClamp": "intervene.methods.sae_clamp",
    "steering_from_sae": "intervene.methods.sae_clamp",
    "DirectionalAblation": "intervene.methods.steering",
    "Steering": "intervene.methods.steering",
    "Positions": "intervene.positions",
    "bake_and_push": "intervene.publish",
    "MethodSpec": "intervene.registry",
    "register": "intervene.registry",
    "register_method": "intervene.registry",
    "registered_methods": "intervene.registry",
    "registered_types": "intervene.registry",
    "Family": "intervene.sites",
    "Site": "intervene.sites",
    "expand_sites": "intervene.sites",
    "register_family": "intervene.sites",
    "resolve_site": "intervene.sites",
    "resolve_sites": "intervene.sites",
    "site_names": "intervene.sites",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'intervene' has no attribute {name!r}")
    ensure_builtins()  # as before the package was lazy: using the API registers the built-in methods
    mod = importlib.import_module(module)  # a fixed name from _EXPORTS above, never one read from input
    value = mod if module == f"intervene.{name}" else getattr(mod, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DAS", "BoundlessDAS", "ConceptErasure", "ConceptErasureConfig", "DASConfig", "DiReFT", "LoReFT", "ReFTConfig",
    "TrainConfig", "TrainResult", "Trainer",
    "ITI", "SAE", "Activations", "DiffFormatError", "DiffNotFoundError", "DirectionalAblation", "Family",
    "ITIConfig", "IncompatibleModelError", "InteropError", "Intervenable", "InterveneError", "InterveneFileError",
    "Intervention", "InterventionError", "UncheckedFileWarning",
    "LatentClamp", "MethodSpec", "Noise", "NotBakeableError", "Patch", "Positions", "PositionsError", "Remedi", "RemediConfig",
    "SAEFormatError", "Site", "SiteError", "Steering", "UnsupportedModelError", "__version__",
    "bake_and_push", "collect", "demo_model", "expand_sites", "interchange", "load_sae", "probes", "register",
    "register_family", "register_method", "registered_methods", "registered_types", "resolve_site",
    "resolve_sites", "site_names", "steering_from_sae",
]
