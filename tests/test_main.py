"""main([...]) end to end on tiny generated image folders, on the CPU."""
import csv
import hashlib
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

import utils.engine
from main import main
from model import MODELS
from utils.checkpoint import load as load_checkpoint

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ["args.json", "summary.txt", "metrics.csv", "last.pt", "best.pt", "curves.png",
             "per_class.csv", "confusion.png", "misclassified.png", "misclassified.csv", "gradcam.png",
             "lr.png", "reliability.png", "results.json"]
COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
           "test_acc_single", "seconds"]


def run(data, out, *extra):
    argv = ["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out),
            "--epochs", "2", "--batch-size", "12", "--lr", "0.05", "--workers", "0", *extra]
    return main(argv)


def read_metrics(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_end_to_end_writes_every_file(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out) == 0
    printed = capsys.readouterr().out
    assert "Total params: 6,571,779" in printed  # torchsummary table (3 classes)
    assert "precision: " in printed and "memory format: " in printed
    for name in RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    rows = read_metrics(out)
    assert list(rows[0]) == COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["test_acc"]) <= 100 for r in rows)
    args = json.loads((out / "args.json").read_text())
    assert args["model"] == "custom_resnet" and args["epochs"] == 2 and args["batch_size"] == 12
    summary = (out / "summary.txt").read_text()
    assert "Total params: 6,571,779" in summary and "best" in summary
    ckpt = load_checkpoint(out / "last.pt")  # weights_only=True
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "best_acc", "args"}
    assert ckpt["epoch"] == 2 and ckpt["args"]["model"] == "custom_resnet"
    assert ckpt["best_acc"] == max(float(r["test_acc"]) for r in rows)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    with Image.open(out / "curves.png") as img:
        assert img.size[0] > 500


def test_learns_a_learnable_task(tmp_path):
    """Noisy colour classes: test accuracy climbs far above chance (33%) and the test loss falls.

    The test loss is the clean signal here: eval mode, no label smoothing, no augmentation.
    """
    data = write_image_folder(tmp_path / "data", train_per_class=40, test_per_class=10)
    out = tmp_path / "run"
    assert run(data, out, "--epochs", "3", "--batch-size", "16", "--lr", "0.05") == 0
    rows = read_metrics(out)
    assert float(rows[-1]["test_acc"]) >= 90.0
    assert float(rows[-1]["test_loss"]) < 0.5 * float(rows[0]["test_loss"])


def test_resume_repeats_an_uninterrupted_run(image_folder, tmp_path, monkeypatch, capsys):
    flags = ("--deterministic", "--seed", "3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(image_folder, straight, *flags) == 0

    calls = {"n": 0}
    real_train = utils.engine.train_one_epoch

    def interrupted_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(utils.engine, "train_one_epoch", interrupted_in_epoch_2)
    capsys.readouterr()
    assert run(image_folder, resumed, *flags) == 130
    assert load_checkpoint(resumed / "last.pt")["epoch"] == 1
    # interrupted during epoch 2: the message names the epoch last.pt holds
    assert f"interrupted after epoch 1: continue with --resume {resumed / 'last.pt'}" in capsys.readouterr().err
    monkeypatch.setattr(utils.engine, "train_one_epoch", real_train)
    assert main(["--resume", str(resumed / "last.pt")]) == 0  # everything else from the checkpoint

    a, b = read_metrics(straight), read_metrics(resumed)
    for row in a + b:
        del row["seconds"]
    assert a == b
    ca, cb = (load_checkpoint(d / "last.pt") for d in (straight, resumed))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert cb["lrs"] == ca["lrs"] and len(ca["lrs"]) == 2 * 3  # the schedule as it ran, across the resume


# ------------------------------------------------------------------------ bad input
def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,needle", [
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--norm", "bx"], "invalid choice: 'bx'"),
    (["--epochs", "0"], "--epochs 0 trains nothing: pass --lr-find with it"),
    (["--epochs", "-1"], "--epochs: must be at least 0"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--epochs", "two"], "expected an integer"),
    (["--cutout-p", "1.5"], "--cutout-p: must be in [0, 1]"),
    (["--lr", "0"], "--lr: must be in (0, 10]"),
    (["--epochs", "4", "--peak-epoch", "4"], "--peak-epoch 4.0 must be below --epochs 4"),
    (["--gallery-size", "-1"], "--gallery-size: must be at least 0"),
    (["--max-lr", "fast"], "--max-lr/--lr: expected a number, got 'fast' (or auto)"),
    (["--lr-find", "--lr-find-start", "1", "--lr-find-end", "0.1"],
     "--lr-find-start 1.0 must be below --lr-find-end 0.1"),
    (["--lr-find-iters", "5"], "--lr-find-iters: must be at least 20"),
    (["--annihilate", "1"], "--annihilate: must be in [0, 1)"),
    (["--div-factor", "0.5"], "--div-factor: must be in [1, 1000000.0]"),
    (["--lr-find", "--resume", "x.pt"], "--lr-find runs before training starts, not on a resumed run"),
])
def test_bad_flags(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in error_line(capsys)


def test_missing_data_folder_and_no_download(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(CIFAR10, "download", offline)
    assert main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "run")]) == 2
    err = error_line(capsys)
    assert "cifar-10-python.tar.gz" in err and "train/<class>/" in err
    assert not (tmp_path / "run").exists()


def _break(data, how):
    if how == "no test":
        for f in sorted((data / "test").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (data / "test").rmdir()
    elif how == "no classes":
        for f in sorted((data / "train").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    elif how == "empty class":
        for f in (data / "train" / "red").iterdir():
            f.unlink()
    elif how == "other classes":
        (data / "test" / "red").rename(data / "test" / "purple")
    elif how == "bad image":
        (data / "train" / "green" / "005.png").write_bytes(b"not a png")


@pytest.mark.parametrize("how,needle", [
    ("no test", "test is missing: an image folder needs train/<class>/"),
    ("no classes", "has no class folders"),
    ("empty class", "no images in"),
    ("other classes", "only in train: ['red'], only in test: ['purple']"),
    ("bad image", "cannot read image"),
])
def test_broken_image_folders(how, needle, image_folder, tmp_path, capsys):
    _break(image_folder, how)
    assert run(image_folder, tmp_path / "run") == 2
    err = error_line(capsys)
    assert needle in err
    if how == "bad image":
        assert str(image_folder / "train" / "green" / "005.png") in err
    assert not (tmp_path / "run" / "args.json").exists()


def test_subset_larger_than_the_data(image_folder, tmp_path, capsys):
    assert run(image_folder, tmp_path / "run", "--test-subset", "13") == 2
    assert "--test-subset 13 is more than the 12 images there: pass at most 12" in error_line(capsys)


def test_subsets_are_balanced_in_the_run(image_folder, tmp_path, capsys):
    assert run(image_folder, tmp_path / "run", "--epochs", "1", "--train-subset", "9",
               "--test-subset", "6") == 0
    assert "(9 train, 6 test, 3 classes)" in capsys.readouterr().out


def test_resume_from_another_model_names_both_and_keeps_the_checkpoint(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs", "1") == 0
    before = sha(out / "last.pt")
    capsys.readouterr()
    argv = ["--model", "resnet18", "--data-dir", str(image_folder), "--epochs", "1",
            "--resume", str(out / "last.pt")]
    assert main(argv) == 2
    err = error_line(capsys)
    assert "custom_resnet" in err and "resnet18" in err
    assert sha(out / "last.pt") == before


def test_unreadable_checkpoint(image_folder, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert run(image_folder, tmp_path / "run", "--resume", str(bad)) == 2
    assert "cannot read checkpoint" in error_line(capsys)
    assert run(image_folder, tmp_path / "run", "--resume", str(tmp_path / "none.pt")) == 2
    assert "does not exist" in error_line(capsys)


def test_new_run_never_overwrites_a_checkpoint(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs", "1") == 0
    before = sha(out / "last.pt")
    capsys.readouterr()
    assert run(image_folder, out, "--epochs", "1") == 2
    assert "already holds a checkpoint" in error_line(capsys)
    assert sha(out / "last.pt") == before


def test_out_dir_that_cannot_be_written(image_folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run(image_folder, blocker / "run") == 2
    assert "cannot write to --out-dir" in error_line(capsys)


def test_command_line_exit_code_and_single_line():
    """As a user sees it: a non-zero exit and one line, no traceback."""
    proc = subprocess.run([sys.executable, "main.py", "--model", "vgg"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: argument --model: invalid choice: 'vgg'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert set(MODELS) <= set(proc.stderr.replace(",", " ").replace(")", " ").replace("'", " ").split())


@pytest.mark.parametrize("model,norm,extra", [
    ("resnet18", "bn", ["--scheduler", "step"]),
    ("resnet18", "gn", ["--optimizer", "adam", "--scheduler", "cosine"]),
    ("resnet18", "ln", ["--precision", "fp32", "--no-channels-last"]),
    ("custom_resnet", "bn", ["--precision", "fp16", "--optimizer", "adam"]),
    ("custom_resnet", "gn", ["--no-nesterov", "--label-smoothing", "0", "--no-tta"]),
    ("custom_resnet", "ln", ["--workers", "2"]),
])
def test_every_model_norm_and_option_trains(model, norm, extra, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", model, "--norm", norm, "--data-dir", str(image_folder), "--out-dir", str(out),
            "--epochs", "1", "--batch-size", "12", "--lr", "0.01", "--workers", "0", *extra]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["args"]["norm"] == norm and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                                 if v.is_floating_point())
    if "fp32" in extra:
        assert "precision: fp32 (asked for) | memory format: NCHW" in printed
    elif "fp16" in extra:  # the T4/V100 path, runnable on any device: GradScaler state is saved
        assert "precision: fp16 autocast + loss scaling (asked for) |" in printed
        assert ckpt["scaler"]["scale"] > 0
    elif norm == "gn":  # GroupNorm is slower in channels_last on the CPU (utils/device.py)
        assert "memory format: NCHW" in printed
    else:
        assert "memory format: channels_last" in printed
    row = read_metrics(out)[0]
    if "--no-tta" in extra:  # one view: both columns are the same measurement
        assert "test-time flip off" in printed and row["test_acc"] == row["test_acc_single"]
    else:
        assert "test-time flip on" in printed and "single view" in printed
    assert ckpt["args"]["optimizer"] == ("adam" if "adam" in extra else "sgd")
    assert ckpt["args"]["lr"] == 0.01 and ckpt["optimizer"]["param_groups"][0]["initial_lr"] > 0


def test_help_states_each_default_once():
    import io
    from contextlib import redirect_stdout

    from main import build_parser
    text = io.StringIO()
    with redirect_stdout(text), pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    flat = " ".join(text.getvalue().split())
    assert "(default: on with CUDA, where loader workers cannot keep up" in flat  # --gpu-aug says it itself
    assert flat.count("(default: on with CUDA") == 3  # --gpu-aug, --cuda-graph, --persistent-workers
    assert "(default: auto)" in flat and ") (default: None)" not in flat
