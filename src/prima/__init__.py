"""PRIMA: multi-image vision-language models for pixel-grounded reasoning segmentation."""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy re-exports keep `import prima` light
    if name == "PrimaPredictor":
        from prima.inference.predictor import PrimaPredictor

        return PrimaPredictor
    raise AttributeError(f"module 'prima' has no attribute {name!r}")
