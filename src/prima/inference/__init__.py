"""Inference: `PrimaPredictor` (images + question -> grounded answer), `prima predict`, `prima demo`, web demo."""

from typing import Any

__all__ = ["Prediction", "PrimaPredictor", "Segment"]


def __getattr__(name: str) -> Any:  # lazy, so `prima --help` does not pay for numpy and Pillow
    if name in __all__:
        from prima.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'prima.inference' has no attribute {name!r}")
