"""Positions are exact under the KV cache, left padding, beams and num_return_sequences."""

from __future__ import annotations

import pytest
import torch

import intervene as iv
from intervene.intervention import Intervention
from intervene.positions import CallContext, Positions
from tests.tiny_models import tiny_model

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15], [21, 22, 23, 24]]


def left_pad(rows: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": am}


def steer(positions, scale: float = 6.0, site: str = "layers.0") -> iv.Steering:
    v = torch.randn(32, generator=torch.Generator().manual_seed(7))
    return iv.Steering({site: v}, scale=scale, positions=positions)


class Recorder(Intervention):
    """Logs, per call, the absolute positions and prompt lengths of the tokens it would touch."""

    type_name = "recorder"

    def __init__(self, positions) -> None:
        super().__init__("layers.0", positions, name="rec")
        self.calls: list[dict] = []

    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        m = ctx.mask(self.positions)
        full = torch.ones(ctx.batch, ctx.seq, dtype=torch.bool)
        m = full if m is None else (~full if m is False else m)
        valid = full if ctx.valid is None else ctx.valid
        self.calls.append({"mask": m.clone(), "abs": ctx.abs_pos.clone(), "plen": ctx.prompt_len.clone(),
                           "valid": valid.clone(), "batch": ctx.batch})
        return h


GEN = dict(max_new_tokens=6, do_sample=False)
POSITION_SPECS = ["all", "generated", "prompt", "last", [1, -1], [[0], [3, 6], [2, 7]]]


@pytest.mark.parametrize("positions", POSITION_SPECS, ids=str)
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "falcon", "gptj", "mixtral"])
def test_cache_on_equals_cache_off(family: str, positions) -> None:
    model = tiny_model(family)
    batch = left_pad(PROMPTS)
    with iv.Intervenable(model, steer(positions)) as ivm:
        on = ivm.generate(**batch, use_cache=True, **GEN)
        off = ivm.generate(**batch, use_cache=False, **GEN)
    assert torch.equal(on, off)
    assert not torch.equal(on, model.generate(**batch, **GEN)), "the edit changed nothing: test is vacuous"


@pytest.mark.parametrize("positions", POSITION_SPECS[:5], ids=str)
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt"])
def test_left_padded_batch_equals_rows_alone(family: str, positions) -> None:
    model = tiny_model(family)
    with iv.Intervenable(model, steer(positions)) as ivm:
        batched = ivm.generate(**left_pad(PROMPTS), **GEN)
        width = batched.shape[1] - GEN["max_new_tokens"]
        for i, row in enumerate(PROMPTS):
            alone = ivm.generate(**left_pad([row]), **GEN)
            assert batched[i, width - len(row):].tolist() == alone[0].tolist()


def _reference_generate(model, rows, positions, n: int, site_path: str, vec: torch.Tensor) -> torch.Tensor:
    """Greedy decoding by hand, without cache: each step re-runs the whole sequence with a plain
    hook adding ``vec`` where the spec says, computed from absolute positions directly."""
    batch = left_pad(rows)
    ids, am = batch["input_ids"], batch["attention_mask"]
    plen = am.sum(-1, keepdim=True)
    for _ in range(n):
        pos = am.cumsum(-1) - 1
        if positions == "generated":
            sel = pos >= plen
        elif positions == "last":
            sel = pos == plen - 1
        elif positions == "prompt":
            sel = pos < plen
        else:
            sel = torch.zeros_like(pos, dtype=torch.bool)
            for b, idx in enumerate(positions):
                for i in idx:
                    sel[b] |= pos[b] == (i if i >= 0 else int(plen[b]) + i)
        sel &= am.bool()
        hook = model.get_submodule(site_path).register_forward_hook(
            lambda m, a, o, sel=sel: torch.where(sel[..., None], o + vec, o))
        try:
            logits = model(input_ids=ids, attention_mask=am, position_ids=pos.clamp(min=0)).logits[:, -1]
        finally:
            hook.remove()
        nxt = logits.argmax(-1, keepdim=True)
        ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("positions", ["generated", "last", "prompt", [[0, -1], [2], [-2]]], ids=str)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_matches_hand_written_reference(family: str, positions) -> None:
    model = tiny_model(family)
    v = torch.randn(32, generator=torch.Generator().manual_seed(7)) * 6.0
    path = "model.layers.0" if family == "llama" else "transformer.h.0"
    want = _reference_generate(model, PROMPTS, positions, 6, path, v)
    with iv.Intervenable(model, iv.Steering({"layers.0": v}, positions=positions)) as ivm:
        got = ivm.generate(**left_pad(PROMPTS), **GEN)
    assert torch.equal(got, want)


def test_generated_never_touches_prompt_and_prompt_never_touches_generated() -> None:
    model = tiny_model("llama")
    for spec, want_generated in (("generated", True), ("prompt", False)):
        for use_cache in (True, False):
            rec = Recorder(spec)
            with iv.Intervenable(model, rec) as ivm:
                ivm.generate(**left_pad(PROMPTS), use_cache=use_cache, **GEN)
            touched = 0
            for c in rec.calls:
                is_gen = c["abs"] >= c["plen"][:, None]
                assert not (c["mask"] & ~c["valid"]).any(), "padding was touched"
                assert bool((c["mask"] & (is_gen != want_generated)).sum() == 0), spec
                # every position of the right kind is touched
                assert torch.equal(c["mask"], c["valid"] & (is_gen == want_generated))
                touched += int(c["mask"].sum())
            assert touched > 0


def test_last_touches_exactly_the_last_prompt_token() -> None:
    model = tiny_model("llama")
    rec = Recorder("last")
    with iv.Intervenable(model, rec) as ivm:
        ivm.generate(**left_pad(PROMPTS), **GEN)
    first = rec.calls[0]
    assert first["mask"].sum(-1).tolist() == [1, 1, 1]
    assert first["abs"][first["mask"]].tolist() == [len(r) - 1 for r in PROMPTS]
    assert all(not c["mask"].any() for c in rec.calls[1:])
    # a plain forward: the last real token of each row (right padding too)
    rec2 = Recorder("last")
    ids = torch.tensor([[5, 6, 7, 0], [1, 2, 3, 4]])
    with iv.Intervenable(model, rec2) as ivm:
        ivm(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert rec2.calls[0]["mask"].tolist() == [[False, False, True, False], [False, False, False, True]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_beams_and_return_sequences_edit_every_row(use_cache: bool) -> None:
    model = tiny_model("llama")
    rec = Recorder("generated")
    per_example = Recorder([[1], [2], [3]])
    per_example.name = "rec2"
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, use_cache=use_cache)
    with iv.Intervenable(model, [rec, per_example]) as ivm:
        out = ivm.generate(**left_pad(PROMPTS), **kw)
    assert out.shape[0] == 6
    decode = [c for c in rec.calls if (c["abs"] >= c["plen"][:, None]).any()]
    assert decode and all(c["batch"] == 9 for c in decode)
    for c in decode:  # every beam of every example has its generated tokens edited
        assert c["mask"].any(-1).all()
    first = per_example.calls[0]
    assert first["batch"] == 9
    hit = first["abs"].masked_fill(~first["mask"], -1).max(-1).values.tolist()
    assert hit == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # beams inherit their example's positions


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_cache_on_off_and_steered(family: str) -> None:
    model = tiny_model(family)
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    with iv.Intervenable(model, steer("generated")) as ivm:
        on = ivm.generate(**left_pad(PROMPTS), use_cache=True, **kw)
        off = ivm.generate(**left_pad(PROMPTS), use_cache=False, **kw)
    assert torch.equal(on, off)
    assert not torch.equal(on, model.generate(**left_pad(PROMPTS), **kw))


def test_model_generate_is_tracked_while_attached() -> None:
    model = tiny_model("llama")
    with iv.Intervenable(model, steer("generated")) as ivm:
        via_ivm = ivm.generate(**left_pad(PROMPTS), **GEN)
        via_model = model.generate(**left_pad(PROMPTS), **GEN)
    assert torch.equal(via_ivm, via_model)
    assert "generate" not in model.__dict__  # restored on detach


def test_plain_forward_generated_touches_nothing_and_indices_work() -> None:
    model = tiny_model("llama")
    batch = left_pad(PROMPTS)
    base = model(**batch).logits
    with iv.Intervenable(model, steer("generated")) as ivm:
        assert torch.equal(ivm(**batch).logits, base)
    rec = Recorder([0, -1])
    with iv.Intervenable(model, rec) as ivm:
        ivm(**batch)
    c = rec.calls[0]
    assert c["abs"][c["mask"]].view(3, 2).tolist() == [[0, 2], [0, 4], [0, 3]]


def test_positions_parse_and_json_round_trip() -> None:
    for spec in ["all", "prompt", "generated", "last", [0, -1], [[1, 2], [3]], torch.tensor([[1, 2], [3, 4]])]:
        p = Positions.parse(spec)
        assert Positions.from_json(p.to_json()) == p
    for bad in ["first", [], [1.5], 3.0]:
        with pytest.raises(iv.PositionsError):
            Positions.parse(bad)


def test_per_example_positions_must_fit_the_batch() -> None:
    model = tiny_model("llama")
    with pytest.raises(iv.PositionsError, match="per-example"):
        with iv.Intervenable(model, steer([[1], [2]])) as ivm:
            ivm(**left_pad(PROMPTS))
