"""The One Cycle schedule as it ran, and the LR range test (torch-lr-finder) on tiny data."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from main import main
from model import MODELS
from utils.data import load_image_folder, make_loader, train_transform
from utils.device import choose_precision
from utils.checkpoint import load as load_checkpoint
from utils.lr_finder import SKIP_START, range_test
from utils.schedule import one_cycle, one_cycle_knots


def lrs_of(scheduler, optimizer, steps):
    """The lr of steps 1..steps, read from the optimizer as train_one_epoch does."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(seen)


def sgd():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=123.0, momentum=0.9)


@pytest.mark.parametrize("total,peak", [(240, 50), (24 * 98, 5 * 98), (10, 1), (10, 9)])
def test_one_cycle_peaks_at_its_step_and_returns_to_the_start(total, peak):
    opt = sgd()
    lrs = lrs_of(one_cycle(opt, 0.4, total, peak, div_factor=25), opt, total)
    assert int(np.argmax(lrs)) + 1 == peak and lrs[peak - 1] == 0.4  # exactly, step counted from 1
    assert lrs[0] == pytest.approx(0.4 / 25 if peak > 1 else 0.4)
    assert lrs[-1] == pytest.approx(0.4 / 25, rel=1e-12)  # back at the start, no annihilation
    assert np.all(np.diff(lrs[:peak]) > 0) and np.all(np.diff(lrs[peak - 1:]) < 0)
    assert lrs.min() == pytest.approx(0.4 / 25)


def test_annihilation_is_a_third_phase_only_when_asked():
    opt = sgd()
    lrs = lrs_of(one_cycle(opt, 1.0, 100, 20, div_factor=10, annihilate=0.1), opt, 100)
    assert int(np.argmax(lrs)) + 1 == 20
    assert lrs[89] == pytest.approx(0.1)  # step 90: back at the start lr
    assert lrs[-1] == pytest.approx(0.1 / 100)  # then 100x further down
    assert np.all(np.diff(lrs[19:]) < 0)
    with pytest.raises(ValueError, match="no steps between the peak"):
        one_cycle_knots(1.0, 100, 95, annihilate=0.1)


def test_the_schedule_recorded_in_a_run(image_folder, tmp_path):
    # 36 images, batch 12: 3 steps an epoch, 4 epochs, peak at epoch 2 = step 6
    out = tmp_path / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(out),
                 "--epochs", "4", "--peak-epoch", "2", "--batch-size", "12", "--lr", "0.05",
                 "--div-factor", "10", "--workers", "0", "--gallery-size", "0"]) == 0
    lrs = np.array(load_checkpoint(out / "last.pt")["lrs"])
    assert len(lrs) == 12 and int(np.argmax(lrs)) + 1 == 6 and lrs[5] == 0.05
    assert np.all(np.diff(lrs[:6]) > 0) and np.all(np.diff(lrs[5:]) < 0)
    assert lrs[0] == pytest.approx(0.005) and lrs[-1] == pytest.approx(0.005)
    assert (out / "lr.png").stat().st_size > 0


@pytest.fixture
def tiny(image_folder):
    train, _ = load_image_folder(image_folder)
    torch.manual_seed(0)
    model = MODELS["custom_resnet"](num_classes=len(train.classes))
    loader = make_loader(train, train_transform(), 12, train=True, workers=0)
    return model, loader


def test_range_test_restores_the_model_bit_for_bit(tiny):
    model, loader = tiny
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = optimizer.state_dict()
    precision = choose_precision(torch.device("cpu"))
    result = range_test(model, optimizer, nn.CrossEntropyLoss(), loader, torch.device("cpu"),
                        precision, start_lr=1e-5, end_lr=10, iters=30)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # weights and BN statistics
    assert optimizer.state_dict()["state"] == opt_before["state"] == {}
    assert optimizer.param_groups[0]["lr"] == 1e-7 and not model.training
    lrs, losses = np.array(result["lr"]), np.array(result["loss"])
    assert SKIP_START + 2 < len(lrs) <= 30 and np.all(np.isfinite(losses))
    assert lrs[0] == pytest.approx(1e-5) and np.all(np.diff(np.log(lrs)) > 0)  # exponential
    assert np.allclose(np.diff(np.log(lrs)), np.log(10 / 1e-5) / 29)  # reaches end_lr at the 30th
    i, lowest = result["index"], result["lowest"]
    assert np.isfinite(result["suggestion"]) and result["suggestion"] == lrs[i]
    assert losses[lowest] == losses.min() and SKIP_START <= i <= lowest  # on the way down
    descent = losses[SKIP_START:lowest + 1]
    assert np.gradient(descent)[i - SKIP_START] == np.gradient(descent).min()  # steepest there


def test_max_lr_auto_trains_with_the_suggestion(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(out),
                 "--epochs", "2", "--batch-size", "12", "--max-lr", "auto", "--lr-find-iters", "30",
                 "--lr-find-start", "1e-5", "--workers", "0", "--gallery-size", "0"]) == 0
    args = json.loads((out / "args.json").read_text())
    assert isinstance(args["lr"], float) and args["lr"] == args["lr_suggested"]
    assert 1e-4 <= args["lr"] <= 10
    lrs = load_checkpoint(out / "last.pt")["lrs"]  # 3 steps an epoch, peak at epoch 0.417: step 1
    assert max(lrs) == lrs[0] == args["lr"] and lrs[-1] == pytest.approx(args["lr"] / args["div_factor"])
    printed = capsys.readouterr().out
    assert f"suggested lr {args['lr']:.3g}" in printed and "(the suggestion)" in printed
    assert (out / "lr_finder.png").stat().st_size > 0


def test_lr_find_with_no_epochs_only_plots(image_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["--model", "resnet18", "--data-dir", str(image_folder), "--out-dir", str(out),
                 "--epochs", "0", "--lr-find", "--lr-find-iters", "20", "--batch-size", "6",
                 "--workers", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "lr_finder.csv", "lr_finder.png", "report.html",
                                                  "summary.txt"]
    assert "suggested lr" in (out / "summary.txt").read_text()
