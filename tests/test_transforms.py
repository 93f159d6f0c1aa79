import numpy as np
import pytest
import torch

from utils.cifar import MEAN, STD, denormalize
from utils.data import ArrayDataset, Split, make_loader, train_transform
from utils.data import test_transform as eval_transform  # not collected as a test
from utils.seed import set_epoch

MEAN_A, STD_A = np.array(MEAN), np.array(STD)


def normalise(uint8_hwc):
    return ((uint8_hwc / 255.0 - MEAN_A) / STD_A).transpose(2, 0, 1)


def to_uint8(chw_tensor):
    return (denormalize(chw_tensor).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_test_transform_normalises_exactly():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = eval_transform()(image=img)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), normalise(img), atol=1e-5)


def test_train_output_is_a_reflect_padded_crop_or_its_mirror():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    tf = train_transform(cutout_p=0.0)
    tf.set_random_seed(0)
    offsets, flips = set(), 0
    for _ in range(200):
        out = tf(image=img)["image"]
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        got = to_uint8(out)
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if np.array_equal(got, (lambda c: c[:, ::-1] if flip else c)(padded[dy:dy + 32, dx:dx + 32]))]
        assert matches, "output is not a crop of the 4-pixel reflect-padded image"
        dy, dx, flip = matches[0]
        offsets.add((dy, dx))
        flips += flip
    assert len(offsets) > 30  # crop offsets cover the 9x9 range, not a few fixed spots
    assert 70 <= flips <= 130  # horizontal flip with p = 0.5


def hole_mask(out, img_value):
    """Pixels that differ from the constant image: where the cutout hole is."""
    return ~np.isclose(out.numpy(), normalise(np.full((1, 1, 3), img_value, np.uint8))).all(axis=0)


def test_cutout_is_one_8x8_hole_filled_with_the_mean():
    img = np.full((32, 32, 3), 255, np.uint8)  # constant: crop and flip leave it unchanged
    tf = train_transform(cutout_p=1.0)
    tf.set_random_seed(0)
    fill = np.round(np.array(MEAN) * 255) / 255
    for _ in range(50):
        out = tf(image=img)["image"]
        mask = hole_mask(out, 255)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask.sum() == 64 and len(rows) == 8 and len(cols) == 8
        assert np.ptp(rows) == 7 and np.ptp(cols) == 7  # one contiguous square
        hole = out[:, mask].numpy()  # (3, 64)
        np.testing.assert_allclose(hole, ((fill - MEAN_A) / STD_A)[:, None].repeat(64, 1), atol=1e-5)


@pytest.mark.parametrize("p,expected", [(0.0, (0, 0)), (0.5, (70, 130))])
def test_cutout_probability(p, expected):
    img = np.full((32, 32, 3), 255, np.uint8)
    tf = train_transform(cutout_p=p)
    tf.set_random_seed(0)
    holes = sum(hole_mask(tf(image=img)["image"], 255).any() for _ in range(200))
    assert expected[0] <= holes <= expected[1]


def _loader(workers):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    split = Split(images, np.arange(16) % 2, ["a", "b"])
    return make_loader(split, train_transform(cutout_p=1.0), batch_size=4, train=True, workers=workers)


def _epoch(loader, epoch):
    set_epoch(loader, seed=1, epoch=epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_repeat_per_seed_and_differ_between_epochs(workers):
    loader = _loader(workers)
    first, again, second = _epoch(loader, 1), _epoch(loader, 1), _epoch(loader, 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


def test_workers_do_not_replay_each_others_augmentations():
    """Forked workers inherit one Albumentations RNG; each must be reseeded."""
    images = np.full((8, 32, 32, 3), 255, np.uint8)  # identical images: only augmentation differs
    split = Split(images, np.zeros(8, dtype=np.int64), ["a"])
    loader = make_loader(split, train_transform(cutout_p=1.0), batch_size=4, train=False, workers=2)
    set_epoch(loader, seed=1, epoch=1)
    batch0, batch1 = list(loader)  # batch i comes from worker i
    assert not torch.equal(batch0[0], batch1[0])


def test_array_dataset_without_transform_returns_raw_items():
    ds = ArrayDataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]))
    image, label = ds[1]
    assert image.shape == (32, 32, 3) and label == 1
