"""main.py --robustness and --faithfulness end to end: the files, the summary, the report, results.json."""
import csv
import json

import utils.interpret
from main import main
from utils.corruptions import CORRUPTIONS, SEVERITIES
from utils.gradcam import METHODS

from conftest import write_image_folder


def test_a_run_assesses_its_final_model(tmp_path, monkeypatch):
    used, real = [], dict(utils.interpret.CAMS)
    spy = {name: (lambda *a, _name=name: used.append(_name) or real[_name](*a)) for name in real}
    monkeypatch.setattr(utils.interpret, "CAMS", spy)
    data = write_image_folder(tmp_path / "data", train_per_class=8, test_per_class=4)
    out = tmp_path / "run"
    argv = ["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "1",
            "--batch-size", "12", "--lr", "1e-5", "--workers", "0", "--gallery-size", "2",  # an untrained model errs
            "--cam-method", "layercam", "--robustness", "--robustness-subset", "6", "--faithfulness", "2"]
    assert main(argv) == 0
    summary = (out / "summary.txt").read_text()
    results = json.loads((out / "results.json").read_text())
    assert f"confidence bins): {100 * results['ece']:.2f}%" in summary and results["ece_bins"] == 15

    with open(out / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + len(CORRUPTIONS) * len(SEVERITIES) == len(results["robustness"])
    assert {int(r["images"]) for r in rows} == {6}
    assert "CIFAR-10-C-style robustness (6 test images" in summary and "not the published CIFAR-10-C" in summary

    with open(out / "faithfulness.csv") as f:
        rows = list(csv.DictReader(f))
    layers = {"layer2", "layer3"}  # the gallery's 8x8 layer and the last 4x4 one
    assert {r["layer"] for r in rows} == layers and {r["method"] for r in rows} == set(METHODS)
    assert len(rows) == len(METHODS) * 2 * 3 and {int(r["images"]) for r in rows} == {2}
    assert all(f"most faithful at {layer}: " in summary for layer in layers)

    page = (out / "report.html").read_text()
    for name in ("reliability.png", "robustness.png", "faithfulness.png", "gradcam.png"):
        assert f'alt="{name}"' in page, name
    assert used == ["layercam"]  # the gallery's method
