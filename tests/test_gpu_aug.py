"""--gpu-aug draws the same augmentations as the Albumentations pipeline.

Each pixel of a probe image encodes its own position (red = 8 x row, green = 8 x column,
blue = 255), so from an augmented 32x32 output we can read back the crop offsets, the
flip and the cutout hole, and compare their distributions between the two pipelines.
"""
import numpy as np
import pytest
import torch

from main import main
from utils.cifar import MEAN, STD
from utils.data import test_transform as eval_transform
from utils.data import Split, train_transform
from utils.gpu_aug import DeviceLoader, augment, normalize
from utils.training import use_gpu_aug

N = 3000
FILL = np.array([round(m * 255) for m in MEAN])


def probe_image():
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([8 * r, 8 * c, np.full_like(r, 255)], -1).astype(np.uint8)


def decode(out: np.ndarray) -> dict:
    """(32, 32, 3) uint8 output -> crop offsets, flip, hole (its rows/cols) read from the probe."""
    hole = np.all(out == FILL, axis=-1)
    ys, xs = np.nonzero(hole)
    keep = ~hole
    # rows: red of any unholed pixel in row i is 8 * (i + oy - 4) when inside the original image
    rr, cc = np.nonzero(keep)
    row_src = out[rr, cc, 0].astype(int) // 8 - rr
    col_src = out[rr, cc, 1].astype(int) // 8
    # a middle row/column is never reflected: its source is the offset plus its index
    mid = (rr >= 8) & (rr < 24) & (cc >= 8) & (cc < 24)
    oy = int(np.median(row_src[mid])) + 4
    forward = np.median(col_src[mid] - cc[mid])
    backward = np.median(col_src[mid] + cc[mid])
    flipped = np.mean(col_src[mid] + cc[mid] == backward) > np.mean(col_src[mid] - cc[mid] == forward)
    ox = int(backward - 31) + 4 if flipped else int(forward) + 4
    return {"oy": oy, "ox": ox, "flip": bool(flipped), "hole": bool(hole.any()),
            "hole_h": int(np.ptp(ys) + 1) if len(ys) else 0, "hole_w": int(np.ptp(xs) + 1) if len(xs) else 0,
            "hole_count": int(hole.sum()), "hole_y": int(ys.min()) if len(ys) else -1,
            "hole_x": int(xs.min()) if len(xs) else -1}


def to_uint8(normalised: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised float -> (H, W, 3) uint8, exact for values that were uint8."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((normalised * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def samples():
    image = probe_image()
    transform = train_transform(cutout_p=0.5)
    transform.set_random_seed(0)
    albu = [decode(to_uint8(transform(image=image)["image"])) for _ in range(N)]
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].repeat(N, 1, 1, 1)
    ours_u8 = augment(batch, torch.Generator().manual_seed(0), cutout_p=0.5)
    ours = [decode(to_uint8(x)) for x in normalize(ours_u8)]
    return albu, ours


def test_probe_decodes_a_known_augmentation():
    image = probe_image()
    crop = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")[2:34, 7:39][:, ::-1].copy()
    crop[5:13, 20:28] = FILL
    got = decode(crop)
    assert (got["oy"], got["ox"], got["flip"], got["hole_y"], got["hole_x"]) == (2, 7, True, 5, 20)


@pytest.mark.parametrize("key", ["oy", "ox", "hole_y", "hole_x"])
def test_offsets_and_hole_positions_have_the_same_distribution(samples, key):
    albu, ours = samples
    values = {name: np.array([s[key] for s in group if s[key] >= 0]) for name, group in
              (("albu", albu), ("ours", ours))}
    assert values["albu"].min() == values["ours"].min() == 0
    assert values["albu"].max() == values["ours"].max() == (8 if key in ("oy", "ox") else 24)
    support = np.arange(values["albu"].max() + 1)
    for v in values.values():  # uniform: every value near its expected share
        freq = np.array([(v == k).mean() for k in support])
        assert np.abs(freq - 1 / len(support)).max() < 0.035, freq


@pytest.mark.parametrize("key, rate", [("flip", 0.5), ("hole", 0.5)])
def test_flip_and_cutout_rates(samples, key, rate):
    for group in samples:
        assert abs(np.mean([s[key] for s in group]) - rate) < 0.04


def test_holes_are_8x8_and_filled_with_the_mean(samples):
    for group in samples:
        holes = [s for s in group if s["hole"]]
        assert {(s["hole_h"], s["hole_w"], s["hole_count"]) for s in holes} == {(8, 8, 64)}


def test_normalise_matches_albumentations():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    want = eval_transform()(image=image)["image"]
    got = normalize(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_device_loader_covers_each_image_once_and_shards_without_overlap():
    images = np.arange(50, dtype=np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3)
    labels = np.arange(50)
    seen = []
    for rank in range(2):
        loader = DeviceLoader(images, labels, 8, "cpu", train=True, rank=rank, world_size=2)
        loader.set_epoch(1, 3)
        batches = list(loader)
        assert len(batches) == len(loader) == 4
        seen += [y for _, ys in batches for y in ys.tolist()]
    assert sorted(seen) == list(range(50))
    loader.set_epoch(1, 3)
    again = [ys.tolist() for _, ys in loader]
    assert again == [ys.tolist() for _, ys in batches]  # the epoch seed fixes the shuffle


TINY = ["--epochs", "1", "--batch-size", "6", "--workers", "0", "--gallery-size", "2"]


def test_gpu_aug_trains_and_writes_the_run_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(out),
                 "--gpu-aug", *TINY]) == 0
    assert "gpu-aug (on the device)" in capsys.readouterr().out
    for name in ("metrics.csv", "last.pt", "misclassified.png", "gradcam.png", "report.html"):
        assert (out / name).is_file(), name


def test_the_default_data_path_is_gpu_aug_on_cuda_while_the_data_fits(monkeypatch):
    split = Split(np.zeros((1000, 32, 32, 3), np.uint8), np.zeros(1000, np.int64), ["a"])  # 3,072,000 bytes
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2 * 3_072_000, 10**12))
    assert use_gpu_aug(None, cuda, split, None, split) is True  # both splits: exactly a quarter
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2 * 3_072_000 - 4, 10**12))
    assert use_gpu_aug(None, cuda, split, None, split) is False  # a byte over: the workers load it
    assert use_gpu_aug(True, cuda, split) is True and use_gpu_aug(False, cuda, split) is False
    assert use_gpu_aug(None, torch.device("cpu"), split) is False
    assert use_gpu_aug(True, torch.device("cpu"), split) is True


def test_a_gpu_aug_run_never_imports_albumentations(image_folder, tmp_path):
    """Its import costs about a second of a short GPU recipe: training, testing, galleries and
    Grad-CAM of a --gpu-aug run normalise with torch alone."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, main; rc = main.main(sys.argv[1:]); "
            "print('albumentations' in sys.modules, rc)")
    argv = ["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(tmp_path / "run"),
            "--gpu-aug", "--epochs", "1", "--batch-size", "12", "--gallery-size", "3", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip().splitlines()[-1] == "False 0", proc.stderr[-500:]
    assert (tmp_path / "run" / "gradcam.png").is_file()
