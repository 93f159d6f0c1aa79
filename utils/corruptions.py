"""CIFAR-10-C-style corruptions of a test set, made here, and a model's accuracy on them.

This is NOT the published CIFAR-10-C (Hendrycks & Dietterich 2019,
https://arxiv.org/abs/1903.12261): four of its fifteen corruptions and gaussian_blur,
one of its four extra ones, regenerated from the test images with other random draws
and other libraries, so the accuracies here are not comparable with published
CIFAR-10-C results or mCE (which is also relative to AlexNet's errors). The severities
follow the parameters of Hendrycks' CIFAR-10-C code (``make_cifar_c.py``); severity
1..5 is:

- ``gaussian_noise``: std 0.04, 0.06, 0.08, 0.09, 0.10 of the [0, 1] range, drawn
  independently per pixel and channel, clipped to [0, 1] (``A.GaussNoise``,
  ``per_channel=True``, on the image as float32 in [0, 1]).
- ``gaussian_blur``: sigma 0.4, 0.6, 0.7, 0.8, 1.0 pixels (``A.GaussianBlur``; kernel
  size ``int(3.5 sigma) * 2 + 1`` as PIL's, borders reflected). The original uses
  skimage's ``gaussian`` (kernel to 4 sigma, nearest border): the same within one
  level away from the border.
- ``jpeg_compression``: quality 80, 65, 58, 50, 40 (``A.ImageCompression``). OpenCV
  encodes the array as BGR, so it is handed BGR and its output flipped back: an RGB
  array given as is would be converted to YCbCr with red and blue swapped. So fed,
  the result is byte for byte PIL's JPEG, which the original uses.
- ``brightness``: c = 0.05, 0.1, 0.15, 0.2, 0.3 added to V = max(R, G, B) in HSV, H and
  S kept, V clipped to 1, as in the original. In numpy: with H and S fixed that scales
  each pixel's RGB by min(V + c, 1) / V (a black pixel becomes grey c). Albumentations
  has no exact equivalent: ``HueSaturationValue`` shifts V in OpenCV's 8-bit HSV (hue
  in 2-degree steps, so colours change even without a shift), and
  ``RandomBrightnessContrast`` adds c to every channel.
- ``contrast``: c = 0.75, 0.5, 0.4, 0.3, 0.15, x -> (x - mean) * c + mean with the
  mean of each image and channel, as in the original. In numpy:
  ``RandomBrightnessContrast`` scales around 0, not around the image mean.

Outputs are rounded to uint8 (the original truncates with ``np.uint8``, half a level
darker on average). Only ``gaussian_noise`` is random; the same (images, name,
severity, seed) always gives the same output. Its noise for image i depends on the
seed and i only, and is the same draw at every severity, scaled. Albumentations seeds
OpenCV's generator from 16 bits per image, so among thousands of images some share a
noise pattern.
"""
import numpy as np

from .data import Split, balanced_subset, make_loader, test_transform
from .engine import predict

SEVERITIES = (1, 2, 3, 4, 5)
CLEAN = "clean"  # the corruption name of the uncorrupted row, severity 0

# name -> the parameter at severities 1..5 (see the module docstring for its meaning)
CORRUPTIONS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std, fraction of the [0, 1] range
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to V in HSV, [0, 1] range
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the distance from the mean
}


def _per_image(images, transform, seed, as_float=False):
    """One Albumentations transform applied to each image in turn, seeded once for the batch.

    With ``as_float`` it sees the image as float32 in [0, 1], rounded back to uint8 after.
    """
    import albumentations as A

    compose = A.Compose([transform], p=1.0, seed=seed)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        if as_float:
            result = compose(image=image.astype(np.float32) / 255)["image"]
            out[i] = np.clip(np.rint(result * 255), 0, 255).astype(np.uint8)
        else:
            out[i] = compose(image=image)["image"]
    return out


def _gaussian_noise(images, std, seed):
    import albumentations as A

    noise = A.GaussNoise(std_range=(std, std), mean_range=(0.0, 0.0), per_channel=True,
                         noise_scale_factor=1.0, p=1.0)
    return _per_image(images, noise, seed, as_float=True)


def _gaussian_blur(images, sigma, seed):
    import albumentations as A

    return _per_image(images, A.GaussianBlur(blur_limit=0, sigma_limit=(sigma, sigma), p=1.0), seed)


def _jpeg(images, quality, seed):
    import albumentations as A

    jpeg = A.ImageCompression(compression_type="jpeg", quality_range=(quality, quality), p=1.0)
    bgr = np.ascontiguousarray(images[..., ::-1])  # OpenCV's imencode reads BGR
    return np.ascontiguousarray(_per_image(bgr, jpeg, seed)[..., ::-1])


def _brightness(images, c, seed):
    x = images.astype(np.float32) / 255
    v = x.max(axis=-1, keepdims=True)
    new_v = np.minimum(v + np.float32(c), 1)
    out = np.where(v > 0, x * (new_v / np.maximum(v, 1e-6)), new_v)  # H, S kept; black -> grey c
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def _contrast(images, c, seed):
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)  # per image and channel, as the original
    return np.clip(np.rint((x - mean) * np.float32(c) + mean), 0, 255).astype(np.uint8)


_APPLY = {"gaussian_noise": _gaussian_noise, "gaussian_blur": _gaussian_blur,
          "jpeg_compression": _jpeg, "brightness": _brightness, "contrast": _contrast}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """A corrupted copy of ``images`` ((N, H, W, 3) uint8), same shape and dtype; input untouched."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int | np.integer) or isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} is not one of {', '.join(map(str, SEVERITIES))}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, not {images.shape} {images.dtype}")
    if len(images) == 0:
        return images.copy()
    return _APPLY[name](images, CORRUPTIONS[name][int(severity) - 1], int(seed))


def robustness(model, split: Split, device, precision, channels_last=False, tta=False,
               batch_size=256, subset=None, seed=0, log=None) -> list:
    """Accuracy in percent on the clean images (severity 0), then each corruption at each severity.

    Rows ``{"corruption", "severity", "accuracy", "images"}``; ``subset`` takes a
    class-balanced choice of that many images (fixed by ``seed``, which also seeds the
    noise). ``log(row)`` is called after each row.
    """
    images, labels = split.images, split.labels
    if subset is not None:
        idx = balanced_subset(labels, min(subset, len(labels)), seed)
        images, labels = images[idx], labels[idx]

    def row(name, severity, batch):
        loader = make_loader(Split(batch, labels, split.classes), test_transform(), batch_size,
                             train=False, workers=0)
        probs = predict(model, loader, device, precision, channels_last, tta)
        correct = int((probs.argmax(1).numpy() == labels).sum())
        result = {"corruption": name, "severity": severity,
                  "accuracy": 100.0 * correct / max(len(labels), 1), "images": len(labels)}
        if log is not None:
            log(result)
        return result

    rows = [row(CLEAN, 0, images)]
    rows += [row(name, s, corrupt(images, name, s, seed)) for name in CORRUPTIONS for s in SEVERITIES]
    return rows


def _by_corruption(rows) -> dict:
    """{corruption: {severity: accuracy}}, in the rows' order."""
    table = {}
    for r in rows:
        table.setdefault(r["corruption"], {})[int(r["severity"])] = float(r["accuracy"])
    return table


def robustness_table(rows) -> str:
    """Plain text: the clean accuracy, one line per corruption (severities 1..5 and their mean), the mean."""
    table = _by_corruption(rows)
    clean = table.pop(CLEAN, {}).get(0)
    width = max([len(n) for n in table] + [len("mean of corruptions")])
    header = "".join(f"{'s' + str(s):>7}" for s in SEVERITIES) + f"{'mean':>7}"
    lines = [f"  {'accuracy (%)':<{width}}{header}"]
    if clean is not None:
        lines.append(f"  {CLEAN:<{width}}{clean:>7.2f}")
    for name, accs in table.items():
        cells = "".join(f"{accs[s]:>7.2f}" if s in accs else f"{'-':>7}" for s in SEVERITIES)
        lines.append(f"  {name:<{width}}{cells}{np.mean(list(accs.values())):>7.2f}")
    if table:
        per_severity = [np.mean([a[s] for a in table.values() if s in a]) for s in SEVERITIES]
        overall = np.mean([acc for a in table.values() for acc in a.values()])
        lines.append(f"  {'mean of corruptions':<{width}}" + "".join(f"{m:>7.2f}" for m in per_severity)
                     + f"{overall:>7.2f}")
    return "\n".join(lines) + "\n"


def robustness_figure(rows):
    """Accuracy against severity, one line per corruption; the clean accuracy dashed."""
    from .plots import DPI, plt

    table = _by_corruption(rows)
    clean = table.pop(CLEAN, {}).get(0)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    for name, accs in table.items():
        severities = sorted(accs)
        ax.plot(severities, [accs[s] for s in severities], marker="o", label=name)
    if clean is not None:
        ax.axhline(clean, color="black", linestyle="--", linewidth=1, label=f"clean ({clean:.1f}%)")
    ax.set_xticks(SEVERITIES)
    ax.set(xlabel="severity", ylabel="accuracy (%)", ylim=(0, 100),
           title="Accuracy on CIFAR-10-C-style corruptions made locally\n(not the published CIFAR-10-C)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
