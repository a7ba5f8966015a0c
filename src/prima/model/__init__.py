"""The PRIMA model: config, vision encoders, SQuARE and its ablations, LLM, grounding, losses, FLOPs."""

from prima.model.config import ModelConfig, load_model_config

__all__ = [
    "GeneratedSegment",
    "GenerationOutput",
    "ModelConfig",
    "PrimaModel",
    "PrimaOutput",
    "create_model",
    "load_model_config",
]


def __getattr__(name: str):  # torch/transformers load only when the model itself is asked for
    if name in ("PrimaModel", "PrimaOutput", "GenerationOutput", "GeneratedSegment", "create_model"):
        from prima.model import prima

        return getattr(prima, name)
    raise AttributeError(f"module 'prima.model' has no attribute {name!r}")
