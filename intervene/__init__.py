"""intervene: exact, fast, safe inference-time interventions on HuggingFace transformers.

The public API, re-exported from where each name lives (docs/architecture.md maps the tree):

* the core — :class:`Intervenable`, :class:`Intervention`, sites, positions, the registry, errors;
* methods, one package each under ``intervene.methods`` — :class:`Steering`,
  :class:`DirectionalAblation`, :class:`ITI`, :class:`Remedi`, :class:`LatentClamp`;
* activations (:func:`collect`), probes (``intervene.probes``), SAEs (``intervene.features``),
  baking (``Intervenable.bake``, :mod:`intervene.bake`) and publishing (:func:`bake_and_push`), the demo
  model (:func:`demo_model`).
"""

import intervene.methods  # noqa: F401  (registers every built-in intervention type)
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
from intervene.methods.iti import ITI, ITIConfig
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
from intervene.version import __version__

__all__ = [
    "ITI", "SAE", "Activations", "DiffFormatError", "DiffNotFoundError", "DirectionalAblation", "Family",
    "ITIConfig", "IncompatibleModelError", "InteropError", "Intervenable", "InterveneError", "InterveneFileError",
    "Intervention", "InterventionError",
    "LatentClamp", "MethodSpec", "NotBakeableError", "Positions", "PositionsError", "Remedi", "RemediConfig",
    "SAEFormatError", "Site", "SiteError", "Steering", "UncheckedFileWarning", "UnsupportedModelError", "__version__",
    "bake_and_push", "collect", "demo_model", "expand_sites", "load_sae", "probes", "register",
    "register_family", "register_method", "registered_methods", "registered_types", "resolve_site",
    "resolve_sites", "site_names", "steering_from_sae",
]
