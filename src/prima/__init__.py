"""PRIMA: multi-image vision-language models for pixel-grounded reasoning segmentation."""

__version__ = "0.1.0"
