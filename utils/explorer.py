"""What the explorer app (``app.py``) shows, as plain functions a test can call without a browser.

``Explorer`` loads a checkpoint once with the preprocessing, precision and
test-time flip of its run, finds the layers Grad-CAM can explain, and reads the
run's test data when it can still be reached (else the parts that need it say
why). Every method takes and returns plain Python, NumPy or file paths; a
user's mistake is a ``UserError`` whose message the page shows.
"""
from pathlib import Path

import numpy as np
import torch

from .analysis import top_losses
from .errors import UserError
from .gradcam import CAMS, METHODS, overlay
from .images import read_image
from .inference import Predictor, top_k

SCALE = 8  # 32x32 pictures are shown 8x larger, pixels kept sharp
MAX_MISTAKES = 50


class Explorer:
    def __init__(self, checkpoint, device=torch.device("cpu"), data_dir=None):
        self.checkpoint = Path(checkpoint)
        self.predictor = Predictor.from_checkpoint(checkpoint, device)
        self.classes = self.predictor.classes
        self.size = self.predictor.preprocess.image_size
        self.args = self.predictor.args
        self.layers = spatial_layers(self.predictor.model, self.size)
        self.test, self.data_note = self._test_split(data_dir or self.args.get("data_dir"))
        self._probs = None  # test-set predictions, computed on first use

    def _test_split(self, data_dir):
        """(the run's test Split, "") or (None, why it cannot be shown)."""
        try:
            from .data import balanced_subset, load_data  # not in an exported Space, which has no data
            _, test = load_data(data_dir, download=False)
        except ImportError:
            return None, "This copy of the app carries no test data: only its examples."
        except (UserError, OSError, TypeError) as exc:
            return None, f"The run's test data ({data_dir}) cannot be read here: {exc}"
        if test.classes != self.classes:
            return None, f"{data_dir} holds other classes than this model: {', '.join(test.classes)}"
        if self.args.get("test_subset"):  # the subset the run tested on
            keep = balanced_subset(test.labels, self.args["test_subset"], self.args.get("seed", 1))
            test.images, test.labels = test.images[keep], test.labels[keep]
        return test, ""

    # ------------------------------------------------------------------ one image
    def read(self, path) -> np.ndarray:
        if path is None:
            raise UserError("no image: upload one or click an example")
        return read_image(path, self.size)  # DataError (a UserError) names a file that is no image

    def classify(self, path, k: int) -> dict:
        """{class: probability} of the ``k`` most probable classes (k capped at the class count)."""
        k = max(1, min(int(k), len(self.classes)))
        return dict(top_k(self.predictor.probs(self.read(path)[None])[0], self.classes, k))

    def explain(self, path, target: str, layer: str, method: str, opacity: float) -> np.ndarray:
        """The image beside its CAM overlay for ``target`` (a class name, or "predicted"), enlarged."""
        image = self.read(path)
        index = None if target in (None, "", "predicted") else self.class_index(target)
        heat = self.cams(image[None], [index] if index is not None else None, layer, method)[0]
        return enlarge(np.concatenate([image, overlay(image, heat, float(opacity))], axis=1))

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise UserError(f"class {name!r} is not one of the model's: {', '.join(self.classes)}")
        return self.classes.index(name)

    def cams(self, images: np.ndarray, class_idx, layer: str, method: str) -> np.ndarray:
        if method not in METHODS:
            raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
        if layer not in dict(self.layers):
            raise UserError(f"layer {layer!r} is not one of the model's spatial layers: "
                            f"{', '.join(name for name, _ in self.layers)}")
        x = self.predictor.preprocess.to_tensor(images).to(self.predictor.device)
        with CAMS[method](self.predictor.model, layer) as cam:
            return cam(x, class_idx)

    # ------------------------------------------------------------------ the test set
    def examples(self) -> list:
        """One test image per class as uint8 arrays (class order), or [] without test data."""
        if self.test is None:
            return []
        return [self.test.images[np.flatnonzero(self.test.labels == c)[0]]
                for c in range(len(self.classes)) if (self.test.labels == c).any()]

    def mistakes(self, n: int, layer: str, method: str) -> list:
        """[(picture, caption)] of the ``n`` worst mistakes: image, CAM of the predicted, of the true class."""
        if self.test is None:
            raise UserError(self.data_note)
        if self._probs is None:
            batch = self.predictor.batch_size
            self._probs = np.concatenate([self.predictor.probs(self.test.images[i:i + batch])
                                          for i in range(0, len(self.test.labels), batch)])
        idx = top_losses(self._probs, self.test.labels, max(0, min(int(n), MAX_MISTAKES)))
        if not len(idx):
            return []
        images, true = self.test.images[idx], self.test.labels[idx]
        pred = self._probs[idx].argmax(1)
        maps_pred, maps_true = self.cams(images, pred, layer, method), self.cams(images, true, layer, method)
        return [(enlarge(np.concatenate([im, overlay(im, mp), overlay(im, mt)], axis=1)),
                 f"true {self.classes[t]} | predicted {self.classes[p]} ({self._probs[i, p]:.0%}) | "
                 f"maps: predicted, true")
                for im, mp, mt, t, p, i in zip(images, maps_pred, maps_true, true, pred, idx, strict=True)]

    # ------------------------------------------------------------------ the run
    def run_files(self) -> dict:
        """The run folder's pictures and per-class table, where they exist."""
        folder = self.checkpoint.parent
        found = {name: folder / name for name in ("curves.png", "confusion.png", "per_class.csv")}
        return {name: str(path) for name, path in found.items() if path.is_file()}


def spatial_layers(model, size: int) -> list:
    """[(name, (C, H, W))] of the modules that output a spatial map, in forward order, blocks and up."""
    shapes, handles = {}, []

    def record(name):
        def hook(module, inputs, out):  # returns None: the output stays as it is
            shapes.setdefault(name, tuple(getattr(out, "shape", ()))[1:])
        return hook
    for name, module in model.named_modules():
        if name and name.count(".") <= 1 and any(True for _ in module.children()):  # layers, blocks
            handles.append(module.register_forward_hook(record(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [(name, shape) for name, shape in shapes.items() if len(shape) == 3 and shape[1] * shape[2] > 1]


def enlarge(picture: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Nearest-neighbour enlargement: every pixel a ``scale`` x ``scale`` block."""
    return picture.repeat(scale, axis=0).repeat(scale, axis=1)
