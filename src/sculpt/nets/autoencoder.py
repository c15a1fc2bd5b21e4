"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022), at small scale.

`Autoencoder.encode(x) -> (mean, logvar)` maps images [B, C, H, W] to a diagonal Gaussian
posterior over latents [B, latent_channels, H/f, W/f]; `decode(z)` maps latents back. The
downsampling factor f is 2 ** (len(channel_mult) - 1): 2, 4 or 8 in the presets. The
layout is Stable Diffusion's VAE: a ResNet encoder and decoder with GroupNorm and SiLU,
one attention block in the middle of each, 1x1 convs into and out of the latent space.

`PatchDiscriminator` is the pix2pix PatchGAN (Isola et al. 2017) that LDM trains against
the decoder. Networks know nothing about training: the losses live in `sculpt.objectives`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AttentionBlock, Downsample, Dropout, Upsample, group_norm

__all__ = ["AUTOENCODERS", "Autoencoder", "PatchDiscriminator", "nearest_valid_sizes"]


def nearest_valid_sizes(size: int, factor: int) -> tuple[int, int]:
    """The multiples of ``factor`` just below and above ``size`` (below is at least ``factor``)."""
    below = max(factor, size // factor * factor)
    return below, below + factor


class _ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a 1x1 skip when the width changes (no noise input)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups, eps=1e-6)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Co, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, Co, H, W)
        return self.skip(x) + h  # (B, Co, H, W)


class Autoencoder(nn.Module):
    """KL autoencoder (Rombach et al. 2022, "High-resolution image synthesis with latent diffusion models").

    Encoder: conv3x3 in; per level ``num_res_blocks`` ResNet blocks and a stride-2
    downsample except at the last level; middle (res, attention, res); GroupNorm -> SiLU
    -> conv3x3 to 2 * latent_channels, then a 1x1 conv: the posterior's mean and
    log-variance, the latter clamped to [logvar_min, logvar_max] (SD's [-30, 20]) so that
    exp never overflows. Decoder: the mirror image with ``num_res_blocks + 1`` blocks per
    level and nearest + conv upsampling.

    Args:
        in_channels: image channels (1 or 3).
        resolution: the image size the autoencoder is built for; must be divisible by the
            factor (the error names the nearest valid sizes). Convolutions run at any
            size that is.
        base_channels, channel_mult: width of each level (the factor is 2 ** (levels - 1)).
        num_res_blocks: ResNet blocks per level on the way down.
        latent_channels: channels of the latent.
    """

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 64,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
        dropout: float = 0.0,
        norm_groups: int = 32,
        logvar_min: float = -30.0,
        logvar_max: float = 20.0,
    ) -> None:
        super().__init__()
        if len(channel_mult) < 1:
            raise ValueError("channel_mult needs at least one level, e.g. (1, 2, 2) for a factor of 4")
        self.in_channels, self.latent_channels, self.resolution = in_channels, latent_channels, resolution
        self.factor = 2 ** (len(channel_mult) - 1)
        self.logvar_min, self.logvar_max = logvar_min, logvar_max
        self.check_size(resolution)
        widths = [base_channels * m for m in channel_mult]

        # -- encoder
        self.encoder_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.encoder_levels = nn.ModuleList()
        width = widths[0]
        for level, out in enumerate(widths):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(_ResnetBlock(width, out, dropout, norm_groups))
                width = out
            if level < len(widths) - 1:
                blocks.append(Downsample(width))
            self.encoder_levels.append(nn.Sequential(*blocks))
        self.encoder_mid = nn.Sequential(
            _ResnetBlock(width, width, dropout, norm_groups),
            AttentionBlock(width, 1, norm_groups),
            _ResnetBlock(width, width, dropout, norm_groups),
        )
        self.encoder_norm = group_norm(width, norm_groups, eps=1e-6)
        self.encoder_out = nn.Conv2d(width, 2 * latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

        # -- decoder
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        width = widths[-1]
        self.decoder_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.decoder_mid = nn.Sequential(
            _ResnetBlock(width, width, dropout, norm_groups),
            AttentionBlock(width, 1, norm_groups),
            _ResnetBlock(width, width, dropout, norm_groups),
        )
        self.decoder_levels = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(_ResnetBlock(width, widths[level], dropout, norm_groups))
                width = widths[level]
            if level > 0:
                blocks.append(Upsample(width))
            self.decoder_levels.append(nn.Sequential(*blocks))
        self.decoder_norm = group_norm(width, norm_groups, eps=1e-6)
        self.decoder_out = nn.Conv2d(width, in_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight: LDM's adaptive GAN weight compares gradients there."""
        return self.decoder_out.weight

    def check_size(self, size: int) -> None:
        if size % self.factor:
            below, above = nearest_valid_sizes(size, self.factor)
            raise ValueError(
                f"resolution {size} is not divisible by the autoencoder's downsampling factor {self.factor}; "
                f"the nearest valid sizes are {below} and {above} (set --data.resolution)"
            )

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of an image -> (latent_channels, H / f, W / f), checking that it fits."""
        channels, height, width = shape
        if channels != self.in_channels:
            raise ValueError(
                f"the autoencoder was built for {self.in_channels}-channel images, the data has {channels} "
                f"(set --data.channels={self.in_channels}, or train an autoencoder on this data)"
            )
        self.check_size(height)
        self.check_size(width)
        return (self.latent_channels, height // self.factor, width // self.factor)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images [B, C, H, W] in [-1, 1] -> the posterior's (mean, logvar), each [B, Z, H/f, W/f]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self.check_size(x.shape[-2])
        self.check_size(x.shape[-1])
        h = self.encoder_in(x)  # (B, C0, H, W)
        for level in self.encoder_levels:
            h = level(h)  # (B, C_level, H_level, W_level), halved after every level but the last
        h = self.encoder_mid(h)  # (B, C_last, H/f, W/f)
        moments = self.quant_conv(self.encoder_out(F.silu(self.encoder_norm(h))))  # (B, 2Z, H/f, W/f)
        mean, logvar = moments.chunk(2, dim=1)  # (B, Z, H/f, W/f) each
        return mean, logvar.clamp(self.logvar_min, self.logvar_max)

    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, Z, h, w] -> images [B, C, h f, w f] (not clamped)."""
        h = self.decoder_in(self.post_quant_conv(z))  # (B, C_last, h, w)
        h = self.decoder_mid(h)  # (B, C_last, h, w)
        for level in self.decoder_levels:
            h = level(h)  # (B, C_level, ...), doubled after every level but the last
        return self.decoder_out(F.silu(self.decoder_norm(h)))  # (B, C, h f, w f)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, mean, logvar); z = mean + exp(logvar / 2) * noise (noise None: z = mean)."""
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        return self.decode(z), mean, logvar


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017), as LDM's NLayerDiscriminator: one logit per overlapping patch.

    conv4x4 stride 2 -> LeakyReLU(0.2), then ``num_layers - 1`` more stride-2 and one stride-1
    conv4x4 with GroupNorm (not BatchNorm: a sample's logits never depend on its batch), and a
    conv4x4 to one channel. LDM's init: N(0, 0.02) weights.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, resolution: int = 0) -> None:
        super().__init__()
        if resolution and self.output_size(resolution, num_layers) < 1:
            deepest = max((n for n in range(1, 8) if self.output_size(resolution, n) >= 1), default=0)
            raise ValueError(
                f"a patch discriminator of {num_layers} layers does not fit {resolution}x{resolution} images; "
                f"use at most {deepest} (autoencoder.disc_layers)"
            )
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = base_channels
        for index in range(1, num_layers + 1):
            out = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), group_norm(out, 32), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.body = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    @staticmethod
    def output_size(size: int, num_layers: int) -> int:
        """Side of the logit map for size x size images (< 1: the image is too small)."""
        for _ in range(num_layers):  # conv4x4 stride 2 padding 1 halves
            size = size // 2
        return size - 2  # the stride-1 conv4x4 and the final conv4x4 take one off each

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, 1, h, w) logits


#: Autoencoder presets (``model.net`` of ``--task autoencoder``). The ``-f4`` in a name is the factor.
AUTOENCODERS: dict[str, functools.partial[Autoencoder]] = {
    # Minutes on a CPU at 32x32-64x64: one block per level, 32-64 channels, 4 latent channels.
    "ae-f2": functools.partial(Autoencoder, base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
    "ae-f4": functools.partial(Autoencoder, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
    "ae-f8": functools.partial(Autoencoder, base_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1),
    # Stable Diffusion's VAE layout (kl-f8: 128-512 channels, two blocks per level), for a GPU.
    "ae-sd-f8": functools.partial(Autoencoder, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2),
}
