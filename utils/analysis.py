"""Where a trained model goes wrong: confusion matrix, per-class accuracy, the worst mistakes."""
import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    return np.bincount(num_classes * np.asarray(labels) + np.asarray(preds),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(matrix: np.ndarray, classes: list) -> list:
    """One row per class: class, correct, total, accuracy (percent of that class's images)."""
    rows = []
    for k, name in enumerate(classes):
        total = int(matrix[k].sum())
        correct = int(matrix[k, k])
        rows.append({"class": name, "correct": correct, "total": total,
                     "accuracy": 100.0 * correct / total if total else float("nan")})
    return rows


def top_losses(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` misclassified images, the worst first.

    Ordered by the probability given to the true class, lowest first (the
    highest cross-entropy), as fastai's ``plot_top_losses`` does.
    """
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    true_prob = probs[wrong, labels[wrong]]
    return wrong[np.argsort(true_prob, kind="stable")][:n]
