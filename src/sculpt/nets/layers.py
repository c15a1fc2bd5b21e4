"""Building blocks shared by the networks: noise embedding, residual and attention blocks.

Nothing here knows about diffusion: the noise level arrives as a float per sample
(`c_noise`), already mapped by the denoiser to whatever scale it prefers.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionBlock",
    "attention",
    "Downsample",
    "Dropout",
    "batch_share",
    "NoiseEmbedding",
    "ResBlock",
    "Upsample",
    "count_parameters",
    "group_norm",
    "timestep_embedding",
    "zero_",
]


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in `module` (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it.

    Used on the last layer of each residual branch so that a fresh block is the
    identity and a fresh network outputs exactly zero (Ho et al. 2020; Dhariwal &
    Nichol 2021): training starts from a well-conditioned, shallow function.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`.

    Clipping (rather than failing) lets narrow test networks and odd widths such as
    192 * 3 reuse a preset's `norm_groups=32` unchanged.
    """
    groups = max(1, min(groups, channels))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017; Ho et al. 2020).

    Frequencies run geometrically from 1 down to 1/max_period, so the same embedding
    separates c_noise = 1000 t (VP schedules) and c_noise = ln(sigma)/4 (EDM): the fast
    channels resolve small values, the slow ones large values. Layout is [cos | sin]
    (ADM / diffusers' `flip_sin_to_cos=True`); an odd `dim` gets one zero channel.

    Args:
        c_noise: any shape `(...)`; cast to float32 because float16 loses the phase of
            large arguments (1000 * freq).
        dim: embedding width.
        max_period: the slowest period.

    Returns:
        float32 tensor of shape `(..., dim)`.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=c_noise.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = c_noise.float()[..., None] * freqs  # (..., half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., 2*half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


#: (rank, world size) of the data-parallel process running the network; see `batch_share`.
_SHARE: contextvars.ContextVar[tuple[int, int]] = contextvars.ContextVar("sculpt_batch_share", default=(0, 1))


@contextlib.contextmanager
def batch_share(rank: int, world_size: int) -> Iterator[None]:
    """Within this context the network's batch is rows ``rank * B : (rank + 1) * B`` of a global batch
    of ``world_size * B``: `Dropout` draws the global batch's masks and keeps this process's rows.

    With every process seeding torch's generator alike, N processes of batch B then drop exactly
    the units one process of batch N * B drops (the training loop sets it).
    """
    token = _SHARE.set((rank, world_size))
    try:
        yield
    finally:
        _SHARE.reset(token)


class Dropout(nn.Dropout):
    """Dropout whose masks depend on the global batch, not on how it is split over processes.

    The mask is drawn for the whole global batch (`batch_share`; one process: its own batch)
    from torch's default generator, and this process keeps its rows: N processes of batch B
    draw what one process of batch N * B draws, so data-parallel training takes the same steps
    with dropout on. Inverted dropout: kept units are scaled by 1 / (1 - p), as `nn.Dropout`.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        rank, size = _SHARE.get()
        rows = x.shape[0]
        keep = torch.empty((rows * size, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep[rank * rows : (rank + 1) * rows].div_(1 - self.p)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise followed by Linear-SiLU-Linear (Ho et al. 2020)."""

    def __init__(self, freq_dim: int, emb_dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        features = timestep_embedding(c_noise, self.freq_dim, self.max_period)  # (B, F)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, E)


class ResBlock(nn.Module):
    """Residual block with noise conditioning (Ho et al. 2020; Dhariwal & Nichol 2021).

    GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> condition -> SiLU -> dropout -> conv3x3,
    plus a 1x1 skip conv when the width changes. With `scale_shift=True` the embedding
    modulates the second norm, h = norm(h) * (1 + scale) + shift (ADM's
    "scale-shift norm"); with `scale_shift=False` it is added before that norm, as in
    DDPM. The last conv is zero-initialised so a fresh block is the identity.

    `forward` takes the embedding *after* its SiLU: the UNet applies it once for all
    blocks instead of once per block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
        scale_shift: bool = True,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_channels, norm_groups)
        # nn.Identity when dropout is off: nn.Dropout(0) still costs a pass in training.
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Co, H, W)
        cond = self.emb_proj(emb)[:, :, None, None]  # (B, Co or 2Co, 1, 1)
        if self.scale_shift:
            scale, shift = cond.chunk(2, dim=1)  # (B, Co, 1, 1) each
            # One fused pass instead of a multiply then an add.
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # (B, Co, H, W)
        else:
            h = self.norm2(h + cond)  # (B, Co, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, Co, H, W)
        # In place on the fresh conv output (conv backward does not need its output).
        return h.add_(self.skip(x))  # (B, Co, H, W)


#: Longest sequence that trains through explicit matmuls in bfloat16 on the CPU (see `attention`).
CPU_BF16_MATMUL_ATTENTION_MAX_TOKENS = 256


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017).

    `F.scaled_dot_product_attention` (fused, never materialises the L x L weights), except
    when training in bfloat16 on the CPU with at most `CPU_BF16_MATMUL_ATTENTION_MAX_TOKENS`
    tokens: there PyTorch's flash kernel is slow to differentiate, and two bf16 matmuls
    around a softmax train 2.5-5x faster (benchmarks/README.md). The two differ by bf16
    round-off (the scores are rounded to bf16 before the softmax).

    Args: q, k, v of shape (..., L, d). Returns (..., L, d).
    """
    if (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.requires_grad
        and q.shape[-2] <= CPU_BF16_MATMUL_ATTENTION_MAX_TOKENS
    ):
        weights = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).softmax(dim=-1)  # (..., L, L)
        return torch.matmul(weights, v)  # (..., L, d)
    return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (Ho et al. 2020; Vaswani et al. 2017).

    GroupNorm -> fused qkv projection -> `attention` (SDPA on the whole) -> output
    projection (zero-initialised, so a fresh block is the identity) -> residual add.
    It works on a (B, H*W, C) view of the feature map, which is free for channels_last
    tensors and lets SDPA read q, k, v without a transpose copy.
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(
                f"attention width {channels} is not divisible by num_heads={num_heads}; "
                "choose num_heads (or head_dim) that divides every attention width"
            )
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        heads = self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L=H*W, C)
        qkv = self.qkv(tokens)  # (B, L, 3C)
        qkv = qkv.view(batch, -1, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, L, C/heads) each
        h = attention(q, k, v)  # (B, heads, L, C/heads)
        h = h.transpose(1, 2).reshape(batch, -1, channels)  # (B, L, C)
        h = self.proj(h)  # (B, L, C)
        h = h.transpose(1, 2).view(batch, channels, height, width)  # (B, C, H, W)
        return x + h  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv3x3 (Ho et al. 2020)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


def _nearest_phases(weight: Tensor, dim: int) -> Tensor:
    """Along `dim`, the 3 taps (w0, w1, w2) of a conv after nearest x2 upsampling -> 4 taps of a stride-2
    transposed conv: an even output row sees input rows (i-1, i) with taps (w0, w1 + w2), an odd one rows
    (i, i+1) with (w0 + w1, w2); conv_transpose2d(stride=2, padding=1) reads them as (w2, w1+w2, w0+w1, w0).
    """
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then conv3x3 (Ho et al. 2020), no checkerboard.

    Computed as the identical function it is, a stride-2 transposed conv whose 4x4 kernel is
    summed from the 3x3 one (`_nearest_phases`): 16 instead of 36 multiply-adds per output
    pixel and no upsampled copy of the input, about 2x faster forward and backward. The
    parameter is still the conv3x3's, so checkpoints and initialisation are unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        kernel = _nearest_phases(_nearest_phases(self.conv.weight, 2), 3)  # (C_out, C_in, 4, 4)
        # conv_transpose2d wants (C_in, C_out, kH, kW).
        return F.conv_transpose2d(x, kernel.transpose(0, 1), self.conv.bias, stride=2, padding=1)  # (B, C, 2H, 2W)
