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
                                "rebuild it: python examples/train_quirky_model.py --out intervene/assets/quirky-tiny")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    tokenizer.padding_side = "left"
    with quiet_loading(False):  # a 2 MB model: a loading bar would only be noise in a notebook
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=dtype).to(device).eval()
    return model, tokenizer


def model_source(name: str | Path, revision: str | None = None) -> str:
    """Where to load ``name`` from: the demo model's directory, a local directory, or a Hub id that exists.

    Answers a name that is neither with one line (``FileNotFoundError``) instead of transformers'
    error for a malformed repo id, or its retries when the network is down.
    """
    from intervene.hubio import check_hub_file

    path = Path(resolve_model_name(name)).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{name} is a file; a model is a directory holding config.json, or a Hub id")
    try:
        check_hub_file(str(name), "config.json", "model", revision=revision)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; a model is a local directory, a Hub id, or 'demo'") from None
    return str(name)


def quiet_loading(progress: bool) -> Any:
    """A context in which transformers shows its loading bars only if ``progress``."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def ctx() -> Any:
        shown = hf_logging.is_progress_bar_enabled()
        if not progress and shown:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if shown:
                hf_logging.enable_progress_bar()

    return ctx()


def load_model(name: str, dtype: str = "float32", device: str = "cpu", progress: bool = True,
               revision: str | None = None) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local dir, a Hub id, or ``demo`` (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_source(name, revision)
    kw = {} if revision is None else {"revision": revision}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with quiet_loading(progress):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw).to(device).eval()
    return model, tok
