"""Every image mode Pillow opens is read as 8-bit RGB with its values scaled, not clipped; limits and odd files."""
import cv2
import numpy as np
import pytest
from PIL import Image

import gradcam
from main import main
from utils.data import DataError, load_image_folder, read_image

from conftest import write_image_folder

RAMP = np.arange(32 * 32, dtype=np.float64).reshape(32, 32) / (32 * 32 - 1)  # 0 .. 1 across the image


def grey(values01):
    """The intended (32, 32, 3) uint8 of a greyscale image whose values are fractions of white."""
    return np.repeat(np.round(values01 * 255).astype(np.uint8)[..., None], 3, axis=2)


def one_bit(tmp):
    bits = (np.indices((32, 32)).sum(0) % 2).astype(bool)
    Image.fromarray(bits).save(tmp / "x.png")
    return tmp / "x.png", grey(bits.astype(float))


def eight_bit(tmp):
    values = np.round(RAMP * 255).astype(np.uint8)
    Image.fromarray(values).save(tmp / "x.png")
    return tmp / "x.png", grey(values / 255)


def sixteen_bit(tmp):
    values = np.round(RAMP * 65535).astype(np.uint16)
    Image.fromarray(values).save(tmp / "x.png")  # Pillow's convert("RGB") would clip these to white
    assert Image.open(tmp / "x.png").mode == "I;16"
    return tmp / "x.png", grey(values / 65535)


def thirty_two_bit(tmp):
    values = np.round(RAMP * (2**31 - 1)).astype(np.int32)
    Image.fromarray(values).save(tmp / "x.tif")
    assert Image.open(tmp / "x.tif").mode == "I"
    return tmp / "x.tif", grey(values / (2**31 - 1))


def float_image(tmp):
    Image.fromarray(RAMP.astype(np.float32)).save(tmp / "x.tif")
    assert Image.open(tmp / "x.tif").mode == "F"
    return tmp / "x.tif", grey(RAMP)


PALETTE = [(10, 200, 30), (250, 0, 0), (0, 0, 255)]
INDEX = np.indices((32, 32))[1] % 3  # columns cycle through the palette


def palette(tmp, transparent=False):
    img = Image.fromarray(INDEX.astype(np.uint8), "P")
    img.putpalette([c for colour in PALETTE for c in colour])
    expected = np.asarray(PALETTE, np.uint8)[INDEX]
    if transparent:
        img.info["transparency"] = 0  # index 0 is see-through: white, as a viewer shows it
        expected[INDEX == 0] = 255
        img.save(tmp / "x.png", transparency=0)
    else:
        img.save(tmp / "x.png")
    return tmp / "x.png", expected


def rgb(tmp):
    values = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(values).save(tmp / "x.png")
    return tmp / "x.png", values


def rgba(tmp):
    colour = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.float64)
    alpha = np.tile(np.array([0, 128, 255], np.float64), 11)[:32][None, :].repeat(32, 0)
    Image.fromarray(np.dstack([colour, alpha]).astype(np.uint8), "RGBA").save(tmp / "x.png")
    a = alpha[..., None] / 255
    return tmp / "x.png", np.round(colour * a + 255 * (1 - a)).astype(np.uint8)


def grey_alpha(tmp):
    values = np.round(RAMP * 255)
    Image.fromarray(np.dstack([values, np.zeros_like(values)]).astype(np.uint8), "LA").save(tmp / "x.png")
    return tmp / "x.png", np.full((32, 32, 3), 255, np.uint8)  # fully transparent: white


def cmyk(tmp):
    inks = np.zeros((32, 32, 4), np.uint8)
    inks[:, 8:16, 0] = 255  # cyan
    inks[:, 16:24, 3] = 255  # black
    inks[:, 24:, 1] = 255  # magenta
    Image.fromarray(inks, "CMYK").save(tmp / "x.tif")
    expected = np.full((32, 32, 3), 255, np.uint8)
    expected[:, 8:16] = (0, 255, 255)
    expected[:, 16:24] = 0
    expected[:, 24:] = (255, 0, 255)
    return tmp / "x.tif", expected


def sixteen_bit_rgb(tmp):
    values = np.random.default_rng(2).integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp / "x.png"), values[..., ::-1])  # OpenCV writes 48-bit PNGs (BGR order)
    return tmp / "x.png", np.round(values / 65535 * 255).astype(np.uint8)


def multi_frame(tmp):
    first = np.full((32, 32, 3), (200, 20, 20), np.uint8)
    frames = [Image.fromarray(first), Image.fromarray(np.full((32, 32, 3), 5, np.uint8))]
    frames[0].save(tmp / "x.tif", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(tmp / "x.tif"), "n_frames", 1) == 2
    return tmp / "x.tif", first


@pytest.mark.parametrize("make", [one_bit, eight_bit, sixteen_bit, thirty_two_bit, float_image, palette,
                                  lambda tmp: palette(tmp, transparent=True), rgb, rgba, grey_alpha, cmyk,
                                  sixteen_bit_rgb, multi_frame],
                         ids=["1-bit", "8-bit grey", "16-bit grey", "32-bit grey", "float grey", "palette",
                              "palette with transparency", "RGB", "RGBA", "grey with alpha", "CMYK",
                              "16-bit RGB", "multi-frame"])
def test_every_mode_is_read_as_its_intended_colours(make, tmp_path):
    path, expected = make(tmp_path)
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # rounding (16-bit RGB: Pillow's >> 8)


def test_analyze_warns_about_near_constant_images(tmp_path, capsys):
    """What 16-bit files read by a plain convert("RGB") look like: white. --analyze says so."""
    data = write_image_folder(tmp_path / "data")
    for path in data.rglob("*.png"):
        Image.fromarray(np.full((32, 32, 3), 254, np.uint8)).save(path)
    assert main(["--analyze", "--data-dir", str(data), "--out-dir", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "warning: the red channel is nearly constant (mean 0.996, std 0.000)" in printed
    assert "warning" in (tmp_path / "a" / "analysis.txt").read_text()


def test_analyze_is_quiet_on_ordinary_images(image_folder, tmp_path, capsys):
    assert main(["--analyze", "--data-dir", str(image_folder), "--out-dir", str(tmp_path / "a")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_an_image_over_the_pixel_limit_is_named(image_folder, tmp_path, capsys):
    big = image_folder / "train" / "red" / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(big)  # 1,600 pixels
    for extra in ([], ["--analyze"]):
        assert main([*extra, "--data-dir", str(image_folder), "--out-dir", str(tmp_path / f"r{len(extra)}"),
                     "--max-image-pixels", "1500", "--workers", "0", "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: image {big} has more pixels than the limit of 1,500 (a decompression bomb?): "
                       "remove it, or raise --max-image-pixels if it is a real photo")
    with pytest.raises(DataError):  # the limit travels into the decoding processes too
        from utils.data import read_images, set_max_image_pixels
        set_max_image_pixels(1500)
        try:
            read_images([big] * 4096)
        finally:
            set_max_image_pixels(89_478_485)


def test_gradcam_refuses_an_image_over_the_limit(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "1",
                 "--batch-size", "12", "--workers", "0", "--gallery-size", "0"]) == 0
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(big)
    capsys.readouterr()
    assert gradcam.main(["--checkpoint", str(out / "best.pt"), "--image", str(big),
                         "--max-image-pixels", "1500"]) == 2
    assert f"error: image {big} has more pixels than the limit of 1,500" in capsys.readouterr().err


def test_macos_and_hidden_files_are_skipped(image_folder):
    (image_folder / "train" / "red" / "._000.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (image_folder / "train" / "red" / ".hidden").mkdir()
    (image_folder / "train" / "red" / ".hidden" / "x.png").write_bytes(b"junk")
    train, _ = load_image_folder(image_folder)
    assert len(train.labels) == 36


def test_one_class_trains_with_a_warning(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    for split in ("train", "test"):
        for name in ("green", "blue"):
            for f in (data / split / name).iterdir():
                f.unlink()
            (data / split / name).rmdir()
    assert main(["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "6", "--workers", "0", "--gallery-size", "0"]) == 0
    assert "warning: the data has one class (red)" in capsys.readouterr().err
