"""Image files to model inputs: decoding any image file, and the normalisation of the test images.

What inference needs and nothing of training (``utils/data.py`` builds the
training data on top of it), so a deployed app can carry this module alone.
"""
import warnings

import numpy as np
from PIL import Image

from .cifar import IMAGE_SIZE, MEAN, STD
from .errors import UserError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(UserError):
    """Data that cannot be used; the message names the problem and the fix."""


def set_max_image_pixels(pixels: int) -> None:
    """Images larger than this are refused (Pillow's decompression-bomb limit; this process only)."""
    Image.MAX_IMAGE_PIXELS = pixels


def _full_scale(mode: str, peak: float) -> float:
    """The value that means white in a greyscale image of ``mode`` whose largest value is ``peak``.

    16-bit modes have a fixed range. ``I`` (32-bit integers; older Pillow also opens 16-bit
    PNGs so) and ``F`` (floats) do not say theirs: the smallest usual range that holds
    ``peak`` is taken (1 for floats, then 255, 65535, 2**31 - 1).
    """
    if mode.startswith("I;16"):
        return 65535.0
    ranges = ([1.0] if mode == "F" else []) + [255.0, 65535.0, 2.0**31 - 1]
    return next((r for r in ranges if peak <= r), ranges[-1])


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of an image in any Pillow mode, values scaled (not clipped) to 0-255.

    Pillow's own ``convert("RGB")`` clips 16- and 32-bit greyscale to 255, so such files
    would come out almost white; here they are scaled by their range. Transparent pixels
    (RGBA, LA, palette with transparency) are composited over white, as a viewer shows
    them; a multi-frame file gives its first frame.
    """
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 / _full_scale(img.mode, float(values.max(initial=0)))
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def read_image(path, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 RGB; bicubic resize when the file has another size; DataError if unreadable.

    Larger than ``Image.MAX_IMAGE_PIXELS`` (``--max-image-pixels``) is refused, not decoded.
    """
    try:
        with warnings.catch_warnings():  # Pillow only warns between 1x and 2x its limit: refuse at 1x
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = to_rgb(img)  # also forces the full decode, so truncated files fail here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {path} has more pixels than the limit of {Image.MAX_IMAGE_PIXELS:,} "
                        "(a decompression bomb?): remove it, or raise --max-image-pixels if it is "
                        "a real photo") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}): "
                        "delete or replace the file") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def test_transform(mean=MEAN, std=STD):
    """uint8 (H, W, 3) RGB -> the normalised (3, H, W) float tensor the model reads (an
    Albumentations Compose; imported here, as a run that holds its data on the GPU never needs it)."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2
    return A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])
