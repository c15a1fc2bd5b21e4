"""Datasets of images, and an exactly resumable stream of shuffled batches.

`load_dataset(spec)` reads a dataset named by a short string:

    digits                   scikit-learn's 8x8 handwritten digits (built in, offline)
    mnist:PATH               MNIST IDX files (train-images-idx3-ubyte[.gz], ...)
    fashion_mnist:PATH       Fashion-MNIST, same IDX layout
    cifar10:PATH             CIFAR-10, binary version (data_batch_1.bin ... test_batch.bin)
    PATH or folder:PATH      a folder of PNG/JPEG/WebP/BMP images, searched recursively
    FILE.tar or tar:PATH     WebDataset-style tar shards: one .tar, or a folder of them, of
                             KEY.png / KEY.jpg ... members with an optional KEY.cls label
    hf:NAME                  a Hugging Face dataset (needs `pip install sculpt[datasets]`)

Small sets are held in memory as one uint8 tensor [N, C, H, W] (`ImageDataset`), so a
batch is one indexing operation and a float conversion, with no worker processes. Sets
larger than `memory_limit` bytes (or any set, with `stream=True`) stay on disk
(`StreamingDataset`): images are decoded, resized and flipped in `DataLoader` worker
processes, and only the batches in flight are in memory. IDX and CIFAR-10 files are
uint8 already (CIFAR-10 is 150 MB), so they are always read into memory.

`batches(dataset, batch_size, generator=...)` yields shuffled batches forever, from memory
or from disk alike; its state (seed, epoch, index) saved in a checkpoint rebuilds the
identical continuation, under any number of processes.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import signal
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from sculpt.images import GRAYSCALE_MODES, IMAGE_EXTENSIONS, pil_to_uint8, to_uint8

SPEC_FORMS = (
    "'digits', 'mnist:PATH', 'fashion_mnist:PATH', 'cifar10:PATH', "
    "'folder:PATH' (or a bare folder path), 'tar:PATH' (or a bare .tar file), 'hf:NAME'"
)
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
DIGITS_TEST_SIZE = 297  # the last 297 of scikit-learn's 1797 digits are the test split
MEMORY_LIMIT = 2 << 30  # bytes of uint8 pixels above which a set is streamed from disk


def default_workers() -> int:
    """Decoding processes for a streamed set: the cores this process may use, less one for the loop, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


@dataclass(eq=False)  # compare datasets by identity: == on tensors is elementwise
class ImageDataset(Dataset):
    """Images and labels held in memory, as uint8.

    pixels: uint8 [N, C, H, W], value v standing for v / (max_value / 2) - 1 in [-1, 1]
    (max_value is 255, or 16 for scikit-learn's digits, whose 17 levels are kept exactly),
    or float32 values held as they are (a latent cache, ``sculpt.latent``);
    labels: int64 [N] (all 0 when unlabelled); num_classes: 0 when the dataset has no
    labels; class_names[k] names label k. `images(rows)` gives float32 images in [-1, 1].
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = ""
    max_value: int = 255

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4 or self.pixels.dtype not in (torch.uint8, torch.float32):
            raise ValueError(
                "pixels must be uint8 [N, C, H, W], or float32 values held as they are (latents); "
                "ImageDataset.from_images quantises float images, "
                f"got {self.pixels.dtype} {tuple(self.pixels.shape)}"
            )
        _check_labels(self.labels, self.pixels.shape[0])
        if not 1 <= self.max_value <= 255:
            raise ValueError(f"max_value must be in 1..255, got {self.max_value}")

    @classmethod
    def from_images(
        cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, class_names=None, name: str = ""
    ) -> ImageDataset:
        """Float images [N, C, H, W] in [-1, 1], quantised to 8 bits exactly as `sculpt.images.to_uint8`."""
        pixels = torch.from_numpy(to_uint8(images)).movedim(-1, 1).contiguous()
        return cls(pixels, labels, num_classes, list(class_names or []), name)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_float(self.pixels[index]), self.labels[index]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.pixels.shape[1:])

    def to_float(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels of this dataset -> float32 in [-1, 1] (v / (max_value / 2) - 1, in place after one copy).

        A float32 dataset (a latent cache) holds its values as they are: they pass through.
        """
        if pixels.dtype == torch.float32:
            return pixels
        return pixels.to(torch.float32).div_(self.max_value / 2).sub_(1.0)

    def images(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """float32 [n, C, H, W] in [-1, 1] of the given rows (all of them by default)."""
        return self.to_float(self.pixels if rows is None else self.pixels[rows])

    def read(self, index: int) -> torch.Tensor:
        """uint8 [C, H, W] of one image (the interface `StreamingDataset` shares)."""
        return self.pixels[index]


def _check_labels(labels: torch.Tensor, n: int) -> None:
    if labels.shape != (n,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")


class StreamingDataset(Dataset):
    """Images that stay on disk: each is decoded, converted and resized when it is read.

    The index (files, or tar members and their offsets) and the labels are in memory; a
    read opens one file (or seeks to one tar member), so it works in any process. The
    images are all the same (C, H, W) after the centred square crop and resize.
    """

    max_value = 255

    def __init__(
        self,
        source: _Source,
        labels: torch.Tensor,
        num_classes: int,
        class_names: list[str],
        name: str,
        shape: tuple[int, int, int],
    ):
        _check_labels(labels, len(source))
        self.source, self.labels, self.num_classes = source, labels, num_classes
        self.class_names, self.name, self.shape = class_names, name, tuple(shape)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_float(self.read(index)), self.labels[index]

    def to_float(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32).div_(127.5).sub_(1.0)

    def read(self, index: int) -> torch.Tensor:
        """uint8 [C, H, W] of image `index`; raises what the decoder raises for a broken file."""
        channels, resolution, _ = self.shape
        return _decode(self.source.open(index), resolution, channels)

    def images(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """float32 [n, C, H, W] in [-1, 1] of the given rows, decoded now (all rows: a whole pass)."""
        indices = torch.arange(len(self))[slice(None) if rows is None else rows]
        return self.to_float(torch.stack([self.read(int(i)) for i in indices.reshape(-1)]))

    def describe(self, index: int) -> str:
        return self.source.describe(index)


AnyDataset = ImageDataset | StreamingDataset


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    spec: str,
    *,
    resolution: int | None = None,
    split: str = "train",
    channels: int | None = None,
    labels_from_folders: bool | None = None,
    stream: bool | None = None,
    memory_limit: int = MEMORY_LIMIT,
    workers: int | None = None,
    progress: bool = False,
) -> AnyDataset:
    """Load the dataset named by `spec` (see the module docstring for the forms).

    Args:
        resolution: side of the square images returned. Built-in datasets keep their own
            size (digits 8, MNIST 28, CIFAR-10 32) unless given, and are then resized with
            antialiased bicubic interpolation. Folders, tar shards and hf: default to the
            shorter side of their smallest image (so nothing is enlarged); giving it (and
            `channels`) spares a pass over every file's header.
        split: "train" or "test" (folders and tar shards ignore it; hf: passes it on).
        channels: 1 or 3 to force greyscale or RGB; by default a dataset keeps its own
            (folders, tar shards and hf: 1 if every image is greyscale, else 3).
        labels_from_folders: for folders, label images by their first-level subfolder, and
            for tar shards by their .cls members. True: labels are required, and a layout
            that cannot give every image one is refused; False: no labels; None (the
            default): labels when every image has one, else the set is unlabelled.
        stream: keep images on disk and decode them when read (a `StreamingDataset`); by
            default only folders, tar shards and hf: sets over `memory_limit` bytes of uint8.
        workers: processes decoding images when a folder, tar or hf: set is read into
            memory (default `default_workers()`).
        progress: show a progress bar while files are scanned or decoded.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
    files = dict(labels=labels_from_folders, stream=stream, memory_limit=memory_limit, workers=workers)
    files["progress"] = progress
    builtin = spec == "digits" or spec.partition(":")[0] in ("mnist", "fashion_mnist", "cifar10")
    if stream and builtin:
        warnings.warn(
            f"{spec}: digits, IDX and CIFAR-10 sets are held in memory as uint8 (60,000 MNIST images are "
            "47 MB, CIFAR-10 150 MB), so data.stream=true is not needed for them and is ignored",
            stacklevel=2,
        )
    if spec == "digits":
        dataset = _load_digits(split)
    else:
        prefix, colon, rest = spec.partition(":")
        if colon and prefix in ("mnist", "fashion_mnist"):
            class_names = MNIST_CLASSES if prefix == "mnist" else FASHION_MNIST_CLASSES
            dataset = _load_idx(Path(rest), split, prefix, class_names)
        elif colon and prefix == "cifar10":
            dataset = _load_cifar10(Path(rest), split)
        elif colon and prefix == "hf":
            return _from_source(_hf_source(rest, split), resolution, channels, f"{rest}-{split}", **files)
        elif colon and prefix == "folder":
            return _from_source(_folder_source(Path(rest)), resolution, channels, Path(rest).name, **files)
        elif colon and prefix == "tar":
            return _from_source(_tar_source(Path(rest)), resolution, channels, Path(rest).stem, **files)
        elif not colon or Path(spec).exists():  # a bare path (C:\... on Windows has a colon)
            path = Path(spec)
            if not path.exists():
                raise FileNotFoundError(f"no dataset '{spec}': not a folder, nor one of {SPEC_FORMS}")
            tars = path.suffix == ".tar" or (
                path.is_dir() and any(path.glob("*.tar")) and not _has_images_directly(path)
            )
            source = _tar_source(path) if tars else _folder_source(path)
            return _from_source(source, resolution, channels, path.stem if tars else path.name, **files)
        else:
            raise ValueError(f"unknown dataset spec '{spec}'; valid forms are {SPEC_FORMS}")
    if labels_from_folders is False:
        dataset.labels, dataset.num_classes, dataset.class_names = torch.zeros_like(dataset.labels), 0, []
    return _set_size(dataset, resolution, channels)


def _has_images_directly(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file())


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")


def _set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Grey -> RGB by repetition; RGB -> grey by ITU-R 601 luma, as Pillow's convert('L')."""
    if channels is None or channels == images.shape[1]:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    return (images * luma).sum(dim=1, keepdim=True)


def _set_size(dataset: ImageDataset, resolution: int | None, channels: int | None) -> ImageDataset:
    """Channels and resolution of a built-in set: exact when only grey -> RGB, else re-quantised to 8 bits."""
    if channels == 3:
        dataset.pixels = _set_channels(dataset.pixels, 3)  # repetition: exact, and keeps max_value
    if (channels is None or channels == dataset.pixels.shape[1]) and resolution in (None, dataset.pixels.shape[-1]):
        return dataset
    images = _set_channels(dataset.images(), channels)
    if resolution is not None and resolution != images.shape[-1]:
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False
        ).clamp(-1, 1)  # bicubic overshoots at sharp edges
    return ImageDataset.from_images(images, dataset.labels, dataset.num_classes, dataset.class_names, dataset.name)


# ----------------------------------------------------------------------------- built-in sets


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' images [1797, 8, 8] and labels [1797], read from scikit-learn's own data file.

    Importing ``sklearn`` (SciPy and all) takes about 3 s, longer than a short training run's
    set-up; the file it reads (``sklearn/datasets/data/digits.csv.gz``: 64 pixels then the
    label per row) is located without importing it. Falls back to ``load_digits`` if the
    package keeps its data elsewhere.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ModuleNotFoundError(
            "the digits dataset comes with scikit-learn: pip install scikit-learn (or pip install sculpt)"
        )
    for root in spec.submodule_search_locations or ():
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _load_digits(split: str) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits, values 0..16 (stored as such: max_value 16); the last 297 are "test"."""
    _check_split(split)
    images, target = _digits_arrays()
    pixels = torch.from_numpy(images.astype(np.uint8))
    labels = torch.from_numpy(target.astype(np.int64))
    part = slice(None, -DIGITS_TEST_SIZE) if split == "train" else slice(-DIGITS_TEST_SIZE, None)
    return ImageDataset(
        pixels[part, None].contiguous(), labels[part].contiguous(), 10, MNIST_CLASSES[:], f"digits-{split}", 16
    )


def _read_maybe_gzipped(folder: Path, name: str) -> tuple[bytes, Path]:
    """Bytes of folder/name.gz or folder/name, whichever exists (gzip preferred)."""
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                return f.read(), path
    raise FileNotFoundError(f"no {name}[.gz] in {folder}")


def _parse_idx(data: bytes, path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: big-endian magic, ndim uint32 sizes, then data."""
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path}: bad IDX magic number {found} (0x{found:08x}); "
            f"expected {magic} (0x{magic:08x})"
        )
    sizes = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header_size + math.prod(sizes)
    if len(data) != expected:
        raise ValueError(
            f"{path}: header says sizes {sizes} ({expected} bytes), "
            f"but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(sizes)


def _load_idx(folder: Path, split: str, name: str, class_names: list[str]) -> ImageDataset:
    """(Fashion-)MNIST from the standard IDX files: magic 2051 for images, 2049 for labels."""
    _check_split(split)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name}: no folder {folder} (expected the IDX files of {name} inside)"
        )
    stem = "train" if split == "train" else "t10k"
    image_bytes, image_path = _read_maybe_gzipped(folder, f"{stem}-images-idx3-ubyte")
    label_bytes, label_path = _read_maybe_gzipped(folder, f"{stem}-labels-idx1-ubyte")
    pixels = _parse_idx(image_bytes, image_path, 2051, 3)  # [N, H, W]
    labels = _parse_idx(label_bytes, label_path, 2049, 1)  # [N]
    if len(labels) != len(pixels):
        raise ValueError(
            f"{image_path} holds {len(pixels)} images but {label_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(class_names):
        raise ValueError(
            f"{label_path}: label {labels.max()} out of range 0..{len(class_names) - 1}"
        )
    return ImageDataset(
        torch.from_numpy(pixels[:, None].copy()),
        torch.from_numpy(labels.astype(np.int64)),
        10,
        class_names[:],
        f"{name}-{split}",
    )


def _load_cifar10(folder: Path, split: str) -> ImageDataset:
    """CIFAR-10, binary version: records of 1 label byte + 3072 bytes (R, G, B planes, 32x32)."""
    _check_split(split)
    if (folder / "cifar-10-batches-bin").is_dir():  # the folder the archive unpacks to
        folder = folder / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10: {folder} lacks {', '.join(missing)} "
            "(expected the binary version of CIFAR-10)"
        )
    records = []
    for name in names:
        data = np.fromfile(folder / name, dtype=np.uint8)
        if data.size == 0 or data.size % 3073:
            raise ValueError(
                f"{folder / name}: {data.size} bytes is not a whole number "
                "of 3073-byte CIFAR-10 records"
            )
        records.append(data.reshape(-1, 3073))
    table = np.concatenate(records)
    labels = table[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise ValueError(f"cifar10: label {labels.max()} out of range 0..9 in {folder}")
    pixels = np.ascontiguousarray(table[:, 1:]).reshape(-1, 3, 32, 32)  # channel planes, rows, columns
    return ImageDataset(
        torch.from_numpy(pixels), torch.from_numpy(labels), 10, CIFAR10_CLASSES[:], f"cifar10-{split}"
    )


# ----------------------------------------------------------------------------- decoding


def _resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side equals `resolution`, then take the centred square.

    Done as one Lanczos resampling of the centred square of the source (Pillow's `box`),
    which is the same as resize-then-crop without rounding the intermediate size.
    Lanczos in Pillow widens its kernel when shrinking, so the result is antialiased.
    """
    width, height = image.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)


def _image_to_uint8(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """One Pillow image -> uint8 [resolution, resolution, channels], resized and cropped."""
    # Convert before resampling: Lanczos needs L or RGB, and alpha must be composited first.
    pixels = pil_to_uint8(image, channels)
    if pixels.shape[:2] == (resolution, resolution):
        return pixels  # already the size asked for: the resampling would be the identity
    converted = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    return pil_to_uint8(_resize_and_crop(converted, resolution), channels)


def _decode(opened, resolution: int, channels: int) -> torch.Tensor:
    """A path, a file object or a Pillow image -> uint8 [channels, resolution, resolution]."""
    if isinstance(opened, Image.Image):
        pixels = _image_to_uint8(opened, resolution, channels)
    else:
        with Image.open(opened) as image:
            image.load()
            pixels = _image_to_uint8(image, resolution, channels)
    pixels = np.require(pixels, requirements=["W"])  # Pillow's arrays are read-only; torch wants writable
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class _Source:
    """Where the images of a folder, tar or hf: set are: `open(i)` gives something Pillow reads."""

    root: Path | str
    labels: list | None  # a label per image (class name or number), or None for an image without one

    def __len__(self) -> int:
        raise NotImplementedError

    def open(self, index: int):
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def header(self, index: int) -> tuple[tuple[int, int], str]:
        """(size, mode) of image `index`, reading no more than its header where the format allows."""
        opened = self.open(index)
        if isinstance(opened, Image.Image):
            return opened.size, opened.mode
        with Image.open(opened) as image:
            return image.size, image.mode

    def subset(self, keep: list[int]) -> _Source:
        raise NotImplementedError


class _FileSource(_Source):
    def __init__(self, root: Path, paths: list[str], labels: list | None):
        self.root, self.paths, self.labels = root, paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, index: int):
        return self.root / self.paths[index]

    def describe(self, index: int) -> str:
        return self.paths[index]

    def subset(self, keep: list[int]) -> _FileSource:
        return _FileSource(self.root, [self.paths[i] for i in keep], _pick(self.labels, keep))


class _TarSource(_Source):
    """Members of tar shards, read by offset: open, seek, read one member's bytes."""

    def __init__(self, root: Path, shards: list[str], members: np.ndarray, names: list[str], labels: list | None):
        self.root, self.shards, self.names, self.labels = root, shards, names, labels
        self.members = members  # int64 [N, 3]: shard number, data offset, size

    def __len__(self) -> int:
        return len(self.members)

    def open(self, index: int):
        shard, offset, size = (int(v) for v in self.members[index])
        with open(self.shards[shard], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise OSError(f"{self.describe(index)}: the shard ends {size - len(data)} bytes early (truncated?)")
        return io.BytesIO(data)

    def describe(self, index: int) -> str:
        return f"{Path(self.shards[int(self.members[index, 0])]).name}:{self.names[index]}"

    def subset(self, keep: list[int]) -> _TarSource:
        names, labels = [self.names[i] for i in keep], _pick(self.labels, keep)
        return _TarSource(self.root, self.shards, self.members[keep], names, labels)


class _HFSource(_Source):
    """Rows of a Hugging Face table, decoded by `datasets` when read."""

    def __init__(self, root: str, table, column: str, rows: np.ndarray, labels: list | None, class_names):
        self.root, self.table, self.column, self.rows, self.labels = root, table, column, rows, labels
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.rows)

    def open(self, index: int):
        return self.table[int(self.rows[index])][self.column]

    def describe(self, index: int) -> str:
        return f"row {int(self.rows[index])}"

    def subset(self, keep: list[int]) -> _HFSource:
        labels = _pick(self.labels, keep)
        return _HFSource(self.root, self.table, self.column, self.rows[keep], labels, self.class_names)


def _pick(labels: list | None, keep: list[int]) -> list | None:
    return None if labels is None else [labels[i] for i in keep]


# ----------------------------------------------------------------------------- folders, tar shards, hf:


def _folder_source(folder: Path) -> _FileSource:
    """Every image file under `folder`, recursively, sorted; its label is its first-level subfolder."""
    what = f"a folder of {'/'.join(IMAGE_EXTENSIONS)} images"
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder} (expected {what})")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (expected {what})")
    paths = []
    for directory, subfolders, names in os.walk(folder):  # scandir: no stat per file (links to folders: not followed)
        subfolders.sort()
        relative = os.path.relpath(directory, folder)
        prefix = "" if relative == "." else relative + os.sep
        paths += [prefix + name for name in names if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    paths.sort()
    if not paths:
        raise ValueError(f"no images under {folder} (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    labels = [path.split(os.sep, 1)[0] if os.sep in path else None for path in paths]
    return _FileSource(folder, paths, labels)


def _tar_source(path: Path) -> _TarSource:
    """Index WebDataset-style shards once: where each KEY.{png,jpg,...} member's bytes are, and KEY.cls."""
    if not path.exists():
        raise FileNotFoundError(f"no such tar file or folder of tar shards: {path}")
    shards = [path] if path.is_file() else sorted(path.glob("*.tar"))
    if not shards:
        raise ValueError(f"no .tar shards in {path} (expected shard-000000.tar ... of KEY.png / KEY.cls members)")
    members, names, keys, cls = [], [], [], {}
    for number, shard in enumerate(shards):
        for name, offset, size, read in _tar_members(shard):
            directory, _, base = name.rpartition("/")
            stem, _, extensions = base.partition(".")  # WebDataset: the key ends at the first dot
            key = (number, f"{directory}/{stem}")
            if "." + extensions.lower() in IMAGE_EXTENSIONS:
                members.append((number, offset, size))
                names.append(name)
                keys.append(key)
            elif extensions == "cls":
                cls[key] = read().decode().strip()
    if not members:
        raise ValueError(f"no image members in {path} (expected KEY.png / KEY.jpg ... inside the tar shards)")
    labels = [cls.get(key) for key in keys]
    return _TarSource(path, [str(s) for s in shards], np.array(members, dtype=np.int64), names, labels)


def _tar_members(shard: Path):
    """(name, data offset, size, read()) of each regular file in an uncompressed tar.

    Plain ustar headers are read and parsed directly, 512 bytes each with `os.pread` (about
    3x faster than tarfile on 100,000 small members, and nothing mapped: memory stays flat);
    a shard with anything else (pax or GNU long-name headers, base-256 sizes) is read with
    tarfile instead.
    """
    with open(shard, "rb") as handle:
        fd, end = handle.fileno(), os.fstat(handle.fileno()).st_size
        found, offset, simple = [], 0, True
        while offset + 512 <= end:
            header = os.pread(fd, 512, offset)
            if header.count(0) == 512:
                break  # the end-of-archive blocks
            kind, size_field, magic = header[156:157], header[124:136], header[257:262]
            if kind not in (b"0", b"\0", b"5") or size_field[0] & 0x80 or magic not in (b"ustar", b"\0" * 5):
                simple = False
                break
            try:
                size = int(size_field.rstrip(b" \0").strip() or b"0", 8)
            except ValueError:
                simple = False
                break
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if magic == b"ustar" else ""
            if kind != b"5":
                start = offset + 512
                full = f"{prefix}/{name}" if prefix else name
                found.append((full, start, size, lambda a=start, b=size: os.pread(fd, b, a)))
            offset += 512 + (size + 511) // 512 * 512
        if simple:
            yield from found
            return
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: members must be seekable
            for member in tar:
                if member.isfile():
                    yield member.name, member.offset_data, member.size, tar.extractfile(member).read
    except tarfile.ReadError as error:
        raise ValueError(
            f"{shard} is not an uncompressed tar file ({error}); unpack .tar.gz shards first"
        ) from error


def _hf_source(name: str, split: str) -> _HFSource:
    """A Hugging Face dataset: its first Image column, and a ClassLabel (or 'label') column."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"hf:{name} needs the Hugging Face datasets package: pip install sculpt[datasets]"
        ) from error

    table = datasets.load_dataset(name, split=split)
    features = table.features
    image_columns = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if not image_columns:
        raise ValueError(f"hf:{name} has no image column (columns: {list(features)})")
    label_columns = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
    label_columns += [k for k in ("label", "labels") if k in features and k not in label_columns]
    rows = np.arange(len(table))
    if not label_columns:
        return _HFSource(f"hf:{name}", table, image_columns[0], rows, None, None)
    values = list(table[label_columns[0]])
    feature = features[label_columns[0]]
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return _HFSource(f"hf:{name}", table, image_columns[0], rows, values, class_names)


def _numbered_labels(source: _Source, required: bool | None) -> tuple[torch.Tensor, list[str]]:
    """int64 labels and class names from the source's per-image labels (see `load_dataset`)."""
    n, raw = len(source), source.labels
    present = [] if raw is None else [value for value in raw if value is not None]
    if required is False or not present or (required is None and len(present) < n):
        return torch.zeros(n, dtype=torch.int64), []
    if len(present) < n:
        missing = next(i for i, value in enumerate(raw) if value is None)
        if isinstance(source, _FileSource):
            names = sorted(set(present))
            problem = (
                f"{source.root} has class subfolders {names[:5]} but also {n - len(present)} images directly "
                f"inside it (e.g. {source.describe(missing)})"
            )
        else:
            problem = (
                f"{n - len(present)} of the {n} images of {source.root} have no label "
                f"(e.g. {source.describe(missing)})"
            )
        raise ValueError(
            f"{problem}: class conditioning (--model.class_cond=true) needs a class for every image. "
            "Move them into a class folder (or give them a .cls), or train unconditionally "
            "(--model.class_cond=false), which uses every image whatever the layout."
        )
    class_names = getattr(source, "class_names", None)
    if class_names is not None:
        return torch.tensor(raw, dtype=torch.int64), list(class_names)
    if all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in raw) and not isinstance(
        source, _FileSource
    ):  # numbered classes (.cls members, integer columns): label k is class k
        values = [int(v) for v in raw]
        return torch.tensor(values, dtype=torch.int64), [str(k) for k in range(max(values) + 1)]
    class_names = sorted({str(v) for v in raw})  # names: numbered in sorted order
    index = {name: i for i, name in enumerate(class_names)}
    return torch.tensor([index[str(v)] for v in raw], dtype=torch.int64), class_names


class _Headers(Dataset):
    def __init__(self, source: _Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return index, self.source.header(index), None
        except Exception as error:  # any decoder error means "unreadable"
            return index, None, f"{type(error).__name__}: {error}"


class _Decoded(Dataset):
    def __init__(self, source: _Source, resolution: int, channels: int):
        self.source, self.resolution, self.channels = source, resolution, channels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return index, _decode(self.source.open(index), self.resolution, self.channels), None
        except Exception as error:  # truncated or undecodable pixel data
            return index, None, f"{type(error).__name__}: {error}"


def _map(dataset: Dataset, workers: int, desc: str, progress: bool):
    """dataset[0], dataset[1], ... in order, computed by `workers` processes (0: here)."""
    from tqdm.auto import tqdm

    workers = min(workers, max(len(dataset) // 256, 0))  # small sets: worker start-up costs more
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=64,
        num_workers=workers,
        collate_fn=list,
        worker_init_fn=_quiet_worker if workers else None,
    )
    with tqdm(total=len(dataset), desc=desc, disable=not progress, unit="img", leave=False) as bar:
        for chunk in loader:
            yield from chunk
            bar.update(len(chunk))


def _from_source(
    source: _Source,
    resolution: int | None,
    channels: int | None,
    name: str,
    *,
    labels: bool | None,
    stream: bool | None,
    memory_limit: int,
    workers: int | None,
    progress: bool,
) -> AnyDataset:
    """A folder / tar / hf: set, in memory when small (or asked), else streamed from disk."""
    workers = default_workers() if workers is None else workers
    skipped: list[tuple[str, str]] = []
    if resolution is None or channels is None:
        # One pass over the headers (size, mode): cheap, and finds most broken files.
        sizes, modes, keep = [], [], []
        for index, header, error in _map(_Headers(source), workers, "scanning", progress):
            if header is None:
                skipped.append((source.describe(index), error))
            else:
                sizes.append(min(header[0]))
                modes.append(header[1])
                keep.append(index)
        if skipped:
            source = source.subset(keep)
        if not keep:
            _warn_skipped(skipped, source.root)
            raise ValueError(f"none of the {len(skipped)} image files under {source.root} could be read")
        channels = channels or (1 if all(mode in GRAYSCALE_MODES for mode in modes) else 3)
        resolution = resolution or min(sizes)
    shape = (channels, resolution, resolution)
    if stream is None:
        stream = len(source) * math.prod(shape) > memory_limit
    if stream:
        _warn_skipped(skipped, source.root)
        label_values, class_names = _numbered_labels(source, labels)
        return StreamingDataset(source, label_values, len(class_names), class_names, name, shape)

    # In memory: decode everything once (the second pass; a file can still fail here: truncated data).
    pixels = torch.empty((len(source), *shape), dtype=torch.uint8)
    keep = []
    for index, image, error in _map(_Decoded(source, resolution, channels), workers, "decoding", progress):
        if image is None:
            skipped.append((source.describe(index), error))
        else:
            pixels[len(keep)] = image
            keep.append(index)
    _warn_skipped(skipped, source.root)
    if not keep:
        raise ValueError(f"none of the {len(skipped)} image files under {source.root} could be read")
    if len(keep) < len(source):
        source, pixels = source.subset(keep), pixels[: len(keep)].clone()
    label_values, class_names = _numbered_labels(source, labels)
    return ImageDataset(pixels, label_values, len(class_names), class_names, name)


def _warn_skipped(skipped: list[tuple[str, str]], root) -> None:
    if skipped:
        what, error = skipped[0]
        warnings.warn(
            f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} under {root}, "
            f"e.g. {what}: {error}",
            stacklevel=4,
        )


def _quiet_worker(worker_id: int) -> None:
    """Decoding workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly after its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------- batches


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends on (seed, epoch) only, so any epoch can be rebuilt alone.

    NumPy's SeedSequence hashes the pair, so runs whose seeds differ by one do not replay
    each other's epochs shifted by one (as manual_seed(seed + epoch) would).
    """
    mixed = np.random.SeedSequence((seed, epoch)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


class BatchSampler:
    """An endless stream of shuffled indices, cut into batches, exactly resumable.

    The stream is perm_0 ++ perm_1 ++ ..., where perm_e, a random permutation of range(N),
    is drawn from `_epoch_generator(seed, e)`. Batches are consecutive slices of batch_size
    and may straddle an epoch boundary, so every batch is full and every sample is seen
    exactly once per epoch. With hflip, each position of an epoch also draws a coin from
    the same generator (after the permutation) saying whether to mirror that sample.

    The whole state is (seed, epoch, index): index is the position within epoch's
    permutation of the next sample. `state_dict()` returns it as plain ints (JSON-safe)
    together with num_samples, which `load_state_dict` checks so that a checkpoint is not
    resumed on a different dataset by mistake.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        hflip: bool = False,
        position: int = 0,
    ):
        if num_samples < 1 or batch_size < 1:
            raise ValueError(
                f"need num_samples >= 1 and batch_size >= 1, got {num_samples} and {batch_size}"
            )
        if seed < 0 or position < 0:
            raise ValueError(f"seed and position must be >= 0, got {seed} and {position}")
        self.num_samples, self.batch_size, self.hflip = num_samples, batch_size, hflip
        self.seed = int(seed)
        self.epoch, self.index = divmod(int(position), num_samples)
        self._cached_epoch: int | None = None

    @property
    def position(self) -> int:
        """Samples handed out since the start of the stream (epoch * N + index)."""
        return self.epoch * self.num_samples + self.index

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"batch state was saved for a dataset of {state['num_samples']} samples, "
                f"but this one has {self.num_samples}"
            )
        if not 0 <= state["index"] < self.num_samples or state["epoch"] < 0:
            raise ValueError(f"invalid batch state {state}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.index = int(state["index"])
        self._cached_epoch = None  # the cached permutation may belong to another seed

    def _epoch_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, flip coins) of one epoch, cached for the current epoch."""
        if self._cached_epoch != epoch:
            generator = _epoch_generator(self.seed, epoch)
            order = torch.randperm(self.num_samples, generator=generator)
            if self.hflip:
                flips = torch.rand(self.num_samples, generator=generator) < 0.5
            else:
                flips = torch.zeros(self.num_samples, dtype=torch.bool)
            self._cached_epoch, self._cached = epoch, (order, flips)
        return self._cached

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next batch: (indices int64 [B], flip bool [B])."""
        indices, flips, needed = [], [], self.batch_size
        while needed:
            order, coins = self._epoch_draws(self.epoch)
            take = min(needed, self.num_samples - self.index)
            indices.append(order[self.index : self.index + take])
            flips.append(coins[self.index : self.index + take])
            needed -= take
            self.index += take
            if self.index == self.num_samples:
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(indices), torch.cat(flips)


class _RankSlices:
    """The DataLoader's batch sampler: this process's rows of each global batch, as (index, flip) pairs.

    It walks its own copy of the stream from `position`, so prefetching runs ahead of the
    trainer without moving the position a checkpoint saves (which is what was consumed).
    """

    def __init__(self, sampler: BatchSampler, position: int, rows: slice):
        self.num_samples, self.batch_size, self.seed = sampler.num_samples, sampler.batch_size, sampler.seed
        self.hflip, self.position, self.rows = sampler.hflip, position, rows

    def __iter__(self):
        stream = BatchSampler(
            self.num_samples, self.batch_size, seed=self.seed, hflip=self.hflip, position=self.position
        )
        for indices, flips in stream:
            yield list(zip(indices[self.rows].tolist(), flips[self.rows].tolist(), strict=True))


class _Reads(Dataset):
    """What a decoding worker does for one (index, flip): read, mirror, or report why it could not."""

    def __init__(self, dataset: StreamingDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, bool]):
        index, flip = item
        try:
            pixels = self.dataset.read(index)
        except Exception as error:  # deleted, truncated, undecodable: skipped by the trainer, counted
            return index, None, f"{self.dataset.describe(index)}: {type(error).__name__}: {error}"
        return index, pixels.flip(-1) if flip else pixels, None


def _collate(items) -> tuple[list[int], torch.Tensor, dict[int, str]]:
    """In the worker: one uint8 tensor for the batch (one shared-memory block to pass, not one per image).

    Rows that could not be read are zeros here, and named in the third element (row -> error).
    """
    shape = next((pixels.shape for _, pixels, _ in items if pixels is not None), None)
    if shape is None:
        return [index for index, _, _ in items], torch.empty(0), {k: e for k, (_, _, e) in enumerate(items)}
    batch = torch.empty((len(items), *shape), dtype=torch.uint8)
    errors = {}
    for k, (_, pixels, error) in enumerate(items):
        if pixels is None:
            batch[k], errors[k] = 0, error
        else:
            batch[k] = pixels
    return [index for index, _, _ in items], batch, errors


class Batches:
    """Iterator of (images, labels) batches: this process's rows of the images, every row of the labels.

    With one process (the default) both are the whole global batch. With `world_size`
    processes, process `rank` reads (and decodes) only rows rank*b : (rank+1)*b of each
    global batch (b = batch_size / world_size), while the labels, which are in memory,
    stay global so an objective can make its global draws. From memory a batch is one
    indexing operation; from disk (a `StreamingDataset`) `workers` DataLoader processes
    decode ahead of the trainer (0: decode here). An image that cannot be read any more
    (deleted, truncated) is skipped: its place in the batch is taken by the next readable
    image of the batch, and `unreadable` counts them. `state_dict()` / `load_state_dict()`
    are the sampler's, at the position of what was consumed.
    """

    def __init__(
        self, dataset: AnyDataset, sampler: BatchSampler, *, rank: int = 0, world_size: int = 1, workers: int = 0
    ):
        if len(dataset) != sampler.num_samples:
            raise ValueError(f"sampler is for {sampler.num_samples} samples, dataset has {len(dataset)}")
        if sampler.batch_size % world_size:
            raise ValueError(f"the global batch {sampler.batch_size} does not split over {world_size} processes")
        local = sampler.batch_size // world_size
        self.dataset, self.sampler, self.rows = dataset, sampler, slice(rank * local, (rank + 1) * local)
        self.workers, self.unreadable, self._reported = workers, 0, set()
        self._loader = None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.sampler.position
        indices, flips = next(self.sampler)
        labels = self.dataset.labels[indices]
        mine = indices[self.rows]
        if isinstance(self.dataset, ImageDataset):  # one indexing operation, one conversion
            images = self.dataset.to_float(self.dataset.pixels[mine])
            mirrored = flips[self.rows].nonzero().squeeze(1)
            if len(mirrored):  # (on floats: torch's float kernels are faster than its uint8 ones here)
                images[mirrored] = images[mirrored].flip(-1)
            return images, labels
        if self._loader is None:
            self._loader = iter(self._make_loader(start))
        read, pixels, errors = next(self._loader)
        if read != mine.tolist():
            raise RuntimeError("the decoding workers fell out of step with the batch stream (a bug in sculpt)")
        if errors:
            pixels, labels = self._fill_unreadable(read, pixels, errors, labels)
        return self.dataset.to_float(pixels), labels

    def _make_loader(self, position: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            _Reads(self.dataset),
            batch_sampler=_RankSlices(self.sampler, position, self.rows),
            num_workers=self.workers,
            collate_fn=_collate,
            prefetch_factor=4 if self.workers else None,
            worker_init_fn=_quiet_worker if self.workers else None,
        )

    def _fill_unreadable(
        self, read: list[int], pixels: torch.Tensor, errors: dict[int, str], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each unreadable row takes the image and label of the next readable row of the batch (cyclically)."""
        good = [k for k in range(len(read)) if k not in errors]
        if not good:
            raise OSError(
                f"none of the {len(read)} images of this batch could be read, e.g. {errors[0]}; "
                "is the dataset still there?"
            )
        labels, offset = labels.clone(), self.rows.start
        for k, error in sorted(errors.items()):
            donor = next((g for g in good if g > k), good[0])
            pixels[k] = pixels[donor]
            labels[offset + k] = labels[offset + donor]
            self.unreadable += 1
            if read[k] not in self._reported and len(self._reported) < 5:  # the rest are only counted
                self._reported.add(read[k])
                warnings.warn(f"skipped an unreadable image ({error}); {self.unreadable} so far", stacklevel=3)
        return pixels, labels

    def close(self) -> None:
        """Stop the decoding workers (they also stop when this object is garbage collected)."""
        self._loader = None

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self._loader = None  # the workers' read-ahead belongs to the old position


def batches(
    dataset: AnyDataset,
    batch_size: int,
    *,
    generator: torch.Generator,
    hflip: bool = False,
    start_position: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
) -> Batches:
    """An endless, reshuffled-every-epoch iterator of (images, labels) batches.

    The stream depends only on `generator.initial_seed()` (the seed it was given), not on
    how much it has been used, so a resumed run that seeds a fresh generator the same way
    (or restores a saved generator state) sees the same stream. Resume either with
    `start_position` (samples already consumed, e.g. step * batch_size) or by calling
    `load_state_dict` with what `state_dict()` returned.

    Args:
        batch_size: the global batch, over all processes.
        hflip: mirror each sample left-right with probability 1/2 (coins drawn per epoch).
        start_position: number of samples of the stream to skip.
        rank, world_size: this process reads rows rank*b : (rank+1)*b (b = batch_size / world_size).
        workers: decoding processes for a streamed dataset (default `default_workers()`).
    """
    sampler = BatchSampler(
        len(dataset),
        batch_size,
        seed=generator.initial_seed(),
        hflip=hflip,
        position=start_position,
    )
    workers = default_workers() if workers is None else workers
    return Batches(dataset, sampler, rank=rank, world_size=world_size, workers=workers)
