"""Feature extractors for FID / KID / IS / precision-recall, and the reference-statistics cache.

Every extractor shares one interface (`FeatureExtractor`) and one preprocessing pipeline
(quantise to uint8, clean-fid bicubic resize, channels, normalise), both defined and
documented in `sculpt.metrics.extractor` and re-exported here.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sculpt.checkpoint import state_dict_mismatches
from sculpt.data import ImageDataset
from sculpt.metrics.extractor import (
    FeatureExtractor,
    file_hash,
    preprocess,
    resize_description,
    state_dict_hash,
)
from sculpt.metrics.inception import load_inception
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
    probs = extractor.probs(dataset.images(), batch_size=batch_size, progress=False)
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
    resolution = resolution or dataset.shape[-1]
    config = {
        "in_channels": dataset.shape[0],
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
    inputs = extractor.normalise(preprocess(dataset.images(), resolution, config["in_channels"])).to(device)
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
        "normalisation": extractor.normalisation,
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
    dataset, split, resolution = the images' height, resize method, normalisation, n), so any change in
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
