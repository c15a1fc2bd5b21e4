"""The common base of every feature extractor: the `FeatureExtractor` interface and its preprocessing pipeline.

Every extractor (`sculpt.metrics.features.ClassifierExtractor`,
`sculpt.metrics.inception.InceptionExtractor`) subclasses `FeatureExtractor` and feeds its
network through one preprocessing pipeline, so that a score depends only on the pictures,
never on how they reached the extractor:

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
4. **Normalise** to the network's range, each extractor its own way (``normalise``,
   recorded as ``normalisation`` with every reference cache and evaluation record): the
   FID Inception takes ``(v - 128) / 128``, the TensorFlow graph's own first step, which
   clean-fid and torch-fidelity feed it too (pytorch-fid's ``2 * (v / 255) - 1`` is off
   by half a level and a factor 128 / 127.5); the domain classifier ``v / 127.5 - 1``.

Extractors run in eval mode under `torch.inference_mode`, in batches, and contain no
layer that mixes samples (no BatchNorm in training mode), so the batch size never
changes a result. Features come back as float64 NumPy arrays [N, D].

Also here: the weight hashes (`state_dict_hash`, `file_hash`) that extractors record as
``weights_hash`` in reference metadata.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sculpt.data import _set_channels
from sculpt.images import to_uint8

__all__ = [
    "FeatureExtractor",
    "file_hash",
    "preprocess",
    "resize_description",
    "state_dict_hash",
]


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
    """Step 4 by default (the domain classifier's): 0..255 -> [-1, 1] as v / 127.5 - 1."""
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
    [N, input_channels, input_size, input_size] in [-1, 1]. ``normalise`` maps the
    preprocessed 0..255 values to that input (``v / 127.5 - 1`` unless a subclass says
    otherwise) and ``normalisation`` describes it for the records.
    """

    name: str = "extractor"
    input_size: int
    input_channels: int
    feature_dim: int
    num_classes: int = 0
    weights_hash: str = ""
    normalisation: str = "v/127.5-1"

    def normalise(self, pixels: Tensor) -> Tensor:
        """Step 4 of the pipeline: preprocessed values 0..255 -> the network's input."""
        return _normalise(pixels)

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
                    feats, logits = self(self.normalise(pixels).to(self.device))
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
