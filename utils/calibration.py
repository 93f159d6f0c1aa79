"""Calibration: expected calibration error and the reliability diagram.

Guo et al., "On Calibration of Modern Neural Networks" (2017), https://arxiv.org/abs/1706.04599:
the predictions are sorted by confidence (the top class's probability) into
``bins`` equal-width bins over [0, 1]; ECE is the mean over all predictions of
|accuracy of the bin - mean confidence of the bin|, i.e. each bin weighted by
its share of the predictions. 0 is perfectly calibrated. A confidence of
exactly 1 falls into the last bin, one of exactly 0.1 into (0.0, 0.1].
"""
import numpy as np

ECE_BINS = 15  # as Guo et al. and most papers since


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list:
    """One dict per bin: its edges, count, accuracy and mean confidence (both fractions; None if empty)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or len(probs) != len(labels) or bins < 1:
        raise ValueError(f"need probs (N, K), N labels and bins >= 1, got {probs.shape}, "
                         f"{len(labels)} labels, {bins} bins")
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "accuracy": float(correct[inside].mean()) if n else None,
                     "confidence": float(confidence[inside].mean()) if n else None})
    return rows


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error as a fraction (0.031 = 3.1 points)."""
    rows = reliability(probs, labels, bins)
    total = sum(r["count"] for r in rows)
    return sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / max(total, 1)


def reliability_figure(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Accuracy per confidence bin against the diagonal, with the share of predictions below."""
    from .plots import plt

    rows = reliability(probs, labels, bins)
    width = 1.0 / bins
    mids = [(r["low"] + r["high"]) / 2 for r in rows]
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), dpi=100, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    filled = [r for r in rows if r["count"]]  # an empty bin draws nothing
    at = [(r["low"] + r["high"]) / 2 for r in filled]
    acc = [r["accuracy"] for r in filled]
    ax.bar(at, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(at, [r["confidence"] - a for r, a in zip(filled, acc, strict=True)], bottom=acc, width=width,
           edgecolor="tab:red", color="none", hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability diagram: ECE {100 * ece(probs, labels, bins):.2f}% ({bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    counts = np.array([r["count"] for r in rows], dtype=float)
    ax_n.bar(mids, counts / max(counts.sum(), 1), width=width, edgecolor="black", color="tab:gray")
    ax_n.set(xlabel="confidence (probability of the predicted class)", ylabel="share")
    fig.tight_layout()
    return fig
