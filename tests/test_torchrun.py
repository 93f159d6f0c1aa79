"""torchrun: DDP on the CPU with gloo, the flags it needs, and how the processes leave."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as main_module
from main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags, env, message", [
    (["--sync-bn"], {}, "--sync-bn synchronises BatchNorm across GPUs: use it under torchrun on CUDA"),
    (["--batch-size", "7"], {"WORLD_SIZE": "2", "RANK": "0"},
     "--batch-size 7 is the global batch and does not split evenly over 2 processes: pass a multiple of 2"),
    (["--lr-find"], {"WORLD_SIZE": "2", "RANK": "0"}, "the LR range test runs in one process"),
])
def test_parallel_flags_fail_with_one_line(image_folder, tmp_path, capsys, monkeypatch, flags, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(tmp_path / "run"),
            "--epochs", "1", "--workers", "0", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gpu_aug", [False, True], ids=["albumentations", "gpu-aug"])
def test_torchrun_two_processes_on_the_cpu(image_folder, tmp_path, gpu_aug):
    """torchrun --nproc_per_node=2 with gloo: one run folder, both replicas bit-for-bit equal."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "main.py"), "--model", "custom_resnet", "--data-dir", str(image_folder),
           "--out-dir", str(out), "--device", "cpu", "--epochs", "2", "--batch-size", "8",
           "--workers", "0", "--gallery-size", "2", *(["--gpu-aug"] if gpu_aug else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone prints: one summary table, one line per epoch
    assert proc.stdout.count("Total params: 6,571,779") == 1
    assert proc.stdout.count("epoch 2/2 |") == 1
    assert "processes: 2 (global batch 8, 4 each)" in proc.stdout
    summary = (out / "summary.txt").read_text()
    assert "DDP: the 2 processes' weights and buffers are identical" in summary
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header and 2 epochs, written once
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped
    # 36 training images over 2 processes with batches of 4: ceil(18 / 4) = 5 steps an epoch
    assert len(ckpt["lrs"]) == 10


@pytest.mark.parametrize("status, calls", [(0, ["barrier", "destroy"]), (1, ["destroy"])])
def test_a_successful_process_waits_for_the_others_before_leaving(monkeypatch, status, calls):
    """Rank 0 writes the galleries after the others are done; they leave the group together."""
    import torch.distributed as dist
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: seen.append("destroy"))
    monkeypatch.setattr(main_module, "train", lambda *args: status)
    assert main(["--model", "custom_resnet", "--epochs", "1"]) == status
    assert seen == calls
