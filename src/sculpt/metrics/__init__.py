"""Evaluation metrics: feature extractors and the maths of FID, KID, IS and friends."""

from sculpt.metrics.features import (
    ClassifierExtractor,
    FeatureExtractor,
    get_extractor,
    load_classifier,
    preprocess,
    reference_stats,
    train_classifier,
)
from sculpt.metrics.inception import InceptionExtractor, load_inception
from sculpt.metrics.likelihood import LikelihoodResult, bits_per_dim, bpd_ode, bpd_vlb
from sculpt.metrics.stats import (
    REFERENCE_META_KEYS,
    FIDInfinity,
    ReferenceStats,
    density_coverage,
    extrapolate_infinity,
    feature_moments,
    fid_infinity,
    frechet_distance,
    frechet_distance_from_moments,
    inception_score,
    kid,
    load_reference,
    precision_recall,
    save_reference,
)

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

# Feature extractors and likelihoods.
__all__ += [
    "ClassifierExtractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "LikelihoodResult",
    "bits_per_dim",
    "bpd_ode",
    "bpd_vlb",
    "get_extractor",
    "load_classifier",
    "load_inception",
    "preprocess",
    "reference_stats",
    "train_classifier",
]
