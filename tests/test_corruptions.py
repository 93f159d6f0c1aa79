"""utils/corruptions.py: each corruption's strength per severity, determinism, robustness() on known models."""
import colorsys
import io
from itertools import pairwise

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from utils.cifar import MEAN, STD
from utils.corruptions import (CLEAN, CORRUPTIONS, SEVERITIES, corrupt, robustness, robustness_figure,
                               robustness_table)
from utils.data import Split
from utils.device import choose_precision

NAMES = list(CORRUPTIONS)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images():
    """Photo-like 32x32 images: random 8x8 colours upsampled (edges and gradients), mid-range values."""
    rng = np.random.default_rng(0)
    small = rng.integers(50, 206, (16, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (32, 32), interpolation=cv2.INTER_CUBIC) for s in small])


def by_severity(images, name, seed=0):
    return [corrupt(images, name, s, seed) for s in SEVERITIES]


def test_parameters_are_hendrycks():
    assert SEVERITIES == (1, 2, 3, 4, 5)
    assert CORRUPTIONS == {"gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
                           "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
                           "jpeg_compression": (80, 65, 58, 50, 40),
                           "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
                           "contrast": (0.75, 0.5, 0.4, 0.3, 0.15)}


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_determinism(images, name):
    before = images.copy()
    first = corrupt(images, name, 3, seed=5)
    corrupt(images, "gaussian_noise", 2, seed=9)  # other draws in between change nothing
    again = corrupt(images, name, 3, seed=5)
    assert first.shape == images.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(images, before)  # the input is not modified
    assert not np.array_equal(first, images)
    other_seed = corrupt(images, name, 3, seed=6)
    # only the noise is random; the others do not depend on the seed
    assert np.array_equal(first, other_seed) == (name != "gaussian_noise")


def test_numpy_integer_severity(images):
    np.testing.assert_array_equal(corrupt(images, "contrast", np.int64(2), 0), corrupt(images, "contrast", 2, 0))


def test_noise_of_an_image_does_not_depend_on_the_batch(images):
    np.testing.assert_array_equal(corrupt(images[:3], "gaussian_noise", 4, 1),
                                  corrupt(images, "gaussian_noise", 4, 1)[:3])


def test_noise_std_matches_severity(images):
    diffs = [out.astype(float) - images for out in by_severity(images, "gaussian_noise")]
    for diff, std in zip(diffs, CORRUPTIONS["gaussian_noise"], strict=True):
        assert diff.std() == pytest.approx(std * 255, rel=0.02)
        assert abs(diff.mean()) < 0.2  # rounded, not truncated (which would give -0.5)
        # independent per channel
        assert abs(np.corrcoef(diff[..., 0].ravel(), diff[..., 2].ravel())[0, 1]) < 0.03
    assert all(a.std() < b.std() for a, b in pairwise(diffs))
    # the same draws at every severity, scaled
    assert np.corrcoef(diffs[0].ravel(), diffs[-1].ravel())[0, 1] > 0.99


def laplacian_variance(images):
    grey = images.astype(np.float64).mean(-1)
    return np.mean([cv2.Laplacian(g, cv2.CV_64F)[2:-2, 2:-2].var() for g in grey])


def test_blur_removes_more_detail_with_severity(images):
    blurred = by_severity(images, "gaussian_blur")
    energy = [laplacian_variance(images)] + [laplacian_variance(o) for o in blurred]
    assert all(a > b for a, b in pairwise(energy)), energy


def test_blur_is_the_named_sigma(images):
    gaussian_filter = pytest.importorskip("scipy.ndimage").gaussian_filter

    for sigma, out in zip(CORRUPTIONS["gaussian_blur"], by_severity(images, "gaussian_blur"), strict=True):
        ref = np.stack([gaussian_filter(im.astype(float), sigma=(sigma, sigma, 0), mode="reflect")
                        for im in images])
        inner = np.abs(out.astype(float) - ref)[:, 4:-4, 4:-4]
        assert inner.max() <= 1.0


def test_jpeg_error_grows_and_equals_pils_jpeg(images):
    errors = [np.abs(o.astype(float) - images).mean() for o in by_severity(images, "jpeg_compression")]
    assert all(a < b for a, b in pairwise(errors)), errors
    quality = CORRUPTIONS["jpeg_compression"][2]
    out = corrupt(images, "jpeg_compression", 3, 0)
    for image, got in zip(images, out, strict=True):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=quality)
        np.testing.assert_array_equal(got, np.asarray(Image.open(buf)))  # RGB, not read as BGR


def test_brightness_mean_increases_and_follows_hsv(images):
    means = [images.mean()] + [o.mean() for o in by_severity(images, "brightness")]
    assert all(a < b for a, b in pairwise(means)), means
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (1, 1, 300, 3), dtype=np.uint8)
    pixels[0, 0, :3] = [(0, 0, 0), (255, 255, 255), (250, 10, 30)]  # black, white, clipped V
    for severity, c in zip(SEVERITIES, CORRUPTIONS["brightness"], strict=True):
        got = corrupt(pixels, "brightness", severity, 0)[0, 0].astype(int)
        ref = [colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
               for h, s, v in (colorsys.rgb_to_hsv(*p) for p in pixels[0, 0] / 255)]
        # a nearest integer to HSV's exact value (either one at a tie)
        assert np.abs(got - np.asarray(ref) * 255).max() <= 0.5 + 1e-3
        assert tuple(got[0]) == (round(c * 255),) * 3  # black becomes grey c


def test_contrast_scales_the_std_by_c(images):
    channel_std = images.astype(float).std(axis=(1, 2))
    for c, out in zip(CORRUPTIONS["contrast"], by_severity(images, "contrast"), strict=True):
        np.testing.assert_allclose(out.astype(float).std(axis=(1, 2)), c * channel_std, rtol=0.02, atol=0.1)
        np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=0.3)


@pytest.mark.parametrize("name, severity, match", [
    ("fog", 1, "gaussian_noise, gaussian_blur, jpeg_compression, brightness, contrast"),
    ("contrast", 0, "1, 2, 3, 4, 5"), ("contrast", 6, "1, 2, 3, 4, 5"), ("contrast", True, "1, 2, 3, 4, 5"),
    ("contrast", 2.0, "1, 2, 3, 4, 5")])
def test_bad_name_or_severity(images, name, severity, match):
    with pytest.raises(ValueError, match=match):
        corrupt(images, name, severity, 0)


def test_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        corrupt(np.zeros((2, 32, 32, 3), np.float32), "contrast", 1, 0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(np.zeros((32, 32, 3), np.uint8), "contrast", 1, 0)


class Brightness(torch.nn.Module):
    """Class 1 when the image's mean pixel value (un-normalised, in [0, 1]) is above 0.5, else 0."""

    def forward(self, x):
        pixels = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        m = pixels.mean((1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1) * 100


class Constant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))  # a parameter, as a real model has

    def forward(self, x):
        return torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3) + self.w


def grey_split(levels, labels):
    images = np.stack([np.full((32, 32, 3), v, np.uint8) for v in levels])
    return Split(images, np.asarray(labels, dtype=np.int64), ["dark", "bright"])


def test_robustness_gives_the_expected_accuracies():
    # uniform grey images: blur, contrast and JPEG leave them (all but) unchanged, noise barely
    # moves their mean; brightness adds c * 255 and pushes the dark ones over 127.5 one by one
    split = grey_split([30, 60, 90, 110, 120, 135, 150, 170, 200, 220], [0] * 5 + [1] * 5)
    logged = []
    rows = robustness(Brightness(), split, CPU, choose_precision(CPU, "fp32"), tta=True,
                      batch_size=4, seed=0, log=logged.append)
    assert len(rows) == 1 + 5 * 5 and logged == rows
    assert rows[0] == {"corruption": CLEAN, "severity": 0, "accuracy": 100.0, "images": 10}
    assert [(r["corruption"], r["severity"]) for r in rows[1:]] == [(n, s) for n in NAMES for s in SEVERITIES]
    # dark levels over 127.5 after + c * 255 (12.75, 25.5, 38.25, 51, 76.5): 120 | 110 | 90 | - | 60
    wrong = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4}
    for r in rows[1:]:
        expected = 100.0 * (10 - wrong[r["severity"]]) / 10 if r["corruption"] == "brightness" else 100.0
        assert r["accuracy"] == expected, r
        assert r["images"] == 10


def test_robustness_subset_with_a_constant_model():
    split = grey_split([100] * 12, [0, 1, 2] * 4)
    split.classes = ["a", "b", "c"]
    rows = robustness(Constant(), split, CPU, choose_precision(CPU, "fp32"), batch_size=5, subset=6, seed=3)
    assert len(rows) == 26
    assert all(r["images"] == 6 and r["accuracy"] == 100.0 * 2 / 6 for r in rows)
    # a subset larger than the split takes all of it
    rows = robustness(Constant(), split, CPU, choose_precision(CPU, "fp32"), subset=50)
    assert rows[0]["images"] == 12 and rows[0]["accuracy"] == 100.0 * 4 / 12


def fake_rows():
    rows = [{"corruption": CLEAN, "severity": 0, "accuracy": 90.0, "images": 10}]
    for i, name in enumerate(NAMES):
        rows += [{"corruption": name, "severity": s, "accuracy": 80.0 - 10 * i - s, "images": 10}
                 for s in SEVERITIES]
    return rows


def test_robustness_table():
    lines = robustness_table(fake_rows()).splitlines()
    assert len(lines) == 1 + 1 + 5 + 1  # header, clean, corruptions, mean
    assert lines[1].split() == [CLEAN, "90.00"]
    assert lines[2].split() == ["gaussian_noise", "79.00", "78.00", "77.00", "76.00", "75.00", "77.00"]
    assert lines[6].split()[0] == "contrast" and lines[6].split()[-1] == "37.00"
    assert lines[7].split()[-1] == "57.00"  # the mean of all 25


def test_robustness_figure():
    fig = robustness_figure(fake_rows())
    ax = fig.axes[0]
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(solid) == 5 and len(dashed) == 1
    assert list(dashed[0].get_ydata()) == [90.0, 90.0]
    assert list(solid[0].get_xdata()) == list(SEVERITIES)
    plt.close(fig)
