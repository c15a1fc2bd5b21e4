"""Datasets of images, and an exactly resumable stream of shuffled batches.

`load_dataset(spec)` reads a dataset named by a short string into an `ImageDataset`:

    digits                   scikit-learn's 8x8 handwritten digits (built in, offline)
    mnist:PATH               MNIST IDX files (train-images-idx3-ubyte[.gz], ...)
    fashion_mnist:PATH       Fashion-MNIST, same IDX layout
    cifar10:PATH             CIFAR-10, binary version (data_batch_1.bin ... test_batch.bin)
    PATH or folder:PATH      a folder of PNG/JPEG/WebP/BMP images, class per subfolder
    hf:NAME                  a Hugging Face dataset (needs `pip install sculpt[datasets]`)

Every dataset is held in memory as one float32 tensor [N, C, H, W] in [-1, 1] with int64
labels: the datasets this library trains on are small (MNIST is 188 MB as float32), and
one tensor makes a batch a single indexing operation with no worker processes (0.8 ms for
128 MNIST images with flips and their noise, on one CPU thread). On CUDA the training loop
pins each batch and copies it without blocking.

`batches(dataset, batch_size, generator=...)` yields shuffled batches forever; its state
(seed, epoch, index) saved in a checkpoint rebuilds the identical continuation.
"""

from __future__ import annotations

import gzip
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from sculpt.images import GRAYSCALE_MODES, IMAGE_EXTENSIONS, from_uint8, pil_to_uint8

SPEC_FORMS = (
    "'digits', 'mnist:PATH', 'fashion_mnist:PATH', 'cifar10:PATH', "
    "'folder:PATH' (or a bare folder path), 'hf:NAME'"
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


@dataclass(eq=False)  # compare datasets by identity: == on tensors is elementwise
class ImageDataset(Dataset):
    """Images and labels held in memory.

    images: float32 [N, C, H, W] in [-1, 1]; labels: int64 [N] (all 0 when unlabelled);
    num_classes: 0 when the dataset has no labels; class_names[k] names label k.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ValueError(
                "images must be float32 [N, C, H, W], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 [{self.images.shape[0]}], "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    spec: str,
    *,
    resolution: int | None = None,
    split: str = "train",
    channels: int | None = None,
    labels_from_folders: bool = True,
) -> ImageDataset:
    """Load the dataset named by `spec` (see the module docstring for the forms).

    Args:
        resolution: side of the square images returned. Built-in datasets keep their own
            size (digits 8, MNIST 28, CIFAR-10 32) unless given, and are then resized with
            antialiased bicubic interpolation. Folders and hf: default to the shorter side
            of their smallest image (so nothing is enlarged).
        split: "train" or "test" (folders ignore it; hf: passes it to `datasets`).
        channels: 1 or 3 to force greyscale or RGB; by default a dataset keeps its own
            (folders and hf: 1 if every image is greyscale, else 3).
        labels_from_folders: for folders, label images by their first-level subfolder.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
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
            return _load_hf(rest, split, resolution, channels)
        elif colon and prefix == "folder":
            return _load_folder(Path(rest), resolution, channels, labels_from_folders)
        elif not colon or Path(spec).exists():  # a bare path (C:\... on Windows has a colon)
            if not Path(spec).exists():
                raise FileNotFoundError(
                    f"no dataset '{spec}': not a folder, nor one of {SPEC_FORMS}"
                )
            return _load_folder(Path(spec), resolution, channels, labels_from_folders)
        else:
            raise ValueError(f"unknown dataset spec '{spec}'; valid forms are {SPEC_FORMS}")
    dataset.images = _resize_tensor(_set_channels(dataset.images, channels), resolution)
    return dataset


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


def _resize_tensor(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Resize square images with antialiased bicubic interpolation, clamped back to [-1, 1]."""
    if resolution is None or resolution == images.shape[-1]:
        return images
    resized = F.interpolate(
        images, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False
    )
    return resized.clamp(-1, 1)  # bicubic overshoots at sharp edges


# ----------------------------------------------------------------------------- built-in sets


def _load_digits(split: str) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits, values 0..16 -> [-1, 1]; the last 297 are "test"."""
    from sklearn.datasets import load_digits  # heavy import, only when asked for

    _check_split(split)
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)) / 8.0 - 1.0  # 0..16 -> -1..1
    labels = torch.from_numpy(digits.target.astype(np.int64))
    part = slice(None, -DIGITS_TEST_SIZE) if split == "train" else slice(-DIGITS_TEST_SIZE, None)
    return ImageDataset(
        images[part, None].contiguous(),
        labels[part].contiguous(),
        10,
        MNIST_CLASSES[:],
        f"digits-{split}",
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
    images = from_uint8(pixels[..., None])  # [N, 1, H, W]
    return ImageDataset(
        images, torch.from_numpy(labels.astype(np.int64)), 10, class_names[:], f"{name}-{split}"
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
    pixels = table[:, 1:].reshape(-1, 3, 32, 32)  # channel planes, rows, columns
    images = torch.from_numpy(pixels).float() / 127.5 - 1.0
    return ImageDataset(
        images, torch.from_numpy(labels), 10, CIFAR10_CLASSES[:], f"cifar10-{split}"
    )


# ----------------------------------------------------------------------------- image files


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
    converted = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    return pil_to_uint8(_resize_and_crop(converted, resolution), channels)


def _load_folder(
    folder: Path, resolution: int | None, channels: int | None, labels_from_folders: bool
) -> ImageDataset:
    """A folder of images, searched recursively; labels from first-level subfolders."""
    if not folder.exists():
        raise FileNotFoundError(
            f"no such folder: {folder} (expected a folder of {'/'.join(IMAGE_EXTENSIONS)} images)"
        )
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder (expected a folder of {'/'.join(IMAGE_EXTENSIONS)} images)"
        )
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(
            f"no images under {folder} (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
        )

    # First pass reads headers only (size, mode): cheap, and finds most broken files.
    skipped: list[tuple[Path, Exception]] = []
    headers: list[tuple[Path, tuple[int, int], str]] = []
    for path in files:
        try:
            with Image.open(path) as image:
                headers.append((path, image.size, image.mode))
        except Exception as error:  # any decoder error means "unreadable"
            skipped.append((path, error))
    if channels is None:
        channels = 1 if all(mode in GRAYSCALE_MODES for _, _, mode in headers) else 3
    if resolution is None and headers:
        resolution = min(min(size) for _, size, _ in headers)

    # Second pass decodes, converts and resizes; a file can still fail here (truncated data).
    arrays, kept = [], []
    for path, _, _ in headers:
        try:
            with Image.open(path) as image:
                image.load()
                arrays.append(_image_to_uint8(image, resolution, channels))
            kept.append(path)
        except Exception as error:  # truncated or undecodable pixel data
            skipped.append((path, error))
    if skipped:
        path, error = skipped[0]
        warnings.warn(
            f"skipped {len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} "
            f"under {folder}, "
            f"e.g. {path.relative_to(folder)}: {error}",
            stacklevel=3,
        )
    if not kept:
        raise ValueError(f"none of the {len(files)} image files under {folder} could be read")

    # Classes: first-level subfolders holding images, sorted by name.
    top_level = [p.relative_to(folder).parts for p in kept]
    class_names = sorted({parts[0] for parts in top_level if len(parts) > 1})
    if labels_from_folders and class_names:
        loose = [parts[0] for parts in top_level if len(parts) == 1]
        if loose:
            raise ValueError(
                f"{folder} has class subfolders {class_names[:5]} but also {len(loose)} "
                f"images directly inside it (e.g. {loose[0]}); move them into a class folder, "
                "or pass labels_from_folders=False to load everything unlabelled"
            )
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index[parts[0]] for parts in top_level], dtype=torch.int64)
    else:
        class_names = []
        labels = torch.zeros(len(kept), dtype=torch.int64)
    return ImageDataset(
        from_uint8(np.stack(arrays)), labels, len(class_names), class_names, folder.name
    )


def _load_hf(name: str, split: str, resolution: int | None, channels: int | None) -> ImageDataset:
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
    images = list(table[image_columns[0]])  # decoded Pillow images, read once
    if channels is None:
        channels = 1 if all(image.mode in GRAYSCALE_MODES for image in images) else 3
    if resolution is None:
        resolution = min(min(image.size) for image in images)
    pixels = np.stack([_image_to_uint8(image, resolution, channels) for image in images])
    if not label_columns:
        labels = torch.zeros(len(images), dtype=torch.int64)
        return ImageDataset(from_uint8(pixels), labels, 0, [], f"{name}-{split}")
    values = list(table[label_columns[0]])
    feature = features[label_columns[0]]
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    elif all(isinstance(value, int) for value in values):
        class_names = [str(k) for k in range(max(values) + 1)]
    else:  # text labels: number them in sorted order, as folders are
        class_names = sorted({str(value) for value in values})
        index = {class_name: i for i, class_name in enumerate(class_names)}
        values = [index[str(value)] for value in values]
    labels = torch.tensor(values, dtype=torch.int64)
    return ImageDataset(
        from_uint8(pixels), labels, len(class_names), class_names, f"{name}-{split}"
    )


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


class Batches:
    """Iterator of (images [B, C, H, W], labels [B]) batches from an ImageDataset.

    A thin layer over BatchSampler: `state_dict()` / `load_state_dict()` are the sampler's.
    """

    def __init__(self, dataset: ImageDataset, sampler: BatchSampler):
        if len(dataset) != sampler.num_samples:
            raise ValueError(
                f"sampler is for {sampler.num_samples} samples, dataset has {len(dataset)}"
            )
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices, flips = next(self.sampler)
        images = self.dataset.images[indices]
        if flips.any():
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        return images, self.dataset.labels[indices]

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    generator: torch.Generator,
    hflip: bool = False,
    start_position: int = 0,
) -> Batches:
    """An endless, reshuffled-every-epoch iterator of (images, labels) batches.

    The stream depends only on `generator.initial_seed()` (the seed it was given), not on
    how much it has been used, so a resumed run that seeds a fresh generator the same way
    (or restores a saved generator state) sees the same stream. Resume either with
    `start_position` (samples already consumed, e.g. step * batch_size) or by calling
    `load_state_dict` with what `state_dict()` returned.

    Args:
        hflip: mirror each sample left-right with probability 1/2 (coins drawn per epoch).
        start_position: number of samples of the stream to skip.
    """
    sampler = BatchSampler(
        len(dataset),
        batch_size,
        seed=generator.initial_seed(),
        hflip=hflip,
        position=start_position,
    )
    return Batches(dataset, sampler)
