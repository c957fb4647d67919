"""The shared trainer: the model stays frozen (bit-identical, no gradient, flags restored), gradients reach only
the intervention, gradient accumulation equals one big batch, the schedule, early stopping, seeding, checkpoint
resume (bit-identical to an uninterrupted run; validated, named errors), bf16 with fp32 parameters, accelerate
offload to disk, and the losses against hand computations."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import intervene as iv
from intervene.errors import CheckpointError, InterventionError
from intervene.positions import CallContext
from intervene.training import (
    IGNORE_INDEX,
    TrainConfig,
    Trainer,
    kl_to_reference,
    last_token_cross_entropy,
    model_inputs,
    pad_batch,
    token_cross_entropy,
    weighted_sum,
)
from intervene.training.trainer import lr_factor
from tests.tiny_models import HIDDEN, VOCAB, tiny_model


class LearnedShift(iv.Intervention):
    """A user's trainable type: adds a learned vector (held in an nn.Module) at every position."""

    type_name = "test_learned_shift"

    def __init__(self, site: str = "layers.0", width: int = HIDDEN) -> None:
        super().__init__(site, "all", name="shift")
        self.shift = nn.Linear(1, width, bias=False)
        nn.init.zeros_(self.shift.weight)

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        return h + self.shift.weight[:, 0].to(h.dtype)


def examples(n: int, seed: int = 0, lengths: tuple[int, int] = (3, 8)) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(*lengths, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, VOCAB, (length,), generator=g).tolist(),
                    "target": int(torch.randint(1, 8, (1,), generator=g))})  # few targets: learnable by a shift
    return out


def collate(exs: list[dict[str, Any]]) -> dict[str, Any]:
    return pad_batch(exs, pad_id=0)


def loreft(model: nn.Module, seed: int = 0) -> iv.LoReFT:
    return iv.LoReFT.create(model, "layers.0", 4, positions="last", seed=seed)


def fit(model: nn.Module, interventions: list[iv.Intervention], data: list, **cfg: Any) -> Any:
    cfg = {"lr": 0.05, "epochs": 2, "batch_size": 4, "progress": False, **cfg}
    progress = cfg.pop("progress")
    trainer = Trainer(model, interventions, last_token_cross_entropy, TrainConfig(**cfg), collate=collate,
                      progress=progress)
    return trainer, trainer.fit(data)


def test_model_frozen_and_gradients_only_into_the_intervention() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    model.lm_head.weight.requires_grad_(False)  # a user's own frozen part: restored as it was
    x = loreft(model)
    start = {k: v.clone() for k, v in x.tensors().items()}
    seen: list[bool] = []

    def spy(step: int, total: int) -> None:  # after each step: the model holds no gradient, flags are off
        seen.append(all(p.grad is None and not p.requires_grad for p in model.parameters()))

    trainer = Trainer(model, [x], last_token_cross_entropy, TrainConfig(lr=0.05, epochs=2, batch_size=4),
                      collate=collate, progress=False, callbacks=[spy])
    result = trainer.fit(examples(24))
    assert seen and all(seen) and result.steps == len(seen)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.lm_head.weight.requires_grad
    model.lm_head.weight.requires_grad_(True)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not torch.equal(start[k], v) for k, v in x.tensors().items()), "every tensor of the LoReFT trained"
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    # an intervention that shares a model parameter is refused
    x2 = LearnedShift()
    x2.shift.weight = model.lm_head.weight
    with pytest.raises(InterventionError, match="shares parameters"):
        Trainer(model, [x2], last_token_cross_entropy)
    with pytest.raises(InterventionError, match="nothing to train"):
        Trainer(model, [iv.Steering({"layers.0": torch.ones(HIDDEN)})], last_token_cross_entropy)


def test_any_intervention_with_parameters_trains() -> None:
    model = tiny_model("gpt2")
    x = LearnedShift()
    _, result = fit(model, [x], examples(32, seed=1), lr=0.1, epochs=3, val_fraction=0.25, patience=None)
    assert result.n_train == 24 and result.n_val == 8 and result.steps == 3 * 6
    assert x.shift.weight.abs().sum() > 0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # an Intervenable given to the trainer keeps its attachment state (and its other interventions' edits)
    steer = iv.Steering({"layers.1": torch.ones(HIDDEN)}, scale=0.5)
    ivm = iv.Intervenable(model, [steer, LearnedShift()])
    Trainer(ivm, [ivm["shift"]], last_token_cross_entropy, TrainConfig(epochs=1, batch_size=8), collate=collate,
            progress=False).fit(examples(16, seed=2))
    assert ivm.attached
    ivm.detach()
    with pytest.raises(InterventionError, match="not in the Intervenable"):
        Trainer(ivm, [LearnedShift()], last_token_cross_entropy)


def test_grad_accumulation_equals_one_big_batch() -> None:
    model = tiny_model("llama")
    data = examples(16, seed=2)
    outs = []
    for bs, acc in ((8, 1), (4, 2), (2, 4)):
        x = loreft(model)
        fit(model, [x], data, batch_size=bs, grad_accum=acc, epochs=1, val_fraction=0.0, eval_at_start=False,
            restore_best=False)
        outs.append(x.tensors())
    for other in outs[1:]:
        for k in outs[0]:
            torch.testing.assert_close(other[k], outs[0][k], atol=1e-6, rtol=1e-5)


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(schedule="linear", warmup=0.2)
    f = lr_factor(cfg, 10)
    assert [f(s) for s in range(4)] == [0.0, 0.5, 1.0, 1.0 - 1 / 8]
    assert f(10) == 0.0
    g = lr_factor(TrainConfig(schedule="cosine"), 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)
    assert lr_factor(TrainConfig(), 10)(7) == 1.0
    model = tiny_model("llama")
    x = loreft(model)
    lrs: list[float] = []
    trainer = Trainer(model, [x], last_token_cross_entropy,
                      TrainConfig(lr=0.1, epochs=1, batch_size=2, schedule="linear", warmup=0.25, val_fraction=0),
                      collate=collate, progress=False,
                      callbacks=[lambda s, t: lrs.append(trainer.optimizer.param_groups[0]["lr"])])
    trainer.fit(examples(8))
    assert lrs == pytest.approx([0.1 * f for f in (1.0, 2 / 3, 1 / 3, 0.0)])  # after steps 1..4 of 4, warm-up 1


def test_early_stopping_restores_the_best() -> None:
    model = tiny_model("llama")
    train = examples(24, seed=3)
    val = [{**e, "target": 90} for e in examples(8, seed=4)]  # training moves away from these targets
    x = loreft(model)
    start = {k: v.clone() for k, v in x.tensors().items()}
    trainer = Trainer(model, [x], last_token_cross_entropy,
                      TrainConfig(lr=0.1, epochs=10, batch_size=4, patience=2), collate=collate, progress=False)
    result = trainer.fit(train, val)
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 0
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert all(torch.equal(start[k], v) for k, v in x.tensors().items()), "the untrained start was the best"


def test_seeded_and_leaves_the_global_rng_alone() -> None:
    model = tiny_model("llama")
    data = examples(20, seed=5)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    runs = []
    for seed in (7, 7, 8):
        x = loreft(model)
        _, result = fit(model, [x], data, seed=seed)
        runs.append((x.tensors(), result.history))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert runs[0][1] == runs[1][1] and all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert runs[0][1] != runs[2][1]


def test_progress_bar_shows_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    fit(tiny_model("llama"), [loreft(tiny_model("llama"))], examples(8), epochs=1, progress=True)
    assert "loss=" in capsys.readouterr().err


@pytest.mark.parametrize("every", [0, 3])
def test_resume_after_an_interruption_is_bit_identical(tmp_path, every: int) -> None:
    """Interrupt a run (5 steps per epoch) at step 6, just after a mid-epoch checkpoint (every 3 steps), or at step
    10, before its epoch-end checkpoint (so the step-5 one is the latest); resume in a fresh trainer: the
    parameters, the optimizer's state and the history equal an uninterrupted run's."""
    model = tiny_model("llama")
    data = examples(22, seed=6)
    cfg = TrainConfig(lr=0.05, epochs=4, batch_size=4, grad_accum=1, schedule="cosine", eval_every=2,
                      val_fraction=0.2, patience=None)
    x = loreft(model)
    full = Trainer(model, [x], last_token_cross_entropy, cfg, collate=collate, progress=False)
    want = full.fit(data)

    class Stop(Exception):
        pass

    def stop_at(step: int, total: int) -> None:
        if step == (6 if every == 3 else 10):
            raise Stop

    y = loreft(model)
    ck = tmp_path / "ck"
    with pytest.raises(Stop):
        Trainer(model, [y], last_token_cross_entropy, cfg, collate=collate, progress=False,
                callbacks=[stop_at]).fit(data, checkpoint_dir=ck, checkpoint_every=every)
    assert json.loads((ck / "latest.json").read_text())["dir"] == ("step-000006" if every == 3 else "step-000005")
    z = loreft(model, seed=99)  # a different start: everything must come from the checkpoint
    again = Trainer(model, [z], last_token_cross_entropy, cfg, collate=collate, progress=False)
    got = again.fit(data, checkpoint_dir=ck, checkpoint_every=every, resume=True)
    assert got.history == want.history and got.steps == want.steps and got.best_step == want.best_step
    assert all(torch.equal(z.tensors()[k], v) for k, v in x.tensors().items())
    sa, sb = full.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_checkpoints_are_validated_with_named_errors(tmp_path) -> None:
    model = tiny_model("llama")
    data = examples(12, seed=7)
    cfg = TrainConfig(lr=0.05, epochs=1, batch_size=4)
    Trainer(model, [loreft(model)], last_token_cross_entropy, cfg, collate=collate,
            progress=False).fit(data, checkpoint_dir=tmp_path)
    sub = tmp_path / json.loads((tmp_path / "latest.json").read_text())["dir"]
    assert sorted(p.name for p in sub.iterdir()) == sorted(
        ["state.json", "params.safetensors", "best.safetensors", "optimizer.safetensors", "rng.safetensors"])
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))

    def resume(config: TrainConfig = cfg, x: iv.Intervention | None = None, d: list = data) -> None:
        Trainer(model, [x or loreft(model)], last_token_cross_entropy, config, collate=collate,
                progress=False).fit(d, checkpoint_dir=tmp_path, resume=True)

    with pytest.raises(CheckpointError, match=r"lr \(0.05 there, 0.1 now\)"):
        resume(TrainConfig(lr=0.1, epochs=1, batch_size=4))
    with pytest.raises(CheckpointError, match="training / .* validation examples"):
        resume(d=data + data)
    with pytest.raises(CheckpointError, match="other tensors"):
        resume(x=iv.LoReFT.create(model, "layers.0", 2, name="loreft"))
    (sub / "optimizer.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="optimizer.safetensors is not a readable safetensors"):
        resume()
    (sub / "params.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        resume()


def test_bf16_model_with_fp32_parameters() -> None:
    model = tiny_model("qwen2", torch.bfloat16)
    x = loreft(model)
    _, result = fit(model, [x], examples(24, seed=8), lr=0.05, epochs=3)
    assert all(t.dtype == torch.float32 for t in x.tensors().values())
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_trains_under_accelerate_disk_offload(tmp_path) -> None:
    """The same run on a model split across the CPU and disk (accelerate's dispatch_model) ends where the plain
    model's does, and the offloaded model is untouched."""
    accelerate = pytest.importorskip("accelerate")
    import copy

    base = tiny_model("llama")
    data = examples(16, seed=9)
    x = loreft(base)
    fit(base, [x], data, epochs=1)
    model = copy.deepcopy(base)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # its weights live on disk
    assert any(tmp_path.glob("*.dat"))
    y = loreft(model)
    fit(model, [y], data, epochs=1)
    for k, v in x.tensors().items():
        torch.testing.assert_close(y.tensors()[k], v, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())
    batch = collate(data[:4])
    with torch.no_grad():
        torch.testing.assert_close(model(**model_inputs(model, batch)).logits, base(**model_inputs(base, batch)).logits)


def test_losses_against_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    ref = torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 2], labels[1, 0], labels[1, 3] = 3, 5, 1
    batch: Mapping[str, Any] = {"labels": labels, "target": torch.tensor([2, 6]), "attention_mask": mask,
                                "reference_logits": ref, "counterfactual": torch.tensor([0, 1])}
    lp = torch.log_softmax(logits.double(), -1)
    want = -(lp[0, 2, 3] + lp[1, 0, 5] + lp[1, 3, 1]) / 3
    assert token_cross_entropy(logits, batch).item() == pytest.approx(want.item(), rel=1e-6)
    assert last_token_cross_entropy(logits, batch).item() == pytest.approx(
        -(lp[0, 3, 2] + lp[1, 3, 6]).item() / 2, rel=1e-6)
    lr = torch.log_softmax(ref.double(), -1)
    kl = [(lr[b, t].exp() * (lr[b, t] - lp[b, t])).sum() for b in range(2) for t in range(4) if mask[b, t]]
    assert kl_to_reference(logits, batch).item() == pytest.approx(float(sum(kl) / len(kl)), rel=1e-5)
    combo = weighted_sum((2.0, last_token_cross_entropy), (0.5, kl_to_reference))
    assert combo.needs_reference
    assert combo(logits, batch).item() == pytest.approx(
        2 * last_token_cross_entropy(logits, batch).item() + 0.5 * kl_to_reference(logits, batch).item(), rel=1e-6)
    assert F.cross_entropy(logits[:, -1], batch["counterfactual"]).item() == pytest.approx(
        iv.training.interchange_loss(logits, batch).item())


def test_kl_regularised_training_gets_reference_logits() -> None:
    model = tiny_model("llama")
    x = loreft(model)
    loss = weighted_sum((1.0, last_token_cross_entropy), (10.0, kl_to_reference))
    trainer = Trainer(model, [x], loss, TrainConfig(lr=0.05, epochs=1, batch_size=4, val_fraction=0),
                      collate=collate, progress=False)
    result = trainer.fit(examples(8))
    assert result.steps == 2 and math.isfinite(result.history[-1]["train_loss"])


def test_pad_batch_and_model_inputs() -> None:
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [1, 2, 3], "target": 4, "source": {"input_ids": [9]}},
                       {"input_ids": [8], "labels": [1], "target": 2, "source": {"input_ids": [3, 4]}}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 1]]
    assert batch["target"].tolist() == [4, 2] and batch["source"]["input_ids"].tolist() == [[0, 9], [3, 4]]
    kw = model_inputs(tiny_model("llama"), batch, logits_to_keep=1, not_an_argument=3)
    assert kw["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]] and kw["logits_to_keep"] == 1
    assert "not_an_argument" not in kw
