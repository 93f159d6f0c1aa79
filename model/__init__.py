"""Model registry: one entry per model with its builder, recipe defaults and Grad-CAM layer.

    MODELS["resnet18"](num_classes=10, norm="bn")   # builds the model
    MODELS["resnet18"].epochs, .batch_size, .lr       # its recipe's defaults
    MODELS["resnet18"].cam_layer                      # its default Grad-CAM layer
    MODELS["resnet18"].deep_layer                     # its last feature map (4x4)

In the spirit of timm's ``default_cfgs``: every fact about a model lives here,
and ``main.py``, ``gradcam.py`` and the tests read it from here.
"""
import contextlib
import io
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .custom_resnet import custom_resnet
from .norm import NORMS
from .resnet import resnet18


@dataclass(frozen=True)
class ModelEntry:
    """A model's builder and the defaults of its training recipe."""

    builder: Callable[..., nn.Module]
    epochs: int  # recipe length
    batch_size: int
    lr: float  # One Cycle's peak learning rate for SGD
    cam_layer: str  # deepest layer with 8x8 maps on 32x32 inputs (gradcam.py says why)
    deep_layer: str  # the last feature map before pooling (4x4), the usual CAM layer elsewhere
    about: str

    def __call__(self, num_classes: int = 10, norm: str = "bn") -> nn.Module:
        return self.builder(num_classes=num_classes, norm=norm)


# ResNet-18 follows kuangliu/pytorch-cifar (batch 128, SGD lr 0.1, weight decay 5e-4), with
# One Cycle instead of 200 cosine epochs. The custom ResNet is Page's recipe (batch 512,
# Nesterov SGD, peak 0.4 at epoch 5); on CIFAR-10 its range test's loss bottoms out near
# 0.33, Smith's upper bound for a cycle (docs/results.md).
MODELS = {
    "resnet18": ModelEntry(resnet18, epochs=20, batch_size=128, lr=0.1, cam_layer="layer3",
                           deep_layer="layer4",
                           about="ResNet-18 in kuangliu's CIFAR form, 11.2M parameters"),
    "custom_resnet": ModelEntry(custom_resnet, epochs=24, batch_size=512, lr=0.4, cam_layer="layer2",
                                deep_layer="layer3",
                                about="Page's ResNet9-style network, 6.6M parameters"),
}
ADAM_LR = 1e-3  # peak lr for --optimizer adam when none is given


def summary(model: nn.Module, image_size: int = 32) -> str:
    """torchsummary's table, computed on the CPU in eval mode so BN statistics stay untouched."""
    from torchsummary import summary as torchsummary

    was_training = model.training
    model.eval()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        torchsummary(model, (3, image_size, image_size), device="cpu")
    model.train(was_training)
    return buf.getvalue()


__all__ = ["ADAM_LR", "MODELS", "NORMS", "ModelEntry", "summary"]
