"""Frozen-CLIP image features: extraction and the memory-mapped, provenance-checked cache."""

from clipcap.features.cache import (
    FORMAT_VERSION,
    FeatureCache,
    FeatureCacheError,
    FeatureCacheMismatch,
    validate_image_ids,
)
from clipcap.features.extract import ImageReadError, cache_expectation, extract_features, load_image

__all__ = [
    "FORMAT_VERSION",
    "FeatureCache",
    "FeatureCacheError",
    "FeatureCacheMismatch",
    "ImageReadError",
    "cache_expectation",
    "extract_features",
    "load_image",
    "validate_image_ids",
]
