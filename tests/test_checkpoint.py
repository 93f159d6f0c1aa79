"""utils/checkpoint.py: the schema, atomic saves, safe loads, load_trained and the resume rules."""
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from main import main
from utils import checkpoint
from utils.checkpoint import CheckpointError, Preprocess, load_trained
from utils.data import load_image_folder
from utils.data import test_transform as eval_transform

from conftest import write_image_folder

BASE = ["--model", "custom_resnet", "--epochs", "2", "--batch-size", "12", "--lr", "0.05", "--workers", "0",
        "--gallery-size", "0"]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run on a tiny image folder."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_image_folder(root / "data")
    out = root / "run"
    assert main([*BASE, "--data-dir", str(data), "--out-dir", str(out)]) == 0
    return {"data": data, "out": out}


def error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ the schema
def test_every_key_of_the_schema_is_saved(run):
    ckpt = checkpoint.load(run["out"] / "last.pt")
    assert set(ckpt) == set(checkpoint.KEYS)
    assert ckpt["classes"] == ["blue", "green", "red"] and ckpt["epoch"] == 2
    assert ckpt["preprocess"] == {"image_size": 32, "mean": [0.4914, 0.4822, 0.4465],
                                  "std": [0.2470, 0.2435, 0.2616]}
    assert ckpt["steps_per_epoch"] == 3  # 36 images, batches of 12
    assert ckpt["versions"]["torch"] == torch.__version__
    assert len(ckpt["lrs"]) == 6 and [r["epoch"] for r in ckpt["history"]] == [1, 2]


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})
    before = sha(path)

    class Unsaveable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        checkpoint.save(path, {"epoch": 2, "x": Unsaveable()})
    assert sha(path) == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("content,needle", [
    (b"garbage", "(UnpicklingError)"),
    ("list", "(a list, not a checkpoint dict)"),
    ("no epoch", "(no epoch)"),
    ("foreign model", "(model 'vgg' is not one of resnet18, custom_resnet)"),
    ("exploit", "(UnpicklingError)"),
])
def test_bad_files_are_one_clear_error(run, tmp_path, content, needle):
    path = tmp_path / "x.pt"
    good = checkpoint.load(run["out"] / "last.pt")
    if content == "list":
        torch.save([1, 2], path)
    elif content == "no epoch":
        torch.save({k: v for k, v in good.items() if k != "epoch"}, path)
    elif content == "foreign model":
        torch.save({**good, "args": {**good["args"], "model": "vgg"}}, path)
    elif content == "exploit":  # would create a file if unpickled with weights_only=False
        exploit = Exploit()
        exploit.target = str(tmp_path / "pwned")
        path.write_bytes(pickle.dumps({"model": exploit}, protocol=2))
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert needle in str(info.value) and "pass a last.pt or best.pt written by main.py" in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_an_older_checkpoint_gets_the_constants_it_was_trained_with(run, tmp_path):
    old = checkpoint.load(run["out"] / "best.pt")
    for key in ("preprocess", "steps_per_epoch", "versions"):
        del old[key]
    torch.save(old, tmp_path / "old.pt")
    trained = load_trained(tmp_path / "old.pt")
    assert trained.preprocess == Preprocess()


# ------------------------------------------------------------------ load_trained
def test_load_trained_gives_the_run_model_ready_for_inference(run):
    trained = load_trained(run["out"] / "best.pt")
    assert not trained.model.training and trained.classes == ["blue", "green", "red"]
    assert trained.args["model"] == "custom_resnet" and trained.epoch >= 1
    _, test = load_image_folder(run["data"])
    x = trained.preprocess.to_tensor(test.images)  # (12, 3, 32, 32)
    reference = torch.stack([eval_transform()(image=im)["image"] for im in test.images])
    assert torch.equal(x, reference)  # the run's own test transform
    with torch.no_grad():  # eval mode: BatchNorm's running statistics, so an image alone = in a batch
        torch.testing.assert_close(trained.model(x[:1]), trained.model(x)[:1], rtol=1e-4, atol=1e-5)


def test_load_trained_takes_preprocessing_from_the_checkpoint(run, tmp_path):
    ckpt = checkpoint.load(run["out"] / "best.pt")
    ckpt["preprocess"] = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    torch.save(ckpt, tmp_path / "other.pt")
    pre = load_trained(tmp_path / "other.pt").preprocess
    white = np.full((32, 32, 3), 255, np.uint8)
    assert pre.to_tensor(white).unique().tolist() == [2.0]  # (1 - 0.5) / 0.25


# ------------------------------------------------------------------ resume rules
@pytest.mark.parametrize("flag,value,saved", [
    ("--model", "resnet18", "'custom_resnet'"),
    ("--norm", "gn", "'bn'"),
    ("--epochs", "3", "2"),
    ("--batch-size", "6", "12"),
    ("--optimizer", "adam", "'sgd'"),
    ("--max-lr", "0.1", "0.05"),
    ("--momentum", "0.8", "0.9"),
    ("--no-nesterov", None, "True"),
    ("--weight-decay", "0.001", "0.0005"),
    ("--label-smoothing", "0.2", "0.1"),
    ("--scheduler", "cosine", "'onecycle'"),
    ("--peak-epoch", "1", "0.417"),
    ("--div-factor", "10", "100.0"),
    ("--annihilate", "0.2", "0.0"),
    ("--cutout-p", "0.3", "0.5"),
    ("--train-subset", "9", "None"),
    ("--test-subset", "6", "None"),
    ("--val-split", "6", "None"),
    ("--seed", "7", "1"),
])
def test_a_flag_that_changes_the_mathematics_is_refused(run, flag, value, saved, capsys):
    last = run["out"] / "last.pt"
    before = {p.name: sha(p) for p in run["out"].iterdir()}
    argv = ["--resume", str(last), flag] + ([value] if value is not None else [])
    assert main(argv) == 2
    err = error_line(capsys)
    named = "--nesterov False" if value is None else f"{flag} {value}"
    assert f"{named}" in err.replace("'", "") and f"(checkpoint: {saved})" in err, err
    assert {p.name: sha(p) for p in run["out"].iterdir()} == before  # nothing written


def test_every_clashing_flag_is_named_at_once(run, capsys):
    assert main(["--resume", str(run["out"] / "last.pt"), "--optimizer", "adam", "--seed", "5"]) == 2
    err = error_line(capsys)
    assert "--optimizer 'adam' (checkpoint: 'sgd')" in err and "--seed 5 (checkpoint: 1)" in err


def test_the_same_values_and_harmless_flags_are_accepted(run, tmp_path, capsys):
    out = tmp_path / "continued"
    argv = ["--resume", str(run["out"] / "last.pt"), "--model", "custom_resnet", "--max-lr", "0.05",
            "--workers", "0", "--device", "cpu", "--log-interval", "5", "--gallery-size", "0",
            "--out-dir", str(out)]
    assert main(argv) == 0
    assert "already finished all 2 epochs: nothing to train" in capsys.readouterr().out
    saved = json.loads((out / "args.json").read_text())
    assert saved["lr"] == 0.05 and saved["batch_size"] == 12 and saved["log_interval"] == 5


def test_other_data_with_other_steps_per_epoch_is_refused(run, tmp_path, capsys):
    more = write_image_folder(tmp_path / "more", train_per_class=20)  # 60 images: 5 steps of 12
    before = sha(run["out"] / "last.pt")
    assert main(["--resume", str(run["out"] / "last.pt"), "--data-dir", str(more)]) == 2
    err = error_line(capsys)
    assert f"--data-dir {more} gives 5 steps per epoch" in err and "trained with 3" in err
    assert sha(run["out"] / "last.pt") == before


def test_a_moved_data_folder_with_the_same_steps_resumes(run, tmp_path):
    moved = write_image_folder(tmp_path / "moved")  # the same layout elsewhere
    out = tmp_path / "continued"
    assert main(["--resume", str(run["out"] / "last.pt"), "--data-dir", str(moved), "--out-dir", str(out)]) == 0
    assert json.loads((out / "args.json").read_text())["data_dir"] == str(moved)
