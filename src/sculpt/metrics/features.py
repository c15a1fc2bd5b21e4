"""Feature extractors for FID / KID / IS / precision-recall, and the reference-statistics cache.

Every extractor shares one interface (`FeatureExtractor`) and one preprocessing pipeline,
so that a score depends only on the pictures, never on how they reached the extractor:

1. **Quantise** images in [-1, 1] to uint8 with exactly `sculpt.images.to_uint8`
   (``clamp(round((x + 1) * 127.5), 0, 255)``): samples held in memory and the same
   samples saved as PNG and read back give identical features.
2. **Resize** to the extractor's square input size, only when the size differs, with
   antialiased bicubic interpolation on the float values 0..255 of the uint8 image
   (`torch.nn.functional.interpolate(mode="bicubic", antialias=True)`), then clamp to
   [0, 255]. Torch's antialiased bicubic is Pillow's BICUBIC filter (a = -0.5, support
   scaled when shrinking), so this is clean-fid's "clean" resize (Parmar et al. 2022,
   "On Aliased Resizing and Surprising Subtleties in GAN Evaluation": Pillow BICUBIC in
   float mode, then clip) batched on tensors; the tests check it against Pillow to 1e-4.
   No re-quantisation after resizing. Non-square images are stretched to the square.
3. **Channels**: grey -> RGB by repetition (Inception); RGB -> grey by ITU-R 601 luma
   (0.299, 0.587, 0.114, as Pillow's ``convert("L")``) for a greyscale classifier.
4. **Normalise** to the network's range: both extractors here take ``v / 127.5 - 1``,
   which for Inception is pytorch-fid's ``2 * (v / 255) - 1``.

Extractors run in eval mode under `torch.inference_mode`, in batches, and contain no
layer that mixes samples (no BatchNorm in training mode), so the batch size never
changes a result. Features come back as float64 NumPy arrays [N, D].

Extractors: ``classifier`` (a small CNN trained here on the domain, for data where
ImageNet features do not fit: digits, MNIST) and ``inception`` (the FID Inception-v3 of
`sculpt.metrics.inception`, with weights from a local file). `get_extractor(spec)` builds
either from a string.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sculpt.checkpoint import state_dict_mismatches
from sculpt.data import ImageDataset, _set_channels
from sculpt.images import to_uint8
from sculpt.metrics.stats import REFERENCE_META_KEYS, ReferenceStats, load_reference, save_reference

__all__ = [
    "EXTRACTOR_SPEC_FORMS",
    "ClassifierExtractor",
    "ClassifierNet",
    "FeatureExtractor",
    "file_hash",
    "get_extractor",
    "load_classifier",
    "preprocess",
    "reference_meta",
    "reference_stats",
    "resize_description",
    "state_dict_hash",
    "train_classifier",
]

EXTRACTOR_SPEC_FORMS = "'classifier:DIR' (a folder written by ClassifierExtractor.save), 'inception:PATH', 'inception'"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


# ----------------------------------------------------------------------------- pipeline


def resize_description(size: int) -> str:
    """The `resize` field of reference metadata: what step 2 of the pipeline does."""
    return f"uint8>bicubic-antialias(torch=PIL)>clamp@{size}x{size}"


def preprocess(images: Tensor, size: int, channels: int) -> Tensor:
    """Steps 1-3 of the pipeline: [-1, 1] images [N, C, H, W] -> float32 [N, channels, size, size] in 0..255.

    C may be 1 or 3, H and W anything. The result is on the CPU; step 4 (the network's own
    normalisation) is left to the extractor.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3 in [-1, 1]; got shape {tuple(images.shape)}")
    pixels = torch.from_numpy(to_uint8(images)).movedim(-1, 1).float()  # [N, C, H, W], 0..255
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = pixels.clamp(0, 255)  # bicubic overshoots at sharp edges
    return _set_channels(pixels, channels)  # luma weights sum to 1, so 0..255 stays 0..255


def _normalise(pixels: Tensor) -> Tensor:
    """Step 4 for both extractors: 0..255 -> [-1, 1] (pytorch-fid's 2 * v / 255 - 1)."""
    return pixels / 127.5 - 1.0


def state_dict_hash(state_dict: dict[str, Tensor]) -> str:
    """First 16 hex digits of the sha256 of the state dict serialised by safetensors (no metadata).

    The serialisation is canonical (tensors ordered by dtype then name), so a model and the
    same weights loaded back from disk hash alike whatever metadata the file carries.
    """
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    return hashlib.sha256(save(tensors)).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- interface


class FeatureExtractor(nn.Module):
    """A network that maps images to feature vectors (and, where it has classes, probabilities).

    Subclasses set ``name``, ``input_size``, ``input_channels``, ``feature_dim``,
    ``num_classes`` (0 when there are none) and ``weights_hash``, and implement
    ``forward(x) -> (features [N, D], logits [N, classes] or None)`` on normalised input
    [N, input_channels, input_size, input_size] in [-1, 1].
    """

    name: str = "extractor"
    input_size: int
    input_channels: int
    feature_dim: int
    num_classes: int = 0
    weights_hash: str = ""

    @property
    def resize(self) -> str:
        """Description of the resize step, recorded with every reference cache."""
        return resize_description(self.input_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def class_probs(self, logits: Tensor) -> Tensor:
        """Class probabilities from the logits ``forward`` returns (softmax by default)."""
        return torch.softmax(logits.double(), dim=1)

    def extract(
        self,
        images: Tensor,
        *,
        batch_size: int = 64,
        progress: bool = True,
        features: bool = True,
        probs: bool = False,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Features and/or class probabilities of images in [-1, 1], in one pass over the set.

        Returns (features float64 [N, D] or None, probs float64 [N, classes] or None).
        """
        if probs and not self.num_classes:
            raise ValueError(f"extractor {self.name!r} has no classes, so no probabilities")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        feats_out, probs_out = [], []
        show = progress and sys.stderr.isatty()
        starts = range(0, images.shape[0], batch_size)
        try:
            with torch.inference_mode():
                for start in tqdm(starts, desc=f"{self.name} features", disable=not show, leave=False):
                    pixels = preprocess(images[start : start + batch_size], self.input_size, self.input_channels)
                    feats, logits = self(_normalise(pixels).to(self.device))
                    if features:
                        feats_out.append(feats.double().cpu())
                    if probs:
                        probs_out.append(self.class_probs(logits).cpu())
        finally:
            self.train(was_training)
        empty = lambda width: np.zeros((0, width))
        feats_array = (torch.cat(feats_out).numpy() if feats_out else empty(self.feature_dim)) if features else None
        probs_array = (torch.cat(probs_out).numpy() if probs_out else empty(self.num_classes)) if probs else None
        return feats_array, probs_array

    def features(self, images: Tensor, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Feature vectors, float64 [N, feature_dim], of images [N, C, H, W] in [-1, 1] (any C in 1, 3; any size)."""
        return self.extract(images, batch_size=batch_size, progress=progress)[0]

    def probs(self, images: Tensor, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Class probabilities, float64 [N, num_classes], rows summing to 1."""
        return self.extract(images, batch_size=batch_size, progress=progress, features=False, probs=True)[1]


# ----------------------------------------------------------------------------- classifier


class ClassifierNet(nn.Module):
    """A small CNN: per width, conv3x3 -> GroupNorm -> SiLU (2x average pooling between widths),
    then the final map flattened -> linear -> SiLU gives ``feature_dim`` features, and a
    linear layer maps them to the class logits.

    GroupNorm, not BatchNorm: it normalises each sample on its own, so features never depend
    on which other images share the batch. The flattened head keeps where strokes are (a
    global average pool would throw that away, and digits need it). Any resolution >= 4.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int,
        widths: Sequence[int] = (32, 64, 128),
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous, side = in_channels, resolution
        for index, width in enumerate(widths):
            if index > 0:
                layers.append(nn.AvgPool2d(2, ceil_mode=True))  # 28 -> 14 -> 7, 8 -> 4 -> 2
                side = math.ceil(side / 2)
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU()]
            previous = width
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(previous * side * side, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(self.body(x))  # [N, feature_dim]
        return feats, self.head(feats)  # features, logits [N, num_classes]


class ClassifierExtractor(FeatureExtractor):
    """A domain classifier as a feature extractor: penultimate features, softmax probabilities."""

    name = "classifier"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        required = ("in_channels", "resolution", "num_classes", "widths")
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"classifier config lacks {missing}; it needs {list(required)}")
        self.config = dict(config)
        self.config["widths"] = list(config["widths"])
        self.input_size = int(config["resolution"])
        self.input_channels = int(config["in_channels"])
        self.num_classes = int(config["num_classes"])
        self.feature_dim = int(config.get("feature_dim", 128))
        self.net = ClassifierNet(
            self.input_channels, self.num_classes, self.input_size, config["widths"], self.feature_dim
        )
        self.refresh_hash()

    def refresh_hash(self) -> None:
        """Recompute ``weights_hash`` (after the weights change, e.g. by training)."""
        self.weights_hash = state_dict_hash(self.net.state_dict())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x)

    def save(self, path_dir: str | Path) -> Path:
        """Write ``classifier.safetensors`` (config also in its metadata) and ``classifier.json``."""
        from safetensors.torch import save_file

        folder = Path(path_dir)
        folder.mkdir(parents=True, exist_ok=True)
        config_json = json.dumps({**self.config, "weights_hash": self.weights_hash}, indent=2)
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.net.state_dict().items()}
        save_file(tensors, str(folder / CLASSIFIER_WEIGHTS), metadata={"config": config_json})
        (folder / CLASSIFIER_CONFIG).write_text(config_json + "\n")
        return folder


def load_classifier(path_dir: str | Path, *, device: str | torch.device = "cpu") -> ClassifierExtractor:
    """Rebuild a classifier from a folder written by `ClassifierExtractor.save`."""
    from safetensors.torch import load_file

    folder = Path(path_dir)
    weights, config_path = folder / CLASSIFIER_WEIGHTS, folder / CLASSIFIER_CONFIG
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"no {path.name} in {folder}: a classifier folder holds {CLASSIFIER_WEIGHTS} and "
                f"{CLASSIFIER_CONFIG}, as written by ClassifierExtractor.save (train one with "
                "sculpt.metrics.train_classifier)"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); re-save the classifier") from None
    extractor = ClassifierExtractor(config)
    state = load_file(str(weights))
    expected = extractor.net.state_dict()
    missing, unexpected, shapes = state_dict_mismatches(expected, state)
    problems = [f"missing {key}" for key in missing] + [f"unexpected {key}" for key in unexpected]
    problems += [f"{key}: file has shape {found}, config implies {wanted}" for key, found, wanted in shapes]
    if problems:
        raise ValueError(
            f"{weights} does not match {config_path} (widths {config['widths']}, "
            f"{config['in_channels']} channels, {config['num_classes']} classes): "
            + "; ".join(problems[:6])
            + ". Were the two files written by different runs? Re-save the classifier."
        )
    extractor.net.load_state_dict(state)
    extractor.refresh_hash()
    stored = config.get("weights_hash")
    if stored and stored != extractor.weights_hash:
        warnings.warn(
            f"{weights} hashes to {extractor.weights_hash} but {config_path} records {stored}: "
            "the weights were changed after saving",
            stacklevel=2,
        )
    return extractor.to(device).eval()


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by a whole number of pixels in [-max_shift, max_shift], edges replicated."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]  # [N, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]  # [N, 1, 1, W]
    index = torch.arange(n)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    return padded[index, channel, rows, cols]


def _accuracy(extractor: ClassifierExtractor, dataset: ImageDataset, batch_size: int) -> float:
    probs = extractor.probs(dataset.images, batch_size=batch_size, progress=False)
    return float((probs.argmax(axis=1) == dataset.labels.numpy()).mean())


def train_classifier(
    dataset: ImageDataset,
    *,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    widths: Sequence[int] = (32, 64, 128),
    feature_dim: int = 128,
    resolution: int | None = None,
    augment: bool = True,
    seed: int = 0,
    test_dataset: ImageDataset | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[ClassifierExtractor, float | None]:
    """Fit a `ClassifierNet` on a labelled dataset with AdamW; return it and its held-out accuracy.

    Inputs go through the same pipeline as at evaluation (uint8, resize to ``resolution``
    (default: the dataset's), channels, [-1, 1]), so training and scoring see identical
    pixels. Light augmentation: random translations of up to max(1, resolution // 14)
    pixels. The learning rate follows a cosine decay to 0 over ``steps``. Deterministic
    given ``seed`` on the CPU. The accuracy is on ``test_dataset`` (None when not given).
    """
    if dataset.num_classes < 2:
        raise ValueError(
            f"dataset {dataset.name!r} has {dataset.num_classes} classes; a classifier needs labels "
            "of at least 2 classes (for unlabelled data use the inception extractor)"
        )
    resolution = resolution or dataset.images.shape[-1]
    config = {
        "in_channels": dataset.images.shape[1],
        "resolution": resolution,
        "num_classes": dataset.num_classes,
        "widths": list(widths),
        "feature_dim": feature_dim,
        "class_names": list(dataset.class_names),
        "dataset": dataset.name,
        "steps": steps,
        "seed": seed,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        extractor = ClassifierExtractor(config).to(device)
    inputs = _normalise(preprocess(dataset.images, resolution, config["in_channels"])).to(device)
    labels = dataset.labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(extractor.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    max_shift = max(1, resolution // 14)
    from tqdm.auto import tqdm

    extractor.train()
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="classifier", disable=not (progress and sys.stderr.isatty()), leave=False)
    for _ in bar:
        index = torch.randint(0, len(inputs), (batch_size,), generator=generator).to(device)
        batch = inputs[index]
        if augment:
            batch = _random_shift(batch.cpu(), max_shift, generator).to(device)
        loss = F.cross_entropy(extractor(batch)[1], labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    extractor.eval()
    extractor.refresh_hash()
    accuracy = _accuracy(extractor, test_dataset, max(batch_size, 256)) if test_dataset is not None else None
    extractor.config["accuracy"] = accuracy
    extractor.config["train_seconds"] = round(time.perf_counter() - started, 2)
    return extractor, accuracy


# ----------------------------------------------------------------------------- specs


def get_extractor(spec: str, *, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build an extractor from a string: 'classifier:DIR', 'inception:PATH' or 'inception'.

    Plain 'inception' reads the weights path from the SCULPT_INCEPTION_WEIGHTS environment
    variable. Nothing is ever downloaded.
    """
    kind, colon, rest = spec.partition(":")
    if kind == "classifier" and colon and rest:
        return load_classifier(rest, device=device)
    if kind == "inception" and (not colon or rest):
        from sculpt.metrics.inception import load_inception

        return load_inception(rest or None, device=device)
    raise ValueError(f"unknown feature extractor {spec!r}; valid forms are {EXTRACTOR_SPEC_FORMS}")


# ----------------------------------------------------------------------------- references


def reference_meta(extractor: FeatureExtractor, *, dataset: str, split: str, resolution: int) -> dict[str, Any]:
    """The metadata (REFERENCE_META_KEYS) that decides a set of reference features."""
    meta = {
        "extractor": extractor.name,
        "weights_hash": extractor.weights_hash,
        "dataset": dataset,
        "split": split,
        "resolution": int(resolution),
        "resize": extractor.resize,
    }
    assert set(meta) == set(REFERENCE_META_KEYS), "reference_meta is out of step with REFERENCE_META_KEYS"
    return meta


def reference_stats(
    extractor: FeatureExtractor,
    images: Tensor,
    *,
    dataset: str,
    split: str,
    cache_dir: str | Path,
    batch_size: int = 64,
    progress: bool = True,
) -> ReferenceStats:
    """Reference features and moments of ``images``, cached in ``cache_dir``.

    The cache file is named by the sha256 of the metadata (extractor, weights hash,
    dataset, split, resolution = the images' height, resize method, n), so any change in
    those computes a new file and never reuses a stale one. ``dataset`` is a name for the
    data (e.g. ``ImageDataset.name``); use one that does not depend on where the files lie.
    """
    meta = {
        **reference_meta(extractor, dataset=dataset, split=split, resolution=images.shape[-2]),
        "n": int(images.shape[0]),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{extractor.name}-{dataset}-{split}")[:80]
    path = Path(cache_dir) / f"{slug}-{key}.npz"
    if path.is_file():
        try:
            return load_reference(path, meta)
        except (ValueError, OSError, KeyError) as error:
            warnings.warn(f"recomputing reference statistics: {error}", stacklevel=2)
    feats = extractor.features(images, batch_size=batch_size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_reference(path, feats, meta)
    return load_reference(path, meta)
