"""Frozen-CLIP image features: extraction and the memory-mapped, provenance-checked cache."""

from clipcap.data.images import DEFAULT_MAX_PIXELS, ImageReadError, load_image
from clipcap.features.cache import (
    FORMAT_VERSION,
    FeatureCache,
    FeatureCacheError,
    FeatureCacheMismatch,
    RowBlocks,
    cache_expectation,
    validate_image_ids,
)
from clipcap.features.extract import (
    ExtractionReport,
    extract_entries,
    extract_features,
    partial_folder,
    write_summary,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMAT_VERSION",
    "ExtractionReport",
    "FeatureCache",
    "FeatureCacheError",
    "FeatureCacheMismatch",
    "ImageReadError",
    "RowBlocks",
    "cache_expectation",
    "extract_entries",
    "extract_features",
    "load_image",
    "partial_folder",
    "validate_image_ids",
    "write_summary",
]
