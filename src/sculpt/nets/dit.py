"""Diffusion Transformer: DiT with adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers", arXiv:2212.09748).

The network maps `(x, c_noise, class_labels)` to a tensor shaped like `x` (or with
`out_channels` channels). It knows nothing about diffusion: the denoiser decides what the
output means (eps, x0, v, ...) and how `c_noise` is derived from sigma.

`DIT_NETS` holds the paper's presets (DiT-S/B/L/XL, patch 2/4/8) plus two tiny ones for CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .layers import Dropout, attention, timestep_embedding

__all__ = ["DIT_NETS", "DiT", "patchify", "unpatchify"]

# Width of the sinusoidal timestep features fed to the timestep MLP (the paper's value).
FREQUENCY_EMBEDDING_SIZE = 256


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sine-cosine positional embedding (MAE, He et al. 2022), as used by DiT.

    Returns [grid_size**2, dim] in row-major token order: the first dim/2 channels encode the
    column (x) coordinate, the last dim/2 the row (y) coordinate, each as [sin | cos].
    """
    if dim % 4:
        raise ValueError(
            f"2-D sin-cos positional embedding needs hidden_size divisible by 4, got {dim}; "
            "choose a hidden_size that is a multiple of 4 or use pos_embed='learned'."
        )
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    coords = torch.arange(grid_size, dtype=torch.float64)  # [G]
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each

    def embed_1d(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1)[:, None] * omega[None]  # [G*G, D/4]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [G*G, D/2]

    # Column first then row matches the reference implementation's channel layout.
    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # [G*G, D]


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches: [B, C, H, W] -> [B, (H/p)*(W/p), p*p*C].

    Tokens are in row-major order; each token's features are laid out (p_row, p_col, C),
    the layout `unpatchify` (and DiT's final linear layer) uses.
    """
    batch, channels, height, width = x.shape
    p = patch_size
    x = x.reshape(batch, channels, height // p, p, width // p, p)  # [B, C, h, p, w, p]
    x = torch.einsum("bchpwq->bhwpqc", x)  # [B, h, w, p, p, C]
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)  # [B, h*w, p*p*C]


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Inverse of `patchify`: [B, (H/p)*(W/p), p*p*C] -> [B, C, H, W]."""
    batch, _, features = tokens.shape
    p = patch_size
    channels = features // (p * p)
    x = tokens.reshape(batch, height // p, width // p, p, p, channels)  # [B, h, w, p, p, C]
    x = torch.einsum("bhwpqc->bchpwq", x)  # [B, C, h, p, w, p]
    return x.reshape(batch, channels, height, width)  # [B, C, H, W]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: per-sample affine transform of normalised tokens, in one pass.

    `1 + scale` so that a zero modulation leaves the normalised tokens unchanged. The result
    has the modulation's dtype: under autocast that is the bf16/fp16 the following linear
    layer casts its input to anyway, so the tokens are written once, at half the bytes.
    """
    return torch.addcmul(shift[:, None], x.to(shift.dtype), 1 + scale[:, None])  # [B, N, D]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of c_noise followed by a two-layer MLP (DiT, Sec. 3.2)."""

    def __init__(self, hidden_size: int, frequency_size: int = FREQUENCY_EMBEDDING_SIZE) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        features = timestep_embedding(c_noise, self.frequency_size)  # [B, F]
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # [B, D]


class Attention(nn.Module):
    """Multi-head self-attention through `layers.attention` (SDPA's fused kernels on the whole)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, hidden = x.shape  # x: [B, N, D]
        head_dim = hidden // self.num_heads  # D/heads
        qkv = self.qkv(x)  # [B, N, 3*D]
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)  # [B, N, 3, heads, D/heads]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D/heads]
        x = attention(q, k, v)  # [B, heads, N, D/heads]
        x = x.transpose(1, 2).reshape(batch, tokens, hidden)  # [B, N, D]
        return self.proj(x)  # [B, N, D]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Sec. 3.2, Fig. 3).

    The modulation's linear layer is zero-initialised, so both residual gates start at zero and
    the block is exactly the identity at init; the paper found this beats cross-attention and
    in-context conditioning (Fig. 5).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        # No affine parameters: scale and shift come from the conditioning instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size),
        )
        self.dropout = Dropout(dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        modulation = self.adaLN_modulation(c)  # [B, 6*D]
        # adaLN: shift/scale/gate for attention, then for the MLP; each [B, D]
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, 1)
        attn_out = self.attn(modulate(self.norm1(x), shift_attn, scale_attn))  # [B, N, D]
        # Gated residual adds, x + gate * branch, each in one pass (and in x's dtype).
        x = torch.addcmul(x, gate_attn[:, None], self.dropout(attn_out))  # [B, N, D]
        mlp_out = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # [B, N, D]
        return torch.addcmul(x, gate_mlp[:, None], self.dropout(mlp_out))  # [B, N, D]


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear map from tokens to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each [B, D]
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, p*p*C_out]


class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, arXiv:2212.09748).

    `forward(x, c_noise, class_labels=None)`: x [B, C, H, W] with H = W = `resolution`;
    c_noise [B] (or a scalar, broadcast); class_labels [B] long in [0, num_classes], where
    index `num_classes` is the reserved null class used for classifier-free guidance, and
    `None` means "null class for every sample". Returns [B, out_channels, H, W].

    Output is exactly zero at init (adaLN-Zero and a zero final layer), which a denoiser's
    preconditioning turns into a sensible first guess.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        resolution: int = 32,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        pos_embed: str = "sincos",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if resolution % patch_size:
            raise ValueError(
                f"DiT resolution {resolution} is not divisible by patch_size {patch_size}; "
                f"use a resolution that is a multiple of {patch_size} or a smaller patch_size."
            )
        if hidden_size % num_heads:
            raise ValueError(
                f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}; "
                "choose num_heads that divides hidden_size."
            )
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}.")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.resolution = resolution
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.num_patches = (resolution // patch_size) ** 2

        # A conv with kernel = stride = patch is a linear map of each patch, done in one op.
        self.patch_embed = nn.Conv2d(
            in_channels, hidden_size, kernel_size=patch_size, stride=patch_size
        )
        table = sincos_pos_embed_2d(hidden_size, resolution // patch_size)[None]  # [1, N, D]
        if pos_embed == "learned":
            # Start the learned table from the sin-cos one: a good init and no extra RNG use.
            self.pos_embed = nn.Parameter(table)
        else:
            # A buffer, not a frozen Parameter: it is not trained, and is recomputable,
            # so keep it out of the parameter count and out of the optimiser.
            self.register_buffer("pos_embed", table, persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Row `num_classes` is the null class that classifier-free guidance drops labels to.
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation (DiT `models.py`): Xavier linears, zeroed adaLN."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Treat the patch conv as the linear map it is: Xavier over (out, in*p*p).
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        # adaLN-Zero: zero modulation => zero gates => every block is the identity at init.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Zero output layer => the network predicts exactly zero at init.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _check_inputs(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None) -> None:
        """Raise a ValueError that says what was wrong with the inputs and what was expected."""
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiT expects x of shape [B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}] (in_channels={self.in_channels}, resolution="
                f"{self.resolution}), got {list(x.shape)}; build the net with matching "
                "in_channels / resolution."
            )
        if c_noise.numel() not in (1, x.shape[0]):
            raise ValueError(
                f"c_noise must be a scalar or have one value per sample ({x.shape[0]}), "
                f"got shape {list(c_noise.shape)}."
            )
        if class_labels is None:
            return
        if self.class_embed is None:
            raise ValueError(
                "class_labels given to an unconditional DiT (num_classes=0); "
                "build it with num_classes > 0 or pass class_labels=None."
            )
        if class_labels.shape != (x.shape[0],) or class_labels.is_floating_point():
            raise ValueError(
                f"class_labels must be an integer tensor of shape [{x.shape[0]}] with values "
                f"in [0, {self.num_classes}] ({self.num_classes} = null class), got "
                f"{class_labels.dtype} of shape {list(class_labels.shape)}."
            )

    def forward(
        self, x: Tensor, c_noise: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        c_noise = torch.as_tensor(c_noise, device=x.device)  # [B] or [] (scalar)
        self._check_inputs(x, c_noise, class_labels)  # x: [B, C_in, H, W]
        batch = x.shape[0]  # B
        c_noise = c_noise.reshape(-1).expand(batch)  # [B]: a scalar applies to every sample
        tokens = self.patch_embed(x)  # [B, D, H/p, W/p]
        # [B, N, D], N = (H/p)*(W/p), row-major. Made contiguous once here: elementwise ops keep their
        # input's strides, so a transposed view would carry through the whole residual stream and every
        # LayerNorm would copy it, forward and backward (26 copies a step for a depth-6 DiT).
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()
        tokens = tokens + self.pos_embed  # [B, N, D]
        c = self.t_embedder(c_noise)  # [B, D]
        if self.class_embed is not None:  # class-conditional: add the label embedding to c
            if class_labels is None:  # no labels: every sample gets the null class
                class_labels = x.new_full((batch,), self.num_classes, dtype=torch.long)  # [B]
            c = c + self.class_embed(class_labels)  # [B, D]
        for block in self.blocks:  # depth x
            tokens = block(tokens, c)  # [B, N, D]
        patches = self.final_layer(tokens, c)  # [B, N, p*p*C_out]
        height, width = x.shape[-2:]  # H, W
        return unpatchify(patches, self.patch_size, height, width)  # [B, C_out, H, W]


# The paper's model sizes (Table 1): hidden_size, depth, num_heads.
_DIT_SIZES: dict[str, dict[str, int]] = {
    "s": dict(hidden_size=384, depth=12, num_heads=6),
    "b": dict(hidden_size=768, depth=12, num_heads=12),
    "l": dict(hidden_size=1024, depth=24, num_heads=16),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
}
_DIT_PATCHES = (2, 4, 8)

# Presets: name -> partial(DiT, ...); the caller supplies in_channels, resolution, etc.
DIT_NETS: dict[str, functools.partial[DiT]] = {
    f"dit-{size}/{patch}": functools.partial(DiT, patch_size=patch, **shape)
    for size, shape in _DIT_SIZES.items()
    for patch in _DIT_PATCHES
}
# Small enough to train a few hundred steps on a laptop CPU (tests, smoke runs).
DIT_NETS.update(
    {
        f"dit-tiny/{patch}": functools.partial(
            DiT, patch_size=patch, hidden_size=128, depth=4, num_heads=4
        )
        for patch in (2, 4)
    }
)
