"""Evaluation metrics: feature extractors and the maths of FID, KID, IS and friends."""

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
