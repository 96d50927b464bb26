"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers")
as a flow-map backbone: patchify, 2D sin-cos positions, adaLN-Zero blocks, adaLN final layer.

The output is read as a velocity / average velocity F(x, t, s) (docs/design.md section 2).
Conditioning is `ConditionEmbedding` (plain mode); attention goes through `attention()`.
"""

import torch
from einops import rearrange
from torch import nn

from .attention import attention
from .embeddings import ConditionEmbedding, batch_vector
from .mp import force_normalize_
from .tangent_ops import Conv2d, Linear


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table (height * width, dim): half the channels encode the row,
    half the column, each as [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"hidden size must be divisible by 4 for 2D sin-cos positions, got {dim}")
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        arg = pos[:, None] * omega[None, :]
        parts += [arg.sin(), arg.cos()]
    return torch.cat(parts, dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens."""
    return x * torch.ops.aten.add.Scalar(scale, 1)[:, None] + shift[:, None]  # add.Scalar: 1 + scale, lean tangent


class SelfAttention(nn.Module):
    """Multi-head self-attention on (B, N, D) tokens through the package's `attention()` helper."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        y = attention(qkv[0], qkv[1], qkv[2])
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: x += gate * f(modulate(LN(x))) for f = attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), Linear(hidden, dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.modulation = Linear(dim, 6 * dim)  # from silu(c); zero-initialized (adaLN-Zero)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.dropout(self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear projection of each token to a patch_size^2 * C patch."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Linear(dim, 2 * dim)
        self.linear = Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer F(x, t, s, class, guidance) -> same shape as x.

    Defaults are the CPU digits model (1x8x8); `presets.py` holds DiT-S/B/L/XL-2 sizes.

    Args:
        img_channels: Channels of x (and of the output).
        img_resolution: Height = width of x, in pixels; a multiple of patch_size.
        patch_size: Patch side in pixels; tokens = (img_resolution / patch_size)^2.
        hidden_size: Token width D.
        depth: Number of transformer blocks.
        num_heads: Attention heads (D / num_heads channels per head).
        mlp_ratio: Hidden width of the blocks' MLP, as a multiple of D.
        num_classes: Number of classes (label num_classes is the learned null token of
            classifier-free guidance); 0: unconditional.
        dropout: Dropout probability on the attention output and the MLP hidden layer.
        learn_pos_embed: Learn the position table (initialized to the 2D sin-cos table); false:
            the fixed sin-cos table.
        fourier_channels: Width of the Fourier time features.
        time_min_freq: Lowest angular frequency of the t and t - s embeddings, per unit t.
        time_max_freq: Highest angular frequency of the t and t - s embeddings; keep it low: the
            JVP differentiates through it (docs/design.md section 3, Stability).
    """

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 8,
        patch_size: int = 2,
        hidden_size: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        learn_pos_embed: bool = False,
        fourier_channels: int = 256,
        time_min_freq: float = 0.5,
        time_max_freq: float = 16.0,
    ):
        super().__init__()
        if img_resolution % patch_size:
            raise ValueError(f"img_resolution {img_resolution} not divisible by patch_size {patch_size}")
        self.img_channels, self.img_resolution, self.patch_size = img_channels, img_resolution, patch_size
        grid = img_resolution // patch_size
        self.patch_embed = Conv2d(img_channels, hidden_size, patch_size, stride=patch_size)
        pos = sincos_pos_embed_2d(hidden_size, grid, grid)[None]
        if learn_pos_embed:
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)
        self.emb = ConditionEmbedding(
            hidden_size, num_classes, fourier_channels, time_min_freq=time_min_freq, time_max_freq=time_max_freq
        )
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, img_channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT initialization: xavier-uniform linears and patch conv, N(0, 0.02) time MLP,
        zero adaLN modulations and output projection (the network starts at F = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for branch in (self.emb.mlp_t, self.emb.mlp_s, self.emb.mlp_g):
            for lin in (branch.fc0, branch.fc1):
                nn.init.normal_(lin.weight, std=0.02)
        self.emb.zero_init_s_embedding()
        for m in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, s=None, class_labels=None, guidance=None) -> torch.Tensor:
        """F(x, t, s): x (B, C, H, W); t, s, guidance (B,) or scalars; class_labels (B,) long."""
        t, s = batch_vector(t, x), batch_vector(s, x)
        labels, guidance = batch_vector(class_labels, x), batch_vector(guidance, x)
        c = nn.functional.silu(self.emb(t, s, labels, guidance))  # float32 (float64 after .double())
        c = c.to(self.patch_embed.weight.dtype)  # only changes c for low-precision weights (bf16-true)
        h = rearrange(self.patch_embed(x), "b d gh gw -> b (gh gw) d")
        h = h + self.pos_embed.to(h.dtype)
        for block in self.blocks:
            h = block(h, c)
        h = self.final(h, c)
        p, grid = self.patch_size, x.shape[-1] // self.patch_size
        return rearrange(h, "b (gh gw) (p q ch) -> b ch (gh p) (gw q)", gw=grid, p=p, q=p)

    def zero_init_s_embedding(self) -> None:
        """Zero the s and guidance branches (student initialized from a teacher: F(x,t,s) = v(x,t))."""
        self.emb.zero_init_s_embedding()

    def force_normalize_(self) -> None:
        """No-op unless MP layers are present; here so one callback can serve every backbone."""
        force_normalize_(self)

    @property
    def num_patches(self) -> int:
        return (self.img_resolution // self.patch_size) ** 2

