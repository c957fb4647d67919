"""The shipped demo model and its loader (its SAE, beside it, loads with ``intervene.features.load_sae("demo")``).

The quirky demo model is a tiny Llama trained by ``examples/train_quirky_model.py``. It judges statements of :mod:`intervene.data.quirky` truthfully when the prompt names Alice and with a
systematic error when it names Bob. Everything runs offline: weights and tokenizer live in
``intervene/assets/quirky-tiny``, loadable with vanilla ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "quirky-tiny"
DEMO_ALIASES = ("demo", "quirky-tiny")


def resolve_model_name(name: str | Path) -> str:
    """Map ``"demo"`` (or ``"quirky-tiny"``) to the shipped model's directory; anything else unchanged."""
    return str(DEMO_MODEL_DIR) if str(name) in DEMO_ALIASES else str(name)


def demo_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the demo model (in eval mode) and its tokenizer (left padding, ready for batched prompts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the demo model is missing from {DEMO_MODEL_DIR}; "
                                "rebuild it with examples/train_quirky_model.py")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=dtype).to(device).eval()
    return model, tokenizer


def load_model(name: str, dtype: str = "float32", device: str = "cpu", progress: bool = True) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local dir, a Hub id, or ``demo`` (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_name(name)
    tok = AutoTokenizer.from_pretrained(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model, tok
