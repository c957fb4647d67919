"""intervene: exact, fast, safe inference-time interventions on HuggingFace transformers."""

from intervene import probes
from intervene.activations import Activations, collect
from intervene.demo_model import demo_model
from intervene.errors import (
    DiffFormatError,
    DiffNotFoundError,
    IncompatibleModelError,
    InterveneError,
    InterventionError,
    NotBakeableError,
    PositionsError,
    SiteError,
    UnsupportedModelError,
)
from intervene.features import SAE, LatentClamp, SAEFormatError, load_sae, steering_from_sae
from intervene.intervenable import Intervenable
from intervene.intervention import Intervention, register, registered_types
from intervene.interventions.iti import ITI
from intervene.interventions.remedi import Remedi
from intervene.interventions.steering import DirectionalAblation, Steering
from intervene.positions import Positions
from intervene.sites import (
    Family,
    Site,
    expand_sites,
    register_family,
    resolve_site,
    resolve_sites,
    site_names,
)

__version__ = "0.1.0"

__all__ = [
    "ITI", "SAE", "LatentClamp", "SAEFormatError", "load_sae", "steering_from_sae", "Activations", "Remedi", "bake_and_push", "collect", "demo_model", "probes",
    "DiffFormatError", "DiffNotFoundError", "DirectionalAblation", "Family", "IncompatibleModelError",
    "Intervenable", "InterveneError", "Intervention", "InterventionError", "NotBakeableError", "Positions",
    "PositionsError", "Site", "SiteError", "Steering", "UnsupportedModelError", "expand_sites", "register",
    "register_family", "registered_types", "resolve_site", "resolve_sites", "site_names",
]
