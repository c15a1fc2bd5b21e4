"""The DDPM / ADM U-Net (Ho et al. 2020; Dhariwal & Nichol 2021).

`net(x, c_noise, class_labels=None) -> tensor` of the same height and width as `x`.
The network knows nothing about diffusion: `c_noise` is a float per sample (1000 t for
VP schedules, ln(sigma)/4 for EDM, ...) and the output is whatever the denoiser trains
it to be.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    AttentionBlock,
    Downsample,
    NoiseEmbedding,
    ResBlock,
    Upsample,
    group_norm,
    zero_,
)

__all__ = ["UNET_NETS", "UNet"]


class _ResAttn(nn.Module):
    """A residual block, followed by self-attention at the resolutions that ask for it."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class UNet(nn.Module):
    """U-Net denoiser backbone (Ho et al. 2020), ADM scale-shift conditioning
    (Dhariwal & Nichol 2021).

    Layout: conv3x3 in; per level `num_res_blocks` residual blocks (+ attention at
    `attn_resolutions`) and a stride-2 downsample except at the last level; a middle
    block (res, attention, res); the mirror image on the way up with
    `num_res_blocks + 1` blocks per level, each taking the matching down-path
    activation concatenated on channels, and a nearest+conv upsample; finally
    GroupNorm -> SiLU -> conv3x3. Every residual branch and the output conv are
    zero-initialised, so a fresh network outputs exactly zero.

    Args:
        in_channels: channels of `x`.
        out_channels: channels of the output; defaults to `in_channels`.
        resolution: the image size the network is built for; it decides which levels
            carry attention. Any H, W divisible by 2**(len(channel_mult) - 1) runs.
        base_channels: width of the first level; the noise embedding is 4x this.
        channel_mult: width of each level as a multiple of `base_channels`.
        num_res_blocks: residual blocks per level on the way down (one more going up).
        attn_resolutions: feature-map sizes (of `resolution`) that get self-attention.
            The middle block always has it.
        num_heads: attention heads, used when `head_dim` is None.
        head_dim: channels per head; if set, the head count is width // head_dim.
        dropout: dropout in the residual blocks (DDPM CIFAR-10 uses 0.1).
        num_classes: > 0 adds a class embedding with `num_classes + 1` rows, the last
            one being the null class (label `num_classes`, or `class_labels=None`)
            that classifier-free guidance uses.
        norm_groups: GroupNorm groups, clipped to a divisor of each width.
        scale_shift: ADM's scale-shift norm (True) or DDPM's additive embedding (False).
        cpu_channels_last: run float32 CPU passes in the channels_last layout (the input is
            converted once; the output comes back in the input's layout). oneDNN's
            convolutions are faster there: a training step of a 7M-parameter UNet at 32x32
            takes 4.0 s instead of 4.5 s, sampling 1.2x faster (benchmarks/README.md). Not
            under autocast, where PyTorch's bf16 GroupNorm is slower in channels_last.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        resolution: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        head_dim: int | None = None,
        dropout: float = 0.0,
        num_classes: int = 0,
        norm_groups: int = 32,
        scale_shift: bool = True,
        cpu_channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.cpu_channels_last = cpu_channels_last
        num_levels = len(channel_mult)
        if num_levels < 1:
            raise ValueError("channel_mult must have at least one level, e.g. (1, 2, 2)")
        self.downscale = 2 ** (num_levels - 1)
        if resolution % self.downscale:
            raise ValueError(
                f"resolution {resolution} is not divisible by 2**(len(channel_mult) - 1) = "
                f"{self.downscale} (channel_mult={tuple(channel_mult)}); pick a resolution "
                f"that is a multiple of {self.downscale} or use fewer levels in channel_mult"
            )
        level_resolutions = [resolution // 2**level for level in range(num_levels)]
        missing = sorted(set(attn_resolutions) - set(level_resolutions))
        if missing:
            raise ValueError(
                f"attn_resolutions {missing} are not feature-map sizes of this network "
                f"(resolution={resolution}, channel_mult={tuple(channel_mult)} gives "
                f"{level_resolutions}); choose attn_resolutions among those, or () for "
                "attention in the middle block only"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.resolution = resolution
        self.num_classes = num_classes

        emb_dim = 4 * base_channels

        def heads(width: int) -> int:
            if head_dim is None:
                return num_heads
            if width % head_dim:
                raise ValueError(
                    f"attention width {width} is not divisible by head_dim={head_dim}; "
                    "choose a head_dim that divides every attention width"
                )
            return width // head_dim

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, norm_groups, scale_shift)

        def res_attn(cin: int, cout: int, with_attn: bool) -> _ResAttn:
            attn = AttentionBlock(cout, heads(cout), norm_groups) if with_attn else None
            return _ResAttn(res_block(cin, cout), attn)

        self.noise_embedding = NoiseEmbedding(base_channels, emb_dim)
        # Row `num_classes` is the null class: unconditional samples for guidance.
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path; `skip_widths` records the width of every activation pushed to the
        # skip stack, which the up path pops in reverse.
        width = base_channels
        skip_widths = [width]
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            with_attn = level_resolutions[level] in attn_resolutions
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res_attn(width, base_channels * mult, with_attn))
                width = base_channels * mult
                skip_widths.append(width)
            self.down_levels.append(blocks)
            if level < num_levels - 1:
                self.downsamples.append(Downsample(width))
                skip_widths.append(width)

        self.mid_res1 = res_block(width, width)
        self.mid_attn = AttentionBlock(width, heads(width), norm_groups)
        self.mid_res2 = res_block(width, width)

        # Up path, stored deepest level first (the order `forward` visits it).
        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(num_levels)):
            with_attn = level_resolutions[level] in attn_resolutions
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                cout = base_channels * channel_mult[level]
                blocks.append(res_attn(width + skip_widths.pop(), cout, with_attn))
                width = cout
            self.up_levels.append(blocks)
            if level > 0:
                self.upsamples.append(Upsample(width))

        self.out_norm = group_norm(width, norm_groups)
        self.out_conv = zero_(nn.Conv2d(width, self.out_channels, 3, padding=1))

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"this network was built with in_channels={self.in_channels}"
            )
        height, width = x.shape[-2:]
        if height % self.downscale or width % self.downscale:
            raise ValueError(
                f"input size {height}x{width} is not divisible by {self.downscale}, "
                "the network's total downsampling; pad or resize the images to a multiple "
                f"of {self.downscale}, or build the network with fewer levels in channel_mult"
            )

    def _embed(self, c_noise: Tensor | float, class_labels: Tensor | None, x: Tensor) -> Tensor:
        """Noise (+ class) embedding, already through its SiLU. Returns (B, E)."""
        batch = x.shape[0]
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)  # one noise level for the whole batch
        elif c_noise.numel() == batch:
            c_noise = c_noise.reshape(batch)
        else:
            raise ValueError(
                f"c_noise must be a scalar or hold one value per sample ({batch}), got shape {tuple(c_noise.shape)}"
            )
        emb = self.noise_embedding(c_noise)  # (B, E)
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, device=x.device)
            emb = emb + self.class_embedding(class_labels.reshape(batch))  # (B, E)
        elif class_labels is not None:
            raise ValueError(
                "class_labels were given but this network was built with num_classes=0; "
                "build it with num_classes=<number of classes> to condition on labels"
            )
        # Every residual block starts its embedding projection with a SiLU; do it once.
        return F.silu(emb).to(x.dtype)  # (B, E)

    def forward(self, x: Tensor, c_noise: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Args: x (B, C, H, W); c_noise (B,) float or a scalar; class_labels (B,) long.

        Returns (B, out_channels, H, W).
        """
        self._check_input(x)
        emb = self._embed(c_noise, class_labels, x)  # (B, E)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if self._prefers_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)  # every layer below follows the input's layout

        h = self.input_conv(x)  # (B, C0, H, W)
        skips = [h]
        for level, blocks in enumerate(self.down_levels):
            for block in blocks:
                h = block(h, emb)  # (B, C_level, H_level, W_level)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)  # (B, C_level, H_level/2, W_level/2)
                skips.append(h)

        h = self.mid_res1(h, emb)  # (B, C_last, H_last, W_last)
        h = self.mid_attn(h)  # (B, C_last, H_last, W_last)
        h = self.mid_res2(h, emb)  # (B, C_last, H_last, W_last)

        for level, blocks in enumerate(self.up_levels):
            for block in blocks:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H_level, W_level)
                h = block(h, emb)  # (B, C_level, H_level, W_level)
            if level < len(self.upsamples):
                h = self.upsamples[level](h)  # (B, C_level, 2 H_level, 2 W_level)

        return self.out_conv(F.silu(self.out_norm(h))).contiguous(memory_format=layout)  # (B, out_channels, H, W)

    def _prefers_channels_last(self, x: Tensor) -> bool:
        if not (self.cpu_channels_last and x.device.type == "cpu" and x.dtype == torch.float32):
            return False
        try:
            autocast = torch.is_autocast_enabled("cpu")
        except TypeError:  # torch < 2.4
            autocast = torch.is_autocast_cpu_enabled()
        return not autocast


UNET_NETS: dict[str, functools.partial[UNet]] = {
    # Minutes on a CPU for 8x8 / 16x16 / 28x28 digits (0.7M parameters). Attention only
    # in the middle block, i.e. at the lowest resolution whatever `resolution` is; two
    # levels so any even size runs.
    "unet-tiny": functools.partial(UNet, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=()),
    # A few M parameters: 28x28 / 32x32 datasets on one GPU or a patient CPU.
    "unet-small": functools.partial(
        UNet, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=()
    ),
    # DDPM's CIFAR-10 network (Ho et al. 2020, 35.7M parameters): additive embedding,
    # one attention head.
    "unet-cifar10": functools.partial(
        UNet,
        resolution=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
        scale_shift=False,
    ),
    # ADM-like ImageNet 64x64 (Dhariwal & Nichol 2021), with conv (not residual)
    # up/downsampling.
    "unet-imagenet64": functools.partial(
        UNet,
        resolution=64,
        base_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        head_dim=64,
        dropout=0.1,
    ),
}
