"""Encoders and their preprocessing.

The registry names are resolved lazily: Ray Data CPU tasks import ``preprocess_batch`` from here
and should not pay for importing torch, timm and torchvision.
"""

from medcurate.models.preprocess import Preprocessing, preprocess_batch

_REGISTRY_NAMES = ("DEFAULT_ENCODER", "Encoder", "create_encoder", "fu_layers", "list_encoders",
                   "source_collections", "workspace_weights_sha256")

__all__ = ["Preprocessing", "preprocess_batch", *_REGISTRY_NAMES]


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        from medcurate.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
