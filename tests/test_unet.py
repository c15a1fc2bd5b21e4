"""The U-Net: shapes, presets, conditioning, layout invariance, and that it can learn."""

from __future__ import annotations

import math

import pytest
import torch

from sculpt.nets import UNET_NETS, UNet
from sculpt.nets.layers import Upsample, attention, count_parameters, timestep_embedding

# Reduced sizes that keep each preset's structure (levels, blocks, attention, heads)
# but run a forward/backward in well under a second.
SMALL_OVERRIDES = {
    "unet-tiny": dict(in_channels=1, resolution=8),
    "unet-small": dict(resolution=8, base_channels=16),
    "unet-cifar10": dict(resolution=16, base_channels=16),
    "unet-imagenet64": dict(resolution=32, base_channels=16, head_dim=8),
}

# Parameter counts of the presets at their default configuration (3 channels,
# unconditional). unet-cifar10 equals DDPM's CIFAR-10 network (Ho et al. 2020), and
# diffusers' UNet2DModel of the same configuration has exactly this many.
PRESET_PARAMETERS = {
    "unet-tiny": 705_859,
    "unet-small": 6_617_667,
    "unet-cifar10": 35_746_307,
    "unet-imagenet64": 276_421_059,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these small-tensor tests on one thread.

    At 8x8 images intra-op threads cost more than they save, and on a loaded 2-core
    machine OpenMP spin-waiting made the overfitting test 10x slower (50 s vs 4 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised layers stop hiding the rest."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return net


def _tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNET_NETS["unet-tiny"](**{"resolution": 8, **overrides})


def test_presets_cover_registry():
    assert set(SMALL_OVERRIDES) == set(UNET_NETS) == set(PRESET_PARAMETERS)


@pytest.mark.parametrize("name", sorted(UNET_NETS))
def test_preset_parameter_count(name):
    # Built on the meta device: no memory, no init time, exact shapes.
    with torch.device("meta"):
        net = UNET_NETS[name]()
    assert count_parameters(net) == PRESET_PARAMETERS[name]


def test_cifar10_preset_matches_ddpm_size():
    with torch.device("meta"):
        net = UNET_NETS["unet-cifar10"]()
    # DDPM reports 35.7M parameters for its CIFAR-10 model.
    assert abs(count_parameters(net) - 35.7e6) / 35.7e6 < 0.01
    assert (net.in_channels, net.out_channels, net.resolution) == (3, 3, 32)


@pytest.mark.parametrize("name", sorted(UNET_NETS))
def test_preset_forward_backward(name):
    torch.manual_seed(0)
    net = UNET_NETS[name](**SMALL_OVERRIDES[name])
    x = torch.randn(2, net.in_channels, net.resolution, net.resolution)
    out = net(x, torch.tensor([3.0, 700.0]))
    assert out.shape == x.shape
    out.square().mean().backward()  # zero output: the gradient reaches the out conv only
    (net(x, torch.tensor([3.0, 700.0])) - x).square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.out_conv.weight.grad.abs().sum() > 0


def test_fresh_net_outputs_exactly_zero():
    net = _tiny(in_channels=2, num_classes=3)
    out = net(torch.randn(3, 2, 8, 8), torch.tensor([0.1, -1.5, 900.0]), torch.tensor([0, 1, 2]))
    assert torch.equal(out, torch.zeros(3, 2, 8, 8))


def test_out_channels_override_and_attributes():
    net = _tiny(in_channels=3, out_channels=6)
    assert (net.in_channels, net.out_channels, net.resolution, net.num_classes) == (3, 6, 8, 0)
    out = _perturb(net)(torch.randn(2, 3, 8, 8), torch.zeros(2))
    assert out.shape == (2, 6, 8, 8)
    # Any size divisible by the downsampling runs, not only `resolution`.
    assert net(torch.randn(1, 3, 12, 16), torch.zeros(1)).shape == (1, 6, 12, 16)


def test_scalar_c_noise_broadcasts_and_matters():
    net = _perturb(_tiny())
    x = torch.randn(3, 3, 8, 8)
    per_sample = net(x, torch.full((3,), 0.25))
    torch.testing.assert_close(net(x, 0.25), per_sample)
    torch.testing.assert_close(net(x, torch.tensor(0.25)), per_sample)
    # Both VP-style (hundreds) and EDM-style (|c| < 2) values must move the output.
    assert (net(x, 0.5) - per_sample).abs().max() > 1e-3
    assert (net(x, 500.0) - net(x, 510.0)).abs().max() > 1e-3


def test_samples_do_not_interact():
    # GroupNorm is per sample and nothing loops over or mixes the batch.
    net = _perturb(_tiny())
    x, c_noise = torch.randn(4, 3, 8, 8), torch.tensor([0.0, 1.0, 10.0, 100.0])
    torch.testing.assert_close(net(x[1:2], c_noise[1:2]), net(x, c_noise)[1:2])


def test_class_labels_change_output_and_none_is_null_class():
    net = _perturb(_tiny(num_classes=10))
    assert net.class_embedding.num_embeddings == 11  # the extra row is the null class
    x, c_noise = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 5.0])
    out_a = net(x, c_noise, torch.tensor([0, 1]))
    out_b = net(x, c_noise, torch.tensor([2, 1]))
    assert (out_a[0] - out_b[0]).abs().max() > 1e-3
    torch.testing.assert_close(out_a[1], out_b[1])
    torch.testing.assert_close(net(x, c_noise), net(x, c_noise, torch.tensor([10, 10])))
    assert (net(x, c_noise) - out_a).abs().max() > 1e-3


def test_class_labels_without_classes_raise():
    with pytest.raises(ValueError, match="num_classes=0"):
        _tiny()(torch.randn(1, 3, 8, 8), torch.zeros(1), torch.tensor([0]))


def test_channels_last_matches_contiguous():
    net = _perturb(_tiny(num_classes=4, attn_resolutions=(8,)))
    x, c_noise, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.0, 2.0, 400.0]), None
    expected = net(x, c_noise, labels)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last), c_noise, labels)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # A contiguous input into a channels_last model must also work.
    torch.testing.assert_close(net_cl(x, c_noise, labels), expected, atol=1e-5, rtol=1e-5)


def test_cpu_float32_runs_channels_last_inside_and_returns_the_input_layout():
    net = _perturb(_tiny(num_classes=4, attn_resolutions=(8,)))
    plain = _perturb(_tiny(num_classes=4, attn_resolutions=(8,), cpu_channels_last=False))
    seen = []
    channels_last = torch.channels_last
    net.input_conv.register_forward_hook(lambda m, a, out: seen.append(out.is_contiguous(memory_format=channels_last)))
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    c_noise, labels = torch.tensor([0.0, 2.0, 400.0]), torch.tensor([0, 3, 1])
    out, expected = net(x, c_noise, labels), plain(x, c_noise, labels)
    assert seen == [True] and out.is_contiguous()  # channels_last inside, NCHW back out
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)
    # under bf16 autocast (slower in channels_last) and in float64 the input's layout is kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, c_noise, labels)
    net.double()(x.double(), c_noise, labels)
    assert seen == [True, False, False]
    assert net(x.double().contiguous(memory_format=torch.channels_last), c_noise, labels).is_contiguous(
        memory_format=torch.channels_last
    )


def test_tiny_net_overfits():
    torch.manual_seed(0)
    net = UNET_NETS["unet-tiny"](in_channels=1, resolution=8)
    x, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    c_noise = torch.tensor([0.0, 250.0, 500.0, 999.0])
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    initial = (net(x, c_noise) - target).square().mean().item()
    for _ in range(200):
        loss = (net(x, c_noise) - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = (net(x, c_noise) - target).square().mean().item()
    assert final < initial / 10, (initial, final)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match=r"in_channels=3"):
        _tiny()(torch.randn(2, 1, 8, 8), torch.zeros(2))


def test_indivisible_input_size_raises():
    net = _tiny(channel_mult=(1, 2, 2))  # total downsampling 4
    with pytest.raises(ValueError, match="not divisible by 4"):
        net(torch.randn(1, 3, 10, 8), torch.zeros(1))


def test_indivisible_resolution_raises():
    with pytest.raises(ValueError, match=r"resolution 30 is not divisible by .* = 4"):
        UNET_NETS["unet-small"](resolution=30)


def test_unreachable_attention_resolution_raises():
    with pytest.raises(ValueError, match=r"attn_resolutions \[16\]"):
        UNET_NETS["unet-cifar10"](resolution=8, base_channels=8)


def test_c_noise_of_wrong_size_raises():
    with pytest.raises(ValueError, match="one value per sample"):
        _tiny()(torch.randn(2, 3, 8, 8), torch.zeros(3))


def test_timestep_embedding_values():
    c_noise = torch.tensor([0.0, 1.0, 1000.0])
    emb = timestep_embedding(c_noise, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    # [cos | sin] at frequencies 10000**(-i/4), i = 0..3.
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0].item() == pytest.approx(math.cos(1.0))
    assert emb[2, 5].item() == pytest.approx(math.sin(1000.0 * 10000 ** (-1 / 4)), abs=1e-4)
    # Odd widths pad one zero channel; any leading shape, including 0-d, is kept.
    assert timestep_embedding(c_noise, 7)[:, -1].abs().max() == 0
    assert timestep_embedding(torch.tensor(3.0), 6).shape == (6,)


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 4, 1, 1)])
def test_upsample_is_nearest_then_conv3x3(shape):
    # Upsample runs as a stride-2 transposed conv with a kernel summed from its conv3x3;
    # it must be that very function, values and gradients, in any layout.
    torch.manual_seed(0)
    up = Upsample(4).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    reference = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = up(x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(reference, [x, up.conv.weight], grad)
    got = torch.autograd.grad(out, [x, up.conv.weight], grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(up(x_cl), reference, rtol=1e-12, atol=1e-12)


def test_attention_matmul_path_matches_sdpa():
    # Training in bf16 on the CPU takes two matmuls around a softmax instead of SDPA; both
    # must be softmax(q k^T / sqrt(d)) v to bf16 round-off, values and gradients.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=torch.float64) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=3e-2)
    out.float().square().sum().backward()
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*exact).square().sum().backward()
    for got, expected in zip(inputs, exact, strict=True):
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=0, atol=0.1)
    # Everywhere else it is SDPA itself.
    torch.testing.assert_close(attention(q, k, v), reference, rtol=0, atol=0)
