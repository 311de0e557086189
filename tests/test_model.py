"""The REG SiT: shapes, parameter counts, init, determinism, options (REG_SPEC "Model")."""

import math

import pytest
import torch

from regscale.config import MODEL_SIZES, ConfigError, load_config
from regscale.models import SiT, build_model, build_model_from_config
from regscale.models.sit import sincos_pos_embed_2d
from tests.fixtures.models import TINY, randomize

pytestmark = pytest.mark.usefixtures("one_thread")


def meta_model(size: str, **options) -> SiT:
    with torch.device("meta"):
        return build_model(size, **options)


def inputs(model: SiT, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = model.input_size
    x = torch.randn(batch, model.in_channels, side, side, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    cls = torch.randn(batch, model.cls_token_dim, generator=g)
    return x, t, y, cls


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_shapes_every_size(size):
    # the full published forward, on the meta device: shapes without the FLOPs
    model = meta_model(size)
    x, t, y, cls = (a.to("meta") for a in inputs(model))
    v, zs, v_cls = model(x, t, y, cls)
    assert v.shape == (2, 4, 32, 32)
    assert len(zs) == 1 and zs[0].shape == (2, 257, 768)
    assert v_cls.shape == (2, 768)
    assert len(model.blocks) == MODEL_SIZES[size]["depth"]
    assert model.num_classes == 1000 and model.y_embedder.num_embeddings == 1001


@pytest.mark.parametrize("size,millions", [("B/2", 131.7), ("L/2", 459.7), ("XL/2", 676.9)])
def test_parameter_counts_without_projector(size, millions):
    # upstream counts its frozen position table (an nn.Parameter there, a buffer here)
    state = meta_model(size).state_dict()
    count = sum(v.numel() for k, v in state.items() if not k.startswith("projectors."))
    assert round(count / 1e6, 1) == millions


def test_s2_final_layer_has_its_own_width():
    model = meta_model("S/2")
    assert model.final_layer.linear.in_features == 384
    assert model.final_layer.adaLN_modulation[-1].weight.shape == (768, 384)
    assert model.final_layer.linear_cls.weight.shape == (768, 384)
    count = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("projectors."))
    assert 33e6 < count < 34e6


def test_projector_reads_block_encoder_depth_over_all_tokens():
    model = meta_model("XL/2")
    assert model.encoder_depth == 8
    mlp = model.projectors[0]
    assert [type(m).__name__ for m in mlp] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features, mlp[4].out_features) == (1152, 2048, 2048, 768)
    assert meta_model("B/2").encoder_depth == 4


def test_zero_init_heads_give_zero_output():
    model = build_model("S/2", **TINY)
    v, zs, v_cls = model(*inputs(model))
    assert torch.count_nonzero(v) == 0 and torch.count_nonzero(v_cls) == 0
    assert torch.count_nonzero(zs[0]) > 0  # the projector is not zero-initialised


def test_init_scheme():
    torch.manual_seed(0)
    model = build_model("S/2", depth=2, encoder_depth=2)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0
        assert torch.count_nonzero(block.attn.qkv.bias) == 0
        bound = math.sqrt(6 / sum(block.attn.qkv.weight.shape))  # xavier uniform
        assert block.attn.qkv.weight.abs().max() <= bound and block.attn.qkv.weight.abs().max() > 0.9 * bound
    assert abs(model.y_embedder.weight.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    fan = model.x_embedder.proj.weight[0].numel() + model.x_embedder.proj.weight.shape[0]
    assert model.x_embedder.proj.weight.abs().max() <= math.sqrt(6 / fan)
    assert torch.count_nonzero(model.cls_embed.bias) == 0 and torch.all(model.cls_norm.weight == 1)


def test_position_embedding_row_zero_and_formula():
    model = build_model("S/2", **TINY)
    pe = model.pos_embed[0]
    grid = TINY["input_size"] // 2
    assert pe.shape == (1 + grid * grid, 32) and not model.pos_embed.requires_grad
    assert torch.count_nonzero(pe[0]) == 0
    # token 1 + r*grid + c: channel 0 = sin(c * 1), channel dim/4 = cos(c), channel dim/2 = sin(r)
    r, c = 2, 3
    row = pe[1 + r * grid + c]
    assert row[0].item() == pytest.approx(math.sin(c), abs=1e-6)
    assert row[8].item() == pytest.approx(math.cos(c), abs=1e-6)
    assert row[16].item() == pytest.approx(math.sin(r), abs=1e-6)
    assert row[24].item() == pytest.approx(math.cos(r), abs=1e-6)
    assert torch.equal(sincos_pos_embed_2d(32, grid), pe)


def test_forward_is_deterministic_and_mode_independent(tiny_model):
    args = inputs(tiny_model, batch=3)
    a = tiny_model(*args)
    tiny_model.train()
    b = tiny_model(*args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) and torch.equal(a[2], b[2])
    assert a[0].abs().max() > 0 and a[2].abs().max() > 0


def test_null_class_is_a_label_row(tiny_model):
    x, t, _, cls = inputs(tiny_model)
    y_null = torch.full((2,), tiny_model.num_classes)
    v_null = tiny_model(x, t, y_null, cls)[0]
    v_zero = tiny_model(x, t, torch.zeros(2, dtype=torch.long), cls)[0]
    assert not torch.allclose(v_null, v_zero)


def test_projector_output_does_not_depend_on_later_blocks(tiny_model):
    args = inputs(tiny_model)
    zs = tiny_model(*args)[1][0]
    with torch.no_grad():
        for p in tiny_model.blocks[TINY["encoder_depth"]].parameters():
            p.add_(1.0)
    zs2, v2 = tiny_model(*args)[1][0], tiny_model(*args)[0]
    assert torch.equal(zs, zs2)
    assert not torch.equal(v2, tiny_model.unpatchify(torch.zeros(2, 16, 16)))


def test_class_token_shares_t_and_influences_image(tiny_model):
    x, t, y, cls = inputs(tiny_model)
    v1 = tiny_model(x, t, y, cls)[0]
    v2 = tiny_model(x, t, y, cls + 1.0)[0]
    assert not torch.allclose(v1, v2)  # token 0 attends with the patches


def test_fused_and_manual_attention_agree():
    fused = randomize(build_model("S/2", **TINY, fused_attn=True))
    manual = build_model("S/2", **TINY, fused_attn=False)
    manual.load_state_dict(fused.state_dict())
    args = inputs(fused)
    for a, b in zip(fused(*args)[::2], manual(*args)[::2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qk_norm_option():
    model = randomize(build_model("S/2", **TINY, qk_norm=True))
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    v, zs, v_cls = model(*inputs(model))
    assert torch.isfinite(v).all() and v_cls.shape == (2, 16)


def test_block_and_model_compile_without_graph_breaks(tiny_model):
    import torch._dynamo

    torch._dynamo.reset()
    args = inputs(tiny_model)
    block = tiny_model.blocks[0]
    h = torch.randn(2, 17, 32)
    c = torch.randn(2, 32)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, c), block(h, c))
    whole = torch.compile(tiny_model, backend="eager", fullgraph=True)
    torch.testing.assert_close(whole(*args)[0], tiny_model(*args)[0])


def test_backward_reaches_every_trainable_parameter(tiny_model):
    v, zs, v_cls = tiny_model(*inputs(tiny_model))
    (v.square().mean() + zs[0].square().mean() + v_cls.square().mean()).backward()
    missing = [n for n, p in tiny_model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_build_from_smoke_config(recipes):
    cfg = load_config(recipes / "smoke.yaml")
    model = build_model_from_config(cfg.model)
    assert (len(model.blocks), model.hidden_size, model.encoder_depth) == (4, 64, 2)
    assert model.num_classes == 10 and model.cls_token_dim == 64
    assert model.final_layer.linear.in_features == 64 and model.projectors[0][0].out_features == 128


def test_bad_options_fail_with_the_key():
    with pytest.raises(ConfigError, match="unknown option.*dept"):
        build_model("S/2", dept=3)
    with pytest.raises(ConfigError, match="model.size"):
        build_model("M/2")
    with pytest.raises(ConfigError, match="model.num_heads"):
        build_model("S/2", num_heads=5)
    with pytest.raises(ConfigError, match="model.encoder_depth"):
        build_model("S/2", depth=2, encoder_depth=3)
