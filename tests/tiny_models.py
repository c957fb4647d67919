"""Tiny random causal LMs of many families, built from configs (no downloads), cached per test run."""

from __future__ import annotations

import functools

import torch
import transformers as T

VOCAB = 96
HIDDEN = 32
LAYERS = 2
HEADS = 4

_COMMON_LLAMA = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, max_position_embeddings=128,
)

CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (T.LlamaConfig, dict(_COMMON_LLAMA, num_key_value_heads=HEADS)),
    "llama_gqa": (T.LlamaConfig, dict(_COMMON_LLAMA, num_key_value_heads=2)),
    "mistral": (T.MistralConfig, dict(_COMMON_LLAMA, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (T.Qwen2Config, dict(_COMMON_LLAMA, num_key_value_heads=2)),
    "gemma": (T.GemmaConfig, dict(_COMMON_LLAMA, num_key_value_heads=1, head_dim=16)),
    "gemma2": (T.Gemma2Config, dict(_COMMON_LLAMA, num_key_value_heads=2, head_dim=8, sliding_window=16,
                                    query_pre_attn_scalar=8)),
    "phi3": (T.Phi3Config, dict(_COMMON_LLAMA, num_key_value_heads=2, pad_token_id=0)),
    "mixtral": (T.MixtralConfig, dict(_COMMON_LLAMA, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "gpt2": (T.GPT2Config, dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128)),
    "gpt_neox": (T.GPTNeoXConfig, dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       max_position_embeddings=128)),
    "gptj": (T.GPTJConfig, dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                                rotary_dim=4)),
    "opt": (T.OPTConfig, dict(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, max_position_embeddings=128, word_embed_proj_dim=HIDDEN)),
    "falcon": (T.FalconConfig, dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, new_decoder_architecture=False, multi_query=True)),
    "bloom": (T.BloomConfig, dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)),
}

FAMILIES = list(CONFIGS)


@functools.cache
def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> T.PreTrainedModel:
    """A deterministic random model of ``family``; treat it as read-only (it is shared across tests)."""
    cls, kwargs = CONFIGS[family]
    config = cls(**kwargs)
    config._name_or_path = f"tiny-{family}"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves some biases / norms at trivial values; perturb everything so edits that
    # land on a zero-initialised parameter are not accidentally invisible.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model = model.to(dtype).eval()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
    return model
