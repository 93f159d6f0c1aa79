"""The speed flags, torchrun (DDP on the CPU with gloo) and bench.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
from main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--batch-size", "6", "--workers", "0", "--gallery-size", "2"]


def test_gpu_aug_trains_and_writes_the_run_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(out),
                 "--gpu-aug", *TINY]) == 0
    assert "gpu-aug (on the device)" in capsys.readouterr().out
    for name in ("metrics.csv", "last.pt", "misclassified.png", "gradcam.png", "report.html"):
        assert (out / name).is_file(), name


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
    import main as main_module
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: seen.append("destroy"))
    monkeypatch.setattr(main_module, "train", lambda args: status)
    assert main(["--model", "custom_resnet", "--epochs", "1"]) == status
    assert seen == calls


def test_bench_writes_its_table_and_json(tmp_path, image_folder, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "custom_resnet", "--batch-size", "4", "--steps", "1", "--windows", "1",
                       "--warmup", "1", "--data-dir", str(image_folder), "--data-images", "12",
                       "--workers", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "batch 4" in text
    result = json.loads(out.read_text())
    (row,) = result["models"]
    assert row["model"] == "custom_resnet" and row["precision"] in ("bf16 autocast", "fp32")
    for key in ("train_images_per_s", "eval_images_per_s", "reference_train_images_per_s"):
        assert row[key] > 0
    assert row["train_speedup"] == pytest.approx(row["train_images_per_s"] / row["reference_train_images_per_s"])
    assert [r["pipeline"] for r in result["data"]] == ["albumentations", "gpu-aug on cpu"]


def test_bench_real_epoch_runs_main_on_the_folder(tmp_path, image_folder, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "custom_resnet", "--batch-size", "8", "--steps", "1", "--windows", "1",
                       "--warmup", "1", "--data-dir", str(image_folder), "--data-images", "12",
                       "--workers", "0", "--real-epoch", "--epoch-workers", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    (row,) = json.loads(out.read_text())["real_epochs"]
    assert row["model"] == "custom_resnet" and row["train_images"] == 36 and row["workers"] == 0
    assert 0 < row["epoch_seconds"] < row["command_seconds"]
    (ref,) = json.loads(out.read_text())["models"]
    assert row["speedup"] == pytest.approx(36 / row["epoch_seconds"] / ref["reference_train_images_per_s"])
    assert row["speedup_with_decode"] < row["speedup"]
    assert "real epoch: custom_resnet 36 images, workers 0" in text
    assert "Total params" not in text  # main.py's own printout is kept out of the table


def test_bench_real_epoch_needs_a_folder(capsys):
    assert bench.main(["--real-epoch"]) == 2
    assert capsys.readouterr().err.strip() == "error: --real-epoch trains on an image folder: pass --data-dir too"


def test_bench_rejects_a_bad_flag(capsys):
    assert bench.main(["--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch-size 0 must be at least 1"


def test_bench_windows_take_turns():
    calls = []
    seconds = bench.timed_windows({"ours": lambda: calls.append("ours"), "ref": lambda: calls.append("ref")},
                                  torch.device("cpu"), warmup=1, windows=2)
    assert calls == ["ours", "ref"] * 3  # one warm-up round, then two timed ones, alternating
    assert [len(s) for s in seconds.values()] == [2, 2]
