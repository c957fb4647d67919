"""Build every causal-LM type transformers knows, tiny, from its default config (offline, no weights).

``build(model_type)`` shrinks the default config (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 256,
4 experts; per-layer lists cut to two layers keeping a second layer type where there is one) and
returns ``AutoModelForCausalLM.from_config(...)`` in fp32 / eval with every parameter nudged off its
initial value, or raises :class:`BuildError` saying why it could not be built.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import transformers as T
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Token ids every check feeds (no padding); low ids, away from the special tokens set near VOCAB.
IDS = torch.tensor([[3, 10, 17, 24, 31, 38], [45, 52, 59, 66, 73, 80]])
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, FFN, EXPERTS = 64, 4, 2, 16, 2, 256, 128, 4

_SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embedding_size", "dim", "n_embed", "word_embed_proj_dim",
                     "lru_width", "hidden_dim", "embed_dim", "embedding_dim",
                     "backbone_hidden_size", "emb_dim"), HIDDEN),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "swa_num_attention_heads", "attention_heads", "linear_num_value_heads",
                     "linear_num_heads", "mamba_n_heads", "mamba_num_heads", "index_n_heads", "index_num_heads"),
                    HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "swa_head_dim", "d_head", "dim_head",
                     "qk_head_dim", "v_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
                     "mamba_d_head", "mamba_head_dim", "mamba_headdim", "index_head_dim", "attention_head_size",
                     "global_head_dim"),
                    HEAD_DIM),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                     "num_decoder_layers", "num_encoder_layers", "num_blocks"), LAYERS),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token", "moe_k"), 2),
}
_KV = ("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "linear_num_key_heads", "num_query_groups")
_FFN_WORDS = ("intermediate", "ffn", "dff", "dim_ff", "d_inner", "feed_forward_size", "n_inner")
_LAYER_LIST_HINT = ("layer", "block_type", "attn", "attention", "rope_theta", "heads_per_layer", "types",
                    "multipliers", "source")


# Per-type overrides where the generic shrink trips a config validator (checked one by one).
_FIXES: dict[str, dict[str, Any]] = {
    "falcon_h1": dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_ssm=128),
    "mamba2": dict(num_heads=8, head_dim=16),
    "kolibri1_1": dict(layer_types=["sliding_attention", "indexed_attention"], index_layers=[1],
                       kv_source_layers=[0, 1], index_num_heads=2),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"],
                  attention_hidden_size=2 * HIDDEN),
    "zamba2": dict(attention_hidden_size=2 * HIDDEN),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=16, attn_layer_indices=[1]),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=16, layer_types=["linear_attention", "full_attention"]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "nemotron_h": dict(n_groups=1),
    "dots3_note_text": dict(head_dim=16),
    "dots3_note": dict(text_config=dict(head_dim=16), vision_config=dict(adapter_in_dim=HIDDEN, adapter_out_dim=HIDDEN),
                       audio_config=dict(adapter_input_size=HIDDEN, adapter_out_dim=HIDDEN)),
    # RWKV halves the residual every rescale_every blocks in eval mode (6 by default, so never in 2 blocks):
    # every block here, as in any real checkpoint of 6+ blocks
    "rwkv": dict(rescale_every=1),
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 16], max_position_embeddings=256),
}


class BuildError(Exception):
    """A model type could not be built tiny from its default config (the message says why)."""


def causal_lm_types() -> list[str]:
    """Every ``model_type`` in transformers' causal-LM auto mapping, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrunk_kwargs(cfg: Any) -> dict[str, Any]:
    """Overrides for ``type(cfg)(**kw)`` that make it tiny; recurses into sub-configs."""
    d = cfg.to_dict()
    kw = _shrink_dict(d)
    for name in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kw[name] = _shrunk_kwargs(sub)
    return kw


def _ints(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _shrink_dict(d: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config dict that change to make it tiny."""
    kw: dict[str, Any] = {}
    n_layers = next((d[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
                     if isinstance(d.get(k), int)), None)
    heads = next((d[k] for k in ("num_attention_heads", "n_head", "num_heads", "n_heads") if isinstance(d.get(k), int)),
                 None)
    for k, v in d.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int):
            new = _shrink_int(k, v, heads)
            if new is not None and new != v:
                kw[k] = new
        elif isinstance(v, list) and n_layers is not None and len(v) == n_layers \
                and any(h in k for h in _LAYER_LIST_HINT + _FFN_WORDS):
            kw[k] = _two_layers(v)
            if _ints(v) and any(w in k for w in _FFN_WORDS):
                kw[k] = [min(x, FFN) for x in kw[k]]
        elif _ints(v) and k.endswith(("_token_id", "token_ids")):
            kw[k] = [x if x < VOCAB else VOCAB - 1 - i for i, x in enumerate(v)]
        elif isinstance(v, dict) and k == "per_layer_config" and v:
            # {layer index: overrides}: keep one entry, on the last layer, shrunk the same way
            first_key, first = next(iter(v.items()))
            kw[k] = {str(LAYERS - 1).zfill(len(str(first_key))): {**first, **_shrink_dict(first)}}
    if "qk_rope_head_dim" in d and isinstance(d.get("head_dim"), int):
        kw["head_dim"] = kw.get("qk_rope_head_dim", d["qk_rope_head_dim"])  # MLA: RoPE runs on head_dim
    return kw


def _shrink_int(k: str, v: int, heads: int | None) -> int | None:
    """The tiny value of one integer config entry, or ``None`` to keep it."""
    if k in _SIZES:
        return min(v, _SIZES[k])
    if k in _KV:
        return HEADS if heads is not None and v >= heads else min(v, KV_HEADS)
    if any(w in k for w in _FFN_WORDS):
        return min(v, FFN)
    if "vocab" in k:
        return min(v, VOCAB)
    if k in ("hidden_size_per_layer_input", "shape_embed_dim", "pronunciation_embed_dim"):
        return min(v, 16)
    if k in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
             "max_source_positions", "context_length"):
        return min(v, 256)
    if k.endswith(("moe_intermediate_size", "expert_ffn_hidden_size")):
        return min(v, 32)
    if k in ("q_lora_rank", "kv_lora_rank", "o_lora_rank"):
        return min(v, 32)
    if k in ("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim", "rotary_emb_base_dim"):
        return min(v, 8)
    if k in ("n_group", "topk_group", "num_expert_group", "first_k_dense_replace", "first_dense_layers"):
        return min(v, 1)
    if (k.endswith(("_token_id", "_token_index")) or k == "decoder_start_token_id") and v >= VOCAB:
        return VOCAB - 1 - (sum(map(ord, k)) % 16)  # distinct, inside the vocabulary, away from probe ids
    if k in ("sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len",
             "window_size", "attention_chunk_size"):
        return min(v, 64)
    return None


def _two_layers(values: list) -> list:
    """The first entry plus the first different one (so hybrids keep both kinds), else the first two."""
    other = next((x for x in values[1:] if x != values[0]), values[1] if len(values) > 1 else values[0])
    return [values[0], other][:LAYERS]


def tiny_config(model_type: str) -> Any:
    """The default config of ``model_type``, shrunk; raises :class:`BuildError`."""
    cls = CONFIG_MAPPING[model_type]
    try:
        base = cls()
    except Exception as e:  # noqa: BLE001 - any validator failure means: not buildable from defaults
        raise BuildError(f"default config does not validate: {type(e).__name__}: {_first_line(e)}") from None
    kw = _shrunk_kwargs(base)
    for k, v in _FIXES.get(model_type, {}).items():  # a dict fixes a sub-config (merged into its shrink)
        kw[k] = {**kw.get(k, {}), **v} if isinstance(v, dict) else v
    for k, v in (("head_dim", HEAD_DIM), ("num_key_value_heads", HEADS), ("num_experts_per_tok", 2)):
        if k in base.to_dict() and base.to_dict()[k] is None:
            kw.setdefault(k, v)  # left unset by the default config but required by the model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = cls(**kw)
    except Exception as e:  # noqa: BLE001
        raise BuildError(f"shrunk config does not validate: {type(e).__name__}: {_first_line(e)}") from None
    return cfg


def build(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` (fp32, eval, eager attention); ``overrides``
    are set on the shrunk config (residual multipliers a test wants away from 1, say)."""
    cfg = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise BuildError(f"from_config failed: {type(e).__name__}: {_first_line(e)}") from None
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    if hasattr(model, "set_default_language"):  # X-MOD picks a language adapter per call
        model.set_default_language(next(iter(cfg.languages)))
    try:
        with torch.no_grad():
            model(input_ids=IDS)
    except Exception as e:  # noqa: BLE001 - buildable means: a plain forward pass on token ids runs
        raise BuildError(f"plain forward pass failed: {type(e).__name__}: {_first_line(e)}") from None
    return model


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:240]
