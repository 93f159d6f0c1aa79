"""utils/run_folder.py: one process per run folder, stale locks, failed writes, unwritable folders."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from main import main
from utils import checkpoint
from utils.run_folder import RunFolder

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "custom_resnet", "--epochs", "1", "--batch-size", "12", "--lr", "0.05", "--workers", "0",
        "--gallery-size", "0"]


def error_line(capsys):
    err = capsys.readouterr().err.rsplit("\r", 1)[-1].strip()  # after the progress bars it cleared
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_two_runs_started_together_on_one_folder(image_folder, tmp_path):
    """Both start at once: one trains, the other is refused, and the folder is the winner's alone."""
    out = tmp_path / "run"
    procs = {seed: subprocess.Popen([sys.executable, "main.py", *TINY, "--data-dir", str(image_folder),
                                     "--out-dir", str(out), "--seed", str(seed)],
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)}
    results = {seed: (p.wait(timeout=600), p.stderr.read()) for seed, p in procs.items()}
    winners = [seed for seed, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    code, err = results[loser]
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "is in use by another run" in err or "already holds a checkpoint" in err
    assert checkpoint.load(out / "last.pt")["args"]["seed"] == winners[0]
    assert f'"seed": {winners[0]}' in (out / "args.json").read_text()
    assert not (out / ".lock").exists()


def test_a_held_folder_is_refused_with_the_holder(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    with RunFolder(out):
        assert main([*TINY, "--data-dir", str(image_folder), "--out-dir", str(out)]) == 2
    assert f"{out} is in use by another run (process {os.getpid()})" in error_line(capsys)


def test_a_lock_left_by_a_killed_process_does_not_block_its_resume(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--data-dir", str(image_folder), "--out-dir", str(out)]) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.run_folder import RunFolder; "
                               f"RunFolder({str(out)!r}).__enter__(); print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # left behind, but no process holds it
    stale = out / f".last.pt.{holder.pid}.tmp"  # as a kill during a save leaves it
    stale.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert main(["--resume", str(out / "last.pt")]) == 0
    assert "already finished all 2 epochs" in capsys.readouterr().out
    assert not stale.exists() and not (out / ".lock").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one(image_folder, tmp_path, monkeypatch, capsys):
    """Disk full while saving epoch 2: one error line naming the file, epoch 1 intact, no temporary."""
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(Path(f.name).name)
        if len([s for s in saves if s.startswith(".last.pt.")]) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    assert main([*TINY, "--epochs", "2", "--data-dir", str(image_folder), "--out-dir", str(out)]) == 2
    err = error_line(capsys)
    assert f"cannot write {out / 'last.pt'} (No space left on device)" in err
    assert checkpoint.load(out / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in rows(out)] == ["1"]  # the metrics never list an unsaved epoch
    assert not list(out.glob(".*"))


def test_an_out_dir_that_root_cannot_write_fails_before_the_data_is_read(tmp_path, capsys):
    # root passes os.access() everywhere; creating the folder is the real test
    assert main([*TINY, "--data-dir", str(tmp_path / "no-data"), "--out-dir", "/sys/cifar10-run"]) == 2
    err = error_line(capsys)
    assert err.startswith("error: cannot write to --out-dir /sys/cifar10-run (")


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    (data / "train" / "red" / "000.png").write_bytes(b"broken")
    out = tmp_path / "a" / "b" / "run"
    assert main([*TINY, "--data-dir", str(data), "--out-dir", str(out)]) == 2
    assert "cannot read image" in error_line(capsys)
    assert not (tmp_path / "a").exists()



@pytest.mark.parametrize("links", [True, False], ids=["hard link", "file system without links"])
def test_best_pt_is_a_whole_copy_that_outlives_the_next_last_pt(tmp_path, monkeypatch, links):
    from utils.io import atomic_copy, atomic_write
    if not links:
        def no_links(*args):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_write(last, lambda f: f.write(b"epoch 1"))
    atomic_copy(last, best)
    assert best.read_bytes() == b"epoch 1" and (os.stat(best).st_ino == os.stat(last).st_ino) == links
    atomic_write(last, lambda f: f.write(b"epoch 2"))  # a new file renamed over last.pt
    assert best.read_bytes() == b"epoch 1" and last.read_bytes() == b"epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_trained_best_pt_holds_its_epoch(image_folder, tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--epochs", "2", "--data-dir", str(image_folder), "--out-dir", str(out)]) == 0
    accs = [float(r["test_acc"]) for r in rows(out)]
    best_epoch = 1 + accs.index(max(accs))
    assert checkpoint.load(out / "best.pt")["epoch"] == best_epoch
    assert checkpoint.load(out / "last.pt")["epoch"] == 2
