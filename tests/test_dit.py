"""DiT (Peebles & Xie 2023): presets, parameter counts, adaLN-Zero init, conditioning, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sculpt.nets.dit import (
    DIT_NETS,
    DiT,
    patchify,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)

PAPER_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and does not collapse (10x and worse)
    when the suite shares its cores with other jobs and the OpenMP threads oversubscribe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def expected_params(
    hidden: int, depth: int, patch: int, in_ch: int, out_ch: int, classes: int, tokens: int = 0
) -> int:
    """Closed-form parameter count of a DiT (biases included, mlp_ratio 4, 256 frequencies).

    `tokens` > 0 adds a positional table stored as a parameter (learned / the reference repo).
    """
    d = hidden
    patch_embed = in_ch * patch * patch * d + d
    t_embed = 256 * d + d + d * d + d
    class_embed = (classes + 1) * d if classes else 0
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    block += d * 6 * d + 6 * d  # adaLN modulation
    final = (d * patch * patch * out_ch + patch * patch * out_ch) + (d * 2 * d + 2 * d)
    return patch_embed + t_embed + class_embed + depth * block + final + tokens * d


def perturb_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every weight by small noise so the zero-initialised paths become active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return net


def tiny(**overrides) -> DiT:
    kwargs = dict(in_channels=3, resolution=8, num_classes=10) | overrides
    return DIT_NETS["dit-tiny/2"](**kwargs)


# ----------------------------------------------------------------------------- presets


def test_preset_names() -> None:
    names = {f"dit-{s}/{p}" for s in PAPER_SIZES for p in (2, 4, 8)} | {"dit-tiny/2", "dit-tiny/4"}
    assert set(DIT_NETS) == names


@pytest.mark.parametrize("name", sorted(DIT_NETS))
def test_every_preset_constructs_with_the_closed_form_parameter_count(name: str) -> None:
    # Meta device: shapes without memory or init cost, so even DiT-XL builds in milliseconds.
    with torch.device("meta"):
        net = DIT_NETS[name](in_channels=4, resolution=32, num_classes=1000)
    size, patch = name.removeprefix("dit-").split("/")
    hidden, depth, _ = PAPER_SIZES.get(size, (128, 4, 4))
    assert (net.in_channels, net.out_channels, net.resolution, net.num_classes) == (4, 4, 32, 1000)
    assert net.patch_size == int(patch) and len(net.blocks) == depth
    assert count_params(net) == expected_params(hidden, depth, int(patch), 4, 4, 1000)


def test_dit_xl2_parameter_count_matches_the_paper() -> None:
    """DiT-XL/2 on 256x256 images (32x32x4 latents, 1000 classes) has 675M parameters.

    The reference repo prints 675,129,632: it learns sigma (out_channels 8) and keeps its
    fixed sin-cos table as a frozen Parameter (256 tokens x 1152 = 294,912). Ours predicts
    only the mean (out_channels 4, a final linear 1152 x 16 + 16 smaller: -18,448) and keeps
    the table as a buffer, so the default model has 675,129,632 - 18,448 - 294,912
    = 674,816,272 parameters, 0.05% under the paper's 675M.
    """
    with torch.device("meta"):
        ours = DIT_NETS["dit-xl/2"](in_channels=4, resolution=32, num_classes=1000)
        reference_layout = DIT_NETS["dit-xl/2"](
            in_channels=4, out_channels=8, resolution=32, num_classes=1000, pos_embed="learned"
        )
    assert count_params(reference_layout) == 675_129_632
    assert count_params(ours) == 674_816_272
    assert abs(count_params(ours) - 675e6) / 675e6 < 0.01


@pytest.mark.parametrize("name", ["dit-tiny/2", "dit-tiny/4"])
def test_tiny_presets_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    net = DIT_NETS[name](in_channels=3, resolution=16, num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([10.0, 500.0]), torch.tensor([1, 10]))
    assert out.shape == (2, 3, 16, 16)
    F.mse_loss(out, x).backward()
    # At init only the zeroed output layer gets a gradient (every other path is gated by zero).
    assert net.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


# ----------------------------------------------------------------------------- behaviour


def test_fresh_model_outputs_exactly_zero_and_blocks_are_identity() -> None:
    torch.manual_seed(0)
    net = tiny()
    x = torch.randn(4, 3, 8, 8)
    out = net(x, torch.rand(4) * 1000, torch.tensor([0, 3, 9, 10]))
    assert torch.equal(out, torch.zeros_like(out))
    tokens, c = torch.randn(4, 16, 128), torch.randn(4, 128)
    assert torch.equal(net.blocks[0](tokens, c), tokens)


def test_perturbed_model_shape_and_class_conditioning() -> None:
    torch.manual_seed(0)
    net = perturb_(tiny(out_channels=5)).eval()
    x, c_noise = torch.randn(3, 3, 8, 8), torch.tensor([1.0, 2.0, 3.0])
    labels = torch.tensor([0, 1, 2])
    out = net(x, c_noise, labels)
    assert out.shape == (3, 5, 8, 8)
    assert out.abs().mean() > 1e-3
    # Different labels give different outputs for every sample.
    other = net(x, c_noise, torch.tensor([5, 6, 7]))
    assert ((out - other).flatten(1).abs().amax(1) > 1e-4).all()
    # class_labels=None is exactly the null class (index num_classes), which differs from 0.
    null = net(x, c_noise, None)
    assert torch.equal(null, net(x, c_noise, torch.full((3,), 10)))
    assert not torch.allclose(null, net(x, c_noise, torch.zeros(3, dtype=torch.long)))


def test_the_residual_stream_is_contiguous_so_no_layernorm_copies_it() -> None:
    """Elementwise ops keep their input's strides: a transposed token view would reach every block."""
    net = perturb_(tiny())
    seen = []
    for block in net.blocks:
        block.norm1.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        block.norm2.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    x, c_noise, labels = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    out = net(x, c_noise, labels)
    assert len(seen) == 2 * len(net.blocks) and all(seen)
    # The layout changes no number: the blocks run on the transposed view give the same output.
    with torch.no_grad():
        tokens = net.patch_embed(x).flatten(2).transpose(1, 2) + net.pos_embed  # not contiguous
        c = net.t_embedder(c_noise) + net.class_embed(labels)
        for block in net.blocks:
            tokens = block(tokens, c)
        reference = unpatchify(net.final_layer(tokens, c), net.patch_size, 8, 8)
    torch.testing.assert_close(out.detach(), reference, rtol=1e-6, atol=1e-6)


def test_c_noise_scalar_broadcasts_and_conditions() -> None:
    net = perturb_(tiny(num_classes=0)).eval()
    x = torch.randn(2, 3, 8, 8)
    batched = net(x, torch.full((2,), -0.3))
    assert torch.equal(net(x, -0.3), batched)
    assert torch.equal(net(x, torch.tensor(-0.3)), batched)
    # Small EDM-style c_noise values (0.25 ln sigma) still move the output.
    assert not torch.allclose(net(x, 0.25 * np.log(0.5)), net(x, 0.25 * np.log(5.0)))


def test_patchify_unpatchify_round_trip_is_exact_and_matches_the_patch_conv() -> None:
    x = torch.randn(2, 3, 12, 8)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 3 * 2, 4 * 4 * 3)
    assert torch.equal(unpatchify(tokens, 4, 12, 8), x)
    # The conv patch embedding is the same linear map applied to `patchify` tokens, which
    # checks that both agree on token order and on the (row, col, channel) feature layout.
    net = tiny(resolution=8)
    x = torch.randn(2, 3, 8, 8)
    conv = net.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
    weight = net.patch_embed.weight.permute(0, 2, 3, 1).reshape(128, -1)  # [D, p*p*C]
    linear = patchify(x, 2) @ weight.T + net.patch_embed.bias
    torch.testing.assert_close(conv, linear, rtol=1e-5, atol=1e-5)


def test_sincos_pos_embed_matches_the_reference_numpy_formula() -> None:
    """Against DiT/MAE `get_2d_sincos_pos_embed`, retyped in numpy."""

    def embed_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, size = 64, 5
    grid = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, size, size)
    reference = np.concatenate([embed_1d(dim // 2, grid[0]), embed_1d(dim // 2, grid[1])], 1)
    ours = sincos_pos_embed_2d(dim, size)
    torch.testing.assert_close(ours, torch.from_numpy(reference).float(), rtol=0, atol=1e-6)


def test_timestep_embedding_layout() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos half then sin half
    freqs = torch.tensor([1.0, 0.1, 0.01, 0.001])  # 10000 ** (-k / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2 * freqs), torch.sin(2 * freqs)]))


def test_pos_embed_modes() -> None:
    fixed, learned = tiny(), tiny(pos_embed="learned")
    assert "pos_embed" not in dict(fixed.named_parameters())
    assert "pos_embed" not in fixed.state_dict()  # recomputed, not stored in checkpoints
    assert learned.pos_embed.requires_grad
    assert torch.equal(learned.pos_embed.detach(), fixed.pos_embed)  # starts from sin-cos


def test_tiny_dit_overfits_four_images() -> None:
    torch.manual_seed(0)
    net = tiny(num_classes=4)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8)
    c_noise, labels = torch.tensor([10.0, 200.0, 500.0, 900.0]), torch.arange(4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = F.mse_loss(net(noise, c_noise, labels), images).item()
    for _ in range(300):
        loss = F.mse_loss(net(noise, c_noise, labels), images)
        if loss.item() < first / 10:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10, f"MSE {first:.4f} -> {loss.item():.4f}"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(resolution=10, patch_size=4), "not divisible by patch_size"),
        (dict(hidden_size=130, num_heads=4), "not divisible by num_heads"),
        (dict(hidden_size=6, num_heads=3), "divisible by 4"),
        (dict(pos_embed="rope"), "pos_embed"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_bad_construction_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiT(**(dict(in_channels=3, resolution=8, hidden_size=64, depth=1, num_heads=4) | kwargs))


def test_bad_inputs_raise() -> None:
    net, uncond = tiny(), tiny(num_classes=0)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="in_channels=3"):
        net(torch.randn(2, 4, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="resolution=8"):
        net(torch.randn(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="c_noise"):
        net(x, torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, torch.zeros(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.zeros(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, torch.zeros(2), torch.tensor([0, 1, 2]))
