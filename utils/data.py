"""CIFAR-10 and image-folder data: decoded once into uint8 arrays, augmented with Albumentations.

Two sources, picked by what ``--data-dir`` holds:
- an image folder, ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (PNG, JPEG, ...),
  resized to 32x32 where needed; class indices follow ``sorted()`` of the names;
- otherwise torchvision's CIFAR-10 under ``DIR``, downloaded on first use.
Either way the images are decoded once and held as (N, 32, 32, 3) uint8 arrays,
as torchvision's CIFAR10 does, so an epoch never touches the disk.
"""
import os
import urllib.error
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .cifar import IMAGE_SIZE, MEAN, STD
from .images import (IMG_EXTENSIONS, DataError, read_image, set_max_image_pixels,  # noqa: F401
                     test_transform, to_rgb)
from .seed import seed_worker

# Folders at least this large are decoded by a pool of processes: a 32x32 JPEG is mostly
# per-file Python work under the GIL, so threads do not help (docs/speed.md has the timings).
PARALLEL_DECODE_MIN = 4096
DECODE_CHUNK = 1024
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


@dataclass
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray  # (N,) int64
    classes: list


# ---------------------------------------------------------------- image folders
def _class_dirs(split_dir: Path) -> list:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _walk_images(folder: str):
    """Image paths under ``folder`` via os.scandir (no stat per file, unlike Path.rglob): hidden
    files and folders (.DS_Store, macOS's ._name.jpg) skipped, symlinked folders not entered."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _walk_images(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMG_EXTENSIONS and entry.is_file():
                yield entry.path


def _image_files(class_dir: Path) -> list:
    """The image paths (str) under ``class_dir`` in ``sorted()`` order of their Paths."""
    files = sorted(_walk_images(str(class_dir)), key=lambda p: os.path.normcase(p).split(os.sep))
    if not files:
        raise DataError(f"no images in {class_dir}: add images "
                        f"({', '.join(IMG_EXTENSIONS)}) or remove the folder")
    return files


def _read_chunk(files: list, max_pixels) -> np.ndarray:
    set_max_image_pixels(max_pixels)  # in a worker process: the parent's limit
    return np.stack([read_image(f) for f in files])


def read_images(files: list) -> np.ndarray:
    """(N, 32, 32, 3) uint8 of ``files``, in order; large lists decoded in parallel processes."""
    workers = min(8, os.cpu_count() or 1)
    if len(files) < PARALLEL_DECODE_MIN or workers < 2:
        return _read_chunk(files, Image.MAX_IMAGE_PIXELS)
    chunks = [files[i:i + DECODE_CHUNK] for i in range(0, len(files), DECODE_CHUNK)]
    with ProcessPoolExecutor(workers) as pool:  # a DataError in a worker is re-raised here
        limits = [Image.MAX_IMAGE_PIXELS] * len(chunks)
        return np.concatenate(list(pool.map(_read_chunk, chunks, limits)))


def _read_split(split_dir: Path, classes: list) -> Split:
    files, labels = [], []
    for label, name in enumerate(classes):
        class_files = _image_files(split_dir / name)
        files += class_files
        labels += [label] * len(class_files)
    return Split(read_images(files), np.asarray(labels, dtype=np.int64), list(classes))


def load_image_folder(root) -> tuple:
    """(train, test) Splits from ``root/train/<class>/*`` and ``root/test/<class>/*``."""
    root = Path(root)
    layout = "an image folder needs train/<class>/* and test/<class>/* images"
    names = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} is missing: {layout}")
        names[split] = [p.name for p in _class_dirs(split_dir)]
        if not names[split]:
            raise DataError(f"{split_dir} has no class folders: {layout}")
    if names["train"] != names["test"]:
        only_train = sorted(set(names["train"]) - set(names["test"]))
        only_test = sorted(set(names["test"]) - set(names["train"]))
        raise DataError(f"train and test classes differ (only in train: {only_train or 'none'}, "
                        f"only in test: {only_test or 'none'}): give both the same class folders")
    classes = names["train"]
    return _read_split(root / "train", classes), _read_split(root / "test", classes)


def image_sizes(data_dir, splits: tuple) -> dict:
    """{"train": Counter of (width, height), "test": ...} of the images as stored.

    An image folder's files are read for their headers only (the loaders resize
    to 32x32, so the arrays no longer tell); torchvision's CIFAR-10 is all 32x32.
    """
    root = Path(data_dir)
    if not ((root / "train").is_dir() or (root / "test").is_dir()):
        return {name: Counter({split.images.shape[2:0:-1]: len(split.labels)})
                for name, split in zip(("train", "test"), splits, strict=True)}
    sizes = {}
    for name, split in zip(("train", "test"), splits, strict=True):
        sizes[name] = Counter()
        for class_name in split.classes:
            for path in _image_files(root / name / class_name):
                with Image.open(path) as img:  # lazy: the header only
                    sizes[name][img.size] += 1
    return sizes


# ---------------------------------------------------------------- torchvision CIFAR-10
def load_cifar10(root, download: bool = True) -> tuple:
    """(train, test) Splits from torchvision's CIFAR-10 pickles under ``root``."""
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(root, train=True, download=download)
        test = CIFAR10(root, train=False, download=download)
    except (OSError, RuntimeError, urllib.error.URLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({reason}): put "
            f"{CIFAR_ARCHIVE} into {root}, or pass --data-dir DIR with train/<class>/ "
            f"and test/<class>/ image folders") from None
    return tuple(Split(ds.data, np.asarray(ds.targets, dtype=np.int64), list(ds.classes))
                 for ds in (train, test))


def load_data(data_dir, download: bool = True) -> tuple:
    """Image folder if ``data_dir`` has train/ or test/, else torchvision's CIFAR-10."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder: pass the folder "
                        f"that holds train/ and test/, or where {CIFAR_ARCHIVE} goes")
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        return load_image_folder(data_dir)
    return load_cifar10(data_dir, download)


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` samples spread evenly over the classes, fixed by ``seed``.

    Each class is shuffled, then classes are taken in turn (round robin), so any
    prefix is as balanced as the class sizes allow.
    """
    if n > len(labels):
        raise ValueError(f"cannot take {n} of {len(labels)} samples")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[r] for r in range(max(map(len, per_class)))
             for idx in per_class if r < len(idx)]
    return np.sort(np.asarray(order[:n], dtype=np.int64))


# ---------------------------------------------------------------- transforms
def train_transform(cutout_p: float = 0.5):
    """Pad 4 and random-crop 32, horizontal flip, one 8x8 cutout hole, normalise (Albumentations).

    Padding reflects the border (as Page's ResNet9 and airbench do) rather than
    adding black frames the model never sees at test time. The cutout hole is
    filled with the dataset mean, which the normalisation then maps to ~0.
    Albumentations is imported here: a run that holds its data on the GPU never needs it.
    """
    import albumentations as A
    from albumentations.pytorch import ToTensorV2
    fill = tuple(round(m * 255) for m in MEAN)
    pad = IMAGE_SIZE + 8
    return A.Compose([
        A.PadIfNeeded(pad, pad, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(IMAGE_SIZE, IMAGE_SIZE),
        A.HorizontalFlip(p=0.5),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(8, 8),
                        hole_width_range=(8, 8), fill=fill, p=cutout_p),
        A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0),
        ToTensorV2(),
    ])


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 HWC images in memory, an Albumentations transform applied per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, int(self.labels[i])


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...`` in order: each process evaluates its own share.

    Unlike DistributedSampler it does not pad the shares to equal length, so summing the
    processes' counts covers every test image exactly once.
    """

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loader(split: Split, transform, batch_size: int, train: bool, workers: int,
                pin_memory: bool = False, persistent: bool = False, prefetch: int = 4,
                rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader with its own generator, so ``utils.seed.set_epoch`` can fix each epoch.

    With ``world_size`` > 1 (torchrun) each process loads its share: DistributedSampler
    (one shuffle shared by all, seeded by the epoch) for training, ShardSampler for test.
    ``persistent`` keeps the workers alive between epochs (no start-up cost per epoch);
    they then continue their augmentation streams instead of being reseeded each epoch.
    """
    dataset = ArrayDataset(split.images, split.labels, transform)
    sampler = None
    if world_size > 1:
        sampler = (torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True)
                   if train else ShardSampler(len(dataset), rank, world_size))
    extra = {"persistent_workers": persistent, "prefetch_factor": prefetch} if workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker,
        generator=torch.Generator(),
        **extra,
    )
