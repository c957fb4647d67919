"""SAEs and their latents: loading (sparsify, SAELens), a sparse latent cache, explaining and scoring latents.

Interventions on latents live in :mod:`intervene.methods.sae_clamp` (``LatentClamp``) and
:meth:`intervene.Steering.from_sae`.

>>> sae = load_sae("demo")                                   # or a folder / Hub repo (sparsify, SAELens)
>>> steer = iv.Steering.from_sae(sae, latent=12, scale=4.0)  # a Steering along the decoder row
>>> clamp = iv.LatentClamp(sae, latents=12, values=0.0)      # exact ablation, reconstruction error kept
>>> cache = cache_latents(model, sae, texts, "cache/", tokenizer=tok)
>>> ex = sample_examples(cache, 12)                           # explain / score windows, disjoint
>>> expl = Explainer(TransformersClient(model, tok), tok).explain(ex)
>>> DetectionScorer(OpenAIClient(url, "m"), tok).score(expl).metrics
"""

from intervene.features.cache import cache_latents, token_rows
from intervene.features.clients import Client, ClientError, OpenAIClient, TransformersClient, make_client
from intervene.features.delphi import export_delphi, import_delphi
from intervene.features.encoders import DirectionEncoder, LatentEncoder
from intervene.features.examples import Example, LatentExamples, sample_examples
from intervene.features.explain import Explainer, Explanation, highlight, parse_explanation
from intervene.features.report import explain_latents, load_explanations, score_latents
from intervene.features.sae import SAE, SAEFormatError, site_from_hook_name
from intervene.features.sae_io import load_sae, save_sae
from intervene.features.score import DetectionScorer, FuzzingScorer, ScoreResult, binary_metrics
from intervene.features.scorers_client import IntruderScorer, SimulationScorer
from intervene.features.scorers_model import (
    EmbeddingScorer,
    OpenAIEmbedder,
    SurprisalScorer,
    TransformersEmbedder,
)
from intervene.features.store import LatentActivations, LatentCache, LatentCacheError

__all__ = [
    "SAE", "Client", "ClientError", "DetectionScorer", "DirectionEncoder", "Example", "Explainer", "Explanation",
    "FuzzingScorer", "LatentActivations", "LatentCache", "LatentCacheError", "LatentEncoder",
    "LatentExamples", "OpenAIClient", "SAEFormatError", "ScoreResult", "TransformersClient", "binary_metrics",
    "cache_latents", "explain_latents", "highlight", "load_explanations", "load_sae", "make_client",
    "parse_explanation", "sample_examples", "save_sae", "score_latents", "site_from_hook_name",
    "token_rows",
    # interop with delphi and its scorers
    "EmbeddingScorer", "IntruderScorer", "OpenAIEmbedder", "SimulationScorer", "SurprisalScorer",
    "TransformersEmbedder", "export_delphi", "import_delphi",
]
