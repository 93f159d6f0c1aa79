"""What the data holds (class counts, channel statistics) and where a trained model goes wrong."""
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


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class, (num_classes,) int64."""
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def channel_stats(images: np.ndarray, chunk: int = 5000) -> tuple:
    """Per-channel mean and std of (N, H, W, 3) uint8 images, pixels scaled to [0, 1].

    Over every pixel of every image (the std of the pixels, not the mean of
    per-image stds), accumulated in float64 chunks so 50,000 images need little memory.
    """
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
