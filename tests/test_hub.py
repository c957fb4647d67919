"""Hub round trips through the real huggingface_hub / transformers clients and a loopback Hub."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import intervene as iv
from intervene.publish import bake_and_push
from tests.tiny_models import tiny_model


def _batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[3, 4, 5, 6], [0, 7, 8, 9]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])}


def _steer(scale: float = 3.0) -> iv.Steering:
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    return iv.Steering({"layers.1": v}, scale=scale)


def _tokenizer() -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _logits(model_or_ivm) -> torch.Tensor:
    with torch.no_grad():
        return model_or_ivm(**_batch()).logits


def test_push_diff_then_load_gives_identical_outputs(hub):
    model = tiny_model("llama")
    ivm = iv.Intervenable(model, _steer(), attach=False)
    ivm.metadata = {"method": "mean difference", "layer": 1}
    info = ivm.push_to_hub("tester/steer-truth", commit_message="diff v1")
    assert [c[:2] for c in hub.commits] == [("tester/steer-truth", "main")]  # one commit
    assert info.oid == hub.commits[0][2]
    files = hub.files("tester/steer-truth")
    assert {"intervene_config.json", "intervene_weights.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: intervene") and "mean difference" in card
    assert all(r["authorization"] == "Bearer hf_intervene_test_token" for r in hub.requests if r["method"] == "POST")

    loaded = iv.Intervenable.load("tester/steer-truth", model, attach=False)
    assert loaded.metadata == ivm.metadata
    assert torch.equal(_logits(loaded), _logits(ivm))


def test_bake_and_push_loads_with_vanilla_transformers(hub):
    model = tiny_model("llama")
    ivm = iv.Intervenable(model, _steer(), attach=False)
    ivm.metadata = {"method": "CCS probe direction", "metrics": {"accuracy": 0.91}}
    tok = _tokenizer()
    bake_and_push(ivm, "tester/model-truthful", tokenizer=tok)
    assert len(hub.commits) == 1
    files = hub.files("tester/model-truthful")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "base_model: tiny-llama" in card and "library_name: intervene" in card and "| accuracy | 0.91 |" in card
    assert "mlp_bias=True" in card and "model.layers.1.mlp.down_proj.bias" in card

    baked = T.AutoModelForCausalLM.from_pretrained("tester/model-truthful").eval()
    real = _batch()["attention_mask"].bool()
    assert (_logits(baked) - _logits(ivm))[real].abs().max() < 1e-4
    assert T.AutoTokenizer.from_pretrained("tester/model-truthful")("w3 w4")["input_ids"] == [3, 4]


def test_revisions_and_stale_weights(hub):
    model = tiny_model("llama")
    v1, v2 = iv.Intervenable(model, _steer(1.0), attach=False), iv.Intervenable(model, _steer(-2.0), attach=False)
    first = v1.push_to_hub("tester/steer")
    v2.push_to_hub("tester/steer", revision="v2")
    assert [c[1] for c in hub.commits] == ["main", "v2"]
    assert torch.equal(_logits(iv.Intervenable.load("tester/steer", model, attach=False)), _logits(v1))
    assert torch.equal(_logits(iv.Intervenable.load("tester/steer", model, revision="v2", attach=False)), _logits(v2))
    assert torch.equal(_logits(iv.Intervenable.load("tester/steer", model, revision=first.oid, attach=False)),
                       _logits(v1))

    # a baked push replaces earlier weight shards in the same commit
    from huggingface_hub import HfApi

    HfApi().create_repo("tester/baked")
    HfApi().upload_file(path_or_fileobj=b"stale", path_in_repo="model-00001-of-00002.safetensors", repo_id="tester/baked")
    bake_and_push(v1, "tester/baked")
    assert "model-00001-of-00002.safetensors" not in hub.files("tester/baked")
    assert "model.safetensors" in hub.files("tester/baked")


def test_clear_errors(hub):
    model = tiny_model("llama")
    with pytest.raises(iv.DiffNotFoundError, match="no Hub repo 'tester/missing'"):
        iv.Intervenable.load("tester/missing", model)
    iv.Intervenable(model, _steer(), attach=False).push_to_hub("tester/steer")
    with pytest.raises(iv.DiffNotFoundError, match="has no revision 'nope'"):
        iv.Intervenable.load("tester/steer", model, revision="nope")
    bake_and_push(iv.Intervenable(model, _steer(), attach=False), "tester/a-model")
    with pytest.raises(iv.DiffNotFoundError, match="not an intervene diff"):
        iv.Intervenable.load("tester/a-model", model)


def test_cli_push_and_bake_push(hub, tmp_path, capsys):
    from intervene.cli import main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    ivm = iv.Intervenable(model, _steer(), attach=False)
    ivm.save_pretrained(tmp_path / "diff")
    assert main(["push", str(tmp_path / "diff"), "tester/cli-diff", "--revision", "exp"]) == 0
    assert [c[:2] for c in hub.commits] == [("tester/cli-diff", "exp")]
    loaded = iv.Intervenable.load("tester/cli-diff", model, revision="exp", attach=False)
    assert torch.equal(_logits(loaded), _logits(ivm))

    assert main(["bake", str(tmp_path / "base"), "tester/cli-diff", "--revision", "exp",
                 "--out", str(tmp_path / "out"), "--push", "tester/cli-baked"]) == 0
    assert "pushed to tester/cli-baked" in capsys.readouterr().out
    baked = T.AutoModelForCausalLM.from_pretrained("tester/cli-baked").eval()
    real = _batch()["attention_mask"].bool()
    assert (_logits(baked) - _logits(ivm))[real].abs().max() < 1e-4
    assert main(["push", str(tmp_path / "base"), "tester/not-a-diff"]) == 1  # a model dir is not a diff
