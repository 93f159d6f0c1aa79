"""report.html (parsed: every image decodes, the metrics table is metrics.csv) and --analyze."""
import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import utils.run_folder
from main import main
from utils.cifar import MEAN, STD
from utils.data import load_image_folder

from conftest import write_fake_cifar10, write_image_folder


class Page(HTMLParser):
    """Images (alt, src), the rows of table#metrics, the headline and any external reference."""

    def __init__(self, text):
        super().__init__()
        self.images, self.rows, self.headline, self.external = [], [], "", []
        self._table = self._cell = None
        self._in_headline = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag == "img":
            self.images.append((attrs["alt"], attrs["src"]))
        elif tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table == "metrics":
            self.rows.append([])
        elif tag in ("td", "th") and self._table == "metrics":
            self._cell = []
        elif tag == "p" and attrs.get("class") == "headline":
            self._in_headline = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "p":
            self._in_headline = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_headline:
            self.headline += data


def decoded_images(page):
    images = {}
    for alt, src in page.images:
        assert src.startswith("data:image/png;base64,"), alt
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()  # decodes every pixel: a truncated image fails here
            images[alt] = img.size
    return images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run, recording each report.html as it was written."""
    tmp = tmp_path_factory.mktemp("report")
    data, out = write_image_folder(tmp / "data"), tmp / "run"
    snapshots = []
    original = utils.run_folder.write_report

    def record(folder, status="finished"):
        original(folder, status)
        snapshots.append((status, (Path(folder) / "report.html").read_text()))

    utils.run_folder.write_report = record
    try:
        assert main(["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out),
                     "--epochs", "2", "--batch-size", "12", "--lr", "0.05", "--workers", "0",
                     "--gallery-size", "3", "--lr-find", "--lr-find-iters", "20"]) == 0
    finally:
        utils.run_folder.write_report = original
    return {"out": out, "snapshots": snapshots}


def test_report_embeds_every_picture_and_the_metrics(trained):
    out = trained["out"]
    page = Page((out / "report.html").read_text())
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"curves.png", "lr.png", "lr_finder.png", "misclassified.png", "gradcam.png",
            "confusion.png"} <= set(pngs)
    images = decoded_images(page)
    assert sorted(images) == pngs
    for name in pngs:
        with Image.open(out / name) as img:
            assert images[name] == img.size
    assert page.external == []  # self-contained: nothing to fetch

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header, *body = page.rows
    shown = [c for c in rows[0] if any(r[c] != "" for r in rows)]  # no validation split: no val columns
    assert header[0] == "epoch" and len(header) == len(shown) == len(rows[0]) - 2
    assert len(body) == len(rows) == 2
    for cells, row in zip(body, rows, strict=True):
        for cell, value in zip(cells, [row[c] for c in shown], strict=True):
            decimals = len(cell.split(".")[1]) if "." in cell and "e" not in cell else 0
            assert float(cell) == pytest.approx(float(value), rel=1e-3, abs=0.51 * 10 ** -decimals)

    best = max(rows, key=lambda r: float(r["test_acc"]))
    assert f"Final test accuracy {float(rows[-1]['test_acc']):.2f}% (epoch 2)" in page.headline
    assert (f"best.pt: epoch {best['epoch']}, {float(best['test_acc']):.2f}%, chosen on the test set"
            in page.headline)
    text = (out / "report.html").read_text()
    args = json.loads((out / "args.json").read_text())
    assert args["command"].startswith("python main.py --model custom_resnet --data-dir ")
    assert args["command"] in text.replace("&#x27;", "'")
    assert "Total params: 6,571,779" in text  # the model summary
    assert 'http-equiv="refresh"' not in text  # finished: no more reloading


def test_report_is_rewritten_after_every_epoch(trained):
    statuses = [status for status, _ in trained["snapshots"]]
    assert statuses == ["training: 0 of 2 epochs done", "training: 1 of 2 epochs done",
                        "training: 2 of 2 epochs done", "finished"]
    for k, (_, text) in enumerate(trained["snapshots"][:3]):
        page = Page(text)
        assert len(page.rows) == (k + 1 if k else 0)  # header + one row per finished epoch
        assert ("No epoch has finished yet." in page.headline) == (k == 0)
        assert 'http-equiv="refresh"' in text  # an open page follows the run
        decoded_images(page)
    assert "lr_finder.png" in dict(Page(trained["snapshots"][0][1]).images)


def test_analyze_counts_sizes_and_channel_statistics(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", train_per_class=7, test_per_class=3)
    odd = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(odd).save(data / "train" / "red" / "odd.png")  # 40 wide, 30 high
    out = tmp_path / "analyze"
    assert main(["--analyze", "--data-dir", str(data), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["analysis.txt", "args.json", "class_counts.png",
                                                     "image_sizes.png", "report.html", "samples.png"]
    text = (out / "analysis.txt").read_text()
    assert text in printed
    lines = text.splitlines()
    counts = {line.split()[0]: line.split()[1:] for line in lines[2:6]}
    assert counts == {"blue": ["7", "3"], "green": ["7", "3"], "red": ["8", "3"], "total": ["22", "9"]}
    assert "train image sizes (width x height): 32x32: 21, 40x30: 1" in lines
    assert "test image sizes (width x height): 32x32: 9" in lines

    train, _ = load_image_folder(data)  # what the loaders see: the odd image resized to 32x32
    pixels = train.images.reshape(-1, 3) / 255.0
    stats = lines[lines.index(next(line for line in lines if line.startswith("channel"))) + 1:]
    for i, channel in enumerate(("red", "green", "blue")):
        row = stats[i].split()
        assert row[0] == channel
        assert float(row[1]) == pytest.approx(pixels[:, i].mean(), abs=1e-4)
        assert float(row[3]) == pytest.approx(pixels[:, i].std(), abs=1e-4)
        assert (float(row[2]), float(row[4])) == (MEAN[i], STD[i])

    page = Page((out / "report.html").read_text())
    assert sorted(decoded_images(page)) == ["class_counts.png", "image_sizes.png", "samples.png"]
    assert "per-channel statistics" in (out / "report.html").read_text()
    with Image.open(out / "samples.png") as img:  # 10 columns of tiles
        assert img.size[0] >= 10 * 150


def test_analyze_refuses_training_flags(tmp_path, capsys):
    assert main(["--analyze", "--lr-find", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --analyze only describes the data")


def test_analyze_reads_torchvision_cifar10_too(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as tv_cifar

    write_fake_cifar10(tmp_path / "cifar", per_batch=4)  # 5 train batches, 1 test batch
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    out = tmp_path / "analyze"
    assert main(["--analyze", "--data-dir", str(tmp_path / "cifar"), "--out-dir", str(out)]) == 0
    lines = (out / "analysis.txt").read_text().splitlines()
    assert lines[0].endswith("(torchvision CIFAR-10), 10 classes")
    assert lines[2].split() == ["a", "5", "1"] and lines[6].split() == ["e", "0", "0"]
    assert "train image sizes (width x height): 32x32: 20" in lines
    assert len(decoded_images(Page((out / "report.html").read_text()))) == 3
