"""Training interventions with learnable parameters through a frozen model (shared by every trainable method).

* :class:`Trainer` / :class:`TrainConfig` / :class:`TrainResult` — the loop (``trainer.py``, ``config.py``):
  batching, gradient accumulation, a learning-rate schedule, early stopping on a validation split, a progress
  bar, seeding, checkpoint resume;
* ``losses.py`` — losses on model outputs: last-token / teacher-forced cross-entropy, the interchange loss,
  KL to the unedited model, weighted sums;
* ``batching.py`` — padding examples into batches and the forward's keyword arguments;
* ``checkpoint.py`` — resumable checkpoints in safetensors + JSON (no pickle), validated on load;
* :class:`Orthonormal` — a matrix kept orthonormal by PyTorch's orthogonal parametrization (DAS, LoReFT).

REMEDI (``intervene.methods.remedi``), DAS (``intervene.methods.das``) and ReFT (``intervene.methods.reft``)
train on it.
"""

from intervene.training.batching import IGNORE_INDEX, input_device, model_inputs, pad_batch, pad_tokens
from intervene.training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from intervene.training.config import TrainConfig, train_config
from intervene.training.losses import (
    interchange_loss,
    kl_to_reference,
    last_token_cross_entropy,
    logits_of,
    token_cross_entropy,
    weighted_sum,
)
from intervene.training.orthogonal import Orthonormal, random_orthonormal
from intervene.training.trainer import (
    Trainer,
    TrainResult,
    default_forward,
    frozen,
    split_indices,
    trainable_modules,
)

__all__ = ["IGNORE_INDEX", "Orthonormal", "TrainConfig", "TrainResult", "Trainer", "default_forward", "frozen",
           "has_checkpoint", "input_device", "interchange_loss", "kl_to_reference", "last_token_cross_entropy",
           "load_checkpoint", "logits_of", "model_inputs", "pad_batch", "pad_tokens", "random_orthonormal",
           "save_checkpoint", "split_indices", "token_cross_entropy", "train_config", "trainable_modules",
           "weighted_sum"]
