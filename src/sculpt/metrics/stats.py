"""Metric maths on feature matrices: FID, FID-infinity, KID, IS, precision/recall,
density/coverage, and the reference-statistics cache.

Everything here is pure NumPy in float64 and knows nothing about images or networks:
the inputs are feature matrices of shape (n, d) (or class probabilities of shape
(n, C) for the Inception Score) produced by an extractor elsewhere in `sculpt.metrics`.
Torch tensors are accepted and converted (detached, moved to the CPU, cast to float64).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    Features = np.ndarray | torch.Tensor

__all__ = [
    "REFERENCE_META_KEYS",
    "FIDInfinity",
    "ReferenceStats",
    "density_coverage",
    "extrapolate_infinity",
    "feature_moments",
    "fid_infinity",
    "frechet_distance",
    "frechet_distance_from_moments",
    "inception_score",
    "kid",
    "load_reference",
    "precision_recall",
    "save_reference",
]

# Pairwise-distance blocks are kept under this many bytes, so that 10k x 10k real/fake
# comparisons (or more) never hold the full n x m matrix in memory.
_DISTANCE_BLOCK_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- inputs


def _as_matrix(x: Features, name: str) -> np.ndarray:
    """Return `x` as a finite float64 (n, d) NumPy array, or raise a ValueError naming `name`."""
    if hasattr(x, "detach"):  # a torch.Tensor; duck-typed so torch is not imported here
        x = x.detach().cpu().double().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix of shape (n_samples, n_features); got shape "
            f"{array.shape}. Flatten each sample's features into one row."
        )
    if not np.isfinite(array).all():
        bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(
            f"{name} contains NaN or inf in {bad_rows.size} of {array.shape[0]} rows "
            f"(first bad row: {bad_rows[0]}). Check the extractor's input range and dtype "
            "(e.g. fp16 overflow) and drop or recompute those samples."
        )
    return array


def _check_widths(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} and {name_b} have different feature widths ({a.shape[1]} vs "
            f"{b.shape[1]}); both must come from the same extractor and layer."
        )


def _check_min_samples(x: np.ndarray, name: str, minimum: int, why: str) -> None:
    if x.shape[0] < minimum:
        raise ValueError(
            f"{name} has {x.shape[0]} samples; at least {minimum} are needed ({why})."
        )


# ------------------------------------------------------------------------------ FID


def feature_moments(feats: Features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of a feature matrix, in float64.

    The covariance divides by n - 1, as pytorch-fid, clean-fid and torch-fidelity do, so
    cached statistics are interchangeable with theirs.
    """
    x = _as_matrix(feats, "feats")
    _check_min_samples(x, "feats", 2, "a covariance needs two samples")
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])  # reshape: d == 1
    return mu, sigma


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix through eigh.

    Eigenvalues are clipped at 0 because round-off makes a rank-deficient covariance
    show tiny negative ones, whose square roots would be NaN.
    """
    eigvals, eigvecs = np.linalg.eigh(cov)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _frechet_with_sqrt(
    mu_a: np.ndarray, cov_a: np.ndarray, sqrt_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """The Frechet distance given sqrt(cov_a) already computed (FID-infinity reuses it)."""
    # tr((A B)^{1/2}) = tr((A^{1/2} B A^{1/2})^{1/2}) = sum of the singular values of
    # B^{1/2} A^{1/2}, since (B^½A^½)^T (B^½A^½) = A^½ B A^½. Singular values avoid the square
    # roots of round-off-sized eigenvalues that eigvalsh of A^½ B A^½ would take (an error of
    # ~1e-5 on features with near-dead units, measured against a 40-digit reference; this route
    # agrees with it to 1e-11). scipy's sqrtm of the non-symmetric A B is worse still.
    trace_covmean = np.linalg.svd(_psd_sqrt(cov_b) @ sqrt_a, compute_uv=False).sum()
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_covmean
    # A distance cannot be negative; round-off near 0 can make the sum slightly so.
    return max(float(value), 0.0)


def _as_moments(mu: Features, cov: Features, name: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(mu, "detach"):
        mu = mu.detach().cpu().double().numpy()
    if hasattr(cov, "detach"):
        cov = cov.detach().cpu().double().numpy()
    mu = np.asarray(mu, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    if mu.ndim != 1 or cov.shape != (mu.size, mu.size):
        raise ValueError(
            f"moments of {name} must be a mean of shape (d,) and a covariance of shape "
            f"(d, d); got {mu.shape} and {cov.shape}."
        )
    if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        raise ValueError(f"moments of {name} contain NaN or inf; recompute them.")
    return mu, cov


def frechet_distance_from_moments(
    mu_a: Features, cov_a: Features, mu_b: Features, cov_b: Features
) -> float:
    """Frechet (2-Wasserstein) distance between N(mu_a, A) and N(mu_b, B) (Dowson & Landau 1982).

    ||mu_a - mu_b||^2 + tr(A) + tr(B) - 2 tr((A^{1/2} B A^{1/2})^{1/2}), in float64 through
    symmetric eigendecompositions. This is the FID of Heusel et al. (2017) when the moments
    are those of Inception features.
    """
    mu_a, cov_a = _as_moments(mu_a, cov_a, "a")
    mu_b, cov_b = _as_moments(mu_b, cov_b, "b")
    if mu_a.size != mu_b.size:
        raise ValueError(
            f"moments have different feature widths ({mu_a.size} vs {mu_b.size}); both "
            "must come from the same extractor and layer."
        )
    # Identical moments are at distance exactly 0; the eigen route would leave ~1e-12.
    if np.array_equal(mu_a, mu_b) and np.array_equal(cov_a, cov_b):
        return 0.0
    return _frechet_with_sqrt(mu_a, cov_a, _psd_sqrt(cov_a), mu_b, cov_b)


def _check_fid_samples(x: np.ndarray, name: str) -> None:
    n, d = x.shape
    _check_min_samples(x, name, 2, "a covariance needs two samples")
    if n <= d:
        # n samples span at most n - 1 dimensions, so the covariance is singular and FID
        # is dominated by estimation bias rather than by the distributions.
        raise ValueError(
            f"{name} has {n} samples of {d}-dimensional features; FID needs more samples "
            f"than feature dimensions (at least {d + 1}) for a non-singular covariance, and "
            "the usual protocol uses 50,000. Generate more samples or use a smaller feature "
            "layer."
        )


def frechet_distance(feats_a: Features, feats_b: Features) -> float:
    """Frechet distance between Gaussians fitted to two feature sets: FID (Heusel et al. 2017).

    Raises ValueError for different widths, non-finite features, or fewer samples than
    feature dimensions plus one (singular covariance).
    """
    a = _as_matrix(feats_a, "feats_a")
    b = _as_matrix(feats_b, "feats_b")
    _check_widths(a, b, "feats_a", "feats_b")
    _check_fid_samples(a, "feats_a")
    _check_fid_samples(b, "feats_b")
    return frechet_distance_from_moments(*feature_moments(a), *feature_moments(b))


# ----------------------------------------------------------------------- FID-infinity


@dataclass(frozen=True)
class FIDInfinity:
    """Result of `fid_infinity`: the fit FID(n) = fid_inf + slope / n over `ns`."""

    fid_inf: float
    slope: float
    ns: tuple[int, ...]
    fids: tuple[float, ...]  # mean FID over the trials at each n
    r2: float  # coefficient of determination of the straight-line fit in 1/n


def extrapolate_infinity(
    ns: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray
) -> tuple[float, float, float]:
    """Least-squares fit of values = intercept + slope / n; returns (intercept, slope, r2).

    The intercept is the n -> infinity limit of a metric whose bias is linear in 1/n, as
    FID's is (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score").
    """
    n = np.asarray(ns, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if n.ndim != 1 or n.shape != y.shape:
        raise ValueError(
            f"ns and values must be 1-D and of equal length; got {n.shape} and {y.shape}."
        )
    if np.unique(n).size < 2:
        raise ValueError("extrapolation needs values at two or more distinct sample sizes n.")
    if not (np.isfinite(y).all() and (n > 0).all()):
        raise ValueError("ns must be positive and values finite.")
    design = np.stack([np.ones_like(n), 1.0 / n], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ np.array([intercept, slope])
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual @ residual) / total if total > 0 else 1.0
    return float(intercept), float(slope), float(r2)


def _default_fid_ns(n_fake: int, dim: int, num_points: int) -> np.ndarray:
    """Sample sizes for FID-infinity: `num_points` values evenly spaced in 1/n.

    The largest is every fake sample. The smallest is max(n_fake // 10, 2 * (d + 1)):
    n_fake // 10 mirrors Chong & Forsyth's 5,000..50,000, and 2 * (d + 1) keeps the sample
    covariance well conditioned, since near n = d the bias stops being linear in 1/n.
    Even spacing in 1/n (rather than in n, as in the paper's code) gives every point the
    same leverage in the straight-line fit in 1/n.
    """
    n_min = max(n_fake // 10, 2 * (dim + 1))
    if n_min >= n_fake:
        raise ValueError(
            f"FID-infinity needs more than {n_min} fake samples of {dim}-dimensional "
            f"features to fit FID(n) over a range of n; got {n_fake}. Generate more samples "
            "or pass ns explicitly."
        )
    inverse = np.linspace(1.0 / n_min, 1.0 / n_fake, num_points)
    return np.unique(np.round(1.0 / inverse).astype(np.int64))


def fid_infinity(
    feats_real: Features,
    feats_fake: Features,
    ns: Sequence[int] | None = None,
    trials: int = 1,
    seed: int = 0,
    num_points: int = 15,
) -> FIDInfinity:
    """FID extrapolated to infinitely many fake samples, FID-infinity (Chong & Forsyth 2020).

    FID of the whole real set against random fake subsets (without replacement) of each
    size in `ns`, averaged over `trials` subsets, then fit FID(n) = FID_inf + slope / n.
    By default `ns` holds `num_points` sizes evenly spaced in 1/n from
    max(n_fake // 10, 2 * (d + 1)) to n_fake. The real statistics are fixed, so their own
    finite-sample bias stays in the intercept, as in the paper.
    """
    real = _as_matrix(feats_real, "feats_real")
    fake = _as_matrix(feats_fake, "feats_fake")
    _check_widths(real, fake, "feats_real", "feats_fake")
    _check_fid_samples(real, "feats_real")
    n_fake, dim = fake.shape
    if trials < 1:
        raise ValueError(f"trials must be at least 1; got {trials}.")
    if ns is None:
        sizes = _default_fid_ns(n_fake, dim, num_points)
    else:
        sizes = np.unique(np.asarray(ns, dtype=np.int64))
        if sizes.size < 2 or sizes[0] <= dim or sizes[-1] > n_fake:
            raise ValueError(
                f"ns must hold at least two distinct sizes between {dim + 1} (feature "
                f"dimension + 1) and {n_fake} (the number of fake samples); got {list(ns)}."
            )

    mu_real, cov_real = feature_moments(real)
    sqrt_real = _psd_sqrt(cov_real)  # computed once: the real side never changes
    rng = np.random.default_rng(seed)
    fids = []
    for size in sizes:
        per_trial = []
        # At n = n_fake every subset is the whole set, so one trial says everything.
        for _ in range(trials if size < n_fake else 1):
            subset = fake[rng.choice(n_fake, size=int(size), replace=False)]
            mu_fake, cov_fake = feature_moments(subset)
            per_trial.append(_frechet_with_sqrt(mu_real, cov_real, sqrt_real, mu_fake, cov_fake))
        fids.append(float(np.mean(per_trial)))
    fid_inf, slope, r2 = extrapolate_infinity(sizes, fids)
    return FIDInfinity(
        fid_inf=fid_inf,
        slope=slope,
        ns=tuple(int(n) for n in sizes),
        fids=tuple(fids),
        r2=r2,
    )


# ------------------------------------------------------------------------------ KID


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3, the kernel of KID (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-sized sets with the KID kernel (Gretton et al. 2012).

    Within-set sums leave out the diagonal (k(x_i, x_i) is not an independent pair); the
    cross term keeps all m^2 pairs, since x_i and y_i are independent. This matches the
    'unbiased' estimator of Binkowski et al.'s code, clean-fid and torch-fidelity.
    """
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x)
    k_yy = _polynomial_kernel(y, y)
    k_xy = _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(
    feats_a: Features,
    feats_b: Features,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs").

    Unbiased MMD^2 with the cubic polynomial kernel (x . y / d + 1)^3 on `subsets` random
    pairs of subsets (without replacement) of `subset_size` samples each; returns the mean
    and the standard deviation over subsets. `subset_size` is clipped, with a warning, to
    the smaller set. Deterministic given `seed`.
    """
    a = _as_matrix(feats_a, "feats_a")
    b = _as_matrix(feats_b, "feats_b")
    _check_widths(a, b, "feats_a", "feats_b")
    _check_min_samples(a, "feats_a", 2, "the unbiased estimator needs pairs")
    _check_min_samples(b, "feats_b", 2, "the unbiased estimator needs pairs")
    if subsets < 1 or subset_size < 2:
        raise ValueError(
            f"KID needs subsets >= 1 and subset_size >= 2; got {subsets} and {subset_size}."
        )
    smaller = min(a.shape[0], b.shape[0])
    if subset_size > smaller:
        warnings.warn(
            f"KID subset_size={subset_size} exceeds the smaller feature set ({smaller} "
            f"samples); using subset_size={smaller}.",
            stacklevel=2,
        )
        subset_size = smaller
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], size=subset_size, replace=False)]
        y = b[rng.choice(b.shape[0], size=subset_size, replace=False)]
        values[i] = _mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------- IS


def inception_score(probs: Features, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) per split.

    `probs` holds class probabilities p(y|x), one row per sample (softmax outputs, not
    logits). The rows are cut into `splits` contiguous parts, part i holding rows
    i * N // splits to (i + 1) * N // splits - 1, as in the original code (and
    torch-fidelity's), so that when N is not divisible the longer parts come last;
    returns the mean and standard deviation of the score over the parts.
    """
    p = _as_matrix(probs, "probs")
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be between 1 and the number of rows ({n}); got {splits}.")
    row_sums = p.sum(axis=1)
    # 1e-3 admits fp16 softmax round-off but still catches logits and unnormalised scores.
    if (p < 0).any() or not np.allclose(row_sums, 1.0, rtol=0.0, atol=1e-3):
        worst = int(np.argmax(np.abs(row_sums - 1.0)))
        raise ValueError(
            "probs must hold class probabilities: non-negative rows that sum to 1 "
            f"(row {worst} sums to {row_sums[worst]:.6g}, minimum entry {p.min():.6g}). "
            "Pass softmax(logits), not logits."
        )
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0)
        # 0 * log 0 = 0: a class with p(y|x) = 0 adds nothing to the KL divergence.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------- precision / recall, density / coverage


# Round-off of the expansion ||x||^2 + ||y||^2 - 2 x.y (and of the exact form it is checked
# against) is below this many units of float64 round-off per feature, times ||x||^2 + ||y||^2.
_EXPANSION_ERROR_ULPS = 8


def _squared_distance_blocks(
    x: np.ndarray, y: np.ndarray
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (start, approximate squared distances, a bound on their error per row) from x[start:start + rows] to y.

    The distances come from the expansion ||x||^2 + ||y||^2 - 2 x.y on features centred on
    y's mean (which shrinks the norms, and so the cancellation); the bound of row i,
    (8 d + 32) eps (||x_i||^2 + max_j ||y_j||^2), holds each of its distances to within
    that of `_exact_squared_distances`, so that decisions near a threshold can be settled
    exactly.
    """
    center = y.mean(axis=0)
    x = x - center
    y = y - center
    y_sq = np.einsum("ij,ij->i", y, y)
    ulps = (_EXPANSION_ERROR_ULPS * x.shape[1] + 32) * np.finfo(np.float64).eps
    rows = max(1, _DISTANCE_BLOCK_BYTES // (8 * y.shape[0]))
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        block_sq = np.einsum("ij,ij->i", block, block)
        squared = block @ y.T
        squared *= -2.0
        squared += block_sq[:, None]
        squared += y_sq[None, :]
        yield start, squared, ulps * (block_sq + y_sq.max())


def _exact_squared_distances(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """sum_f (x[rows, f] - y[cols, f])^2 pair by pair, on the features as given (no centring).

    Differences of the original values: exact for integer features (and exactly 0 for a
    duplicate), and the same rounding wherever the same two rows meet, so a tie is a tie.
    """
    out = np.empty(rows.size)
    chunk = max(1, _DISTANCE_BLOCK_BYTES // (8 * x.shape[1]))
    for start in range(0, rows.size, chunk):
        pick = slice(start, start + chunk)
        difference = x[rows[pick]] - y[cols[pick]]
        out[pick] = np.einsum("ij,ij->i", difference, difference)
    return out


def _knn_squared_radii(x: np.ndarray, k: int, name: str) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest neighbour in x, self excluded.

    Exact (as `_exact_squared_distances`): the expansion finds every neighbour that can be
    within the k-th distance, and those few are measured exactly.
    """
    if not 1 <= k < x.shape[0]:
        raise ValueError(
            f"k must be between 1 and the number of samples minus one ({x.shape[0] - 1}) "
            f"for {name}; got k={k}."
        )
    radii = np.empty(x.shape[0])
    for start, squared, bound in _squared_distance_blocks(x, x):
        rows = np.arange(squared.shape[0])
        squared[rows, start + rows] = np.inf  # exclude self
        kth = np.partition(squared, k - 1, axis=1)[:, k - 1]
        # With |error| <= B (the row's bound), every neighbour whose exact distance is at
        # most the exact k-th has an approximate one at most kth + 2 B.
        reach = kth + 2.0 * bound
        candidate_rows, candidate_cols = np.nonzero(squared <= reach[:, None])
        exact = _exact_squared_distances(x, x, start + candidate_rows, candidate_cols)
        order = np.lexsort((exact, candidate_rows))  # by row, then by distance
        first = np.searchsorted(candidate_rows[order], rows)  # each row's first candidate
        radii[start + rows] = exact[order][first + k - 1]
    return radii


def _inside_pairs(x: np.ndarray, y: np.ndarray, radii_y: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, block by block, the pairs (i, j) with ||x[i] - y[j]||^2 <= radii_y[j] (ties included).

    Pairs farther from a ball's boundary than the expansion's error bound are decided by the
    expansion; the rest are measured exactly. Each ball holds few points, so pairs are kept
    as index arrays rather than as a dense boolean matrix.
    """
    for start, squared, bound in _squared_distance_blocks(x, y):
        rows, cols = np.nonzero(squared <= radii_y[None, :] + bound[:, None])
        unsure = squared[rows, cols] > radii_y[cols] - bound[rows]
        if unsure.any():
            exact = _exact_squared_distances(x, y, start + rows[unsure], cols[unsure])
            keep = np.ones(rows.size, dtype=bool)
            keep[np.flatnonzero(unsure)] = exact <= radii_y[cols[unsure]]
            rows, cols = rows[keep], cols[keep]
        yield start + rows, cols


def _prepare_pair(feats_real: Features, feats_fake: Features) -> tuple[np.ndarray, np.ndarray]:
    real = _as_matrix(feats_real, "feats_real")
    fake = _as_matrix(feats_fake, "feats_fake")
    _check_widths(real, fake, "feats_real", "feats_fake")
    return real, fake


def precision_recall(
    feats_real: Features, feats_fake: Features, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its samples, each of radius the
    distance to the sample's k-th nearest neighbour in the same set (self excluded).
    Precision is the fraction of fake samples inside the real manifold, recall the
    fraction of real samples inside the fake manifold. A point on a ball's boundary is
    inside, as in the authors' code (distance <= radius), and ties are decided exactly: the
    fast expansion of the distances is checked against the direct sum of squared
    differences wherever round-off could flip a comparison, so integer or duplicated
    features count exactly as a brute-force count does.
    """
    real, fake = _prepare_pair(feats_real, feats_fake)
    real_radii = _knn_squared_radii(real, k, "feats_real")
    fake_radii = _knn_squared_radii(fake, k, "feats_fake")
    fake_inside = np.zeros(fake.shape[0], dtype=bool)
    for rows, _ in _inside_pairs(fake, real, real_radii):
        fake_inside[rows] = True
    real_inside = np.zeros(real.shape[0], dtype=bool)
    for rows, _ in _inside_pairs(real, fake, fake_radii):
        real_inside[rows] = True
    return float(fake_inside.mean()), float(real_inside.mean())


def density_coverage(
    feats_real: Features, feats_fake: Features, k: int = 5
) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics").

    With balls of k-NN radius around the real samples only: density is the mean number of
    real balls holding each fake sample, divided by k (1 in expectation for matching
    distributions, unbounded above); coverage is the fraction of real balls holding at
    least one fake sample. Boundary points count as inside, ties decided exactly, as in
    `precision_recall`.
    """
    real, fake = _prepare_pair(feats_real, feats_fake)
    real_radii = _knn_squared_radii(real, k, "feats_real")
    pairs = 0
    covered = np.zeros(real.shape[0], dtype=bool)
    for rows, cols in _inside_pairs(fake, real, real_radii):
        pairs += rows.size  # (fake, real ball) pairs: the fakes' ball counts summed
        covered[cols] = True
    return float(pairs / fake.shape[0] / k), float(covered.mean())


# ------------------------------------------------------------ reference-statistics cache

# What decides a set of reference features: change any and the cache is stale.
REFERENCE_META_KEYS = ("extractor", "weights_hash", "dataset", "split", "resolution", "resize", "normalisation")


@dataclass(frozen=True)
class ReferenceStats:
    """Cached reference features and their moments, with the metadata that produced them."""

    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray
    meta: dict[str, Any]
    key: str  # sha256 of the canonical JSON of meta


def _canonical_json(meta: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except TypeError as error:
        raise ValueError(f"reference meta must be JSON-serialisable: {error}") from None


def _meta_key(meta: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical_json(meta).encode()).hexdigest()


def save_reference(path: str | os.PathLike, feats: Features, meta: Mapping[str, Any]) -> str:
    """Write reference features, their mean and covariance and `meta` to an .npz file.

    `meta` must name every field of REFERENCE_META_KEYS (extractor, weights_hash, dataset,
    split, resolution, resize, normalisation) and may add more; `n` is filled in from `feats`. Returns the
    cache key, the sha256 of the canonical JSON of the stored meta. The write is atomic,
    so an interrupted run never leaves a truncated cache behind.
    """
    x = _as_matrix(feats, "feats")
    missing = [key for key in REFERENCE_META_KEYS if key not in meta]
    if missing:
        raise ValueError(
            f"reference meta lacks {missing}; a cache must record {list(REFERENCE_META_KEYS)} "
            "so that a later run can tell whether it is stale."
        )
    if "n" in meta and meta["n"] != x.shape[0]:
        raise ValueError(f"meta says n={meta['n']} but feats has {x.shape[0]} rows.")
    full_meta = json.loads(_canonical_json({**meta, "n": x.shape[0]}))
    mu, sigma = feature_moments(x)
    key = _meta_key(full_meta)
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:  # a handle, so numpy does not append ".npz"
        np.savez(
            handle, mu=mu, sigma=sigma, feats=x, meta=np.array(_canonical_json(full_meta)),
            key=np.array(key),
        )
    os.replace(temporary, path)
    return key


def load_reference(
    path: str | os.PathLike, expected_meta: Mapping[str, Any]
) -> ReferenceStats:
    """Load a cache written by `save_reference`, refusing one made with other settings.

    Every field of `expected_meta` is compared with the stored meta (after a JSON round
    trip, so a tuple matches a list); `n` is compared only when `expected_meta` has it.
    A mismatch raises a ValueError listing each differing field, expected vs found.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        stored_json = str(data["meta"])
        stored_key = str(data["key"])
        mu, sigma, feats = data["mu"], data["sigma"], data["feats"]
    stored = json.loads(stored_json)
    if _meta_key(stored) != stored_key:
        raise ValueError(
            f"reference cache {path} is corrupt: its key does not match its meta. Delete it "
            "and recompute the reference statistics."
        )
    expected = json.loads(_canonical_json(expected_meta))
    compared = sorted(set(expected) | (set(stored) - {"n"}))
    absent = object()
    show = lambda value: "(absent)" if value is absent else repr(value)
    differences = [
        f"  {field}: expected {show(expected.get(field, absent))}, "
        f"found {show(stored.get(field, absent))}"
        for field in compared
        if expected.get(field, absent) != stored.get(field, absent)
    ]
    if differences:
        raise ValueError(
            f"reference cache {path} was computed with different settings:\n"
            + "\n".join(differences)
            + f"\nDelete {path} (or point to another cache file) to recompute it with the "
            "expected settings."
        )
    if feats.shape[0] != stored.get("n") or mu.shape != (feats.shape[1],):
        raise ValueError(
            f"reference cache {path} is inconsistent (n={stored.get('n')}, feats "
            f"{feats.shape}, mu {mu.shape}); delete it and recompute."
        )
    return ReferenceStats(mu=mu, sigma=sigma, feats=feats, meta=stored, key=stored_key)
