"""Model registry: ``MODELS[name](num_classes=..., norm=...)`` builds a model."""
from .custom_resnet import custom_resnet
from .norm import NORMS
from .resnet import resnet18

MODELS = {
    "resnet18": resnet18,
    "custom_resnet": custom_resnet,
}

__all__ = ["MODELS", "NORMS"]
