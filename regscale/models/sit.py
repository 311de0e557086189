"""SiT with REG's entangled class token and the REPA projector (REG_SPEC "Model").

Token 0 is the noised DINOv2 class token (Linear -> LayerNorm); tokens 1..256 are the patchified
latent. Every block is DiT adaLN-Zero conditioned on c = t_emb + y_emb. The projector reads the
output of block `encoder_depth` (1-based) over all 257 tokens; two heads return the image
velocity and the class-token velocity. The forward is deterministic (label dropout lives in the
objective), so the model can be compiled, checkpointed per block and sharded from outside.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int, extra_tokens: int = 1) -> torch.Tensor:
    """MAE 2-D sin-cos table [extra_tokens + grid_size**2, dim]; the extra (class) rows are zero.

    The first half of the channels encodes the column index, the second half the row index.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4; got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)
    return torch.cat([torch.zeros(extra_tokens, dim, dtype=torch.float64), table]).float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the raw t in [0, 1] (cos first, then sin) -> MLP(256 -> h -> h)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        half = frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)
        return self.mlp(features)


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero: attention and MLP, each modulated by (shift, scale, gate) from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, fused_attn: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=nn.LayerNorm if qk_norm else None)
        self.attn.fused_attn = fused_attn
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm, then the image head on tokens 1.. and the class head on token 0."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cls_token_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.linear_cls = nn.Linear(hidden_size, cls_token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


def projector_mlp(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """REPA projector: Linear(h -> p) - SiLU - Linear(p -> p) - SiLU - Linear(p -> out)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, out_dim))


class SiT(nn.Module):
    """REG SiT: `model(x_t, t, y, cls_t) -> (v_img, [projector output], v_cls)`.

    x_t [B,C,H,W] noised latents, t [B] in [0, 1] (0 data, 1 noise), y [B] labels with
    `num_classes` as the null class, cls_t [B, cls_token_dim] noised class token.
    Returns v_img [B,C,H,W], one projector output [B, 1 + H*W/p^2, cls_token_dim] per encoder,
    v_cls [B, cls_token_dim].
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        encoder_depth: int = 8,
        num_classes: int = 1000,
        projector_dim: int = 2048,
        cls_token_dim: int = 768,
        z_dims: tuple[int, ...] | None = None,
        qk_norm: bool = False,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}]; got {encoder_depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.encoder_depth, self.num_classes = hidden_size, encoder_depth, num_classes
        self.cls_token_dim = cls_token_dim
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # row num_classes: the null class
        self.cls_embed = nn.Linear(cls_token_dim, hidden_size)
        self.cls_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0))  # frozen
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, fused_attn) for _ in range(depth))
        self.projectors = nn.ModuleList(projector_mlp(hidden_size, projector_dim, z)
                                        for z in (z_dims if z_dims is not None else (cls_token_dim,)))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, cls_token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """REG_SPEC init: xavier Linears (zero bias), N(0, 0.02) label table and t-MLP, zero adaLN and heads."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear, self.final_layer.linear_cls]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        p, c, g = self.patch_size, self.in_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                cls_t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        cls = self.cls_norm(self.cls_embed(cls_t)).unsqueeze(1)
        h = torch.cat([cls, self.x_embedder(x)], dim=1) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i == self.encoder_depth:
                zs = [projector(h) for projector in self.projectors]
        v_img, v_cls = self.final_layer(h, c)
        return self.unpatchify(v_img), zs, v_cls
