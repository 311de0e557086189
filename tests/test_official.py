"""Import/export of official REG checkpoints: names, round trips, .pt layouts, clear mismatches."""

import argparse

import pytest
import torch

from regscale.errors import UserError
from regscale.models import build_model, export_official, load_official
from regscale.models.official import from_official_key, to_official_key
from tests.fixtures.models import TINY, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

# Upstream's parameter names for a depth-3 model (models/sit.py of the REG repo), written out by hand.
UPSTREAM_TOP = {
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "projectors.0.0.weight", "projectors.0.0.bias", "projectors.0.2.weight", "projectors.0.2.bias",
    "projectors.0.4.weight", "projectors.0.4.bias",
    "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.linear_cls.weight",
    "final_layer.linear_cls.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    "cls_projectors2.weight", "cls_projectors2.bias", "wg_norm.weight", "wg_norm.bias",
}
UPSTREAM_BLOCK = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight",
                  "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight",
                  "adaLN_modulation.1.bias"}


def upstream_keys(depth: int) -> set[str]:
    return UPSTREAM_TOP | {f"blocks.{i}.{k}" for i in range(depth) for k in UPSTREAM_BLOCK}


def test_exported_names_are_upstream_names(tiny_model):
    state = export_official(tiny_model)
    assert set(state) == upstream_keys(TINY["depth"])
    assert state["y_embedder.embedding_table.weight"].shape == (TINY["num_classes"] + 1, TINY["hidden_size"])
    assert state["cls_projectors2.weight"].shape == (TINY["hidden_size"], TINY["cls_token_dim"])


def test_key_mapping_is_a_bijection(tiny_model):
    ours = list(tiny_model.state_dict())
    theirs = [to_official_key(k) for k in ours]
    assert len(set(theirs)) == len(ours)
    assert [from_official_key(k) for k in theirs] == ours
    assert to_official_key("cls_norm.weight") == "wg_norm.weight"
    assert from_official_key("cls_projectors2.bias") == "cls_embed.bias"


def test_round_trip_export_import_is_exact(tiny_model):
    model = load_official(export_official(tiny_model), size="S/2", **TINY)
    for (k, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    args = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 10]), torch.randn(2, 16))
    for a, b in zip(tiny_model(*args)[::2], model(*args)[::2]):
        assert torch.equal(a, b)


def test_official_pt_file_uses_the_ema_entry(tiny_model, tmp_path):
    ema = export_official(tiny_model)
    other = export_official(randomize(build_model("S/2", **TINY), seed=7))
    wrapped = {"module." + k: v for k, v in other.items()}  # a DDP-wrapped `model` entry
    path = tmp_path / "0400000.pt"
    torch.save({"model": wrapped, "ema": ema, "opt": {"state": {}}, "steps": 400000,
                "args": argparse.Namespace(model="SiT-S/2", cls=0.03)}, path)
    loaded = load_official(path, size="S/2", **TINY)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, tiny_model.blocks[0].attn.qkv.weight)
    from_model = load_official(path, size="S/2", entry="model", **TINY)
    assert torch.equal(from_model.cls_embed.weight, other["cls_projectors2.weight"])
    with pytest.raises(UserError, match="no 'emma' entry"):
        load_official(path, size="S/2", entry="emma", **TINY)


def test_export_to_file_and_safetensors(tiny_model, tmp_path):
    from safetensors.torch import save_file

    export_official(tiny_model, tmp_path / "out" / "ours.pt")
    back = load_official(tmp_path / "out" / "ours.pt", size="S/2", **TINY)
    assert torch.equal(back.final_layer.linear.weight, tiny_model.final_layer.linear.weight)
    save_file(export_official(tiny_model), str(tmp_path / "w.safetensors"))
    again = load_official(tmp_path / "w.safetensors", size="S/2", **TINY)
    assert torch.equal(again.y_embedder.weight, tiny_model.y_embedder.weight)


def test_wrong_size_names_what_the_checkpoint_holds(tiny_model):
    state = export_official(tiny_model)
    with pytest.raises(UserError, match=r"does not fit size S/2.*depth 3, hidden 32.*expects depth 4, hidden 32"):
        load_official(state, size="S/2", **{**TINY, "depth": 4})
    with pytest.raises(UserError, match="does not fit size B/2"):
        load_official(state, size="B/2")


def test_upstream_s2_with_its_768_wide_final_layer_is_refused():
    with torch.device("meta"):
        ours = build_model("S/2")
    state = {to_official_key(k): v for k, v in ours.state_dict().items()}
    state["final_layer.linear.weight"] = torch.empty(16, 768, device="meta")  # upstream S/2's decoder width
    with pytest.raises(UserError, match="final layer width 768.*expects.*final layer width 384"):
        load_official(state, size="S/2")


def test_size_is_inferred_when_not_given():
    torch.manual_seed(0)
    model = build_model("S/2", depth=12)
    loaded = load_official(export_official(model), size=None)
    assert len(loaded.blocks) == 12 and loaded.hidden_size == 384
    with pytest.raises(UserError, match="matches no published size"):
        load_official(export_official(build_model("S/2", **TINY)), size=None)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_official(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt: not a readable torch checkpoint"):
        load_official(tmp_path / "junk.pt")
