"""SIGTERM (Colab, SLURM, Kubernetes stopping a job) is handled like Ctrl-C, alone and under torchrun."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from main import main
from utils import checkpoint

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "custom_resnet", "--epochs", "3", "--batch-size", "4", "--lr", "0.05", "--workers", "0",
        "--gallery-size", "0", "--device", "cpu"]


def start_and_terminate(cmd, out, group=False, **kwargs):
    """Start ``cmd``, send SIGTERM once its first epoch is saved (to its whole process group, as SLURM
    and a terminal's kill -TERM -PGID do, with ``group``); (exit status, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    deadline = time.monotonic() + 300
    while not (out / "metrics.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def epochs_in(out):
    with open(out / "metrics.csv") as f:
        return [r["epoch"] for r in csv.DictReader(f)]


def test_sigterm_mid_epoch_reports_and_resumes(tmp_path):
    data = write_image_folder(tmp_path / "data", train_per_class=40)  # 30 steps an epoch
    out = tmp_path / "run"
    code, err = start_and_terminate([sys.executable, "main.py", *ARGS, "--workers", "2", "--data-dir", str(data),
                                     "--out-dir", str(out)], out, group=True)  # the loader workers get it too
    done = checkpoint.load(out / "last.pt")["epoch"]
    assert code == 143 and "Traceback" not in err, err
    last_line = err.strip().splitlines()[-1].rsplit("\r", 1)[-1].strip()
    assert last_line == f"terminated (SIGTERM) after epoch {done}: continue with --resume {out / 'last.pt'}"
    assert "terminated (SIGTERM) after epoch" in (out / "report.html").read_text()
    assert not (out / ".lock").exists() and not list(out.glob(".*.tmp"))
    assert main(["--resume", str(out / "last.pt")]) == 0
    assert epochs_in(out) == ["1", "2", "3"]


def test_sigterm_to_torchrun_stops_every_rank(tmp_path):
    data = write_image_folder(tmp_path / "data", train_per_class=40)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "main.py"), *ARGS, "--data-dir", str(data), "--out-dir", str(out)]
    code, err = start_and_terminate(cmd, out, env=env)
    assert code != 0
    assert "terminated (SIGTERM) after epoch" in err  # rank 0's message, through torchrun
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-f", f"--out-dir {out}"], capture_output=True, text=True).stdout.split()
    assert alive == [], "a rank outlived torchrun"
    assert not (out / ".lock").exists()
    assert main(["--resume", str(out / "last.pt")]) == 0  # one process continues the 2-process run
    assert epochs_in(out) == ["1", "2", "3"]
