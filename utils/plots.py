"""Figures drawn after training from returned results, never inside the loop.

Each function builds and returns a Figure; ``save_figure`` writes it (whole or not
at all) and closes it, so drawing and saving stay separate and testable.
"""
import io
import math

# No matplotlib.use("Agg") here: without a display matplotlib picks Agg by itself, and
# forcing it on import would switch off a notebook's inline plots for the whole kernel.
# Every figure is closed once saved, so none pops up or lingers anywhere.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from .io import atomic_write

DPI = 100
TILE = 1.6  # inches per image in a grid: 32 px shown as ~5x5 screen pixels each


def save_figure(fig, path) -> None:
    """PNG at the figure's own dpi (no tight bbox: pixels stay where the axes say), then close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_curves(history: list):
    """Loss and accuracy per epoch, train, validation (when there is one) and test, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), dpi=DPI)
    splits = ("train", "val", "test") if history and history[-1].get("val_acc", "") != "" else ("train", "test")
    for split in splits:
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in history], marker="o", label=split)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.legend()
    fig.tight_layout()
    return fig


def image_grid(images, titles, ncols=5, suptitle=None):
    """uint8 RGB images (N, H, W, 3), one titled axes each, drawn pixel for pixel (nearest).

    The image axes are ``fig.axes[:N]`` in order, so a test can find each tile. Each
    cell is placed by hand (a ``TILE`` square under 0.4 inches of title) rather than by
    a layout engine: constrained layout made saving a 75-tile Grad-CAM grid twice as slow.
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    head = 0.3 if suptitle else 0.0  # inches for the suptitle
    cell, pad = TILE + 0.4, 0.08  # inches: a tile and its two-line title; the margin around an image
    width, height = TILE * ncols, cell * nrows + head
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    for i, (image, title) in enumerate(zip(images, titles, strict=True)):
        row, col = divmod(i, ncols)
        x, y = col * TILE + pad, height - head - (row + 1) * cell + pad
        ax = fig.add_axes((x / width, y / height, (TILE - 2 * pad) / width, (TILE - 2 * pad) / height))
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    if n == 0:
        fig.text(0.5, 0.5, "nothing to show", ha="center", va="center")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10, y=1 - 0.05 / height)
    return fig


def confusion_figure(matrix: np.ndarray, classes: list):
    """Counts, true class by row and predicted class by column, each cell annotated."""
    k = len(classes)
    size = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=DPI)
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion matrix ({matrix.sum()} test images, {np.trace(matrix)} correct)")
    threshold = matrix.max() / 2
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[t, p] > threshold else "black")
    fig.tight_layout()
    return fig


def lr_finder_figure(result: dict, max_lr: float, min_lr: float):
    """The range test: smoothed loss against the lr (log axis), the suggestion and minimum marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    ax.plot(result["lr"], result["loss"], label="smoothed training loss")
    i = result["index"]
    ax.plot(result["lr"][i], result["loss"][i], "o", color="red", markersize=8,
            label=f"steepest descent: {result['suggestion']:.3g}")
    j = result["lowest"]
    ax.plot(result["lr"][j], result["loss"][j], "v", color="black", label=f"minimum: {result['lr'][j]:.3g}")
    ax.axvline(max_lr, color="red", alpha=0.4, linestyle="--", label=f"max lr {max_lr:.3g}")
    ax.axvline(min_lr, color="grey", alpha=0.6, linestyle=":", label=f"min lr {min_lr:.3g}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="loss",
           title=f"LR range test ({len(result['lr'])} batches"
                 f"{', stopped: loss diverged' if result['stopped_early'] else ''})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def lr_figure(lrs: list, steps_per_epoch: int):
    """The lr each optimizer step used, as recorded in training, against the epoch."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
    steps = np.arange(1, len(lrs) + 1)
    ax.plot(steps / steps_per_epoch, lrs)
    peak = int(np.argmax(lrs))
    ax.plot(steps[peak] / steps_per_epoch, lrs[peak], "o", color="red",
            label=f"peak {lrs[peak]:.3g} at step {steps[peak]} (epoch {steps[peak] / steps_per_epoch:g})")
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"Learning rate per step ({len(lrs)} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def class_counts_figure(counts: dict, classes: list):
    """Grouped bars: images per class in each split (``{"train": array, "test": array}``)."""
    k = len(classes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * k + 2), 4), dpi=DPI)
    width = 0.8 / len(counts)
    for i, (split, values) in enumerate(counts.items()):
        bars = ax.bar(np.arange(k) + (i - (len(counts) - 1) / 2) * width, values, width,
                      label=f"{split} ({int(np.sum(values))})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set(ylabel="images", title="Images per class")
    ax.legend()
    fig.tight_layout()
    return fig


def image_sizes_figure(sizes: dict, top: int = 10):
    """Bars of the most common stored image sizes (width x height) per split."""
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.6), dpi=DPI, squeeze=False)
    for ax, (split, counter) in zip(axes[0], sizes.items(), strict=True):
        common = counter.most_common(top)
        labels = [f"{w}x{h}" for (w, h), _ in common]
        bars = ax.bar(range(len(common)), [n for _, n in common])
        ax.bar_label(bars, fontsize=7)
        ax.set_xticks(range(len(common)), labels, rotation=45, ha="right")
        rest = sum(counter.values()) - sum(n for _, n in common)
        ax.set(xlabel="width x height (pixels)", ylabel="images",
               title=f"{split}: {len(counter)} size(s)" + (f", {rest} images in rarer sizes" if rest else ""))
    fig.tight_layout()
    return fig


def faithfulness_figure(rows: list):
    """Per layer, the mean probability drop against the fraction of pixels removed (utils.faithfulness rows).

    One line per method, the random removal dashed; the farther a method's line lies above
    the dashed one, the more faithful its maps.
    """
    layers = list(dict.fromkeys(r["layer"] for r in rows)) or ["(no rows)"]
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.6), dpi=DPI, squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        here = [r for r in rows if r["layer"] == layer]
        for method in dict.fromkeys(r["method"] for r in here):
            mine = sorted((r["fraction"], r["drop_map"]) for r in here if r["method"] == method)
            ax.plot([100 * f for f, _ in mine], [d for _, d in mine], marker="o", label=method)
        chance = sorted({(r["fraction"], r["drop_random"]) for r in here})
        ax.plot([100 * f for f, _ in chance], [d for _, d in chance], "k--", marker="x", label="random")
        n = here[0]["images"] if here else 0
        ax.set(xlabel="pixels removed (%)", ylabel="mean drop of class probability",
               title=f"{layer} ({n} images)")
        ax.grid(alpha=0.3)
        if here:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
