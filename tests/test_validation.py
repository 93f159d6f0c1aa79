"""--val-split: a fixed, class-balanced hold-out that best.pt is chosen on; the test set only measured."""
import argparse
import csv
import json

import numpy as np
import pytest

import utils.engine
from main import main
from utils.checkpoint import load as load_checkpoint
from utils.training import load_splits

from conftest import write_image_folder


def split_args(data, val_split, seed=1, train_subset=None):
    return argparse.Namespace(data_dir=str(data), val_split=val_split, seed=seed, train_subset=train_subset,
                              test_subset=None)


def keys(split):
    return {img.tobytes() for img in split.images}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("val") / "data", train_per_class=20, test_per_class=4)


def test_the_hold_out_is_disjoint_balanced_and_fixed_by_the_seed(data):
    train, val, test = load_splits(split_args(data, 12))
    assert len(val.labels) == 12 and len(train.labels) == 60 - 12 and len(test.labels) == 12
    assert np.bincount(val.labels).tolist() == [4, 4, 4]  # 3 classes
    assert np.bincount(train.labels).tolist() == [16, 16, 16]
    assert len(keys(train)) == 48 and not keys(train) & keys(val)  # every image is unique: no overlap
    _, again, _ = load_splits(split_args(data, 12))
    assert np.array_equal(again.images, val.images)
    _, other, _ = load_splits(split_args(data, 12, seed=2))
    assert keys(other) != keys(val)


def test_train_subset_is_taken_from_what_the_hold_out_left(data):
    train, val, _ = load_splits(split_args(data, 12, train_subset=30))
    assert len(train.labels) == 30 and not keys(train) & keys(val)
    from utils.errors import UserError
    with pytest.raises(UserError, match="--train-subset 49 is more than the 48 images left after --val-split"):
        load_splits(split_args(data, 12, train_subset=49))
    with pytest.raises(UserError, match="--val-split 60 leaves no training images"):
        load_splits(split_args(data, 60))


def scripted_evaluate(monkeypatch, accuracies):
    """engine.evaluate returns the next scripted accuracy (val, test, val, test, ...)."""
    real, script = utils.engine.evaluate, iter(accuracies)

    def evaluate(*args, **kwargs):
        result = real(*args, **kwargs)
        acc = next(script)
        return {**result, "acc": acc, "single_acc": acc}
    monkeypatch.setattr(utils.engine, "evaluate", evaluate)


def run(data, out, *extra):
    return main(["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "3",
                 "--batch-size", "12", "--lr", "0.05", "--workers", "0", "--gallery-size", "0", *extra])


def test_best_pt_follows_validation_not_test(data, tmp_path, monkeypatch, capsys):
    # validation peaks at epoch 2, test at epoch 3: best.pt must hold epoch 2
    scripted_evaluate(monkeypatch, [50.0, 80.0, 70.0, 60.0, 60.0, 90.0])
    out = tmp_path / "run"
    assert run(data, out, "--val-split", "12") == 0
    printed = capsys.readouterr().out
    assert "(48 train, 12 validation, 12 test, 3 classes)" in printed
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_acc"]) for r in rows] == [50, 70, 60] and [float(r["test_acc"]) for r in rows] == [80, 60, 90]
    assert load_checkpoint(out / "best.pt")["epoch"] == 2
    results = json.loads((out / "results.json").read_text())
    assert results["best_on"] == "val" and results["best_epoch"] == 2
    assert results["best_test_acc"] == 60 and results["final_test_acc"] == 90 and results["final_val_acc"] == 60
    summary = (out / "summary.txt").read_text()
    assert "best.pt: epoch 2, chosen on validation accuracy (70.00%); its test accuracy 60.00%" in summary
    assert "best.pt: epoch 2, chosen on validation accuracy 70.00%" in (out / "report.html").read_text()
    assert json.loads((out / "args.json").read_text())["data"] == {
        "classes": ["blue", "green", "red"], "train": 48, "val": 12, "test": 12}


def test_without_a_split_the_summary_says_best_was_chosen_on_test(data, tmp_path, monkeypatch):
    scripted_evaluate(monkeypatch, [80.0, 60.0, 90.0])
    out = tmp_path / "run"
    assert run(data, out) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["val_acc"] for r in rows] == ["", "", ""]
    assert load_checkpoint(out / "best.pt")["epoch"] == 3
    assert "best.pt: epoch 3, chosen on the test set (90.00%), so that figure is optimistic" in (
        out / "summary.txt").read_text()
    assert "chosen on the test set" in (out / "report.html").read_text()
    assert json.loads((out / "results.json").read_text())["best_on"] == "test"
