"""What main.py writes after training, read back from the files, and gradcam.py's command line."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gradcam as gradcam_module
import utils.run_folder
from main import main
from utils.checkpoint import load as load_checkpoint
from utils.checkpoint import save as save_checkpoint
from utils.plots import save_figure

from conftest import COLOURS, write_image_folder

REPO = Path(__file__).resolve().parents[1]
TEST_PER_CLASS = 8
CLASSES = sorted(COLOURS)  # folder order: blue, green, red


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run with a tiny lr, so it still makes mistakes; every saved figure is kept
    with its axes' pixel boxes, measured on the canvas that is written to the PNG."""
    root = tmp_path_factory.mktemp("galleries")
    data = write_image_folder(root / "data", train_per_class=12, test_per_class=TEST_PER_CLASS)
    out = root / "run"
    figures = {}

    def recording_save(fig, path):
        fig.canvas.draw()
        figures[Path(path).name] = {
            "height": fig.bbox.height,
            "boxes": [ax.get_window_extent() for ax in fig.axes],
            "titles": [ax.get_title() for ax in fig.axes],
            "texts": [[t.get_text() for t in ax.texts] for ax in fig.axes],
            "ticks": [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes]}
        save_figure(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils.run_folder, "save_figure", recording_save)
        argv = ["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out),
                "--epochs", "1", "--batch-size", "12", "--lr", "1e-5", "--workers", "0",
                "--gallery-size", "6"]
        assert main(argv) == 0
    return {"data": data, "out": out, "figures": figures}


def original_image(data, index):
    """The uint8 file behind test index ``index`` (class folders sorted, files sorted)."""
    name = CLASSES[index // TEST_PER_CLASS]
    return np.asarray(Image.open(data / "test" / name / f"{index % TEST_PER_CLASS:03d}.png"))


def tiles(png_path, figure, n):
    """The first ``n`` axes of a saved grid, sampled at the centre of each drawn image pixel."""
    png = np.asarray(Image.open(png_path).convert("RGB"))
    found = []
    for box in figure["boxes"][:n]:
        xs = np.floor(box.x0 + (np.arange(32) + 0.5) * box.width / 32).astype(int)
        ys = np.floor(figure["height"] - box.y1 + (np.arange(32) + 0.5) * box.height / 32).astype(int)
        found.append(png[ys][:, xs])
    return found


def test_per_class_and_summary_agree_with_the_test_accuracy(trained):
    out = trained["out"]
    rows = read_csv(out / "per_class.csv")
    assert [r["class"] for r in rows] == CLASSES
    assert all(int(r["total"]) == TEST_PER_CLASS for r in rows)
    correct = sum(int(r["correct"]) for r in rows)
    test_acc = float(read_csv(out / "metrics.csv")[-1]["test_acc"])
    assert 100 * correct / (3 * TEST_PER_CLASS) == pytest.approx(test_acc)
    summary = (out / "summary.txt").read_text()
    for r in rows:
        assert f"{r['class']:<12} {float(r['accuracy']):6.2f}% ({r['correct']}/{r['total']})" in summary

    confusion = trained["figures"]["confusion.png"]
    counts = np.array([int(t) for t in confusion["texts"][0]]).reshape(3, 3)
    assert counts.sum() == 3 * TEST_PER_CLASS and counts.sum(1).tolist() == [TEST_PER_CLASS] * 3
    assert np.diag(counts).tolist() == [int(r["correct"]) for r in rows]
    assert confusion["ticks"][0] == CLASSES
    assert Image.open(out / "confusion.png").size[0] > 300


def test_misclassified_gallery_shows_the_real_images_with_their_labels(trained):
    out, data = trained["out"], trained["data"]
    rows = read_csv(out / "misclassified.csv")
    mistakes = 3 * TEST_PER_CLASS - sum(int(r["correct"]) for r in read_csv(out / "per_class.csv"))
    assert mistakes > 0, "the run must make mistakes for this test to mean anything"
    assert len(rows) == min(6, mistakes)
    probs = [float(r["true_prob"]) for r in rows]
    assert probs == sorted(probs)  # worst first: lowest probability of the true class
    figure = trained["figures"]["misclassified.png"]
    for row, tile, title in zip(rows, tiles(out / "misclassified.png", figure, len(rows)),
                                figure["titles"], strict=False):
        index = int(row["index"])
        assert row["true"] == CLASSES[index // TEST_PER_CLASS] and row["predicted"] != row["true"]
        original = original_image(data, index)
        assert np.abs(tile.astype(int) - original).max() <= 1  # de-normalised, not raw tensors
        colour = np.asarray(COLOURS[row["true"]])
        assert np.abs(tile.reshape(-1, 3).mean(0) - colour).max() < 25  # looks like its class
        conf = float(row["confidence"])
        true_prob = float(row["true_prob"])
        assert title == f"pred {row['predicted']} ({conf:.0%})\ntrue {row['true']} ({true_prob:.0%})"


def test_gradcam_gallery_rows(trained):
    out, data = trained["out"], trained["data"]
    rows = read_csv(out / "misclassified.csv")
    figure = trained["figures"]["gradcam.png"]
    found = tiles(out / "gradcam.png", figure, 3 * len(rows))
    for k, row in enumerate(rows):
        image, cam_pred, cam_true = found[3 * k: 3 * k + 3]
        original = original_image(data, int(row["index"]))
        assert np.abs(image.astype(int) - original).max() <= 1
        assert np.abs(cam_pred.astype(int) - original).max() > 40  # the heat is drawn on top
        title_image, title_pred, title_true = figure["titles"][3 * k: 3 * k + 3]
        assert title_image.startswith(f"true {row['true']}\npred {row['predicted']}")
        assert title_pred == f"CAM of pred\n{row['predicted']}"
        assert title_true == f"CAM of true\n{row['true']}"


def test_gallery_size_zero_and_bad_layer(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(out),
            "--epochs", "1", "--batch-size", "12", "--workers", "0"]
    assert main([*argv, "--gallery-size", "0"]) == 0
    assert (out / "per_class.csv").exists() and (out / "confusion.png").exists()
    assert not (out / "misclassified.png").exists() and not (out / "gradcam.png").exists()

    other = tmp_path / "typo"
    capsys.readouterr()
    assert main([*argv, "--out-dir", str(other), "--gradcam-layer", "layer22"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gradcam-layer: no layer 'layer22' in CustomResNet: did you mean")
    assert "\n" not in err and not other.exists()  # stopped before training


# ------------------------------------------------------------------ gradcam.py
def cli(*argv):
    return gradcam_module.main([str(a) for a in argv])


def test_explains_an_image(trained, tmp_path, capsys):
    best = trained["out"] / "best.pt"
    image = trained["data"] / "test" / "red" / "000.png"
    out = tmp_path / "cam.png"
    assert cli("--checkpoint", best, "--image", image, "--class", "red", "--out", out) == 0
    printed = capsys.readouterr().out
    assert printed.count("%") == 3 and all(c in printed for c in CLASSES)
    assert "gradcam of 'red' at layer2" in printed
    assert Image.open(out).size[0] > 300

    big = tmp_path / "big.jpg"  # any size: resized to 32x32
    Image.fromarray(np.full((200, 120, 3), (40, 190, 50), np.uint8)).save(big)
    out2 = tmp_path / "cam2.png"
    assert cli("--checkpoint", best, "--image", big, "--layer", "layer1.res.conv2",
               "--method", "gradcam++", "--out", out2) == 0
    assert "gradcam++ of '" in capsys.readouterr().out and out2.exists()
    assert cli("--checkpoint", best, "--image", image) == 0  # no --out: beside the checkpoint
    assert f"-> {trained['out'] / 'cam-000.png'}" in capsys.readouterr().out
    assert (trained["out"] / "cam-000.png").is_file()


@pytest.fixture
def wrong_checkpoints(trained, tmp_path):
    ckpt = load_checkpoint(trained["out"] / "best.pt")
    ckpt["args"] = {**ckpt["args"], "model": "resnet18"}  # weights of another model
    save_checkpoint(tmp_path / "other.pt", ckpt)
    torch.save(ckpt["model"], tmp_path / "state_dict.pt")  # a bare state dict
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return tmp_path


@pytest.mark.parametrize("change,needle", [
    ({"--layer": "layer9"}, "no layer 'layer9' in CustomResNet: did you mean"),
    ({"--layer": "fc"}, "not a spatial (B, C, H, W) map"),
    ({"--class": "cat"}, "--class 'cat' is not one of this checkpoint's classes: blue, green, red"),
    ({"--image": "missing.png"}, "--image {tmp}/missing.png does not exist"),
    ({"--image": "broken.png"}, "cannot read image {tmp}/broken.png"),
    ({"--checkpoint": "missing.pt"}, "--checkpoint {tmp}/missing.pt does not exist"),
    ({"--checkpoint": "other.pt"}, "is resnet18 (norm bn) but its weights do not fit"),
    ({"--checkpoint": "state_dict.pt"}, "cannot read checkpoint {tmp}/state_dict.pt"),
    ({"--checkpoint": "garbage.pt"}, "cannot read checkpoint {tmp}/garbage.pt"),
    ({"--alpha": "1.5"}, "--alpha: must be in [0, 1]"),
    ({"--out": "no/such/dir/cam.png"}, "folder {tmp}/no/such/dir does not exist"),
])
def test_bad_input_is_one_line(change, needle, trained, wrong_checkpoints, capsys):
    tmp = wrong_checkpoints
    args = {"--checkpoint": trained["out"] / "best.pt", "--image": trained["data"] / "test/blue/000.png",
            "--out": tmp / "cam.png"}
    for flag, value in change.items():
        args[flag] = value if flag in ("--layer", "--class", "--alpha") else tmp / value
    assert cli(*[x for pair in args.items() for x in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert needle.format(tmp=tmp) in err
    assert not (tmp / "cam.png").exists()


def test_command_line_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "gradcam.py", "--checkpoint", str(tmp_path / "x.pt"),
                           "--image", "y.png"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: --checkpoint {tmp_path / 'x.pt'} does not exist")
