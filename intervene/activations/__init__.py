"""Batched activation extraction (:func:`collect`) streamed to a safetensors shard cache.

>>> acts = collect(model, tok, texts, sites=["layers.*"], positions="last", cache_dir="acts/")
>>> acts["layers.3"].shape        # [N, hidden]
>>> acts.stack().shape            # [L, N, hidden], ready for batched probes
"""

from intervene.activations.cache import ActivationCacheError
from intervene.activations.extract import collect, collect_pairs, weight_digest
from intervene.activations.store import Activations

__all__ = ["ActivationCacheError", "Activations", "collect", "collect_pairs", "weight_digest"]
