"""Latent diffusion: codecs between pixels and latents, the latent cache, and the model that samples pixels.

A **codec** maps pixels to the space diffusion runs in and back (EDM2's "encoders"):

    AutoencoderCodec    a sculpt autoencoder run folder (``sculpt train --task autoencoder``)
    DiffusersCodec      a diffusers ``AutoencoderKL`` saved with ``save_pretrained`` (``diffusers:PATH``)

Both encode to the posterior mean and scale it, ``z = (mean - shift) * scale``, so that the
latents diffusion sees have unit variance; ``decode`` undoes the scale. The scale belongs
to the autoencoder, never to code: a sculpt autoencoder measures it over its training set
(1 / std of the latents, LDM's ``scale_by_std``, and their mean as the shift) and keeps it
in ``latent_scale.json`` beside the weights whose hash it was measured with; a diffusers
VAE brings its ``scaling_factor`` and ``shift_factor``.

``latent_dataset(codec, dataset, cache_dir=...)`` encodes a dataset once into safetensors
shards under a manifest holding the codec's hash, its scale, the dataset's name and a
fingerprint of its pixels, the resolution and channels. A cache whose manifest differs
is rebuilt, never reused. With ``hflip`` it also holds the mirrored images' latents (a
flipped latent is not the latent of a flipped image).

``LatentDenoiser`` is what ``sculpt.run.load`` returns for a latent run: a denoiser in
latent space (samplers run on it unchanged) with the codec that decodes its samples.
``samplers.generate`` decodes through ``.codec`` before clamping, so sampling and
evaluation of a latent run give pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import config as cfg
from .checkpoint import load_weights, weights_hash
from .config import Config
from .data import ImageDataset
from .nets.autoencoder import AUTOENCODERS, Autoencoder, nearest_valid_sizes

__all__ = [
    "Codec",
    "AutoencoderCodec",
    "DiffusersCodec",
    "LatentDenoiser",
    "SCALE_FILE",
    "build_autoencoder",
    "latent_dataset",
    "latent_moments",
    "open_codec",
    "resolve_latent",
    "write_latent_scale",
]

SCALE_FILE = "latent_scale.json"
CACHE_FORMAT = "sculpt-latents-1"
SHARD_SIZE = 4096  #: latents per safetensors shard of the cache


# -- codecs ---------------------------------------------------------------------------------


class Codec(nn.Module):
    """Pixels [-1, 1] <-> scaled latents. Subclasses set the fields and the two raw maps.

    ``name`` (how a run records it), ``sha256`` (its weights hash), ``scale`` and ``shift``,
    ``factor`` (spatial downsampling), ``in_channels``, ``latent_channels``.
    """

    name: str
    sha256: str
    scale: float
    shift: float
    factor: int
    in_channels: int
    latent_channels: int

    def posterior_mean(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> the unscaled posterior mean [B, Z, H/f, W/f]."""
        raise NotImplementedError

    def decode_raw(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images (not clamped)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Images -> the latents diffusion runs on: (mean - shift) * scale."""
        with torch.inference_mode():
            return (self.posterior_mean(x) - self.shift) * self.scale

    def decode(self, z: Tensor) -> Tensor:
        """Latents diffusion produced -> images (before any clamping)."""
        with torch.inference_mode():
            return self.decode_raw(z / self.scale + self.shift)

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of an image -> (Z, H / f, W / f); a clear error when the image does not fit."""
        channels, height, width = (int(n) for n in shape)
        if channels != self.in_channels:
            raise ValueError(
                f"the autoencoder {self.name} takes {self.in_channels}-channel images but the data has {channels}; "
                f"set --data.channels={self.in_channels} or use an autoencoder trained on this data"
            )
        for size in (height, width):
            if size % self.factor:
                below, above = nearest_valid_sizes(size, self.factor)
                raise ValueError(
                    f"resolution {size} is not divisible by the downsampling factor {self.factor} of the "
                    f"autoencoder {self.name}; the nearest valid sizes are {below} and {above} "
                    f"(set --data.resolution={below} or {above})"
                )
        return (self.latent_channels, height // self.factor, width // self.factor)


def build_autoencoder(config: Config) -> Autoencoder:
    """The autoencoder network of a ``task = autoencoder`` config (data.resolution/channels resolved)."""
    if config.model.net not in AUTOENCODERS:
        raise ValueError(
            f"--task autoencoder needs an autoencoder preset, not {config.model.net!r}; valid: "
            f"{', '.join(AUTOENCODERS)} (see `sculpt nets`), e.g. --net ae-f4"
        )
    if config.data.resolution is None or config.data.channels is None:
        raise ValueError("the config is not resolved: data.resolution and data.channels must be set")
    factory = AUTOENCODERS[config.model.net]
    return factory(in_channels=config.data.channels, resolution=config.data.resolution, **config.model.net_options)


def _rows(images: Tensor | ImageDataset, start: int, stop: int) -> Tensor:
    """Float images start:stop of a tensor or a dataset (read a batch at a time, never the whole set)."""
    return images.images(slice(start, stop)) if callable(getattr(images, "images", None)) else images[start:stop]


def latent_moments(
    encode,
    images: Tensor | ImageDataset,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[float, float]:
    """(mean, std) of ``encode(images)`` over every latent value, accumulated in float64."""
    from tqdm.auto import tqdm

    total = total_sq = 0.0
    count = 0
    bar = tqdm(total=len(images), desc="latent scale", unit="img", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            z = encode(_rows(images, start, start + batch_size).to(device)).double()
            total += float(z.sum())
            total_sq += float(z.square().sum())
            count += z.numel()
            bar.update(min(batch_size, len(images) - start))
    bar.close()
    mean = total / count
    return mean, max(total_sq / count - mean * mean, 0.0) ** 0.5


def write_latent_scale(
    run_dir: str | Path,
    net: Autoencoder,
    dataset: ImageDataset,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Measure the latent scale of an autoencoder run's EMA weights over ``dataset`` and save it.

    scale = 1 / std and shift = mean of the posterior means (LDM's ``scale_by_std``, with
    the mean of SD3's ``shift_factor``), stored in RUN/latent_scale.json with the hash of
    the ema.safetensors they were measured with.
    """
    run_dir = Path(run_dir)
    was_training = net.training
    net.eval()
    mean, std = latent_moments(lambda x: net.encode(x)[0], dataset, device=device, progress=progress)
    net.train(was_training)
    if std == 0:
        raise ValueError(f"the autoencoder in {run_dir} maps every image to the same latent; it cannot be scaled")
    record = {
        "scale": 1.0 / std,
        "shift": mean,
        "std": std,
        "n": len(dataset),
        "dataset": dataset.name,
        "sha256": weights_hash(run_dir / "ema.safetensors"),
    }
    tmp = run_dir / (SCALE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / SCALE_FILE)
    return record


class AutoencoderCodec(Codec):
    """A sculpt autoencoder run: its EMA weights and the latent scale measured with them."""

    def __init__(self, run_dir: str | Path, *, progress: bool = True) -> None:
        super().__init__()
        run_dir = Path(run_dir)
        self.run_dir, self.name = run_dir, str(run_dir)
        weights, config_path = run_dir / "ema.safetensors", run_dir / "config.json"
        if not (weights.is_file() and config_path.is_file()):
            raise FileNotFoundError(
                f"autoencoder {run_dir} is not an autoencoder run folder (it needs config.json and "
                f"ema.safetensors); train one with `sculpt train --task autoencoder --out {run_dir}`, "
                "or give a diffusers VAE as --latent diffusers:PATH"
            )
        config = cfg.load_config(str(config_path))
        if config.task != "autoencoder":
            raise ValueError(
                f"{run_dir} is a {config.task!r} run, not an autoencoder; train one with "
                "`sculpt train --task autoencoder` and pass its folder to --latent"
            )
        self.config = config
        self.net = build_autoencoder(config)
        load_weights(self.net, weights, "autoencoder weights")
        self.net.requires_grad_(False).eval()
        self.sha256 = weights_hash(weights)
        self.factor, self.in_channels = self.net.factor, self.net.in_channels
        self.latent_channels, self.resolution = self.net.latent_channels, self.net.resolution
        record = self._scale_record(progress)
        self.scale, self.shift = float(record["scale"]), float(record["shift"])

    def _scale_record(self, progress: bool) -> dict:
        """The stored latent scale, measured again if the weights changed since (or it was never written)."""
        path = self.run_dir / SCALE_FILE
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("sha256") == self.sha256:
                return record
        from .data import load_dataset

        d = self.config.data
        print(f"measuring the latent scale of {self.run_dir} over {d.name} (once) ...", flush=True)
        dataset = load_dataset(d.name, resolution=d.resolution, channels=d.channels)
        return write_latent_scale(self.run_dir, self.net, dataset, progress=progress)

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        latent = super().latent_shape(shape)
        if tuple(int(n) for n in shape[1:]) != (self.resolution, self.resolution):
            raise ValueError(
                f"the autoencoder {self.name} was trained on {self.resolution}x{self.resolution} images, the "
                f"data is {shape[1]}x{shape[2]}; set --data.resolution={self.resolution} or train an "
                "autoencoder at this size"
            )
        return latent

    def posterior_mean(self, x: Tensor) -> Tensor:
        return self.net.encode(x)[0]

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.net.decode(z)


def _folder_hash(folder: Path) -> str:
    """First 16 hex digits of the sha256 over a diffusers folder's config and weight files."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class DiffusersCodec(Codec):
    """A diffusers ``AutoencoderKL`` saved with ``save_pretrained`` in a local folder (Stable Diffusion's VAE).

    Its ``scaling_factor`` and ``shift_factor`` come from its config. Needs ``pip install sculpt[diffusers]``.
    """

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        folder = Path(folder)
        self.name = f"diffusers:{folder}"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no diffusers AutoencoderKL in {folder}: the folder needs the config.json and weights that "
                "AutoencoderKL.save_pretrained writes (for SD's VAE, the vae/ subfolder of a pipeline)"
            )
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError("--latent diffusers:PATH needs diffusers: pip install sculpt[diffusers]") from None
        self.vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        self.vae.requires_grad_(False).eval()
        c = self.vae.config
        self.sha256 = _folder_hash(folder)
        self.scale = float(c.scaling_factor)
        self.shift = float(getattr(c, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(c.block_out_channels) - 1)
        self.in_channels, self.latent_channels = int(c.in_channels), int(c.latent_channels)

    def posterior_mean(self, x: Tensor) -> Tensor:
        return self.vae.encode(x).latent_dist.mean

    def decode_raw(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample


def open_codec(spec: str, *, progress: bool = True) -> Codec:
    """``diffusers:PATH`` or a sculpt autoencoder run folder -> its codec (on the CPU, eval mode)."""
    kind, colon, rest = spec.partition(":")
    path = Path(rest if kind == "diffusers" and colon else spec)
    if not path.exists():
        raise FileNotFoundError(
            f"the autoencoder {spec} does not exist; give a sculpt autoencoder run folder "
            "(sculpt train --task autoencoder) or diffusers:PATH to a saved AutoencoderKL"
        )
    if kind == "diffusers" and colon:
        return DiffusersCodec(path)
    return AutoencoderCodec(path, progress=progress)


def resolve_latent(config: Config, codec: Codec) -> Config:
    """Fill in the latent section from the codec, refusing an autoencoder that changed or does not fit the data."""
    recorded = config.latent.sha256
    if recorded and recorded != codec.sha256:
        raise ValueError(
            f"the autoencoder {config.latent.autoencoder} changed under this latent run: its weights now hash "
            f"{codec.sha256}, the run was trained on {recorded}. Restore that autoencoder, or train a new "
            "latent run on this one"
        )
    channels, resolution, _ = codec.latent_shape((config.data.channels, config.data.resolution, config.data.resolution))
    latent = replace(
        config.latent,
        sha256=codec.sha256,
        scale=codec.scale,
        shift=codec.shift,
        channels=channels,
        resolution=resolution,
    )
    return replace(config, latent=latent)


# -- the latent cache ----------------------------------------------------------------------


def _fingerprint(dataset: ImageDataset) -> str:
    """sha256 (16 hex digits) of a dataset's pixels and labels: a changed dataset is a different key."""
    digest = hashlib.sha256()
    digest.update(str((len(dataset), *dataset.shape)).encode())
    for start in range(0, len(dataset), 1024):
        digest.update(_rows(dataset, start, start + 1024).contiguous().numpy().tobytes())
    digest.update(dataset.labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def _cache_key(codec: Codec, dataset: ImageDataset, spec: str, hflip: bool) -> dict:
    channels, height, width = dataset.shape
    return {
        "format": CACHE_FORMAT,
        "autoencoder": codec.name,
        "autoencoder_sha256": codec.sha256,
        "scale": codec.scale,
        "shift": codec.shift,
        "dataset": spec,
        "dataset_sha256": _fingerprint(dataset),
        "count": len(dataset),
        "resolution": [height, width],
        "channels": channels,
        "hflip": hflip,
    }


def _cache_folder(cache_dir: Path, spec: str, dataset: ImageDataset, hflip: bool) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")[-60:] or "data"
    channels, height, _ = dataset.shape
    return cache_dir / f"{slug}_{height}px_{channels}c{'_flip' if hflip else ''}"


def _read_cache(folder: Path, key: dict) -> tuple[Tensor, Tensor] | None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    found = json.loads(manifest.read_text())
    if found.get("key") != key:
        changed = sorted(k for k in key if found.get("key", {}).get(k) != key[k])
        print(f"latent cache {folder} is stale ({', '.join(changed)} changed); rebuilding it", flush=True)
        return None
    shards = [load_file(str(folder / name)) for name in found["shards"]]
    latents = torch.cat([s["latents"] for s in shards])
    labels = torch.cat([s["labels"] for s in shards])
    return latents, labels


def latent_dataset(
    codec: Codec,
    dataset: ImageDataset,
    *,
    cache_dir: str | Path,
    spec: str | None = None,
    hflip: bool = False,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ImageDataset:
    """The dataset's scaled latents (an ImageDataset of float32 latents [N(x2 with hflip), Z, h, w]), from the cache.

    The cache under ``cache_dir`` is keyed by the codec's hash and scale, ``spec`` (the
    dataset's name), a fingerprint of its pixels, the resolution and channels; a cache
    whose key differs is rebuilt. With ``hflip`` the mirrored images are encoded too and
    follow the originals (labels repeated).
    """
    from tqdm.auto import tqdm

    spec = spec if spec is not None else dataset.name
    key = _cache_key(codec, dataset, spec, hflip)
    folder = _cache_folder(Path(cache_dir), spec, dataset, hflip)
    cached = _read_cache(folder, key)
    if cached is None:
        codec.to(device)
        images = dataset
        orientations = [False, True] if hflip else [False]
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shards, pending, pending_labels = [], [], []
        total = len(images) * len(orientations)
        bar = tqdm(total=total, desc=f"encoding {spec} to latents", unit="img", disable=not progress, leave=False)

        def flush() -> None:
            name = f"shard_{len(shards):05d}.safetensors"
            save_file({"latents": torch.cat(pending), "labels": torch.cat(pending_labels)}, str(tmp / name))
            shards.append(name)
            pending.clear()
            pending_labels.clear()

        for flipped in orientations:
            for start in range(0, len(images), batch_size):
                x = _rows(images, start, start + batch_size)
                x = x.flip(-1) if flipped else x
                pending.append(codec.encode(x.to(device)).float().cpu().contiguous())
                pending_labels.append(dataset.labels[start : start + batch_size])
                bar.update(len(x))
                if sum(len(p) for p in pending) >= SHARD_SIZE:
                    flush()
        if pending:
            flush()
        bar.close()
        (tmp / "manifest.json").write_text(json.dumps({"key": key, "shards": shards}, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        cached = _read_cache(folder, key)
    latents, labels = cached
    return ImageDataset(
        latents, labels, dataset.num_classes, list(dataset.class_names), name=f"{dataset.name} latents ({codec.name})"
    )


# -- the model that samples pixels ---------------------------------------------------------------


class LatentDenoiser(nn.Module):
    """A denoiser in a codec's latent space with the codec that decodes its samples.

    It keeps the Denoiser contract in latent space (``D(z, sigma, **cond) -> z0_hat``,
    ``.schedule``), so every sampler and grid runs on it unchanged; ``samplers.generate``
    turns a pixel shape into the latent one and decodes with ``.codec`` before clamping.
    Wrappers around it (guidance) wrap ``.denoiser`` and keep ``.codec``.
    """

    def __init__(self, denoiser: nn.Module, codec: Codec) -> None:
        super().__init__()
        self.denoiser, self.codec = denoiser, codec

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    @property
    def prediction(self) -> str:
        return self.denoiser.prediction

    @property
    def sigma_data(self) -> float:
        return self.denoiser.sigma_data

    @property
    def data_moments(self):
        """The latents' moments (``sculpt.moments``), when the run recorded them."""
        return getattr(self.denoiser, "data_moments", None)

    def forward(self, x: Tensor, sigma, **cond: Tensor) -> Tensor:
        return self.denoiser(x, sigma, **cond)
