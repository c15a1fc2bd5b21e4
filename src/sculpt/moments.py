"""The training data's first two moments, and the analytic first step they give a sampler.

At the top of the noise the ideal denoiser no longer depends on the image: for any data
with mean mu and covariance S,

    E[x0 | x, sigma] = mu + S (S + sigma^2 I)^-1 (x - mu) + O(sigma^-4),

so at sigma_max (80 for EDM, 157 to 2e4 for the discrete VP schedules, inf for zero
terminal SNR) the network's first evaluation carries almost nothing that the mean does
not. A sampler that starts from the moments saves network calls: the analytic first step
(AFS; Dockhorn et al. 2022 and Zhou et al. 2024 use mu = 0, which on images whose
background is -1 is far off: FD 7.8 against 6.4 on digits at 5 calls).

For Gaussian data N(mu, S) the probability-flow ODE is solved in closed form: along each
principal direction of S (variance lambda) the offset from mu scales by
sqrt((lambda + sigma'^2) / (lambda + sigma^2)) from sigma to sigma' (``DataMoments.flow``).
So the first stretch of every trajectory, from sigma_max down to where the data stops
looking Gaussian, costs no network call at all (the "hidden linear structure" of Wang &
Vastola 2023): the runs of images small enough for a covariance (up to
``COVARIANCE_MAX_DIM`` coordinates) record its ``COVARIANCE_RANK`` leading directions, and
the rest of the variance spread evenly over the remaining directions (probabilistic PCA).
Without them (larger images, a conditional draw, an older run) the flow uses the
per-coordinate variances: exact at sigma = inf for any data, off by about |S - diag S| /
sigma per unit of noise below it, 2e-5 at the VP schedules' sigma_max and below 1e-2 at
EDM's 80. The means are per class when the labels are known.

A denoising run measures the moments on the data it trains on (latents for a latent run, the
mirrored images too with ``data.hflip``; a student samples the grid it was distilled for, so
it records none) and writes them to ``data_moments.safetensors``
in the run folder; ``sculpt.run.load`` attaches them to the denoiser as ``data_moments``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["DataMoments", "measure_moments", "MOMENTS_FILE"]

MOMENTS_FILE = "data_moments.safetensors"
MAX_IMAGES = 50_000  #: images read for the moments of a larger dataset (evenly spaced rows)
#: The covariance is measured for images of at most this many coordinates (3 x 32 x 32 pixels, 4 x 32 x 32
#: latents): its float64 total is 8 d^2 bytes (134 MB here) and its eigendecomposition O(d^3).
COVARIANCE_MAX_DIM = 4096
COVARIANCE_RANK = 256  #: principal directions kept (the file holds d x 256 floats: 4 MB at d = 4096)


@dataclass
class DataMoments:
    """Mean [C, H, W], per-coordinate variance (same shape, or a float), per-class means [K, C, H, W] or None.

    ``basis`` [d, k] (d = C * H * W) and ``eigs`` [k] are the covariance's k leading principal
    directions and their variances (decreasing), ``residual`` the variance per direction
    outside them; None where the covariance was not measured.
    """

    mean: Tensor
    var: Tensor | float
    class_means: Tensor | None = None
    count: int = 0  #: images they were measured on
    basis: Tensor | None = None
    eigs: Tensor | None = None
    residual: float = 0.0

    def __post_init__(self) -> None:
        if self.mean.ndim < 1:
            raise ValueError(f"the data mean must have the shape of one image (got {tuple(self.mean.shape)})")
        var = torch.as_tensor(self.var, dtype=torch.float32)
        if var.ndim and tuple(var.shape) != tuple(self.mean.shape):
            shapes = f"{tuple(var.shape)} vs {tuple(self.mean.shape)}"
            raise ValueError(f"the variance must be a float or have the mean's shape ({shapes})")
        if not (torch.isfinite(var).all() and (var >= 0).all()):
            raise ValueError("the data variance must be finite and >= 0")
        if self.class_means is not None and tuple(self.class_means.shape[1:]) != tuple(self.mean.shape):
            raise ValueError(
                f"class means {tuple(self.class_means.shape)} do not match the mean {tuple(self.mean.shape)}"
            )
        if (self.basis is None) != (self.eigs is None):
            raise ValueError("the covariance needs both its basis and its eigenvalues (or neither)")
        if self.basis is not None:
            d = self.mean.numel()
            if self.basis.ndim != 2 or self.basis.shape[0] != d or tuple(self.eigs.shape) != (self.basis.shape[1],):
                raise ValueError(
                    f"the covariance basis must be [{d}, k] with k eigenvalues "
                    f"(got {tuple(self.basis.shape)} and {tuple(self.eigs.shape)})"
                )
            if not (torch.isfinite(self.eigs).all() and (self.eigs >= 0).all() and self.residual >= 0):
                raise ValueError("the covariance's eigenvalues must be finite and >= 0")

    @property
    def gaussian_until(self) -> float | None:
        """sqrt of the largest principal variance: below this noise level the data's strongest direction
        is resolved (SNR > 1) and a Gaussian no longer stands in for it; None without a covariance."""
        return math.sqrt(float(self.eigs[0])) if self.eigs is not None and len(self.eigs) else None

    def uses_covariance(self, class_labels: Tensor | None = None) -> bool:
        """Whether ``flow`` moves along the covariance's directions for this draw: measured, and unconditional
        (a draw from the class means keeps the per-coordinate variances, which the total covariance overstates)."""
        return self.basis is not None and (class_labels is None or self.class_means is None)

    def means(self, n: int, class_labels: Tensor | None = None) -> Tensor:
        """[n, C, H, W]: each sample's class mean (a label past the last class, the null class, gets the mean)."""
        if class_labels is None or self.class_means is None:
            return self.mean.expand(n, *self.mean.shape)
        labels = torch.as_tensor(class_labels, device=self.mean.device).long().reshape(-1).expand(n)
        table = torch.cat([self.class_means, self.mean[None]])
        return table[labels.clamp(0, len(self.class_means))]

    def denoise(self, x: Tensor, sigma: float, class_labels: Tensor | None = None) -> Tensor:
        """mu + v / (v + sigma^2) (x - mu), v the variances: the Gaussian posterior mean at sigma (mu at inf)."""
        mu = self.means(x.shape[0], class_labels).to(device=x.device, dtype=x.dtype)
        if math.isinf(sigma):
            return mu.clone()
        var = torch.as_tensor(self.var).to(device=x.device, dtype=x.dtype)
        return mu + (var / (var + sigma * sigma)) * (x - mu)

    def flow(self, x: Tensor, sigma: float, sigma_next: float, class_labels: Tensor | None = None) -> Tensor:
        """x at ``sigma`` carried to ``sigma_next`` by the probability-flow ODE of the Gaussian with these moments.

        Exact for Gaussian data: the offset from the mean scales by sqrt((v + sigma_next^2) / (v + sigma^2))
        along each principal direction of variance v (the covariance's, unconditionally and where it was
        measured; else each coordinate's). At sigma = inf, x is the unit noise (``sculpt.sample``'s start)
        and the offset is sqrt(v + sigma_next^2) x.
        """
        mu = self.means(x.shape[0], class_labels).to(device=x.device, dtype=torch.float64)
        start = math.isinf(sigma)
        offset = x.double() if start else x.double() - mu

        def gain(v: Tensor) -> Tensor:
            v = v.to(device=x.device, dtype=torch.float64)
            top = torch.sqrt(v + sigma_next**2)
            return top if start else top / torch.sqrt(v + sigma**2)

        if not self.uses_covariance(class_labels):
            return (mu + gain(torch.as_tensor(self.var)) * offset).to(x.dtype)
        flat = offset.reshape(len(x), -1)
        basis = self.basis.to(device=x.device, dtype=torch.float64)
        coords = flat @ basis  # [n, k]
        rest = flat - coords @ basis.T  # the part outside the leading directions
        moved = (coords * gain(self.eigs)) @ basis.T + rest * gain(torch.tensor(self.residual))
        return (mu + moved.reshape(x.shape)).to(x.dtype)

    def knows(self, cond: dict | None) -> bool:
        """Whether the moments describe the distribution that ``cond`` asks for (labels need class means)."""
        keys = set(cond or {})
        if not keys:
            return True
        return keys == {"class_labels"} and self.class_means is not None

    def save(self, path: str | Path) -> None:
        tensors = {"mean": self.mean.float().contiguous().cpu()}
        tensors["var"] = torch.as_tensor(self.var, dtype=torch.float32).expand(self.mean.shape).contiguous()
        if self.class_means is not None:
            tensors["class_means"] = self.class_means.float().contiguous().cpu()
        if self.basis is not None:
            tensors["basis"] = self.basis.float().contiguous().cpu()
            tensors["eigs"] = self.eigs.float().contiguous().cpu()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"count": str(self.count), "residual": repr(float(self.residual))})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> DataMoments:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "mean" not in tensors or "var" not in tensors:
            raise ValueError(f"{path} is not a data-moments file (it needs 'mean' and 'var' tensors)")
        return cls(
            tensors["mean"],
            tensors["var"],
            tensors.get("class_means"),
            int(meta.get("count", 0)),
            tensors.get("basis"),
            tensors.get("eigs"),
            float(meta.get("residual", 0.0)),
        )


def measure_moments(
    dataset,
    *,
    num_classes: int = 0,
    hflip: bool = False,
    max_images: int = MAX_IMAGES,
    batch_size: int = 1024,
    covariance: bool = True,
) -> DataMoments:
    """The moments of ``dataset`` (anything with ``images(rows)``, ``labels`` and ``len``), totalled in float64.

    ``hflip`` averages the images with their mirrors (the distribution a flipped-training run
    sees); ``num_classes`` > 0 adds per-class means. Sets larger than ``max_images`` are
    read at evenly spaced rows. ``covariance`` adds the covariance's ``COVARIANCE_RANK``
    leading directions for images of at most ``COVARIANCE_MAX_DIM`` coordinates.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot measure the moments of an empty dataset")
    rows = torch.arange(n) if n <= max_images else torch.linspace(0, n - 1, max_images).round().long()
    total = square = outer = shift = None
    class_total = class_count = None
    streamed = not isinstance(getattr(dataset, "pixels", None), Tensor)  # read from disk, image by image
    count = 0
    for start in range(0, len(rows), batch_size):
        index = rows[start : start + batch_size]
        if streamed:  # an unreadable file is skipped here as the trainer skips it (and counts it there)
            index, images = _readable(dataset, index)
            if not len(index):
                continue
            x = torch.stack(images)
        else:
            x = dataset.images(index)
        x = x.float()  # each batch sums in float32 (<= 2048 terms), the totals in float64
        if hflip:
            x = torch.cat([x, x.flip(-1)])
        if total is None:
            total, square = torch.zeros(x.shape[1:], dtype=torch.float64), torch.zeros(x.shape[1:], dtype=torch.float64)
            dim = x[0].numel()
            if covariance and dim <= COVARIANCE_MAX_DIM:
                outer = torch.zeros(dim, dim, dtype=torch.float64)
                shift = x.reshape(len(x), -1).mean(0)  # products of offsets from it: no cancellation at the end
            if num_classes:
                class_total = torch.zeros(num_classes, *x.shape[1:], dtype=torch.float64)
                class_count = torch.zeros(num_classes, dtype=torch.float64)
        total += x.sum(0).double()
        square += (x * x).sum(0).double()
        if outer is not None:
            flat = x.reshape(len(x), -1) - shift
            outer += (flat.T @ flat).double()  # float32 within the batch, like the sums
        if num_classes:
            labels = dataset.labels[index].long()
            labels = torch.cat([labels, labels]) if hflip else labels
            class_total += torch.zeros(class_total.shape, dtype=x.dtype).index_add_(0, labels, x).double()
            class_count.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        count += len(x)
    if not count:
        raise ValueError(f"none of the {len(rows)} images read for the data's moments could be decoded")
    mean = total / count
    var = (square / count - mean * mean).clamp_min(0)
    class_means = None
    if num_classes:
        # A class absent from the rows read keeps the overall mean.
        present = class_count > 0
        class_means = mean.expand(num_classes, *mean.shape).clone()
        class_means[present] = class_total[present] / class_count[present].view(-1, *[1] * mean.ndim)
        class_means = class_means.float()
    basis = eigs = None
    residual = 0.0
    if outer is not None:
        offset = mean.reshape(-1) - shift.double()
        cov = outer / count - torch.outer(offset, offset)
        values, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
        values = values.clamp_min(0).flip(0)
        vectors = vectors.flip(1)
        rank = min(COVARIANCE_RANK, len(values))
        basis, eigs = vectors[:, :rank].float().contiguous(), values[:rank].float()
        if rank < len(values):
            residual = float(values[rank:].mean())
    return DataMoments(mean.float(), var.float(), class_means, count, basis, eigs, residual)


def _readable(dataset, rows: Tensor) -> tuple[Tensor, list[Tensor]]:
    kept, images = [], []
    for i in rows.tolist():
        try:
            images.append(dataset.to_float(dataset.read(i)))
        except Exception:  # deleted, truncated, undecodable
            continue
        kept.append(i)
    return torch.tensor(kept, dtype=torch.long), images
