"""The SAELens on-disk layout (``cfg.json`` + ``sae_weights.safetensors``), read and written with SAELens's math.

Read from SAELens 6 (``saes/*.py``, ``loading/pretrained_sae_loaders.py``), not guessed:

* ``standard`` / ``transcoder``: ``relu((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc)``; transcoders never
  subtract ``b_dec`` (SAELens refuses ``apply_b_dec_to_input`` for them) and ``skip_transcoder`` adds
  ``x @ W_skipᵀ`` to the output.
* ``jumprelu`` / ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``: ``relu(pre) * (pre > threshold)``
  (an old ``log_threshold`` tensor means ``threshold = exp(log_threshold)``).
* ``topk``: the ``k`` largest pre-activations, then ReLU. With ``rescale_acts_by_decoder_norm`` the
  pre-activations are multiplied by ``‖W_dec[i]‖`` before the top-k and the activations divided by it before
  decoding; that is the same map as the SAE with ``W_enc[:, i]``, ``b_enc[i]`` multiplied and ``W_dec[i]``
  divided by ``‖W_dec[i]‖``, which is how it is loaded here (the activations are SAELens's own).
* ``gated``: ``(x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc·exp(r_mag)) + b_mag)``. Since ``exp(r_mag) > 0``
  the gate is ``mag_pre > b_mag - exp(r_mag)·b_gate``, so it is loaded as the JumpReLU SAE with
  ``W_enc·exp(r_mag)``, ``b_mag`` and that threshold (equal up to float rounding at the gate's boundary).

Every ``cfg.json`` key is either understood (and honoured or refused) or on an explicit list of keys that do not
change the SAE's math (training settings, provenance); any other key is refused, so a new SAELens option can
never be ignored silently. Unknown tensors are refused likewise.
"""

from __future__ import annotations

from typing import Any

import torch

from intervene.errors import SAEFormatError
from intervene.schemas.base import validate
from intervene.schemas.sae import SAELensCfg, SAELensMeta, TopKKwargs

ARCHS = ("standard", "gated", "topk", "jumprelu", "transcoder", "skip_transcoder", "jumprelu_transcoder",
         "jumprelu_skip_transcoder")
# Keys whose values change the math (each is read below).
_MATH = {"architecture", "d_in", "d_sae", "d_out", "dtype", "apply_b_dec_to_input", "normalize_activations",
         "reshape_activations", "k", "rescale_acts_by_decoder_norm", "finetuning_scaling_factor", "activation_fn",
         "activation_fn_kwargs", "hook_name", "hook_head_index", "hook_name_out", "hook_head_index_out",
         "model_class_name", "model_from_pretrained_kwargs", "metadata", "sae_lens_version"}
# Keys that do not: where it ran, how it was trained, where it came from (SAELens 6's SAE / TrainingSAE configs
# and LanguageModelSAERunnerConfig, and the keys of pre-6.0 configs).
NO_MATH_KEYS = frozenset("""
device sae_lens_training_version model_name neuronpedia_id context_size seqpos_slice dataset_path prepend_bos
exclude_special_tokens hf_hook_name hf_hook_name_out training_architecture training_architecture_details
hook_point_layer hook_layer dataset_trust_remote_code is_dataset_tokenized streaming use_cached_activations
cached_activations_path n_batches_in_buffer total_training_tokens training_tokens train_batch_size
train_batch_size_tokens store_batch_size store_batch_size_prompts seed b_dec_init_method expansion_factor
from_pretrained_path l1_coefficient l1_warm_up_steps lp_norm lr lr_scheduler_name lr_warm_up_steps lr_end
lr_decay_steps n_restart_cycles adam_beta1 adam_beta2 use_ghost_grads feature_sampling_window
feature_sampling_method resample_batches feature_reinit_scale dead_feature_window dead_feature_estimation_method
dead_feature_threshold log_to_wandb wandb_project wandb_entity wandb_id wandb_log_frequency
eval_every_n_wandb_logs run_name logger n_checkpoints checkpoint_path output_path save_final_checkpoint
resume_from_checkpoint tokens_per_buffer normalize_sae_decoder noise_scale decoder_orthogonal_init
decoder_heuristic_init init_encoder_as_decoder_transpose mse_loss_normalization
scale_sparsity_penalty_by_decoder_norm finetuning_method finetuning_tokens autocast autocast_lm compile_llm
compile_sae llm_compilation_mode sae_compilation_mode eval_batch_size_prompts n_eval_batches verbose model_kwargs
hook_eval act_store_device llm_device activations_mixing_fraction disable_concat_sequences
n_batches_for_norm_estimate prefetch_llm_batches sequence_separator_token use_chat_formatting use_error_term
decoder_init_norm aux_loss_coefficient use_sparse_activations jumprelu_bandwidth jumprelu_init_threshold
jumprelu_sparsity_loss_mode jumprelu_ste_to_input jumprelu_tanh_scale l0_coefficient l0_warm_up_steps
pre_act_loss_coefficient target_l0 sae
""".split())
# TransformerLens's from_pretrained options: these leave every hook's values as in the HF model ...
_TL_HARMLESS = {"fold_ln", "center_unembed", "dtype", "torch_dtype", "device", "n_devices", "trust_remote_code",
                "default_prepend_bos", "default_padding_side", "move_to_device", "first_n_layers"}
# ... these change them (a centred residual stream, value biases moved into b_O, refactored W_V / W_O).
_TL_CHANGING = {"center_writing_weights", "fold_value_biases", "refactor_factored_attn_matrices"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float": torch.float32, "double": torch.float64, "half": torch.float16}


def _version(cfg: dict[str, Any]) -> tuple[int, ...]:
    v = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        return tuple(int(p) for p in str(v).split("-")[0].split(".")[:2]) if v else (0,)
    except ValueError:
        return (0,)


def _upgrade_pre6(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens < 6 kept everything at the top level under older names (``handle_pre_6_0_config``)."""
    ren = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    out = {ren.get(k, k): v for k, v in cfg.items()}
    if isinstance(out.get("normalize_activations"), bool):
        out["normalize_activations"] = "expected_average_only_in" if out["normalize_activations"] else "none"
    act = out.get("activation_fn") or "relu"
    if act == "topk":
        k = validate(TopKKwargs, out.get("activation_fn_kwargs") or {}, SAEFormatError, None,
                     "activation_fn_kwargs").k
        if k is None:
            raise SAEFormatError("a pre-6.0 SAELens config with activation_fn 'topk' needs activation_fn_kwargs.k")
        out["architecture"], out["k"] = "topk", k
    elif act != "relu":
        raise SAEFormatError(f"SAELens activation_fn {act!r} is not supported (relu, topk)")
    return out


def _metadata(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The hook-related settings, from ``metadata`` (6.x) or the top level (pre-6.0), checked."""
    meta = dict(cfg.get("metadata") or {})
    for k in ("hook_name", "hook_head_index", "hook_name_out", "hook_head_index_out", "model_class_name",
              "model_from_pretrained_kwargs"):
        if k in cfg and k not in meta:
            meta[k] = cfg[k]
    validate(SAELensMeta, meta, SAEFormatError, where, "metadata")
    unknown = sorted(set(meta) - _MATH - NO_MATH_KEYS - {"intervene_site", "intervene_output_site"})
    if unknown:
        raise SAEFormatError(f"{where}: SAELens metadata keys {unknown} are not understood; refusing rather than "
                             "ignoring them")
    for k in ("hook_head_index", "hook_head_index_out"):
        if meta.get(k) is not None:
            raise SAEFormatError(f"{where}: {k}={meta[k]} (an SAE on one attention head) is not supported")
    cls = meta.get("model_class_name") or "HookedTransformer"
    if cls not in ("HookedTransformer", "AutoModelForCausalLM"):
        raise SAEFormatError(f"{where}: model_class_name {cls!r} is not supported (HookedTransformer, "
                             "AutoModelForCausalLM)")
    kw = dict(meta.get("model_from_pretrained_kwargs") or {})
    bad = sorted(k for k in kw if k not in _TL_HARMLESS and k not in _TL_CHANGING)
    changing = sorted(k for k in kw if k in _TL_CHANGING and kw[k])
    if bad or changing:
        raise SAEFormatError(f"{where}: model_from_pretrained_kwargs {({k: kw[k] for k in bad + changing})} change "
                             "(or may change) the activations the SAE was trained on relative to the HF model")
    return meta


def _cast(t: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    # SAELens casts every tensor to cfg["dtype"] on load, so the math runs in that dtype.
    if cfg.get("dtype") is None:
        return t
    name = str(cfg["dtype"]).removeprefix("torch.")
    if name not in _DTYPES:
        raise SAEFormatError(f"{where}: dtype {cfg['dtype']!r} is not a floating dtype this loader knows")
    return {k: v.to(_DTYPES[name]) for k, v in t.items()}


def _check_shapes(t: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor's shape against ``W_enc`` / ``W_dec`` before any arithmetic combines them."""
    d_in, d_sae = t["W_enc"].shape
    d_out = t["W_dec"].shape[1]
    want = {"W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    want |= {k: (d_sae,) for k in ("b_enc", "b_gate", "b_mag", "r_mag", "threshold")}
    for k, shape in want.items():
        if k in t and tuple(t[k].shape) != shape:
            raise SAEFormatError.at(where, f"tensor {k!r}", f"shape {list(shape)} (from W_enc {[d_in, d_sae]}, "
                                    f"W_dec's {d_out} outputs)", list(t[k].shape))


def parse_saelens(t: dict[str, torch.Tensor], cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """SAE constructor arguments (plus ``transcoder``, ``hook``, ``output_hook``, ``model_class_name``) from
    SAELens tensors and config; ``SAEFormatError`` for anything not reproduced exactly."""
    validate(SAELensCfg, cfg, SAEFormatError, where)
    # a null k or dtype means "not set" (sizes may not be null: the schema refused that)
    cfg = {k: v for k, v in cfg.items() if not (v is None and k in ("k", "dtype"))}
    if _version(cfg) < (6,):
        cfg = _upgrade_pre6(cfg)
    unknown = sorted(set(cfg) - _MATH - NO_MATH_KEYS)
    if unknown:
        raise SAEFormatError(f"{where}: cfg.json keys {unknown} are not understood; refusing rather than ignoring "
                             "them (they may change the SAE's math)")
    meta = _metadata(cfg, where)
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHS:
        raise SAEFormatError(f"{where}: SAELens architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEFormatError(f"{where}: normalize_activations={norm!r} rescales each input; only 'none' is supported "
                             "(fold the scaling into the weights first)")
    if cfg.get("finetuning_scaling_factor"):
        raise SAEFormatError(f"{where}: finetuning_scaling_factor is not supported")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise SAEFormatError(f"{where}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    t = dict(t)
    scale = t.pop("scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        raise SAEFormatError(f"{where}: a scaling_factor tensor other than ones is not supported")
    if "log_threshold" in t and "threshold" not in t:
        t["threshold"] = torch.exp(t.pop("log_threshold"))
    t = _cast(t, cfg, where)
    transcoder = "transcoder" in arch
    want = {"W_enc", "W_dec", "b_dec"} | ({"b_gate", "b_mag", "r_mag"} if arch == "gated" else {"b_enc"})
    if arch.startswith("jumprelu"):
        want.add("threshold")
    if arch.endswith("skip_transcoder"):
        want.add("W_skip")
    missing, extra = sorted(want - set(t)), sorted(set(t) - want)
    if missing or extra:
        raise SAEFormatError(f"{where}: a SAELens {arch!r} SAE has tensors {sorted(want)}; missing {missing}, "
                             f"not understood {extra}")
    _check_shapes(t, where)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    if transcoder and apply_b_dec and "apply_b_dec_to_input" in cfg:
        raise SAEFormatError(f"{where}: apply_b_dec_to_input is not defined for transcoders (SAELens refuses it)")
    W_enc, W_dec, b_dec = t["W_enc"], t["W_dec"], t["b_dec"]
    if tuple(W_enc.shape) != (int(cfg.get("d_in", W_enc.shape[0])), int(cfg.get("d_sae", W_enc.shape[1]))):
        raise SAEFormatError(f"{where}: W_enc has shape {tuple(W_enc.shape)}, cfg.json says "
                             f"[d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}]")
    if transcoder and "d_out" in cfg and int(cfg["d_out"]) != W_dec.shape[1]:
        raise SAEFormatError(f"{where}: W_dec has {W_dec.shape[1]} outputs, cfg.json says d_out={cfg['d_out']}")
    act, k, thr = "relu", None, t.get("threshold")
    b_enc = t.get("b_enc")
    if arch == "gated":
        mag = torch.exp(t["r_mag"])
        W_enc, b_enc, thr, act = W_enc * mag, t["b_mag"], t["b_mag"] - mag * t["b_gate"], "jumprelu"
    elif arch.startswith("jumprelu"):
        act = "jumprelu"
    elif arch == "topk":
        act, k = "topk", cfg.get("k")
        if k is None:
            raise SAEFormatError(f"{where}: a topk SAE needs k in cfg.json")
    if cfg.get("rescale_acts_by_decoder_norm"):
        if arch != "topk":
            raise SAEFormatError(f"{where}: rescale_acts_by_decoder_norm on a {arch!r} SAE (SAELens applies it only "
                                 "to topk SAEs) is refused as ambiguous")
        norms = W_dec.norm(dim=-1)
        if not bool((norms > 0).all()):
            raise SAEFormatError(f"{where}: rescale_acts_by_decoder_norm with a zero decoder row divides by zero")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    return dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation=act, k=k, threshold=thr,
                apply_b_dec_to_input=apply_b_dec and not transcoder, W_skip=t.get("W_skip"), transcoder=transcoder,
                hook=meta.get("intervene_site") or meta.get("hook_name"),
                output_hook=meta.get("intervene_output_site") or meta.get("hook_name_out"),
                model_class_name=meta.get("model_class_name") or "HookedTransformer")


# ---- writing ----------------------------------------------------------------------------------
_TO_TL = {"": "hook_resid_post", ":input": "hook_resid_pre", ".mlp": "hook_mlp_out", ".attn": "hook_attn_out",
          ".heads": "attn.hook_z"}


def tl_hook_name(site: str | None) -> str | None:
    """The TransformerLens hook name of one of our canonical sites (``layers.3.mlp`` -> ``blocks.3.hook_mlp_out``)."""
    import re

    m = re.match(r"^layers\.(\d+)(:input|\.mlp|\.attn|\.heads)?$", site or "")
    return None if m is None else f"blocks.{m.group(1)}.{_TO_TL[m.group(2) or '']}"


def saelens_files(sae: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and ``cfg.json`` that SAELens 6 loads into the same map; ``SAEFormatError`` where it has none."""
    if sae.activation not in ("relu", "jumprelu", "topk"):
        raise SAEFormatError(f"SAELens has no {sae.activation!r} SAE; save with layout='sparsify'")
    if sae.is_transcoder:
        if sae.apply_b_dec_to_input:
            raise SAEFormatError("SAELens transcoders never subtract b_dec from the input")
        if sae.activation == "topk":
            raise SAEFormatError("SAELens has no top-k transcoder architecture")
        arch = ("jumprelu_" if sae.activation == "jumprelu" else "") + \
            ("skip_transcoder" if sae.W_skip is not None else "transcoder")
    else:
        if sae.W_skip is not None:
            raise SAEFormatError("SAELens has no autoencoder with a skip connection")
        arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[sae.activation]
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    meta: dict[str, Any] = {"sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0",
                            "hook_name": tl_hook_name(sae.site) or sae.site}
    if meta["hook_name"] != sae.site:
        meta["intervene_site"] = sae.site  # SAELens keeps unknown metadata; we read our exact site back
    heads = str(sae.site or "").endswith(".heads")
    cfg: dict[str, Any] = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae,
                           "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "device": "cpu",
                           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
                           "reshape_activations": "hook_z" if heads else "none", "metadata": meta}
    if sae.activation == "topk":
        cfg["k"], cfg["rescale_acts_by_decoder_norm"] = sae.k, False
    if sae.is_transcoder:
        cfg["d_out"] = sae.d_out
        meta["hook_name_out"] = tl_hook_name(sae.output_site) or sae.output_site
        if meta["hook_name_out"] != sae.output_site:
            meta["intervene_output_site"] = sae.output_site
    return tensors, cfg
