"""Data: the sample format, masks, and the dataset generators and converters."""

from prima.data.schema import (
    CATEGORIES,
    Sample,
    Segment,
    iter_samples,
    parse_answer,
    read_samples,
    strip_markup,
    validate_sample,
    write_samples,
)

__all__ = [
    "CATEGORIES",
    "Sample",
    "Segment",
    "iter_samples",
    "parse_answer",
    "read_samples",
    "strip_markup",
    "validate_sample",
    "write_samples",
]
