"""Images in and out: tensors in [-1, 1] <-> uint8 arrays, PNG grids, folders and .npz files.

Every tensor here follows the library's convention: float, shape [N, C, H, W], values in
[-1, 1] (C = 1 for grayscale, 3 for RGB). Every array handed to or taken from Pillow or
NumPy files is uint8, shape [N, H, W, C] (or [H, W, C] for one picture).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

# Extensions (lower case) that `load_images` and sculpt.data's folder loader read.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Pillow modes that hold one channel of grey (with or without alpha).
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 array, channels last.

    Exactly: ``clamp(round((x + 1) * 127.5), 0, 255)``, with torch's round-half-to-even,
    so -1 -> 0, 0 -> 128 (127.5 rounds to the even 128), 1 -> 255, and every uint8 value v
    survives the trip ``v / 127.5 - 1 -> to_uint8``. NaN becomes 0 so that a grid of
    diverged samples can still be saved and looked at.

    Args:
        x: [N, C, H, W] (or one image, [C, H, W]).
    Returns:
        uint8 [N, H, W, C] (or [H, W, C]).
    """
    if x.ndim not in (3, 4):
        raise ValueError(f"to_uint8 expects [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    x = torch.nan_to_num(x.detach().float().cpu(), nan=-1.0)
    pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.movedim(-3, -1).numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] (or [H, W, C]) -> float32 [N, C, H, W] (or [C, H, W]) in [-1, 1]."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"from_uint8 expects a uint8 array, got {pixels.dtype}")
    pixels = np.require(pixels, requirements=["C", "W"])  # torch wants writable memory
    return torch.from_numpy(pixels).movedim(-1, -3).float() / 127.5 - 1.0


def pil_to_uint8(image: Image.Image, channels: int) -> np.ndarray:
    """A Pillow image of any mode -> uint8 [H, W, channels], channels 1 (grey) or 3 (RGB).

    Transparent pixels (RGBA, LA, palette with transparency) are composited over white, as
    a viewer shows them. 16-bit greys are scaled to 8 bits rather than clipped. The EXIF
    orientation tag, if any, is applied, so phone photos come out upright.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs open as I;16 (or I in older Pillow); 8-bit data stored wide stays as is.
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return pixels[:, :, None] if channels == 1 else pixels


def make_grid(
    images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0
) -> np.ndarray:
    """Tile images into one uint8 picture [H, W, C], row by row.

    Args:
        images: [N, C, H, W] in [-1, 1].
        nrow: images per row; by default ceil(sqrt(N)), a near-square grid.
        padding: pixels between images and around the border.
        pad_value: value of the padding and of empty cells, in [-1, 1] (1 = white).
    Returns:
        uint8 array of shape [rows*h + (rows+1)*padding, nrow*w + (nrow+1)*padding, C],
        where rows = ceil(N / nrow).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"make_grid expects [N, C, H, W] with N >= 1, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = min(n, nrow if nrow is not None else math.ceil(math.sqrt(n)))
    if nrow < 1 or padding < 0:
        raise ValueError(f"need nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    rows = math.ceil(n / nrow)
    pad = to_uint8(torch.full((c, 1, 1), float(pad_value)))[0, 0]
    grid = np.empty((rows * h + (rows + 1) * padding, nrow * w + (nrow + 1) * padding, c), np.uint8)
    grid[:] = pad
    for i, tile in enumerate(to_uint8(images)):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = tile
    return grid


def _to_pil(pixels: np.ndarray, scale: int = 1) -> Image.Image:
    """uint8 [H, W, C] -> Pillow image, enlarged `scale` times by nearest neighbour."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def save_grid(
    path: str | Path,
    images: torch.Tensor,
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 1,
) -> Path:
    """Write `make_grid(images, nrow, padding)` as a PNG, enlarged `scale` times.

    The enlargement is nearest neighbour, so 8x8 digits stay crisp at scale 8. Parent
    folders are created. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(make_grid(images, nrow=nrow, padding=padding), scale).save(path)
    return path


def save_images(folder: str | Path, images: torch.Tensor, start: int = 0) -> list[Path]:
    """Write one PNG per image: folder/000000.png, 000001.png, ... (numbered from `start`).

    `start` lets a sampler write a large set batch by batch into one folder. Returns the
    paths written, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(to_uint8(images), start=start):
        paths.append(folder / f"{i:06d}.png")
        _to_pil(pixels).save(paths[-1])
    return paths


def load_images(path: str | Path) -> torch.Tensor:
    """Read a set of images into one float tensor [N, C, H, W] in [-1, 1].

    `path` is either
      - a folder: every PNG/JPEG/WebP/BMP in it (recursively, sorted by path), all of one
        size; C is 1 if every file is greyscale, else 3. Nothing is resized.
      - an .npz file holding an array `images` (or, as written by numpy.savez(file, x),
        a single array `arr_0`) that is either uint8 [N, H, W, C] / [N, H, W] (0..255) or
        float [N, C, H, W] / [N, H, W] in [-1, 1]. Floats are clamped to [-1, 1]; floats
        that reach past 2 look like 0..255 and are refused.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no such file or folder: {path} (expected a folder of images or an .npz)"
        )
    if path.is_dir():
        return _load_image_folder(path)
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    raise ValueError(f"cannot load images from {path}: expected a folder of images or an .npz file")


def _load_image_folder(folder: Path) -> torch.Tensor:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    opened = [Image.open(p) for p in files]
    try:
        channels = 1 if all(im.mode in GRAYSCALE_MODES for im in opened) else 3
        sizes = {im.size for im in opened}
        if len(sizes) > 1:
            raise ValueError(
                f"images under {folder} differ in size ({sorted(sizes)[:4]}...); load_images "
                "does not resize: use sculpt.data.load_dataset to resize and crop"
            )
        pixels = np.stack([pil_to_uint8(im, channels) for im in opened])
    finally:
        for im in opened:
            im.close()
    return from_uint8(pixels)


def _load_npz(path: Path) -> torch.Tensor:
    with np.load(path) as archive:
        keys = list(archive.keys())
        if "images" in keys:
            array = archive["images"]
        elif keys == ["arr_0"]:
            array = archive["arr_0"]
        else:
            raise ValueError(f"{path} has arrays {keys}; expected one named 'images'")
    if array.ndim == 3:  # [N, H, W]: greyscale without a channel axis
        array = array[:, None] if array.dtype != np.uint8 else array[..., None]
    if array.ndim != 4:
        raise ValueError(f"{path}: images must be 4-D, got shape {array.shape}")
    if array.dtype == np.uint8:
        if array.shape[-1] not in (1, 3):
            raise ValueError(
                f"{path}: uint8 images must be [N, H, W, C] with C 1 or 3, got {array.shape}"
            )
        return from_uint8(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: images must be uint8 or float, got {array.dtype}")
    if array.shape[1] not in (1, 3):
        raise ValueError(
            f"{path}: float images must be [N, C, H, W] with C 1 or 3, got {array.shape}"
        )
    if array.size and np.nanmax(np.abs(array)) > 2:
        raise ValueError(
            f"{path}: float images reach {np.nanmax(np.abs(array)):.4g}; "
            "expected values in [-1, 1] "
            "(store 0..255 data as uint8 [N, H, W, C])"
        )
    return torch.from_numpy(array.astype(np.float32)).clamp(-1, 1)


def save_trajectory(
    path: str | Path,
    rows: Sequence[torch.Tensor],
    labels: Sequence[str] | None = None,
    scale: int = 4,
    column_labels: Sequence[str] | None = None,
) -> Path:
    """Draw how images change along a sampling run: one column per recorded step.

    Args:
        rows: each a tensor [T, C, H, W] in [-1, 1] holding one image at T steps (for
            example x at each step, then x0_hat at each step). All rows share T, H and W;
            greyscale rows are shown in colour when any row is RGB.
        labels: optional text for each row, drawn at its left.
        scale: nearest-neighbour enlargement of the pictures (not of the text).
        column_labels: optional text for each column (for example sigma), drawn on top.
    Returns the path written (PNG; parent folders are created).
    """
    if not rows:
        raise ValueError("save_trajectory needs at least one row")
    shapes = {(r.shape[0], r.shape[2], r.shape[3]) for r in rows if r.ndim == 4}
    if len(shapes) != 1 or any(r.ndim != 4 for r in rows):
        raise ValueError(
            "every row must be [T, C, H, W] with the same T, H, W; "
            f"got {[tuple(r.shape) for r in rows]}"
        )
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")
    steps = rows[0].shape[0]
    if column_labels is not None and len(column_labels) != steps:
        raise ValueError(f"got {len(column_labels)} column labels for {steps} columns")
    channels = max(r.shape[1] for r in rows)
    stacked = torch.cat([r.detach().float().cpu().expand(-1, channels, -1, -1) for r in rows])
    picture = _to_pil(make_grid(stacked, nrow=steps), scale).convert("RGB")

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    margin = 4
    left_width = max((text_size(t)[0] for t in labels), default=0) + 2 * margin if labels else 0
    top_height = (
        max((text_size(t)[1] for t in column_labels), default=0) + 2 * margin
        if column_labels
        else 0
    )
    canvas = Image.new("RGB", (picture.width + left_width, picture.height + top_height), "white")
    canvas.paste(picture, (left_width, top_height))
    draw = ImageDraw.Draw(canvas)
    cell_h = rows[0].shape[2] * scale + scale  # one image plus one (scaled) padding pixel
    cell_w = rows[0].shape[3] * scale + scale
    for i, text in enumerate(labels or []):
        y = top_height + scale + i * cell_h + (cell_h - scale - text_size(text)[1]) // 2
        draw.text((margin, y), text, fill="black", font=font)
    for j, text in enumerate(column_labels or []):
        x = left_width + scale + j * cell_w + (cell_w - scale - text_size(text)[0]) // 2
        draw.text((x, margin), text, fill="black", font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
