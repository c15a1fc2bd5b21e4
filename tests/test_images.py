"""sculpt.images: exact uint8 conversion, grid geometry, PNG and .npz round trips."""

import numpy as np
import pytest
import torch
from PIL import Image

from sculpt.images import (
    from_uint8,
    load_images,
    make_grid,
    pil_to_uint8,
    save_grid,
    save_images,
    save_trajectory,
    to_uint8,
)


def random_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images on the uint8 lattice, so that a PNG round trip is exact."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, h, w, c), generator=generator, dtype=torch.uint8)
    return from_uint8(pixels.numpy())


def test_to_uint8_exact_values():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0, float("nan"), 1 / 127.5 - 1])
    out = to_uint8(x.view(1, 1, 1, -1))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 9, 1)
    # (x + 1) * 127.5 = 0, 63.75, 127.5 (half to even -> 128), 191.25, 255, clamped, clamped,
    # NaN -> 0, 1.
    assert out[0, 0, :, 0].tolist() == [0, 64, 128, 191, 255, 255, 0, 0, 1]


def test_to_uint8_is_channels_last_and_inverts_from_uint8():
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    out = to_uint8(x)
    assert out.shape == (2, 4, 5, 3)
    assert out[1, 2, 3, 0] == round((x[1, 0, 2, 3].item() + 1) * 127.5)
    assert to_uint8(x[0]).shape == (4, 5, 3)
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(to_uint8(from_uint8(every_value)), every_value)
    assert from_uint8(every_value).min() == -1 and from_uint8(every_value).max() == 1


def test_make_grid_geometry_and_placement():
    images = random_images(10, 3, 5, 7)
    grid = make_grid(images)  # nrow = ceil(sqrt(10)) = 4, so 3 rows
    assert grid.shape == (3 * 5 + 4 * 1, 4 * 7 + 5 * 1, 3)
    tiles = to_uint8(images)
    # image 5 sits in row 1, column 1: top = 1 + (5 + 1), left = 1 + (7 + 1)
    np.testing.assert_array_equal(grid[7:12, 9:16], tiles[5])
    np.testing.assert_array_equal(grid[13:18, 1:8], tiles[8])  # row 2, column 0
    assert (grid[0] == 255).all() and (grid[:, 8] == 255).all()  # padding is white
    assert (grid[13:18, 17:] == 255).all()  # cells 10 and 11 are empty
    strip = make_grid(images, nrow=10, padding=0, pad_value=-1.0)
    assert strip.shape == (5, 70, 3)
    np.testing.assert_array_equal(strip[:, 14:21], tiles[2])
    assert make_grid(random_images(3, 1, 4, 4), padding=2, pad_value=-1.0)[0, 0, 0] == 0
    assert make_grid(random_images(3, 1, 4, 4), padding=2).shape == (
        2 * 4 + 3 * 2,
        2 * 4 + 3 * 2,
        1,
    )


def test_save_grid_png_round_trip_with_scale(tmp_path):
    images = random_images(4, 1, 8, 8)
    path = save_grid(tmp_path / "new" / "dir" / "grid.png", images, nrow=2, scale=3)
    picture = np.asarray(Image.open(path))
    assert picture.shape == (3 * (2 * 8 + 3), 3 * (2 * 8 + 3))
    np.testing.assert_array_equal(picture[::3, ::3], make_grid(images, nrow=2)[:, :, 0])
    np.testing.assert_array_equal(picture[2::3, 1::3], make_grid(images, nrow=2)[:, :, 0])


@pytest.mark.parametrize("channels", [1, 3])
def test_save_images_load_images_round_trip(tmp_path, channels):
    images = random_images(5, channels, 6, 9)
    paths = save_images(tmp_path / "samples", images[:3])
    paths += save_images(tmp_path / "samples", images[3:], start=3)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(5)]
    loaded = load_images(tmp_path / "samples")
    assert loaded.dtype == torch.float32 and loaded.shape == (5, channels, 6, 9)
    assert torch.equal(loaded, images)


def test_load_images_npz_forms(tmp_path):
    images = random_images(4, 3, 5, 5)
    np.savez(tmp_path / "u8.npz", images=to_uint8(images))
    np.savez(tmp_path / "f32.npz", images=images.numpy() * 1.0001)  # a hair out of range
    np.savez(tmp_path / "adm.npz", to_uint8(images))  # guided-diffusion style arr_0
    np.savez(tmp_path / "gray.npz", images=to_uint8(images[:, :1])[..., 0])  # [N, H, W]
    assert torch.equal(load_images(tmp_path / "u8.npz"), images)
    assert torch.equal(load_images(tmp_path / "adm.npz"), images)
    assert torch.allclose(load_images(tmp_path / "f32.npz"), images, atol=2e-4)
    assert load_images(tmp_path / "f32.npz").abs().max() <= 1
    assert torch.equal(load_images(tmp_path / "gray.npz"), images[:, :1])

    np.savez(tmp_path / "bytes_as_float.npz", images=to_uint8(images).transpose(0, 3, 1, 2) * 1.0)
    with pytest.raises(ValueError, match=r"expected values in \[-1, 1\]"):
        load_images(tmp_path / "bytes_as_float.npz")
    np.savez(tmp_path / "other.npz", x=1, y=2)
    with pytest.raises(ValueError, match="'images'"):
        load_images(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        load_images(tmp_path / "missing")


def test_load_images_refuses_mixed_sizes(tmp_path):
    save_images(tmp_path / "a", random_images(1, 3, 4, 4))
    save_images(tmp_path / "a", random_images(1, 3, 5, 4), start=1)
    with pytest.raises(ValueError, match="differ in size"):
        load_images(tmp_path / "a")


def test_pil_to_uint8_modes():
    transparent = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert (pil_to_uint8(transparent, 3) == 255).all()  # composited over white
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert pil_to_uint8(half, 3)[0, 0].tolist() == [127, 127, 127]
    deep = Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.uint16))
    assert pil_to_uint8(deep, 1)[0, :, 0].tolist() == [0, 255, 100]
    palette = Image.new("P", (1, 1), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    assert pil_to_uint8(palette, 3)[0, 0].tolist() == [200, 0, 0]
    assert pil_to_uint8(Image.new("RGB", (1, 1), (255, 0, 0)), 1)[0, 0, 0] == 76  # 0.299 * 255


def test_save_trajectory(tmp_path):
    x = random_images(3, 1, 4, 4, seed=1)  # one image at 3 steps
    x0_hat = random_images(3, 3, 4, 4, seed=2)  # RGB: the grey row is shown in colour too
    plain = np.asarray(Image.open(save_trajectory(tmp_path / "t.png", [x, x0_hat], scale=2)))
    grid = make_grid(torch.cat([x.expand(-1, 3, -1, -1), x0_hat]), nrow=3)
    np.testing.assert_array_equal(plain, grid.repeat(2, axis=0).repeat(2, axis=1))

    labelled = save_trajectory(
        tmp_path / "sub" / "l.png", [x, x0_hat], labels=["x", "x0_hat"], scale=2
    )
    labelled = np.asarray(Image.open(labelled))
    assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
    np.testing.assert_array_equal(labelled[:, -plain.shape[1] :], plain)
    assert (labelled[:, : -plain.shape[1]] < 128).any()  # some text was drawn
    with_columns = save_trajectory(
        tmp_path / "c.png", [x], column_labels=["80", "1.2", "0.0"], scale=4
    )
    assert Image.open(with_columns).height > 4 * (4 + 2)
    with pytest.raises(ValueError, match="same T"):
        save_trajectory(tmp_path / "bad.png", [x, x0_hat[:2]])
