"""FID's small-sample bias, FID-infinity, feature-extraction speed, and sculpt's FID / KID beside torchmetrics'.

For each dataset (scikit-learn's 8x8 digits, 1500 train / 297 test, and ``../shared/data/mnist-5k``,
4000 train / 1000 test at 28x28) a small CNN classifier (``sculpt.metrics.train_classifier``) is
fitted on the train split; its 128-d penultimate features are the feature space of every number
below, and its accuracy on the test split is printed. Real data only: no model is scored.

1. **Bias curve, held-out against train.** FID of random subsets of n test images (without
   replacement) against the whole train split, for n = 250, 500, 1000, 2000 where the test split
   holds n images (digits: 250 only; MNIST: up to 1000), mean +- std over subsets. Then FID-infinity
   (Chong & Forsyth 2020) by ``sculpt.metrics.fid_infinity(train, test)``: the train side is fixed,
   so its own finite-sample bias stays in the intercept, as in the paper. The truth here is unknown
   and need not be 0 (digits' test split is the last 297 digits, by other writers; and the
   classifier has seen the train images, not the test images).
2. **Control with a known answer.** Train and test are pooled. Each trial draws two disjoint random
   subsets of n images each, so both sides come from one distribution and the true FID is 0; n runs
   over 250, 500, 1000, 2000 and the largest n the pool allows (digits: 898, so no 1000 or 2000).
   ``extrapolate_infinity`` fits mean FID(n) = FID_inf + slope / n, which should give about 0.
   Then the protocol of 1. on random splits of the pool with the real split's sizes (truth 0): the
   mean and std over splits of FID, FID-infinity, and FID-infinity less the train side's own bias,
   against which the real split's values are placed (in std). The std is the sampling noise of one
   test set, which fid_infinity does not remove.
3. **Extraction speed**: seconds per 1,000 images of ``ClassifierExtractor.features`` (uint8
   quantisation, resize, forward pass). Inception-v3 is timed with **random weights** (pytorch-fid's
   FID weights cannot be downloaded here), on MNIST images resized 28 -> 299: the architecture's cost,
   not a usable FID extractor.
4. **sculpt against torchmetrics** on exactly the same features. torchmetrics' ``FrechetInceptionDistance``
   and ``KernelInceptionDistance`` get a custom feature module that turns the uint8 images they are
   fed into sculpt's features (float64, so that torchmetrics computes and returns float64; with a
   custom module its ``normalize`` flag does not touch the images). The features it stores are
   checked to equal sculpt's. FID: train vs test, and train vs 250 test images; beside them a third
   float64 route (the trace term as the sum of singular values of B^1/2 A^1/2) and, with ``--mpmath``,
   a 40-digit reference (about a minute per FID). KID: the whole of two equal-size sets as one subset
   (no randomness, so both must agree to round-off), and 100 random subsets of 250 (different random
   streams, so the means differ by sampling noise: the difference is printed in standard errors,
   sqrt(std_a^2 + std_b^2) / sqrt(100)).

Torch and NumPy's BLAS run with one thread each (the machine is shared). About 2 minutes on
2 cores; ``--quick`` is a smoke run (100 classifier steps, few subsets, about 20 s).

    python benchmarks/eval_metrics.py
    python benchmarks/eval_metrics.py --quick
    python benchmarks/eval_metrics.py --mpmath     # + 40-digit FID references, about 5 minutes
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from sculpt.data import ImageDataset, load_dataset
from sculpt.images import from_uint8, to_uint8
from sculpt.metrics import (
    FeatureExtractor,
    FIDInfinity,
    InceptionExtractor,
    extrapolate_infinity,
    feature_moments,
    fid_infinity,
    frechet_distance,
    kid,
    train_classifier,
)
from sculpt.metrics.inception import FIDInceptionV3

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist-5k"
SIZES = (250, 500, 1000, 2000)  # the sample sizes the issue asks for
KID_SUBSET_SIZE = 250  # fits in digits' 297 test images, so both datasets use the same size


@dataclass(frozen=True)
class Settings:
    classifier_steps: int  # train_classifier's AdamW steps
    trials: int  # random subsets per n on the bias curves
    fid_inf_trials: int  # subsets per size inside fid_infinity
    fid_inf_splits: int  # random train/test-sized splits of the pooled data, each given to fid_infinity
    kid_subsets: int
    inception_images: int  # images timed through Inception (random weights)
    speed_repeats: int  # the classifier timing is the median of this many passes


FULL = Settings(
    classifier_steps=500,
    trials=50,
    fid_inf_trials=20,
    fid_inf_splits=20,
    kid_subsets=100,
    inception_images=32,
    speed_repeats=3,
)
QUICK = Settings(
    classifier_steps=100,
    trials=3,
    fid_inf_trials=2,
    fid_inf_splits=2,
    kid_subsets=10,
    inception_images=4,
    speed_repeats=1,
)


# ----------------------------------------------------------------------------- bias curves


def fids_against_reference(reference: np.ndarray, pool: np.ndarray, n: int, trials: int, seed: int) -> np.ndarray:
    """FID of the whole `reference` against `trials` random subsets of n rows of `pool`."""
    rng = np.random.default_rng(seed)
    trials = 1 if n == len(pool) else trials  # every subset is the whole pool
    return np.array([frechet_distance(reference, pool[rng.choice(len(pool), n, replace=False)]) for _ in range(trials)])


def fids_disjoint(pool: np.ndarray, n: int, trials: int, seed: int) -> np.ndarray:
    """FID between two disjoint random subsets of n rows each of `pool` (same distribution: truth 0)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(trials):
        order = rng.permutation(len(pool))
        values.append(frechet_distance(pool[order[:n]], pool[order[n : 2 * n]]))
    return np.array(values)


def lever(ns: tuple[int, ...]) -> str:
    """How far the n -> infinity extrapolation reaches beyond the fitted sizes, in units of 1/n."""
    span = 1 / ns[0] - 1 / ns[-1]
    return f"1/n -> 0 lies {(1 / ns[-1]) / span:.1f} fitted spans beyond the largest n"


def bias_against_train(name: str, train: np.ndarray, test: np.ndarray, settings: Settings) -> FIDInfinity:
    print(
        f"\n-- {name} bias curve: random subsets of n held-out test images vs all {len(train)} train images, "
        f"{settings.trials} subsets per n --"
    )
    fit = fid_infinity(train, test, trials=settings.fid_inf_trials, seed=0)
    for n in SIZES:
        if n > len(test):
            print(f"{name} FID test n={n} vs train: n/a (the test split holds {len(test)} images)")
            continue
        values = fids_against_reference(train, test, n, settings.trials, seed=n)
        note = " (the whole test split: 1 subset)" if n == len(test) else ""
        bias = values.mean() - fit.fid_inf
        print(
            f"{name} FID test n={n} vs train: {values.mean():.3f} ± {values.std():.3f}{note}; "
            f"FID(n) - FID∞ = {bias:+.3f} ({bias / values.mean():.0%} of the value)"
        )
    print(
        f"{name} FID∞ (fid_infinity, train fixed, {len(fit.ns)} sizes n={fit.ns[0]}..{fit.ns[-1]}, "
        f"{settings.fid_inf_trials} subsets each): {fit.fid_inf:.3f}, slope {fit.slope:.0f} (bias = slope / n), "
        f"r²={fit.r2:.3f}; {lever(fit.ns)}"
    )
    print(
        f"{name} train side's own bias, left in FID∞ (if the bias is symmetric in the two sizes): "
        f"slope / {len(train)} = {fit.slope / len(train):.3f}; FID∞ less it {fit.fid_inf - fit.slope / len(train):.3f}"
    )
    return fit


def bias_control(name: str, train: np.ndarray, test: np.ndarray, real_fit: FIDInfinity, settings: Settings) -> None:
    pool = np.concatenate([train, test])
    largest = len(pool) // 2
    sizes = sorted({n for n in SIZES if n <= largest} | {largest})
    print(
        f"\n-- {name} control: two disjoint random subsets of n images each from train ∪ test "
        f"({len(pool)} images), so the truth is 0; {settings.trials} pairs per n --"
    )
    means = []
    for n in sizes:
        values = fids_disjoint(pool, n, settings.trials, seed=n)
        means.append(values.mean())
        print(f"{name} FID n={n} vs n={n}: {values.mean():.3f} ± {values.std():.3f}; n x FID = {n * values.mean():.0f}")
    for n in SIZES:
        if n > largest:
            print(f"{name} FID n={n} vs n={n}: n/a (needs {2 * n} images, the pool holds {len(pool)})")
    for label, kept in (("all n", sizes), ("n >= 500", [n for n in sizes if n >= 500])):
        # n = 250 is below 2 (d + 1) = 258, where the bias stops being linear in 1/n.
        if len(kept) < 2:
            print(f"{name} control FID∞ over {label}: n/a (needs two sizes, has {kept})")
            continue
        fid_inf, slope, r2 = extrapolate_infinity(kept, [means[sizes.index(n)] for n in kept])
        print(
            f"{name} control FID∞ (extrapolate_infinity, both sides n, over {label} = {kept[0]}..{kept[-1]}): "
            f"{fid_inf:.3f}, slope {slope:.0f}, r²={r2:.3f}; truth 0, error {fid_inf:+.3f}"
        )
    # The real split's sizes, with the images shuffled between the two sides: the same protocol as the
    # bias curve above where the truth is 0. The spread over splits is the sampling noise of one set,
    # which fid_infinity does not remove; it calibrates the real split's FID and FID-infinity.
    full, intercepts, corrected = [], [], []
    for split in range(settings.fid_inf_splits):
        order = np.random.default_rng(split).permutation(len(pool))
        fake, real = pool[order[: len(test)]], pool[order[len(test) :]]
        full.append(frechet_distance(real, fake))
        fit = fid_infinity(real, fake, trials=settings.fid_inf_trials, seed=split)
        intercepts.append(fit.fid_inf)
        corrected.append(fit.fid_inf - fit.slope / len(real))
    real_corrected = real_fit.fid_inf - real_fit.slope / len(train)
    print(
        f"{name} control: {settings.fid_inf_splits} random splits of train ∪ test into {len(train)} / {len(test)} "
        f"(truth 0), fid_infinity as above"
    )
    real_full = frechet_distance(train, test)
    for label, values, real_value in (
        (f"FID test ({len(test)}) vs train ({len(train)})", full, real_full),
        ("FID∞", intercepts, real_fit.fid_inf),
        (f"FID∞ less the {len(train)}'s own bias", corrected, real_corrected),
    ):
        mean, std = np.mean(values), np.std(values)
        print(
            f"{name} control {label}: {mean:.3f} ± {std:.3f}; the real split's {real_value:.3f} "
            f"lies {(real_value - mean) / std:+.1f} std from it"
        )


# ----------------------------------------------------------------------------- speed


def seconds_per_thousand(extractor: FeatureExtractor, images: Tensor, repeats: int, batch_size: int = 64) -> float:
    """Median over `repeats` passes of the wall time of extractor.features, per 1,000 images."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        extractor.features(images, batch_size=batch_size, progress=False)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) / len(images) * 1000


def inception_speed(images: Tensor, settings: Settings) -> None:
    torch.manual_seed(0)
    extractor = InceptionExtractor(FIDInceptionV3(), weights_hash="random").eval()
    extractor.features(images[:2], batch_size=2, progress=False)  # warm-up: first-call allocations
    count = settings.inception_images
    per_thousand = seconds_per_thousand(extractor, images[:count], repeats=1, batch_size=16)
    print(
        f"inception-v3 (RANDOM weights, architecture cost only), MNIST 28 -> 299 RGB, batch 16, "
        f"{count} images: {per_thousand:.1f} s per 1000 images, {per_thousand / 60:.1f} min"
    )


# ----------------------------------------------------------------------------- torchmetrics


class SculptFeatureModule(nn.Module):
    """torchmetrics' custom feature extractor: uint8 images [N, C, H, W] -> sculpt's features, float64 [N, D].

    uint8 -> [-1, 1] by `from_uint8`, which sculpt's pipeline quantises back to the same uint8
    values, so these are exactly the features `extractor.features` gives for the original images.
    """

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.feature_dim  # spares torchmetrics a dummy 299x299 forward pass

    def forward(self, images: Tensor) -> Tensor:
        floats = from_uint8(images.movedim(1, -1).numpy())  # [N, C, H, W] in [-1, 1]
        return torch.from_numpy(self.extractor.features(floats, progress=False))


def as_uint8(images: Tensor) -> Tensor:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, C, H, W], sculpt's quantisation."""
    return torch.from_numpy(to_uint8(images)).movedim(-1, 1).contiguous()


def feed(metric, real: Tensor, fake: Tensor, batch_size: int = 500) -> None:
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(as_uint8(images[start : start + batch_size]), real=is_real)


def torchmetrics_fid(module: nn.Module, real: Tensor, fake: Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=module, normalize=False)
    feed(metric, real, fake)
    return float(metric.compute())


def torchmetrics_kid(
    module: nn.Module, real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int
) -> tuple[float, float, object]:
    from torchmetrics.image.kid import KernelInceptionDistance

    metric = KernelInceptionDistance(feature=module, subsets=subsets, subset_size=subset_size)
    feed(metric, real, fake)
    torch.manual_seed(seed)  # its subsets come from torch.randperm on the global generator
    mean, std = metric.compute()
    return float(mean), float(std), metric


def fid_by_singular_values(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID with tr((A^1/2 B A^1/2)^1/2) taken as the sum of the singular values of B^1/2 A^1/2.

    An independent float64 route: (B^1/2 A^1/2)^T (B^1/2 A^1/2) = A^1/2 B A^1/2, so no square
    root is taken of eigenvalues that round-off has pushed around zero.
    """

    def psd_sqrt(cov: np.ndarray) -> np.ndarray:
        eigvals, eigvecs = np.linalg.eigh(cov)
        return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T

    (mu_a, cov_a), (mu_b, cov_b) = feature_moments(feats_a), feature_moments(feats_b)
    trace_covmean = np.linalg.svd(psd_sqrt(cov_b) @ psd_sqrt(cov_a), compute_uv=False).sum()
    return float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_covmean)


def fid_mpmath(feats_a: np.ndarray, feats_b: np.ndarray, digits: int = 40) -> float:
    """FID of the same float64 features to `digits` digits: moments in long double, then mpmath.

    Slow (about a minute for d = 128): mpmath's symmetric eigensolver is pure Python.
    """
    import mpmath

    mpmath.mp.dps = digits

    def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = x.astype(np.longdouble)  # 64-bit mantissa on x86: a sum of 4,000 terms stays far below 1e-16
        mu = x.mean(axis=0)
        centred = x - mu
        return mu, centred.T @ centred / (len(x) - 1)

    def exact(value: np.longdouble):
        numerator, denominator = value.as_integer_ratio()
        return mpmath.mpf(numerator) / denominator

    def matrix(cov: np.ndarray):
        return mpmath.matrix([[exact(v) for v in row] for row in cov])

    (mu_a, cov_a), (mu_b, cov_b) = moments(feats_a), moments(feats_b)
    a, b = matrix(cov_a), matrix(cov_b)
    eigvals, eigvecs = mpmath.eigsy(a)
    sqrt_a = eigvecs * mpmath.diag([mpmath.sqrt(max(e, 0)) for e in eigvals]) * eigvecs.T
    middle = mpmath.eigsy(sqrt_a * b * sqrt_a, eigvals_only=True)
    trace_covmean = sum(mpmath.sqrt(max(e, 0)) for e in middle)
    dim = len(mu_a)
    value = sum(exact(x - y) ** 2 for x, y in zip(mu_a, mu_b, strict=True))
    value += sum(a[i, i] + b[i, i] for i in range(dim)) - 2 * trace_covmean
    return float(value)


def compare_fid(
    label: str, real_feats: np.ndarray, fake_feats: np.ndarray, tm_value: float, high_precision: bool
) -> None:
    sculpt_value = frechet_distance(real_feats, fake_feats)
    svd_value = fid_by_singular_values(real_feats, fake_feats)
    print(
        f"{label}: sculpt {sculpt_value:.10f}, torchmetrics {tm_value:.10f}, "
        f"|diff| {abs(sculpt_value - tm_value):.1e}; svd route {svd_value:.10f}"
    )
    if high_precision:
        started = time.perf_counter()
        reference = fid_mpmath(real_feats, fake_feats)
        errors = ", ".join(
            f"{who} {value - reference:+.1e}"
            for who, value in (("sculpt", sculpt_value), ("torchmetrics", tm_value), ("svd route", svd_value))
        )
        print(f"{label}: 40-digit mpmath {reference:.12f} ({time.perf_counter() - started:.0f} s); errors: {errors}")


def compare_torchmetrics(
    name: str,
    extractor: FeatureExtractor,
    train: ImageDataset,
    test: ImageDataset,
    feats: dict[str, np.ndarray],
    settings: Settings,
    high_precision: bool,
) -> None:
    import torchmetrics

    print(f"\n-- {name}: sculpt vs torchmetrics {torchmetrics.__version__} on the same features (float64) --")
    module = SculptFeatureModule(extractor)
    train_feats, test_feats = feats["train"], feats["test"]
    eigvals = np.linalg.eigvalsh(np.cov(train_feats, rowvar=False))
    print(
        f"{name} train covariance: eigenvalues {eigvals[-1]:.3g} down to {eigvals[0]:.2g}, "
        f"{(eigvals < 1e-9 * eigvals[-1]).sum()} below 1e-9 x the largest (features that barely vary); "
        f"smallest feature std {train_feats.std(axis=0).min():.1e}"
    )

    # Whole sets, one subset: torchmetrics' randperm then takes every row, so there is no randomness.
    real_rows = np.random.default_rng(0).choice(len(train), len(test), replace=False)
    real = train.images()[real_rows]
    sculpt_kid, _ = kid(train_feats[real_rows], test_feats, subsets=1, subset_size=len(test))
    tm_kid, _, metric = torchmetrics_kid(module, real, test.images(), subsets=1, subset_size=len(test), seed=0)
    stored = torch.cat(metric.real_features + metric.fake_features).numpy()
    mismatch = np.abs(stored - np.concatenate([train_feats[real_rows], test_feats])).max()
    print(f"{name} features: torchmetrics' stored {stored.shape[0]} rows vs sculpt's, max |diff| {mismatch:.1e}")

    tm_fid = torchmetrics_fid(module, train.images(), test.images())
    compare_fid(
        f"{name} fid train ({len(train)}) vs test ({len(test)})", train_feats, test_feats, tm_fid, high_precision
    )
    few = np.random.default_rng(1).choice(len(test), 250, replace=False)
    tm_fid = torchmetrics_fid(module, train.images(), test.images()[few])
    compare_fid(f"{name} fid train ({len(train)}) vs test (250)", train_feats, test_feats[few], tm_fid, high_precision)
    print(
        f"{name} kid train ({len(test)} of {len(train)}) vs test ({len(test)}), 1 subset of all {len(test)}: "
        f"sculpt {sculpt_kid:.10f}, torchmetrics {tm_kid:.10f}, |diff| {abs(sculpt_kid - tm_kid):.1e}"
    )

    subsets = settings.kid_subsets
    sculpt_mean, sculpt_std = kid(train_feats, test_feats, subsets=subsets, subset_size=KID_SUBSET_SIZE, seed=0)
    tm_mean, tm_std, _ = torchmetrics_kid(
        module, train.images(), test.images(), subsets=subsets, subset_size=KID_SUBSET_SIZE, seed=0
    )
    standard_error = np.hypot(sculpt_std, tm_std) / np.sqrt(subsets)
    diff = abs(sculpt_mean - tm_mean)
    print(
        f"{name} kid train vs test, {subsets} subsets of {KID_SUBSET_SIZE}: "
        f"sculpt {sculpt_mean:.4f} ± {sculpt_std:.4f}, torchmetrics {tm_mean:.4f} ± {tm_std:.4f}, "
        f"|diff| {diff:.1e} ({diff / standard_error:.2f} standard errors)"
    )


# ----------------------------------------------------------------------------- main


def benchmark(name: str, spec: str, settings: Settings, high_precision: bool) -> tuple[ImageDataset, FeatureExtractor]:
    train = load_dataset(spec, split="train")
    test = load_dataset(spec, split="test")
    side = train.shape[-1]
    print(f"\n==== {name}: {len(train)} train / {len(test)} test images, {side}x{side} ====")
    started = time.perf_counter()
    extractor, accuracy = train_classifier(train, steps=settings.classifier_steps, test_dataset=test, progress=False)
    print(
        f"{name} classifier: {settings.classifier_steps} steps in {time.perf_counter() - started:.1f} s, "
        f"{extractor.feature_dim}-d features, held-out test accuracy {accuracy:.1%}"
    )
    feats = {"train": extractor.features(train.images(), progress=False)}
    feats["test"] = extractor.features(test.images(), progress=False)
    per_thousand = seconds_per_thousand(extractor, train.images(), settings.speed_repeats)
    print(
        f"{name} feature extraction, classifier, batch 64, {len(train)} images, median of {settings.speed_repeats}: "
        f"{per_thousand:.3f} s per 1000 images"
    )
    real_fit = bias_against_train(name, feats["train"], feats["test"], settings)
    bias_control(name, feats["train"], feats["test"], real_fit, settings)
    compare_torchmetrics(name, extractor, train, test, feats, settings, high_precision)
    return train, extractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short classifier training, few subsets")
    parser.add_argument(
        "--mpmath", action="store_true", help="also compute each FID comparison to 40 digits (about 1 min each)"
    )
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    try:
        import torchmetrics  # noqa: F401  (fail now, not after training two classifiers)
    except ImportError:
        raise SystemExit(
            "this benchmark compares against torchmetrics: pip install torchmetrics (it is in sculpt's dev extra)"
        ) from None
    torch.set_num_threads(1)
    # NumPy's OpenBLAS starts a thread per core; on a busy machine that makes a 128-d FID ~70x slower.
    threadpool_limits(limits=1, user_api="blas")
    # torchmetrics' KID warns that it keeps every feature in memory: a few MB here.
    warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted features")
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, torch.set_num_threads(1) (shared, noisy machine): {threads} thread; "
        "NumPy BLAS limited to 1 thread (threadpoolctl)"
    )
    print(f"settings: {settings}")
    started = time.perf_counter()
    benchmark("digits", "digits", settings, args.mpmath)
    mnist, _ = benchmark("mnist", f"mnist:{MNIST_DIR}", settings, args.mpmath)
    print("\n==== Inception-v3 speed ====")
    inception_speed(mnist.images(), settings)
    print(f"\nwall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
