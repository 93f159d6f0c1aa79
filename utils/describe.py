"""``main.py --analyze``: describe the data instead of training on it.

Class counts, up to 10 samples per class, image sizes as stored, and the
per-channel mean and std beside the constants the loaders normalise with.
"""
from pathlib import Path

import numpy as np

from .analysis import channel_stats, class_counts
from .cifar import MEAN, STD
from .data import image_sizes, load_data
from .plots import class_counts_figure, image_grid, image_sizes_figure

CHANNELS = ("red", "green", "blue")
MIN_STD = 0.02  # of pixel values in [0, 1]; CIFAR-10's channels have about 0.25


def describe(args, run) -> str:
    """Write analysis.txt and its three figures into ``run``; returns the text."""
    train_split, test_split = load_data(args.data_dir)
    classes = train_split.classes
    counts = {"train": class_counts(train_split.labels, len(classes)),
              "test": class_counts(test_split.labels, len(classes))}
    sizes = image_sizes(args.data_dir, (train_split, test_split))
    text = _text(args.data_dir, classes, counts, sizes, *channel_stats(train_split.images),
                 len(train_split.labels))

    rng = np.random.default_rng(args.seed)
    picks = [rng.choice(np.flatnonzero(train_split.labels == c), min(10, counts["train"][c]), replace=False)
             for c in range(len(classes))]
    images = [train_split.images[i] for idx in picks for i in idx]
    titles = [classes[c] if k == 0 else "" for c, idx in enumerate(picks) for k in range(len(idx))]
    run.make()
    run.write_json("args.json", vars(args))
    run.write_text("analysis.txt", text)
    run.figure("class_counts.png", class_counts_figure(counts, classes))
    run.figure("samples.png", image_grid(images, titles, ncols=10,
                                         suptitle="up to 10 random training images per class, one class per row"))
    run.figure("image_sizes.png", image_sizes_figure(sizes))
    run.report()
    return text


def _text(data_dir, classes, counts, sizes, mean, std, n_train) -> str:
    source = ("image folder" if any((Path(data_dir) / s).is_dir() for s in ("train", "test"))
              else "torchvision CIFAR-10")
    width = max(len(c) for c in classes + ["total"])
    lines = [f"data: {data_dir} ({source}), {len(classes)} classes",
             f"{'class':<{width}}  {'train':>7}  {'test':>7}"]
    lines += [f"{name:<{width}}  {counts['train'][c]:>7}  {counts['test'][c]:>7}"
              for c, name in enumerate(classes)]
    lines.append(f"{'total':<{width}}  {counts['train'].sum():>7}  {counts['test'].sum():>7}")
    for split, counter in sizes.items():
        common = ", ".join(f"{w}x{h}: {n}" for (w, h), n in counter.most_common(5))
        more = f" (+{len(counter) - 5} more sizes)" if len(counter) > 5 else ""
        lines.append(f"{split} image sizes (width x height): {common}{more}")
    lines.append(f"the loaders resize every image to 32x32\n"
                 f"per-channel statistics of the {n_train} training images "
                 f"(pixels in [0, 1]), beside the constants the loaders normalise with (utils/cifar.py):")
    lines.append(f"{'channel':<8} {'mean':>7} {'loaders':>8} {'std':>7} {'loaders':>8}")
    lines += [f"{ch:<8} {mean[i]:7.4f} {MEAN[i]:8.4f} {std[i]:7.4f} {STD[i]:8.4f}"
              for i, ch in enumerate(CHANNELS)]
    lines += degenerate(mean, std)
    return "\n".join(lines) + "\n"


def degenerate(mean, std) -> list:
    """Warnings for channels that are nearly constant over the whole training set.

    Real photographs never are; files decoded wrongly (16-bit images clipped to
    white) or blank ones are.
    """
    return [f"warning: the {ch} channel is nearly constant (mean {mean[i]:.3f}, std {std[i]:.3f}): the images "
            "may be blank, or decoded wrongly; look at samples.png"
            for i, ch in enumerate(CHANNELS) if std[i] < MIN_STD]
