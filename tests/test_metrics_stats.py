"""Metric maths against closed forms, independent implementations and hand-built cases."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from sculpt.metrics import (
    REFERENCE_META_KEYS,
    density_coverage,
    extrapolate_infinity,
    fid_infinity,
    frechet_distance,
    frechet_distance_from_moments,
    inception_score,
    kid,
    load_reference,
    precision_recall,
    save_reference,
)

scipy_linalg = pytest.importorskip("scipy.linalg")


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    factor = rng.standard_normal((d, d))
    return factor @ factor.T / d + 0.1 * np.eye(d)


def whitened(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Samples whose sample mean is exactly 0 and sample covariance exactly I (to round-off)."""
    x = rng.standard_normal((n, d))
    x -= x.mean(axis=0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(x, rowvar=False))
    return x @ (eigvecs / np.sqrt(eigvals)) @ eigvecs.T


def scipy_frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    """The pytorch-fid formula, through scipy's general matrix square root."""
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------ FID


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("d", [3, 16, 64])
def test_frechet_matches_scipy_sqrtm(seed, d):
    rng = np.random.default_rng(seed)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    cov_a, cov_b = random_spd(rng, d), random_spd(rng, d)
    expected = scipy_frechet(mu_a, cov_a, mu_b, cov_b)
    assert frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(
        expected, rel=1e-6
    )


def test_frechet_of_features_matches_scipy_on_sample_moments():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 12))
    b = rng.standard_normal((400, 12)) * 1.5 + 0.3
    expected = scipy_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    # torch tensors (float32 here) are accepted and give the same answer as their values
    as_tensor = frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert as_tensor == pytest.approx(
        frechet_distance(a.astype(np.float32), b.astype(np.float32)), rel=1e-12
    )


def test_frechet_identical_sets_is_exactly_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 10))
    assert frechet_distance(x, x) == 0.0
    # A permutation changes the moments only by round-off; no shortcut, still ~0, never < 0.
    value = frechet_distance(x, x[::-1])
    assert 0.0 <= value < 1e-10


def test_frechet_closed_form_diagonal_gaussians():
    # For commuting covariances W2^2 = ||mu_a - mu_b||^2 + sum (sqrt a_i - sqrt b_i)^2.
    a = np.array([0.5, 1.0, 2.0, 4.0, 9.0])
    b = np.array([1.0, 1.0, 8.0, 0.25, 1e-3])
    mu_a = np.array([0.0, 1.0, -2.0, 0.5, 3.0])
    mu_b = np.array([1.0, 1.0, 0.0, 0.5, -1.0])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_from_moments(mu_a, np.diag(a), mu_b, np.diag(b))
    assert got == pytest.approx(expected, abs=1e-10)
    # Same answer in any rotated basis: the covariances still commute.
    rotation, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((5, 5)))
    rotated = frechet_distance_from_moments(
        rotation @ mu_a,
        rotation @ np.diag(a) @ rotation.T,
        rotation @ mu_b,
        rotation @ np.diag(b) @ rotation.T,
    )
    assert rotated == pytest.approx(expected, abs=1e-10)


def test_frechet_closed_form_from_exact_sample_moments():
    # Features whose sample moments are exactly (0, I) and (mu, diag(s)).
    rng = np.random.default_rng(3)
    d = 6
    s = np.array([0.25, 0.5, 1.0, 2.0, 4.0, 9.0])
    mu = np.linspace(-1.0, 1.0, d)
    a = whitened(rng, 500, d)
    b = mu + whitened(rng, 700, d) * np.sqrt(s)
    expected = mu @ mu + np.sum((1.0 - np.sqrt(s)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-10)


def test_frechet_is_symmetric():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((100, 20))
    b = rng.standard_normal((150, 20)) @ rng.standard_normal((20, 20)) * 0.5
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)


def test_frechet_bad_inputs():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="different feature widths.*8 vs 9"):
        frechet_distance(rng.standard_normal((50, 8)), rng.standard_normal((50, 9)))
    with pytest.raises(ValueError, match=r"10 samples of 32-dimensional.*at least 33"):
        frechet_distance(rng.standard_normal((10, 32)), rng.standard_normal((100, 32)))
    with pytest.raises(ValueError, match="at least 2 are needed"):
        frechet_distance(rng.standard_normal((1, 1)), rng.standard_normal((10, 1)))
    bad = rng.standard_normal((50, 4))
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"feats_b contains NaN or inf.*first bad row: 7"):
        frechet_distance(rng.standard_normal((50, 4)), bad)
    with pytest.raises(ValueError, match="2-D matrix"):
        frechet_distance(rng.standard_normal(50), rng.standard_normal(50))


# ---------------------------------------------------------------------- FID-infinity


def test_extrapolate_infinity_exact_line():
    ns = np.array([100, 250, 1000, 5000])
    intercept, slope, r2 = extrapolate_infinity(ns, 3.25 + 470.0 / ns)
    assert intercept == pytest.approx(3.25, abs=1e-10)
    assert slope == pytest.approx(470.0, rel=1e-10)
    assert r2 == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="two or more distinct"):
        extrapolate_infinity([100, 100], [1.0, 2.0])


def test_fid_infinity_recovers_population_distance():
    # Real features with exact moments (0, I); fake ones drawn from N(mu, diag(s)), whose
    # distance to N(0, I) is known. At d = 64 plain FID on 6,000 samples is biased upward
    # by ~0.2; the extrapolated value must remove most of that.
    rng = np.random.default_rng(0)
    d = 64
    mu = np.full(d, 0.1)
    s = np.linspace(0.5, 2.0, d)
    real = whitened(rng, 2000, d)
    fake = mu + rng.standard_normal((6000, d)) * np.sqrt(s)
    true_distance = mu @ mu + np.sum((1.0 - np.sqrt(s)) ** 2)

    result = fid_infinity(real, fake, trials=5, seed=0)
    plain = frechet_distance(real, fake)
    assert plain - true_distance > 0.15  # the bias this is all about
    assert abs(result.fid_inf - true_distance) < 0.06
    assert result.slope > 0 and result.r2 > 0.98
    # default grid: 15 sizes evenly spaced in 1/n from n_fake // 10 to n_fake
    assert result.ns[0] == 600 and result.ns[-1] == 6000 and len(result.ns) == 15
    assert np.allclose(np.diff(1.0 / np.array(result.ns)), (1 / 6000 - 1 / 600) / 14, rtol=0.02)
    assert result.fids[-1] == pytest.approx(plain, rel=1e-10)  # n = n_fake is the whole set
    # deterministic given the seed
    assert fid_infinity(real, fake, trials=5, seed=0) == result


def test_fid_infinity_bad_inputs():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((500, 16))
    with pytest.raises(ValueError, match="needs more than 34 fake samples"):
        fid_infinity(real, rng.standard_normal((30, 16)))
    with pytest.raises(ValueError, match="between 17 .* and 200"):
        fid_infinity(real, rng.standard_normal((200, 16)), ns=[10, 200])


# ------------------------------------------------------------------------------ KID


def direct_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Straight from the definition, one kernel evaluation at a time."""
    m, d = x.shape
    k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_matches_direct_double_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5))
    y = rng.standard_normal((30, 5)) * 1.3 + 0.2
    # One subset of every sample is a permutation of each set, which MMD^2 ignores.
    mean, std = kid(x, y, subsets=3, subset_size=30)
    assert mean == pytest.approx(direct_mmd2_unbiased(x, y), abs=1e-10)
    assert std < 1e-10


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1500, 16))
    b = rng.standard_normal((1500, 16))
    same_mean, same_std = kid(a, b, subsets=40, subset_size=300)
    shifted_mean, _ = kid(a, b + 0.5, subsets=40, subset_size=300)
    assert shifted_mean > 0.1
    assert abs(same_mean) < 0.02 * shifted_mean
    assert abs(same_mean) < 3 * same_std  # consistent with 0: unbiased
    assert kid(a, b, subsets=40, subset_size=300) == (same_mean, same_std)  # deterministic


def test_kid_clips_subset_size_with_warning():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((25, 3))
    with pytest.warns(UserWarning, match="using subset_size=20"):
        clipped = kid(x, y, subsets=5, subset_size=1000)
    assert clipped == kid(x, y, subsets=5, subset_size=20)
    with pytest.raises(ValueError, match="different feature widths"):
        kid(x, rng.standard_normal((25, 4)))


# ------------------------------------------------------------------------------- IS


def test_inception_score_uniform_confident_predictions():
    probs = np.tile(np.eye(10), (50, 1))  # each split of 50 rows holds 5 of every class
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-12)
    assert std < 1e-12


def test_inception_score_identical_predictions_is_one():
    probs = np.tile([0.7, 0.2, 0.1], (40, 1))
    assert inception_score(probs, splits=4) == (1.0, 0.0)


def test_inception_score_hand_built_table():
    # p(y) = (3/4, 1/4); KL rows: log(4/3) and 0.5 log(2/3) + 0.5 log 2 = 0.5 log(4/3).
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    mean, std = inception_score(probs, splits=1)
    assert mean == pytest.approx((4.0 / 3.0) ** 0.75, rel=1e-12)
    assert std == 0.0


def test_inception_score_splits_like_the_original_code_when_n_is_not_divisible():
    # N = 10 rows in 3 splits: rows [0, 3), [3, 6), [6, 10) (i * N // splits), not array_split's 4, 3, 3.
    probs = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]] + [[0.5, 0.5]] * 2 + [[0.9, 0.1]] * 4)

    def score(part):  # by hand: exp(mean_x KL(p(y|x) || p(y)))
        marginal = part.mean(axis=0)
        kl = [sum(p * math.log(p / m) for p, m in zip(row, marginal, strict=True) if p > 0) for row in part]
        return math.exp(sum(kl) / len(kl))

    parts = [probs[0:3], probs[3:6], probs[6:10]]
    expected = [score(part) for part in parts]
    assert expected[0] == pytest.approx(1.0)  # three identical rows
    mean, std = inception_score(probs, splits=3)
    assert mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert std == pytest.approx(np.std(expected), rel=1e-12)
    # array_split's parts ([0, 4), [4, 7), [7, 10)) give another number.
    other = [score(part) for part in np.array_split(probs, 3)]
    assert abs(np.mean(other) - mean) > 0.05


def test_inception_score_rejects_logits():
    with pytest.raises(ValueError, match=r"sum to 1.*softmax\(logits\)"):
        inception_score(np.array([[2.0, -1.0], [0.3, 0.1]]), splits=1)
    with pytest.raises(ValueError, match="splits must be between 1 and"):
        inception_score(np.eye(3), splits=4)


# ------------------------------------------------- precision / recall, density / coverage


def test_precision_recall_identical_sets():
    x = np.random.default_rng(0).standard_normal((200, 8))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert density_coverage(x, x, k=5)[1] == 1.0


def test_precision_recall_disjoint_sets():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((100, 4))
    fake = rng.standard_normal((120, 4)) + 1000.0
    assert precision_recall(real, fake) == (0.0, 0.0)
    assert density_coverage(real, fake) == (0.0, 0.0)


def test_precision_recall_density_coverage_hand_built_1d():
    # k = 1. Real balls: radius 1 around 0, 1, 2, 3. Fake balls: radius 0.5 around each.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.25], [0.75], [10.0], [10.5]])
    # precision: 0.25 and 0.75 lie in real balls, 10 and 10.5 do not -> 1/2
    # recall: 0 and 1 lie within 0.5 of a fake, 2 and 3 do not -> 1/2
    assert precision_recall(real, fake, k=1) == (0.5, 0.5)
    # density: 0.25 and 0.75 each lie in 2 real balls (those of 0 and 1) -> 4 / (1 * 4)
    # coverage: the balls of 0 and 1 hold a fake, those of 2 and 3 do not -> 1/2
    assert density_coverage(real, fake, k=1) == (1.0, 0.5)


def test_precision_recall_blockwise_equals_full(monkeypatch):
    from sculpt.metrics import stats

    rng = np.random.default_rng(2)
    real = rng.standard_normal((150, 6))
    fake = rng.standard_normal((130, 6)) * 1.2 + 0.3
    full = precision_recall(real, fake, k=3), density_coverage(real, fake, k=5)
    monkeypatch.setattr(stats, "_DISTANCE_BLOCK_BYTES", 8 * 150 * 7)  # 7-row blocks
    assert (precision_recall(real, fake, k=3), density_coverage(real, fake, k=5)) == full


def _brute_force_pr_dc(real, fake, k_pr, k_dc):
    """Every distance as a sum of squared differences, every radius by sorting, every count by <=."""
    squared = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    def radii(x, k):
        within = squared(x, x)
        np.fill_diagonal(within, np.inf)
        return np.sort(within, axis=1)[:, k - 1]

    cross = squared(fake, real)
    precision = (cross <= radii(real, k_pr)[None, :]).any(axis=1).mean()
    recall = (cross.T <= radii(fake, k_pr)[None, :]).any(axis=1).mean()
    balls = cross <= radii(real, k_dc)[None, :]
    return (float(precision), float(recall)), (float(balls.sum(axis=1).mean() / k_dc), float(balls.any(axis=0).mean()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_with_integer_features_counts_ties_like_brute_force(seed, monkeypatch):
    from sculpt.metrics import stats

    # Integer features far from 0: many points sit exactly on a ball's boundary, and the
    # expansion ||x||^2 + ||y||^2 - 2 x.y rounds there (alone, centred on the mean, it gave about 0.65, not 0.688).
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 5, (300, 8)) + 1000.3
    fake = rng.integers(0, 6, (250, 8)) + 1000.3
    pr, dc = _brute_force_pr_dc(real, fake, 3, 5)
    assert precision_recall(real, fake, k=3) == pr
    assert density_coverage(real, fake, k=5) == dc
    if seed == 0:
        assert pr == (0.688, pytest.approx(299 / 300))
        monkeypatch.setattr(stats, "_DISTANCE_BLOCK_BYTES", 16 * 300 * 7)  # 7-row blocks: the same counts
        assert precision_recall(real, fake, k=3) == pr and density_coverage(real, fake, k=5) == dc


def test_precision_recall_with_duplicates_and_float_features_matches_brute_force():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((120, 16)) * 3 + 50
    fake = np.concatenate([real[:40], rng.standard_normal((60, 16)) * 3 + 50.5])  # 40 exact copies
    real = np.concatenate([real, real[:10]])  # and duplicates within the real set (radius 0 for k = 1)
    for k in (1, 3):
        pr, dc = _brute_force_pr_dc(real, fake, k, k)
        assert precision_recall(real, fake, k=k) == pr
        assert density_coverage(real, fake, k=k) == dc


def test_precision_recall_bad_k():
    x = np.zeros((5, 2)) + np.arange(5)[:, None]
    with pytest.raises(ValueError, match="k must be between 1 and .* \\(4\\)"):
        precision_recall(x, x, k=5)


# ------------------------------------------------------------ reference-statistics cache


META = {
    "extractor": "inception-v3-fid",
    "weights_hash": "f58cb9b6",
    "dataset": "cifar10",
    "split": "train",
    "resolution": [32, 32],
    "resize": "clean-bicubic",
    "normalisation": "(v-128)/128",
}


def test_reference_round_trip(tmp_path):
    feats = np.random.default_rng(0).standard_normal((60, 7))
    path = tmp_path / "cifar10-train.npz"
    key = save_reference(path, feats, META)
    loaded = load_reference(path, {**META, "resolution": (32, 32)})  # tuple == list in JSON
    assert loaded.key == key and len(key) == 64
    assert loaded.meta == {**META, "n": 60}
    np.testing.assert_array_equal(loaded.feats, feats)
    np.testing.assert_allclose(loaded.mu, feats.mean(axis=0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(loaded.sigma, np.cov(feats, rowvar=False), rtol=1e-14)
    assert set(REFERENCE_META_KEYS) <= set(loaded.meta)
    assert not (tmp_path / "cifar10-train.npz.tmp").exists()
    canonical = json.dumps(loaded.meta, sort_keys=True, separators=(",", ":"))
    assert key == hashlib.sha256(canonical.encode()).hexdigest()


def test_reference_mismatch_names_the_fields(tmp_path):
    feats = np.random.default_rng(1).standard_normal((40, 3))
    path = tmp_path / "ref.npz"
    save_reference(path, feats, META)
    with pytest.raises(ValueError) as error:
        load_reference(path, {**META, "split": "test", "resize": "pil-bilinear", "n": 40})
    message = str(error.value)
    assert "split: expected 'test', found 'train'" in message
    assert "resize: expected 'pil-bilinear', found 'clean-bicubic'" in message
    assert "dataset" not in message and "n:" not in message  # only the differing fields
    assert "Delete" in message and str(path) in message
    with pytest.raises(ValueError, match=r"n: expected 41, found 40"):
        load_reference(path, {**META, "n": 41})
    with pytest.raises(ValueError, match="lacks \\['weights_hash'\\]"):
        save_reference(path, feats, {k: v for k, v in META.items() if k != "weights_hash"})
