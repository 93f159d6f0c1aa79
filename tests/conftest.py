"""Shared fixtures: small image folders written into tmp_path, nothing downloaded."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Colours far apart: a task a CNN learns in a few steps, with noise so it is not trivial.
COLOURS = {"blue": (30, 40, 200), "green": (40, 190, 50), "red": (210, 40, 30)}


def write_image_folder(root: Path, train_per_class=12, test_per_class=4, seed=0, size=32) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.asarray(colour) + rng.normal(0, 35, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def write_fake_cifar10(root: Path, per_batch=4, seed=0) -> Path:
    """Random batches in CIFAR-10's pickle format under root/cifar-10-batches-py (labels 0..3).

    torchvision checks the real files' md5s: patch
    ``torchvision.datasets.cifar.check_integrity`` to read these.
    """
    import pickle

    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [n for n, _ in CIFAR10.train_list] + [n for n, _ in CIFAR10.test_list]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [i % 4 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    return folder


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """main(--deterministic) and --max-image-pixels change process-wide settings; keep tests independent."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    max_pixels = Image.MAX_IMAGE_PIXELS  # --max-image-pixels sets it
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)
    Image.MAX_IMAGE_PIXELS = max_pixels
