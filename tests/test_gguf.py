"""llama.cpp control vectors: format fields, layer numbering, and a lossless round trip."""

from __future__ import annotations

import pytest
import torch

import intervene as iv
from intervene.interop.gguf import export_control_vector, import_control_vector, read_control_vector
from tests.tiny_models import tiny_model

gguf = pytest.importorskip("gguf")


def _v(seed: int) -> torch.Tensor:
    return torch.randn(32, generator=torch.Generator().manual_seed(seed))


def test_export_format_and_round_trip(tmp_path):
    model = tiny_model("llama")
    steer = iv.Steering({"layers.1": _v(0)}, scale=2.5)
    ivm = iv.Intervenable(model, steer, attach=False)
    path = export_control_vector(ivm, tmp_path / "cv.gguf")

    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items()}
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 1
    (tensor,) = reader.tensors
    assert tensor.name == "direction.1" and tensor.tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(torch.from_numpy(tensor.data.copy()), _v(0) * 2.5)  # scale is baked into the file

    back = import_control_vector(path, model)
    assert back.sites == ["layers.1"]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(ivm(input_ids=ids).logits, iv.Intervenable(model, back, attach=False)(input_ids=ids).logits)


def test_repeng_style_file_and_llama_cpp_conventions(tmp_path):
    """A file written the way repeng does (direction.N = output of block N, counted from 0)."""
    import numpy as np

    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.1", _v(1).numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cv = read_control_vector(path)
    assert cv.model_hint == "mistral" and list(cv.directions) == [1]
    with pytest.warns(UserWarning, match="made for 'mistral'"):
        steer = import_control_vector(path, tiny_model("llama"), scale=-1.0)
    assert steer.scale == -1.0 and steer.sites == ["layers.1"]


def test_export_refusals(tmp_path):
    model = tiny_model("llama")
    for intervention, why in [
        (iv.Steering({"layers.0": _v(0)}), "block 0"),
        (iv.Steering({"layers.1:input": _v(0)}), "block 0"),  # the same residual point as layers.0
        (iv.Steering({"layers.1.mlp": _v(0)}), "not a block output"),
        (iv.Steering({"layers.1": _v(0)}, positions="generated"), "every position"),
        (iv.DirectionalAblation(_v(0), sites="layers.1"), "can only add"),
    ]:
        with pytest.raises(iv.InterventionError, match=why):
            export_control_vector(iv.Intervenable(model, intervention, attach=False), tmp_path / "x.gguf")
