"""EDM2-style magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", config G, fig. 21), as a flow-map backbone.

The network output is read as a velocity / average velocity F(x, t, s) (docs/design.md section 2);
there is no EDM preconditioning. Conditioning is `ConditionEmbedding` in MP mode. Weights are
normalized functionally in forward (JVP-safe); call `force_normalize_()` after each optimizer
step to apply the paper's forced weight normalization (eq. 6).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .embeddings import ConditionEmbedding, batch_vector
from .mp import MPConv, force_normalize_, mp_cat, mp_silu, mp_sum, normalize


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """'keep', 'down' (2x2 average pooling) or 'up' (2x nearest-neighbour upsampling)."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class UNetBlock(nn.Module):
    """Residual block (EDM2 fig. 21): resample, [1x1 skip conv], pixel norm (encoder), two 3x3
    MP convs with the second modulated by c, MP residual sum, optional cosine self-attention."""

    def __init__(
        self,
        in_channels: int,  # Input channels.
        out_channels: int,  # Output channels.
        emb_dim: int,  # Width of the conditioning vector c.
        flavor: str = "enc",  # 'enc' (pixel norm, skip conv first) or 'dec' (skip conv on the residual).
        resample_mode: str = "keep",  # 'keep', 'down' or 'up'.
        attention: bool = False,  # Add a self-attention layer after the residual branch.
        channels_per_head: int = 64,  # Attention head width.
        dropout: float = 0.0,  # Dropout probability inside the residual branch.
        res_balance: float = 0.3,  # mp_sum weight of the residual branch.
        attn_balance: float = 0.3,  # mp_sum weight of the attention branch.
        clip_act: float | None = 256.0,  # Clamp activations to [-clip_act, clip_act]; None = off.
    ):
        super().__init__()
        self.flavor, self.resample_mode = flavor, resample_mode
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.out_channels = out_channels
        self.emb_gain = nn.Parameter(torch.zeros([1]))  # 1-D: FSDP2 shards no scalars
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_dim, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.dropout = nn.Dropout(dropout)
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        if self.num_heads:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1))
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(c, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(self.dropout(y))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            b, ch, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, 3, self.num_heads, ch // self.num_heads, h * w)
            q, k, v = normalize(qkv, dim=3).transpose(3, 4).unbind(1)  # (B, heads, HW, d), cosine attn
            y = attention(q, k, v).transpose(2, 3).reshape(b, ch, h, w)
            x = mp_sum(x, self.attn_proj(y), self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """Magnitude-preserving U-Net F(x, t, s, class, guidance) -> same shape as x.

    Defaults are the CPU digits model (1x8x8); `presets.py` holds EDM2-XS/S/M-like sizes.

    Args:
        img_channels: Channels of x (and of the output).
        img_resolution: Height = width of x, in pixels; halved once per level after the first.
        model_channels: Base channel count (EDM2's "channels").
        channel_mult: Channel multiplier of each resolution level, full resolution first.
        num_blocks: Residual blocks per resolution level on the encoder side (the decoder has one
            more).
        attn_resolutions: Resolutions (in pixels) whose blocks have self-attention; the first
            block of the lowest resolution's decoder always has it.
        num_classes: Number of classes (label num_classes is the learned null token of
            classifier-free guidance); 0: unconditional.
        emb_dim: Width of the conditioning vector c; None: model_channels * max(channel_mult).
        fourier_channels: Width of the Fourier features; None: model_channels.
        channels_per_head: Channels per attention head.
        dropout: Dropout probability in the residual blocks.
        time_min_freq: Lowest angular frequency of the t and t - s embeddings, per unit t.
        time_max_freq: Highest angular frequency of the t and t - s embeddings; keep it low: the
            JVP differentiates through it (docs/design.md section 3, Stability).
        res_balance: mp_sum weight of the residual branches.
        attn_balance: mp_sum weight of the attention branches.
        concat_balance: mp_cat weight of the encoder skip connections.
        clip_act: Clamp of the activations to [-clip_act, clip_act] after each block; None: off.
    """

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 8,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_blocks: int = 1,
        attn_resolutions: Sequence[int] = (4,),
        num_classes: int = 0,
        emb_dim: int | None = None,
        fourier_channels: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        time_min_freq: float = 0.5,
        time_max_freq: float = 16.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        concat_balance: float = 0.5,
        clip_act: float | None = 256.0,
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        emb_dim = emb_dim or max(cblock)
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.concat_balance = concat_balance
        self.emb = ConditionEmbedding(
            emb_dim, num_classes, fourier_channels or model_channels,
            time_min_freq=time_min_freq, time_max_freq=time_max_freq, magnitude_preserving=True,
        )  # fmt: skip
        kw = dict(
            emb_dim=emb_dim, channels_per_head=channels_per_head, dropout=dropout,
            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act,
        )  # fmt: skip

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # + a constant-one channel, as in EDM2
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, flavor="enc", resample_mode="down", **kw)
            for i in range(num_blocks):
                cin, cout = cout, channels
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, flavor="enc", attention=attn, **kw)

        self.dec = nn.ModuleDict()
        skips = [getattr(block, "out_channels", None) for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, flavor="dec", attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, flavor="dec", **kw)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, flavor="dec", resample_mode="up", **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, flavor="dec", attention=attn, **kw)
        self.out_conv = MPConv(cout, img_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros([1]))  # 1-D: FSDP2 shards no scalars

    def forward(self, x, t, s=None, class_labels=None, guidance=None) -> torch.Tensor:
        """F(x, t, s): x (B, C, H, W); t, s, guidance (B,) or scalars; class_labels (B,) long."""
        t, s = batch_vector(t, x), batch_vector(s, x)
        labels, guidance = batch_vector(class_labels, x), batch_vector(guidance, x)
        c = mp_silu(self.emb(t, s, labels, guidance))
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            h = block(h) if name.endswith("_conv") else block(h, c)  # by name: blocks may be wrapped (checkpointing)
            skips.append(h)
        for name, block in self.dec.items():
            if "block" in name:
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
            h = block(h, c)
        return self.out_conv(h, gain=self.out_gain)

    def zero_init_s_embedding(self) -> None:
        """Zero the s and guidance branches (student initialized from a teacher: F(x,t,s) = v(x,t))."""
        self.emb.zero_init_s_embedding()

    def force_normalize_(self) -> None:
        """Forced weight normalization of every MP layer (EDM2 eq. 6); call after optimizer steps."""
        force_normalize_(self)
