"""The frozen encoders: DINOv2 (timm) with REG preprocessing, the SD-VAE (diffusers), missing weights."""

import pytest
import torch
import torch.nn.functional as F

from regscale.config import EncoderConfig
from regscale.errors import UserError
from regscale.models.encoders import (
    DinoEncoder,
    MissingWeightsError,
    decode_latents,
    encode_moments,
    load_dinov2,
    load_vae,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def images(b: int = 2, side: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def random_vae():
    return load_vae("unused", random_init=True)


def test_random_vae_shapes_and_dtypes(random_vae):
    mean, std = encode_moments(random_vae, images())
    assert mean.shape == std.shape == (2, 4, 32, 32)
    assert mean.dtype == std.dtype == torch.float32 and (std > 0).all()
    out = decode_latents(random_vae, mean * 0.18215)
    assert out.shape == (2, 3, 256, 256) and out.dtype == torch.uint8
    assert not random_vae.training and not any(p.requires_grad for p in random_vae.parameters())


def test_random_vae_same_seed_same_weights(random_vae):
    again = load_vae("unused", random_init=True)
    other = load_vae("unused", random_init=True, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(random_vae.parameters(), again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(random_vae.parameters(), other.parameters()))


def test_vae_moments_and_decoding_follow_the_conventions(random_vae):
    imgs = images(1)
    x = imgs.float() / 127.5 - 1
    dist = random_vae.encode(x).latent_dist
    mean, std = encode_moments(random_vae, imgs)
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.std)
    z = torch.randn(1, 4, 32, 32)
    decoded = random_vae.decode(z / 0.18215).sample
    expected = torch.clamp(255 * (decoded + 1) / 2, 0, 255).to(torch.uint8)
    assert torch.equal(decode_latents(random_vae, z), expected)


def test_vae_saved_folder_loads_offline(random_vae, tmp_path):
    random_vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    assert all(torch.equal(a, b) for a, b in zip(random_vae.parameters(), loaded.parameters()))


def test_missing_vae_names_the_file_and_the_fetch_command(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"empty/config.json.*regscale fetch-weights"):
        load_vae(str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError, match=r"regscale-tests/no-such-vae in the Hugging Face cache.*fetch-weights"):
        load_vae("regscale-tests/no-such-vae")
    assert issubclass(MissingWeightsError, UserError)


def test_random_dinov2_tokens():
    enc = load_dinov2(EncoderConfig(random_init=True, random_depth=2), embed_dim=64)
    assert isinstance(enc, DinoEncoder) and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    tokens = enc(images())
    assert tokens.shape == (2, 257, 64) and tokens.dtype == torch.float32
    # the final LayerNorm (weight 1, bias 0 at init) normalises every token, class token included
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 257), atol=1e-4, rtol=0)
    enc.train()
    assert not enc.training
    again = load_dinov2(EncoderConfig(random_init=True, random_depth=2), embed_dim=64)
    assert torch.equal(again(images()), tokens)


def test_dinov2_preprocessing_normalises_then_resizes():
    enc = load_dinov2(EncoderConfig(random_init=True, random_depth=1), embed_dim=64)
    imgs = images(1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = F.interpolate((imgs / 255.0 - mean) / std, size=(224, 224), mode="bicubic")
    torch.testing.assert_close(enc.preprocess(imgs), expected)
    with pytest.raises(ValueError, match="uint8"):
        enc(imgs.float())


def test_dinov2_from_a_local_checkpoint_resamples_the_position_table(tmp_path):
    # a published-layout checkpoint (518 px, 37x37 position table) of a small DINOv2 of the same family
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=2)
    assert src.pos_embed.shape == (1, 1 + 37 * 37, 384)
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    cfg = EncoderConfig(name="vit_small_patch14_dinov2", weights=str(tmp_path))
    with pytest.raises(UserError, match="not a vit_small_patch14_dinov2 checkpoint"):
        load_dinov2(cfg, embed_dim=384)  # depth 12 expected, the file has 2 blocks
    src12 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    save_file(src12.state_dict(), str(tmp_path / "model.safetensors"))
    enc = load_dinov2(cfg, embed_dim=384)
    torch.testing.assert_close(enc.vit.pos_embed, resample_abs_pos_embed(src12.pos_embed, [16, 16]))
    assert torch.equal(enc.vit.blocks[3].attn.qkv.weight, src12.blocks[3].attn.qkv.weight)
    assert enc(images(1)).shape == (1, 257, 384)
    with pytest.raises(UserError, match="width 384 but model.cls_token_dim is 768"):
        load_dinov2(cfg, embed_dim=768)


def test_missing_dinov2_names_the_file_and_the_fetch_command(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"nope \(encoder.weights: a weights file.*fetch-weights"):
        load_dinov2(EncoderConfig(weights=str(tmp_path / "nope")))


def test_fetch_weights_dry_run_lists_the_files(capsys):
    from regscale.cli import main

    assert main(["fetch-weights", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("timm/vit_base_patch14_dinov2.lvd142m/model.safetensors",
                 "stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
                 "stabilityai/sd-vae-ft-ema/config.json"):
        assert name in out


def test_fetch_weights_fails_clearly_without_network():
    from regscale.models.commands import _check_online

    with pytest.raises(UserError, match="cannot reach regscale-tests.invalid.*machine with internet"):
        _check_online("https://regscale-tests.invalid", timeout=2)
