"""Grad-CAM and Grad-CAM++ for the CIFAR-10 models, and a command that explains one image.

    with GradCAM(model, "layer3") as cam:
        maps = cam(images)                  # (B, H, W) floats in [0, 1], predicted classes
        maps = cam(images, class_idx=[3, 5])  # or one class per image
    picture = overlay(to_uint8_image(images[0]), maps[0])   # uint8 RGB, jet heat on the image

    python gradcam.py --checkpoint runs/X/best.pt --image photo.png --class cat --out cam.png

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
import argparse
import difflib
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_LAYERS = {"resnet18": "layer3", "custom_resnet": "layer2"}  # 8x8 maps; see above
METHODS = ("gradcam", "gradcam++")


class LayerError(ValueError):
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


# ------------------------------------------------------------------ command line
class CLIError(Exception):
    """Bad input: main() prints ``error: <message>`` and returns 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(f"{message} (see python gradcam.py --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Explain one image with Grad-CAM: the overlay and the top-3 classes.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by main.py")
    p.add_argument("--image", required=True, help="any image file; it is resized to 32x32")
    p.add_argument("--layer", default=None,
                   help="dotted layer name (default: " + ", ".join(f"{n} for {m}" for m, n in
                                                                   DEFAULT_LAYERS.items()) + ")")
    p.add_argument("--class", dest="class_name", default=None,
                   help="class to explain, by name (default: the predicted class)")
    p.add_argument("--method", default="gradcam", choices=METHODS, help="CAM method")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in the overlay, in [0, 1]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--out", default="cam.png", help="PNG to write")
    return p


def load_model(path, device):
    """(model in eval mode, class names, args) from a main.py checkpoint; CLIError otherwise."""
    from model import MODELS
    from utils.io import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--checkpoint {path} does not exist: pass the best.pt or last.pt of a run")
    try:
        ckpt = load_checkpoint(path, device)
        args, classes, state = ckpt["args"], ckpt["classes"], ckpt["model"]
        name, norm = args["model"], args["norm"]
    except Exception as exc:  # unpickling or a dict of another shape: the same to the user
        raise CLIError(f"cannot read checkpoint {path} ({type(exc).__name__}): "
                       "pass a best.pt or last.pt written by main.py") from None
    if name not in MODELS:
        raise CLIError(f"checkpoint {path} is a {name!r}, which this repository does not build "
                       f"(models: {', '.join(MODELS)}): pass a checkpoint written by main.py")
    model = MODELS[name](num_classes=len(classes), norm=norm)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CLIError(f"checkpoint {path} says {name} (norm {norm}) but its weights do not fit "
                       f"({str(exc).splitlines()[0]}): pass a checkpoint written by main.py") from None
    return model.to(device).eval(), list(classes), args


def top3(probs: np.ndarray, classes: list) -> str:
    """'cat 61.2% | dog 30.1% | deer 2.0%'."""
    return " | ".join(f"{classes[i]} {probs[i]:.1%}" for i in np.argsort(-probs)[:3])


def explain_figure(image: np.ndarray, picture: np.ndarray, probs: np.ndarray, classes: list,
                   explained: str, layer: str, method: str):
    """Figure: the 32x32 input and its overlay; top-3 classes in the title."""
    from utils.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
    for ax, img, title in zip(axes, (image, picture), ("input (32x32)", f"{method} for '{explained}'\n"
                                                      f"at {layer}"), strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(top3(probs, classes), fontsize=10)
    fig.tight_layout()
    return fig


def explain(args) -> int:
    from utils.cifar import to_uint8_image
    from utils.data import read_image, test_transform
    from utils.device import resolve_device
    from utils.plots import save_figure

    if not 0 <= args.alpha <= 1:
        raise CLIError(f"--alpha must be in [0, 1], got {args.alpha}")
    device = resolve_device(args.device)
    model, classes, saved = load_model(args.checkpoint, device)
    layer = args.layer or DEFAULT_LAYERS[saved["model"]]
    check_layer(model, layer)
    if args.class_name is not None and args.class_name not in classes:
        raise CLIError(f"--class {args.class_name!r} is not one of this checkpoint's classes: "
                       f"{', '.join(classes)}")
    path, out = Path(args.image), Path(args.out)
    if not path.is_file():
        raise CLIError(f"--image {path} does not exist: pass the path of an image file")
    if not out.parent.is_dir():  # before any work is done
        raise CLIError(f"cannot write --out {out}: folder {out.parent} does not exist")
    rgb = read_image(path)  # (32, 32, 3) uint8, resized like the training images
    x = test_transform()(image=rgb)["image"][None]  # normalised (1, 3, 32, 32)
    target = None if args.class_name is None else classes.index(args.class_name)
    with CAMS[args.method](model, layer) as cam:
        heatmap = cam(x, target)[0]
        probs = cam.logits.float().softmax(1)[0].cpu().numpy()
        explained = classes[int(cam.class_idx[0])]
    picture = overlay(to_uint8_image(x[0]), heatmap, args.alpha)
    save_figure(explain_figure(rgb, picture, probs, classes, explained, layer, args.method), out)
    print(top3(probs, classes))
    print(f"{args.method} of '{explained}' at {layer} -> {out}")
    return 0


def main(argv=None) -> int:
    from utils.data import DataError
    from utils.device import SetupError

    try:
        return explain(build_parser().parse_args(argv))
    except (CLIError, LayerError, DataError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing --out
        print(f"error: cannot write {exc.filename or 'the output'} ({exc.strerror}): "
              "choose a writable --out", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
