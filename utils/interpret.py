"""After training: what the final model gets wrong, all derived from one set of predictions.

As fastai's ``Interpretation``: the test set is predicted once (with the
test-time flip when the run used it, so the figures agree with the reported
accuracy), and the per-class accuracy, the confusion matrix, the worst
mistakes and both galleries are computed from those probabilities.
"""
from dataclasses import dataclass

import numpy as np

from .analysis import confusion_matrix, per_class, top_losses
from .cifar import to_uint8_image
from .engine import predict
from .gpu_aug import normalize, to_chw
from .gradcam import CAMS, overlay
from .plots import confusion_figure, image_grid


@dataclass
class Interpretation:
    probs: np.ndarray  # (N, K) softmax probabilities
    labels: np.ndarray  # (N,) true classes
    classes: list

    @classmethod
    def from_model(cls, model, loader, split, device, precision, channels_last, tta):
        probs = predict(model, loader, device, precision, channels_last, tta).numpy()
        return cls(probs, split.labels, split.classes)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.preds, len(self.classes))

    def per_class(self) -> list:
        return per_class(self.confusion(), self.classes)

    def worst(self, n: int) -> list:
        """Up to ``n`` mistakes, lowest probability of the true class first, as dicts."""
        idx = top_losses(self.probs, self.labels, n)
        return [{"rank": r, "index": int(i), "true": int(self.labels[i]), "pred": int(self.preds[i]),
                 "confidence": float(self.probs[i, self.preds[i]]),
                 "true_prob": float(self.probs[i, self.labels[i]])} for r, i in enumerate(idx, 1)]


def write_analysis(run, interp: Interpretation, split, model, layer: str, gallery_size: int,
                   method: str = "gradcam") -> str:
    """per_class.csv, confusion.png and, unless ``gallery_size`` is 0, the two galleries.

    Returns the per-class table for summary.txt.
    """
    rows = interp.per_class()
    run.write_csv("per_class.csv", rows, ["class", "correct", "total", "accuracy"])
    run.figure("confusion.png", confusion_figure(interp.confusion(), interp.classes))
    if gallery_size:
        write_galleries(run, interp, split, model, layer, interp.worst(gallery_size), method)
    return "per-class test accuracy (final model):\n" + "".join(
        f"  {r['class']:<12} {r['accuracy']:6.2f}% ({r['correct']}/{r['total']})\n" for r in rows)


def write_galleries(run, interp: Interpretation, split, model, layer: str, worst: list,
                    method: str = "gradcam") -> None:
    """misclassified.csv/.png and gradcam.png: the worst mistakes, then their maps.

    The images are de-normalised from the tensors the model saw; Grad-CAM
    explains the unflipped image (with ``method``, one of utils.gradcam.CAMS), for the
    predicted and for the true class.
    """
    classes = interp.classes
    run.write_csv("misclassified.csv",
                  [{**w, "true": classes[w["true"]], "predicted": classes[w["pred"]],
                    "confidence": f"{w['confidence']:.4f}", "true_prob": f"{w['true_prob']:.4f}"}
                   for w in worst], ["rank", "index", "true", "predicted", "confidence", "true_prob"])
    note = (f"the {len(worst)} worst of {int((interp.preds != interp.labels).sum())} mistakes "
            "(lowest probability of the true class first)")
    shown, titles, tiles, labels = [], [], [], []
    if worst:
        # the test transform's normalisation (equal to 1e-5, tests/test_gpu_aug.py), without Albumentations
        batch = normalize(to_chw(split.images[[w["index"] for w in worst]]))
        shown = [to_uint8_image(x) for x in batch]  # de-normalised: what the model saw
        true, pred = [w["true"] for w in worst], [w["pred"] for w in worst]
        with CAMS[method](model, layer) as cam:
            maps_pred, maps_true = cam(batch, pred), cam(batch, true)
        for k, (w, image) in enumerate(zip(worst, shown, strict=True)):
            t, p = classes[w["true"]], classes[w["pred"]]
            titles.append(f"pred {p} ({w['confidence']:.0%})\ntrue {t} ({w['true_prob']:.0%})")
            tiles += [image, overlay(image, maps_pred[k]), overlay(image, maps_true[k])]
            labels += [f"true {t}\npred {p} ({w['confidence']:.0%})", f"CAM of pred\n{p}", f"CAM of true\n{t}"]
    run.figure("misclassified.png", image_grid(shown, titles, ncols=5, suptitle=note))
    run.figure("gradcam.png", image_grid(tiles, labels, ncols=9,
                                         suptitle=f"{method} at {layer}: each image, then the map of "
                                                  "the predicted class, then of the true class"))
