"""Networks: `net(x, c_noise, class_labels=None) -> tensor`. They know nothing about diffusion.

`NETS` maps a preset name to a `functools.partial` that builds the network; it takes
the remaining constructor arguments (for example `in_channels`, `resolution`).
`AUTOENCODERS` does the same for the autoencoders of latent diffusion (`Autoencoder`:
`encode(x) -> (mean, logvar)`, `decode(z) -> x`).
"""

from __future__ import annotations

from .autoencoder import AUTOENCODERS, Autoencoder
from .dit import DIT_NETS, DiT
from .unet import UNET_NETS, UNet

NETS = {**UNET_NETS, **DIT_NETS}

__all__ = ["AUTOENCODERS", "NETS", "Autoencoder", "UNet", "DiT"]
