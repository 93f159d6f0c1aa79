"""Class activation maps (CAMs) for the CIFAR-10 models (the command is ``gradcam.py``).

    with GradCAM(model, "layer3") as cam:   # or CAMS[method](model, layer), method in METHODS
        maps = cam(images)                  # (B, H, W) floats in [0, 1], predicted classes
        maps = cam(images, class_idx=[3, 5])  # or one class per image
    picture = overlay(to_uint8_image(images[0]), maps[0])   # uint8 RGB, jet heat on the image

The methods, in ``METHODS`` order; the first five backpropagate the class's logit:

- gradcam: Selvaraju et al. (2017), https://arxiv.org/abs/1610.02391
- gradcam++: Chattopadhay et al. (2018), https://arxiv.org/abs/1710.11063
- hirescam: Draelos & Carin (2020), https://arxiv.org/abs/2011.08891 (gradient x activation
  in each cell, no spatial mean)
- xgradcam: Fu et al. (2020), https://arxiv.org/abs/2008.02312 (gradients averaged with the
  activations as weights)
- layercam: Jiang et al. (2021), https://ieeexplore.ieee.org/document/9462463 (each cell's
  positive gradient)
- eigencam: Muhammad & Yeasin (2020), https://arxiv.org/abs/2008.00299 (the activations' first
  principal component: no gradients, and class-agnostic, the same map for every class)
- scorecam: Wang et al. (2020), https://arxiv.org/abs/1910.01279 (no gradients, but one
  forward pass per channel of the layer and image: 256 or 512 here, so by far the slowest)

The maps follow pytorch-grad-cam (jacobgil) step for step: ReLU of the weighted
sum of the layer's channels, min-max per image, bilinear resize to the input,
min-max again. The tests check that every method agrees with that library
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
METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")


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

    uses_gradients = True  # False: the map needs forward passes only (no backward pass)

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
        """(B, C) channel weights: the spatial mean of the class score's gradient."""
        return gradients.mean((2, 3))

    def _cam(self, x, classes, activations, gradients) -> torch.Tensor:
        """(B, h, w) map before ReLU and scaling: the channels summed with ``_weights``.

        Subclasses that weight each cell, or need no gradients, override this instead.
        """
        weights = self._weights(activations, gradients)  # (B, C)
        return (weights[:, :, None, None] * activations).sum(1)

    def _forward(self, x, class_idx):
        """Logits, target classes, the layer's activations and, if used, their gradients."""
        with torch.set_grad_enabled(self.uses_gradients):
            logits = self.model(x)
            if self._activation is None:
                _check_map(self.layer_name, None)
            classes = self._targets(logits, class_idx)
            if self.uses_gradients:
                score = logits.gather(1, classes[:, None]).sum()
                # Gradient with respect to the layer's output only, so the parameters'
                # .grad stay as the caller left them; the tensor hook records it.
                torch.autograd.grad(score, self._activation)
        activations = self._activation.detach().float()  # (B, C, h, w)
        gradients = self._gradient.float() if self.uses_gradients else None
        return logits.detach(), classes.detach(), activations, gradients

    def __call__(self, images: torch.Tensor, class_idx=None) -> np.ndarray:
        """Heatmaps (B, H, W) in [0, 1] at the input's size; ``class_idx``: None, an int or one per image."""
        name = type(self).__name__
        if not self._handles:
            raise RuntimeError(f"use {name} inside `with {name}(model, layer) as cam:`")
        if images.ndim == 3:
            images = images[None]
        device = next(self.model.parameters()).device
        # A new leaf on the model's device: the caller's tensor keeps its values and
        # requires_grad; for the gradient methods, needing its gradient keeps the graph
        # alive even when every weight is frozen.
        x = images.detach().to(device, torch.float32).requires_grad_(self.uses_gradients)
        was_training = self.model.training
        self.model.eval()  # explain the model as it predicts: BN running stats, no batch mixing
        try:
            # fp32 even inside an autocast region: bf16 gradients would blur small maps
            with torch.autocast(device.type, enabled=False):
                logits, classes, activations, gradients = self._forward(x, class_idx)
                cam = F.relu(self._cam(x, classes, activations, gradients))  # (B, h, w)
            cam = F.interpolate(_min_max(cam)[:, None], size=x.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0]  # = cv2.resize INTER_LINEAR
            cam = _min_max(cam)
        finally:
            self.model.train(was_training)
            for handle in self._handles[1:]:  # this call's tensor hooks
                handle.remove()
            del self._handles[1:]
            self._activation = self._gradient = None
        self.logits, self.class_idx = logits, classes
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


class HiResCAM(GradCAM):
    """HiResCAM: gradient times activation in every cell, summed over channels.

    No spatial mean of the gradient, so the map shows exactly which cells raised the score.
    """

    def _cam(self, x, classes, activations, gradients) -> torch.Tensor:
        return (gradients * activations).sum(1)


class XGradCAM(GradCAM):
    """XGradCAM: gradients averaged with the activations as weights (the paper's axioms)."""

    @staticmethod
    def _weights(activations, gradients) -> torch.Tensor:
        # pytorch-grad-cam's order of operations: divide per cell, then sum
        sum_activations = activations.sum((2, 3), keepdim=True)
        return (gradients * activations / (sum_activations + 1e-7)).sum((2, 3))


class LayerCAM(GradCAM):
    """LayerCAM: each cell's activation weighted by its own positive gradient."""

    def _cam(self, x, classes, activations, gradients) -> torch.Tensor:
        return (gradients.clamp(min=0) * activations).sum(1)


def _principal_projection(activations: np.ndarray) -> np.ndarray:
    """(B, h, w): each image's cells projected on the first principal component of its channels.

    The same numpy SVD as pytorch-grad-cam's ``get_2d_projection`` (float32, full matrices,
    NaN set to 0): the component's sign is arbitrary and, after the ReLU, decides which half
    of the map survives, so a different SVD routine could show the opposite half.
    """
    activations = np.where(np.isnan(activations), 0, activations)
    projections = []
    for image in activations:
        cells = image.reshape(image.shape[0], -1).transpose()  # (h*w, C)
        cells = cells - cells.mean(axis=0)
        _, _, vt = np.linalg.svd(cells, full_matrices=True)
        projections.append((cells @ vt[0, :]).reshape(image.shape[1:]))
    return np.float32(projections)


class EigenCAM(GradCAM):
    """EigenCAM: the activations' first principal component; no gradients, same map for any class.

    ``logits`` and ``class_idx`` are still set (and ``class_idx`` checked) like the other methods.
    """

    uses_gradients = False

    def _cam(self, x, classes, activations, gradients) -> torch.Tensor:
        return torch.from_numpy(_principal_projection(activations.cpu().numpy())).to(activations.device)


class ScoreCAM(GradCAM):
    """Score-CAM: each channel weighted by the class's logit for the input masked by that channel.

    No gradients, but one forward pass per channel and image, ``batch_size`` masked images at
    a time. As in pytorch-grad-cam, the weights are the softmax, over the channels, of the
    class's logit for each masked input (not a softmax over the classes).
    """

    uses_gradients = False

    def __init__(self, model: nn.Module, target_layer, batch_size: int = 64):
        super().__init__(model, target_layer)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def _cam(self, x, classes, activations, gradients) -> torch.Tensor:
        with torch.no_grad():
            scores = torch.stack([self._scores(image, a, int(c))
                                  for image, a, c in zip(x, activations, classes)])  # (B, C)
            weights = scores.softmax(1)
            return (weights[:, :, None, None] * activations).sum(1)

    def _scores(self, image, activations, target: int) -> torch.Tensor:
        """(C,) the target's logit for ``image`` (3, H, W) masked by each channel of ``activations``."""
        masks = F.interpolate(activations[None], size=image.shape[-2:], mode="bilinear",
                              align_corners=True)[0]  # = nn.UpsamplingBilinear2d
        low, high = masks.amin((1, 2), keepdim=True), masks.amax((1, 2), keepdim=True)
        masks = (masks - low) / (high - low + 1e-8)  # each channel to [0, 1]
        scores = [self.model(image * masks[i:i + self.batch_size, None])[:, target]
                  for i in range(0, len(masks), self.batch_size)]
        return torch.cat(scores).float()


CAMS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
        "xgradcam": XGradCAM, "layercam": LayerCAM, "eigencam": EigenCAM, "scorecam": ScoreCAM}


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
