"""pyvene interop: the same additive edit gives identical logits and greedy tokens in both libraries."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import intervene as iv
from intervene.interop.pyvene import export_pyvene, import_pyvene
from tests.tiny_models import tiny_model

pv = pytest.importorskip("pyvene")


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 6, 7, 8, 9, 10, 11], [4, 12, 3, 12, 13, 14, 15]])


def _randn(seed: int, n: int = 32) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # pyvene logs a warning per hook
    yield
    logging.disable(logging.NOTSET)


def test_export_loads_in_pyvene_with_identical_outputs(tmp_path):
    model = copy.deepcopy(tiny_model("llama"))  # pyvene removes every hook on a model it wraps
    steer = iv.Steering({"layers.1": _randn(0), "layers.0.heads": _randn(1), "layers.0.mlp": _randn(2)}, scale=4.0)
    ivm = iv.Intervenable(model, steer, attach=False)
    export_pyvene(ivm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert len(config["sorted_keys"]) == 3 and all((tmp_path / f"intkey_{k}.bin").is_file() for k in config["sorted_keys"])

    pvm = pv.IntervenableModel.load(str(tmp_path), model)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours, theirs = ivm(input_ids=_ids()).logits, pvm({"input_ids": _ids()})[1].logits
        base = model(input_ids=_ids()).logits
        ours_gen = ivm.generate(input_ids=_ids(), **kw)
        _, theirs_gen = pvm.generate({"input_ids": _ids()}, intervene_on_prompt=True, **kw)
    assert (ours - base).abs().max() > 0.1
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_gen, theirs_gen)


def test_import_pyvene_saved_directory(tmp_path):
    model = copy.deepcopy(tiny_model("llama"))  # pyvene removes every hook on a model it wraps
    config = pv.IntervenableConfig(representations=[
        {"layer": 1, "component": "block_output",
         "intervention": pv.AdditionIntervention(source_representation=_randn(3), embed_dim=32)},
        {"layer": 0, "component": "mlp_output",
         "intervention": pv.SubtractionIntervention(source_representation=_randn(4), embed_dim=32)},
        {"layer": 0, "component": "attention_output", "intervention": pv.ZeroIntervention(embed_dim=32)},
        {"layer": 0, "component": "model.layers[1].self_attn.o_proj.input",
         "intervention": pv.AdditionIntervention(source_representation=_randn(5), embed_dim=32)},
    ])
    pvm = pv.IntervenableModel(config, model)
    with torch.no_grad():
        theirs = pvm({"input_ids": _ids()})[1].logits
    pvm.save(str(tmp_path))

    ivm = import_pyvene(tmp_path, model, attach=False)
    sites = sorted({s for i in ivm.interventions for s in i.sites})
    assert sites == ["layers.0.attn", "layers.0.mlp", "layers.1", "layers.1.heads"]
    with torch.no_grad():
        ours = ivm(input_ids=_ids()).logits
    assert torch.equal(ours, theirs)


def test_import_refuses_what_it_cannot_express(tmp_path):
    model = copy.deepcopy(tiny_model("llama"))  # pyvene removes every hook on a model it wraps
    config = pv.IntervenableConfig(representations=[
        {"layer": 1, "component": "block_output", "intervention": pv.RotatedSpaceIntervention(embed_dim=32)}])
    pv.IntervenableModel(config, model).save(str(tmp_path))
    with pytest.raises(iv.InterventionError, match="RotatedSpaceIntervention"):
        import_pyvene(tmp_path, model)
    with pytest.raises(iv.DiffNotFoundError):
        import_pyvene(tmp_path / "nope", model)


def test_bin_files_are_never_unpickled_beyond_tensors(tmp_path):
    model = copy.deepcopy(tiny_model("llama"))  # pyvene removes every hook on a model it wraps
    ivm = iv.Intervenable(model, iv.Steering({"layers.1": _randn(0)}), attach=False)
    export_pyvene(ivm, tmp_path)
    key = json.loads((tmp_path / "config.json").read_text())["sorted_keys"][0]
    torch.save({"source_representation": _randn(0), "evil": _Evil()}, tmp_path / f"intkey_{key}.bin")
    with pytest.raises(iv.DiffFormatError, match="refused to unpickle"):
        import_pyvene(tmp_path, model)
    with pytest.raises(iv.InterventionError, match="no pyvene equivalent"):
        export_pyvene(iv.Intervenable(model, iv.DirectionalAblation(_randn(1), sites="layers.1"), attach=False),
                      tmp_path / "x")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("family,site", [("llama", "layers.0"), ("llama", "layers.1.heads"), ("gpt2", "layers.1")])
def test_das_exports_as_rotated_space_intervention_with_identical_logits(tmp_path, family, site):
    """A DAS (a rotation away from its seeded start) saved as pyvene's RotatedSpaceIntervention: pyvene 0.1.8 loads it and, given
    the same source and unit_locations, reproduces our interchange's logits bit for bit."""

    model = copy.deepcopy(tiny_model(family))  # pyvene removes every hook on a model it wraps
    das = iv.DAS.create(model, site, 5, seed=3)
    with torch.no_grad():  # a trained-looking rotation: not the seeded start, still orthogonal
        das.rotation.set_(torch.linalg.qr(das.weight() + 0.3 * torch.randn(32, 32, generator=torch.Generator()
                                                                            .manual_seed(4)))[0])
    ivm = iv.Intervenable(model, das, attach=False)
    export_pyvene(ivm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["intervention_types"] == ["<class 'pyvene.models.interventions.RotatedSpaceIntervention'>"]
    assert config["intervention_dimensions"] == [5] and config["intervention_constant_sources"] == [False]
    g = torch.Generator().manual_seed(0)
    base, src = torch.randint(1, 90, (3, 7), generator=g), torch.randint(1, 90, (3, 7), generator=g)
    b, s = ({"input_ids": x, "attention_mask": torch.ones_like(x)} for x in (base, src))
    with torch.no_grad(), ivm, das.interchange(ivm, b, s, positions=[4], source_positions=[2]):
        ours = ivm(**b).logits
    pvm = pv.IntervenableModel.load(str(tmp_path), model)
    with torch.no_grad():
        _, theirs = pvm({"input_ids": base}, [{"input_ids": src}],
                        unit_locations={"sources->base": ([[[2]] * 3], [[[4]] * 3])})
        plain = model(input_ids=base).logits
    assert (ours - plain).abs().max() > 1e-2
    assert torch.equal(ours, theirs.logits)


def test_export_refuses_what_pyvene_cannot_hold(tmp_path):
    phi3 = tiny_model("phi3")
    with pytest.raises(iv.InterventionError, match="maps no components for Phi3ForCausalLM"):
        export_pyvene(iv.Intervenable(phi3, iv.DAS.create(phi3, "layers.0", 2), attach=False), tmp_path)
    model = copy.deepcopy(tiny_model("llama"))
    with pytest.raises(iv.InterventionError, match="no pyvene equivalent"):
        export_pyvene(iv.Intervenable(model, iv.LoReFT.create(model, "layers.0", 2), attach=False), tmp_path)
