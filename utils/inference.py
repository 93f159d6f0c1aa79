"""Predicting with a trained model: image files in, class probabilities out.

A ``Predictor`` holds a model with the preprocessing and precision of the run
that trained it, read from the checkpoint (``utils.checkpoint.load_trained``) or
from an exported ONNX file's metadata, so inference never preprocesses
differently from training. ``predict_files`` reads any list of files in batches;
a file that cannot be read gets its error instead of a prediction.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Preprocess, load_trained
from .images import IMG_EXTENSIONS, DataError, read_image
from .device import choose_precision, run_precision, use_channels_last
from .errors import UserError


@dataclass
class Predictor:
    """A PyTorch model in eval mode and how to feed it; ``probs`` maps uint8 images to probabilities."""

    model: torch.nn.Module
    classes: list
    preprocess: Preprocess
    device: torch.device
    precision: object  # utils.device.Precision of the run
    channels_last: bool
    tta: bool  # average the logits of each image and its mirror image
    name: str = ""
    batch_size: int = 256  # the run's: the same batches as its test pass, so the same numbers
    layer: str = ""  # the run's Grad-CAM layer
    data_dir: str = ""  # the run's data
    args: dict = None  # the run's arguments

    @classmethod
    def from_checkpoint(cls, path, device, tta=None) -> "Predictor":
        """The run's model with its precision (bf16/fp16 where it trained so and the device can) and flip."""
        trained = load_trained(path, device)
        args = trained.args
        precision = choose_precision(device, run_precision(args))
        channels_last = use_channels_last(device, args.get("channels_last", True), args.get("norm", "bn"))
        model = trained.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return cls(model, trained.classes, trained.preprocess, device, precision, channels_last,
                   args.get("tta", False) if tta is None else tta, f"{args['model']} ({args['norm']})",
                   args.get("batch_size", 256), args.get("gradcam_layer", ""), args.get("data_dir", ""), args)

    @torch.no_grad()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        """(N, classes) float32 logits on the CPU of uint8 (N, H, W, 3) images, as evaluate() computes them."""
        x = self.preprocess.to_tensor(images).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast():
            out = self.model(x).float()
            if self.tta:
                out = (out + self.model(x.flip(-1)).float()) / 2
        return out.cpu()

    def probs(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).softmax(1).numpy()


def find_images(paths) -> list:
    """(file, the folder argument it was found under or None) for every image in ``paths``, in order.

    A folder is searched recursively; hidden files and folders are skipped. A
    path that does not exist is a UserError.
    """
    found = []
    for arg in paths:
        path = Path(arg)
        if path.is_file():
            found.append((path, None))
        elif path.is_dir():
            found += [(f, path) for f in sorted(path.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                      and not any(part.startswith(".") for part in f.relative_to(path).parts)]
        else:
            raise UserError(f"{path} does not exist: pass image files or folders of images")
    return found


def true_class(file: Path, root, classes: list):
    """The class of ``file`` when it sits in ``root/<class>/...`` under one of ``classes``, else None."""
    if root is None:
        return None
    first = file.relative_to(root).parts[0]
    return first if first in classes and len(file.relative_to(root).parts) > 1 else None


def read_batch(files: list, size: int) -> tuple:
    """(uint8 images of the readable files, their indices, {index: error message} of the others)."""
    images, ok, errors = [], [], {}
    for k, f in enumerate(files):
        try:
            images.append(read_image(f, size))
            ok.append(k)
        except DataError as exc:
            errors[k] = str(exc)
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, ok, errors


def top_k(probs: np.ndarray, classes: list, k: int) -> list:
    """[(class, probability), ...] of the ``k`` most probable classes, most probable first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]
