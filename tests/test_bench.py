"""bench.py: the table, the JSON, the real epoch and the interleaved windows."""
import json

import pytest
import torch

import bench


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
    assert capsys.readouterr().err.strip() == ("error: argument --batch-size: must be at least 1, got 0 "
                                               "(see python bench.py --help)")


def test_bench_windows_take_turns():
    calls = []
    seconds = bench.timed_windows({"ours": lambda: calls.append("ours"), "ref": lambda: calls.append("ref")},
                                  torch.device("cpu"), warmup=1, windows=2)
    assert calls == ["ours", "ref"] * 3  # one warm-up round, then two timed ones, alternating
    assert [len(s) for s in seconds.values()] == [2, 2]


def test_bench_writes_nothing_unless_asked(tmp_path, monkeypatch, capsys):
    """A documented command leaves nothing behind in the folder it runs from."""
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--model", "custom_resnet", "--batch-size", "2", "--steps", "1", "--windows", "1",
                       "--warmup", "0"]) == 0
    assert "wrote" not in capsys.readouterr().out and list(tmp_path.iterdir()) == []


def test_bench_profile_writes_a_trace_and_names_the_costliest_operators(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "custom_resnet", "--batch-size", "4", "--steps", "2", "--windows", "1",
                       "--warmup", "0", "--device", "cpu", "--profile", str(tmp_path / "prof"),
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    (row,) = json.loads(out.read_text())["models"]
    profile = row["profile"]
    trace = json.loads((tmp_path / "prof" / "custom_resnet-train.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::convolution_backward" in names or "ConvolutionBackward0" in names
    assert profile["device_busy_s"] is None and profile["wall_s"] > 0 and len(profile["top"]) == 8
    shares = [t["share"] for t in profile["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert f"profile custom_resnet train: {profile['wall_s']:.3f} s for 2 steps; top: " in text


def test_bench_profile_refuses_an_unwritable_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert bench.main(["--model", "custom_resnet", "--profile", str(tmp_path / "file" / "prof")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --profile {tmp_path / 'file' / 'prof'}: cannot create the folder (")
    assert err.endswith("pass a writable path") and len(err.splitlines()) == 1
