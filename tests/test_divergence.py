"""A run whose loss or model becomes non-finite stops at once and never saves a non-finite state."""
import csv
import dataclasses

import pytest
import torch
import torch.nn as nn

import model as model_registry
from main import main
from utils import checkpoint

ARGS = ["--model", "custom_resnet", "--epochs", "3", "--batch-size", "12", "--lr", "0.05", "--workers", "0",
        "--gradcam-layer", "inner.layer2"]


class NaNAt(nn.Module):
    """The real model, whose logits become NaN from the ``at``-th forward pass in ``mode`` on."""

    def __init__(self, inner, at: int, mode: str):
        super().__init__()
        self.inner, self.at, self.mode, self.calls = inner, at, mode, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training == (self.mode == "train"):
            self.calls += 1
            if self.calls >= self.at:
                return out * float("nan")
        return out


@pytest.fixture
def nan_model(monkeypatch):
    def install(at, mode):
        real = model_registry.MODELS["custom_resnet"]
        entry = dataclasses.replace(real, builder=lambda num_classes, norm: NaNAt(real(num_classes, norm), at, mode))
        monkeypatch.setitem(model_registry.MODELS, "custom_resnet", entry)
    return install


def error_line(capsys):
    err = capsys.readouterr().err.rsplit("\r", 1)[-1].strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(nan_model, image_folder, tmp_path, capsys):
    nan_model(at=5, mode="train")  # 3 steps an epoch: epoch 2, step 2
    out = tmp_path / "run"
    assert main([*ARGS, "--data-dir", str(image_folder), "--out-dir", str(out)]) == 2
    err = error_line(capsys)
    assert "non-finite (NaN or inf) at epoch 2, step 2" in err
    assert "last.pt holds epoch 1" in err and "lower --max-lr than 0.05" in err
    last, best = checkpoint.load(out / "last.pt"), checkpoint.load(out / "best.pt")
    assert last["epoch"] == 1 and finite(last["model"]) and finite(best["model"])
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert not (out / "misclassified.png").exists() and not (out / "gradcam.png").exists()
    assert "stopped: the training loss became non-finite" in (out / "report.html").read_text()


def test_a_nan_in_the_first_epoch_saves_nothing(nan_model, image_folder, tmp_path, capsys):
    nan_model(at=1, mode="train")
    out = tmp_path / "run"
    assert main([*ARGS, "--data-dir", str(image_folder), "--out-dir", str(out)]) == 2
    assert "at epoch 1, step 1; no checkpoint was written" in error_line(capsys)
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_a_nan_test_loss_is_never_best(nan_model, image_folder, tmp_path, capsys):
    # eval-mode passes: the Grad-CAM layer check, the summary, then two a test (image and mirror)
    nan_model(at=5, mode="eval")
    out = tmp_path / "run"
    assert main([*ARGS, "--data-dir", str(image_folder), "--out-dir", str(out)]) == 2
    assert "the test loss of epoch 2 is nan" in error_line(capsys)
    assert checkpoint.load(out / "best.pt")["epoch"] == 1
    assert checkpoint.load(out / "last.pt")["epoch"] == 1
