"""Grad-CAM and Grad-CAM++ for the CIFAR-10 models (the command is ``gradcam.py``).

    with GradCAM(model, "layer3") as cam:
        maps = cam(images)                  # (B, H, W) floats in [0, 1], predicted classes
        maps = cam(images, class_idx=[3, 5])  # or one class per image
    picture = overlay(to_uint8_image(images[0]), maps[0])   # uint8 RGB, jet heat on the image

Selvaraju et al., "Grad-CAM" (2017), https://arxiv.org/abs/1610.02391, and
Chattopadhay et al., "Grad-CAM++" (2018), https://arxiv.org/abs/1710.11063.
The maps follow pytorch-grad-cam (jacobgil) step for step: ReLU of the weighted
sum of the layer's channels, min-max per image, bilinear resize to the input,
min-max again. The tests check that both methods agree with that library
within 1e-4. Unlike it, a CAM here runs the model in eval mode and then restores
the mode it found, never touches the parameters' ``.grad``, and removes its
hooks on leaving the ``with`` block even when the body raises (it swallows no
exception). Activations come from a forward hook and gradients from a tensor
hook on the layer's output: module backward hooks break on in-place ops that
follow the layer (https://github.com/pytorch/pytorch/issues/61519).

Default layers: the last feature map that still has 8x8 cells. On 32x32 images
ResNet-18's layer4 and the custom ResNet's layer3 are 4x4, so each cell of the
map would cover a quarter of the image's width and every heatmap would be a
few blurry blobs; ResNet-18's layer3 and the custom ResNet's layer2 (both 8x8,
256 channels) are the deepest layers that can still say which part of the
object the class came from.
"""
import difflib

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MODELS

from .errors import UserError

DEFAULT_LAYERS = {name: entry.cam_layer for name, entry in MODELS.items()}  # 8x8 maps; see above
METHODS = ("gradcam", "gradcam++")


class LayerError(UserError, ValueError):
    """A target layer that does not exist or gives no spatial map; the message lists valid ones."""


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name`` in ``model.named_modules()`` (``layer3``, ``layer4.1.conv2``)."""
    modules = dict(model.named_modules())
    modules.pop("", None)  # the model itself
    if name in modules:
        return modules[name]
    near = difflib.get_close_matches(name, list(modules), n=4, cutoff=0.6)
    top = [n for n, _ in model.named_children()]
    nested = next((n for n in modules if n.count(".") == 2), next(iter(modules)))
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise LayerError(f"no layer {name!r} in {type(model).__name__}: {hint}top-level layers are "
                     f"{', '.join(top)}; dotted names reach inside, e.g. {nested}")


def check_layer(model: nn.Module, name: str, image_size: int = 32) -> tuple:
    """Shape (C, H, W) of the layer's output for one image; LayerError unless it is a spatial map.

    Runs one zero image through the model in eval mode on the model's device,
    so a typo in ``--gradcam-layer`` stops a run before training, not after.
    """
    layer = find_layer(model, name)
    shapes = []
    handle = layer.register_forward_hook(lambda m, i, out: shapes.append(getattr(out, "shape", None)))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    _check_map(name, shapes[-1] if shapes else None)
    return tuple(shapes[-1][1:])


def _check_map(name, shape) -> None:
    if shape is None:
        raise LayerError(f"layer {name!r} is not used in the forward pass: pick a convolutional "
                         "layer such as one of " + ", ".join(DEFAULT_LAYERS.values()))
    if len(shape) != 4 or shape[-1] * shape[-2] < 2:
        raise LayerError(f"layer {name!r} outputs shape {tuple(shape)}, not a spatial (B, C, H, W) "
                         "map: pick an earlier convolutional layer (defaults: "
                         + ", ".join(f"{m} {n}" for m, n in DEFAULT_LAYERS.items()) + ")")


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map to [0, 1], with pytorch-grad-cam's 1e-7 guard for flat maps."""
    flat = maps.flatten(1)
    low = flat.min(1).values[:, None, None]
    maps = maps - low
    return maps / (1e-7 + maps.flatten(1).max(1).values[:, None, None])


class GradCAM:
    """Grad-CAM of one layer: channel weights = spatial mean of the class score's gradient."""

    def __init__(self, model: nn.Module, target_layer):
        self.model = model
        self.layer_name = target_layer if isinstance(target_layer, str) else type(target_layer).__name__
        self.layer = find_layer(model, target_layer) if isinstance(target_layer, str) else target_layer
        self.logits = None  # (B, classes) of the last call, detached
        self.class_idx = None  # (B,) the classes the last maps explain
        self._handles = []
        self._activation = None
        self._gradient = None

    def __enter__(self):
        self._handles.append(self.layer.register_forward_hook(self._save_activation))
        return self

    def __exit__(self, exc_type, exc, tb):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._activation = self._gradient = None
        return False  # an exception in the body propagates

    def _save_activation(self, module, inputs, output):
        _check_map(self.layer_name, getattr(output, "shape", None))
        self._activation = output
        if output.requires_grad:  # not in the caller's own no_grad forward passes
            self._handles.append(output.register_hook(self._save_gradient))

    def _save_gradient(self, grad):
        self._gradient = grad.detach()

    def _targets(self, logits, class_idx) -> torch.Tensor:
        batch, num_classes = logits.shape
        if class_idx is None:
            return logits.argmax(1)
        if isinstance(class_idx, (int, np.integer)):
            class_idx = [int(class_idx)] * batch
        idx = torch.as_tensor(class_idx, dtype=torch.long, device=logits.device).flatten()
        if len(idx) != batch:
            raise ValueError(f"class_idx has {len(idx)} entries for {batch} images: give one per image")
        if idx.min() < 0 or idx.max() >= num_classes:
            raise ValueError(f"class_idx must be in [0, {num_classes}), got {idx.tolist()}")
        return idx

    @staticmethod
    def _weights(activations, gradients) -> torch.Tensor:
        return gradients.mean((2, 3))  # (B, C)

    def __call__(self, images: torch.Tensor, class_idx=None) -> np.ndarray:
        """Heatmaps (B, H, W) in [0, 1] at the input's size; ``class_idx``: None, an int or one per image."""
        if not self._handles:
            raise RuntimeError("use GradCAM inside `with GradCAM(model, layer) as cam:`")
        if images.ndim == 3:
            images = images[None]
        device = next(self.model.parameters()).device
        # A new leaf on the model's device: the caller's tensor keeps its values and
        # requires_grad; needing its gradient keeps the graph alive even when every
        # weight is frozen.
        x = images.detach().to(device, torch.float32).requires_grad_(True)
        was_training = self.model.training
        self.model.eval()  # explain the model as it predicts: BN running stats, no batch mixing
        try:
            # fp32 even inside an autocast region: bf16 gradients would blur small maps
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                logits = self.model(x)
                if self._activation is None:
                    _check_map(self.layer_name, None)
                classes = self._targets(logits, class_idx)
                score = logits.gather(1, classes[:, None]).sum()
                # Gradient with respect to the layer's output only, so the parameters'
                # .grad stay as the caller left them; the tensor hook records it.
                torch.autograd.grad(score, self._activation)
            activations = self._activation.detach().float()  # (B, C, h, w)
            weights = self._weights(activations, self._gradient.float())  # (B, C)
            cam = F.relu((weights[:, :, None, None] * activations).sum(1))  # (B, h, w)
            cam = F.interpolate(_min_max(cam)[:, None], size=x.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0]  # = cv2.resize INTER_LINEAR
            cam = _min_max(cam)
        finally:
            self.model.train(was_training)
            for handle in self._handles[1:]:  # this call's tensor hooks
                handle.remove()
            del self._handles[1:]
            self._activation = self._gradient = None
        self.logits, self.class_idx = logits.detach(), classes.detach()
        return cam.cpu().numpy()


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++: positive gradients weighted per pixel (eq. 19 of the paper, as pytorch-grad-cam)."""

    @staticmethod
    def _weights(activations, gradients) -> torch.Tensor:
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        sum_activations = activations.sum((2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_activations * g3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (gradients.clamp(min=0) * alpha).sum((2, 3))


CAMS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB: ``(1 - alpha) * image + alpha * jet(heatmap)``.

    ``image`` is the de-normalised RGB image, uint8 or floats in [0, 1]; ``heatmap`` is (H, W)
    in [0, 1]. Unlike pytorch-grad-cam's show_cam_on_image, the result is not divided by its
    maximum, so the image keeps its own brightness.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image / 255.0
    if image.shape[:2] != heatmap.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} differ in size")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.uint8(np.round(255 * np.clip(heatmap, 0, 1)))
    jet = cv2.applyColorMap(heat, cv2.COLORMAP_JET)[..., ::-1] / 255.0  # OpenCV is BGR
    return np.uint8(np.round(255 * ((1 - alpha) * image + alpha * jet)))
