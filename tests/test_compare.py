"""compare.py: statistics over seeds, grouping, best.pt's epoch, the page, the CSV, the Markdown, the errors."""
import ast
import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import compare
from utils import compare as cmp

ROOT = Path(__file__).resolve().parent.parent
ARGS = {"model": "custom_resnet", "norm": "bn", "epochs": 3, "batch_size": 512, "optimizer": "sgd", "lr": 0.4,
        "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005, "label_smoothing": 0.1,
        "scheduler": "onecycle", "peak_epoch": 1.0, "div_factor": 100.0, "annihilate": 0.0, "cutout_p": 0.5,
        "train_subset": None, "test_subset": None, "val_split": None, "seed": 1, "data_dir": "./data",
        "device": "auto", "workers": 2, "out_dir": "runs/x", "command": "python main.py"}
DATA = {"classes": ["cat", "dog"], "train": 50000, "val": 0, "test": 10000}


def write_run(root: Path, name: str, test_acc: list, val_acc=None, results=None, legacy=False, **args) -> Path:
    """A run folder as main.py writes it: args.json, metrics.csv (val columns empty without val_acc)."""
    folder = root / name
    folder.mkdir(parents=True)
    resolved = {**ARGS, **args}
    if legacy:  # written before the validation split existed
        resolved.pop("val_split")
    else:
        resolved.setdefault("data", DATA)
    (folder / "args.json").write_text(json.dumps(resolved))
    columns = ["epoch", "lr", "train_loss", "train_acc"] + ["val_loss", "val_acc"] * (not legacy) + [
        "test_loss", "test_acc", "test_acc_single", "seconds"]
    lines = [",".join(columns)]
    for epoch, acc in enumerate(test_acc, 1):
        val = {"val_loss": "", "val_acc": ""} if val_acc is None else {"val_loss": 1 / epoch,
                                                                       "val_acc": val_acc[epoch - 1]}
        row = {"epoch": epoch, "lr": 0.1, "train_loss": 1.5, "train_acc": 60, **val, "test_loss": 2 / epoch,
               "test_acc": acc, "test_acc_single": acc - 0.5, "seconds": 10}
        lines.append(",".join(str(row[c]) for c in columns))
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def seeds(tmp_path):
    """Three seeds of one setting (final test acc 90, 91, 92.5) and one run of another lr."""
    runs = [write_run(tmp_path, "s1", [80, 85, 90], seed=1), write_run(tmp_path, "s2", [81, 86, 91], seed=2),
            write_run(tmp_path, "s3", [82, 93, 92.5], seed=3),
            write_run(tmp_path, "other", [70, 75, 80], lr=0.1, val_acc=[70, 79, 78], val_split=5000,
                      data={**DATA, "train": 45000, "val": 5000},
                      results={"best_on": "val", "best_epoch": 2, "ece": 0.031, "ece_bins": 15})]
    return [str(r) for r in runs]


def run_main(argv, capsys) -> tuple:
    code = compare.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def error_of(argv, capsys, out_folder: Path) -> str:
    """The one error line of a refused command; exit status 2 and nothing written."""
    before = sorted(out_folder.rglob("*")) if out_folder.exists() else []
    code, out, err = run_main(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert (sorted(out_folder.rglob("*")) if out_folder.exists() else []) == before
    return lines[0]


def rows_of(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_stats_on_known_numbers():
    s = cmp.stats([90, 91, 92.5])
    assert s["n"] == 3 and s["min"] == 90 and s["max"] == 92.5
    assert s["mean"] == pytest.approx(91.1667, abs=1e-4)
    assert s["std"] == pytest.approx(1.2583, abs=1e-4)  # sample std (ddof=1); ddof=0 would be 1.0274
    one = cmp.stats([93.0])
    assert one["n"] == 1 and one["mean"] == 93.0 and one["std"] is None
    assert cmp.stats([None])["n"] == 0


def test_grouping_by_setting_except_seed(tmp_path):
    runs = [write_run(tmp_path, "a1", [90], seed=1), write_run(tmp_path, "b", [80], lr=0.1),
            write_run(tmp_path, "a2", [91], seed=2), write_run(tmp_path, "c", [85], seed=3, val_split=5000)]
    comparison = cmp.compare(runs)
    assert [[r.name for r in g] for g in comparison.settings] == [["a1", "a2"], ["b"], ["c"]]
    assert comparison.varying == ("lr", "val_split")
    row = cmp.setting_row(comparison.settings[0], comparison.varying)
    assert row["kind"] == "group" and row["n"] == 2 and row["setting"] == "lr=0.4, val_split=null"
    assert row["final_test_acc"] == pytest.approx(90.5) and row["final_test_acc_std"] == pytest.approx(0.7071, 1e-4)
    assert cmp.setting_row(comparison.settings[1], comparison.varying)["kind"] == "run"


def test_best_epoch_chosen_on_val_when_present(tmp_path):
    with_val = cmp.load_run(write_run(tmp_path, "v", [80, 85, 90], val_acc=[81, 88, 86]))
    assert (with_val.best_on, with_val.best_epoch) == ("val", 2)
    assert with_val.best_row["test_acc"] == 85  # the test accuracy of best.pt's epoch, not the highest one
    without = cmp.load_run(write_run(tmp_path, "t", [80, 91, 90]))
    assert (without.best_on, without.best_epoch) == ("test", 2)
    legacy = cmp.load_run(write_run(tmp_path, "old", [80, 91, 90], legacy=True))
    assert (legacy.best_on, legacy.best_epoch, legacy.ece) == ("test", 2, None)
    told = cmp.load_run(write_run(tmp_path, "r", [80, 85, 90], val_acc=[81, 88, 86],
                                  results={"best_on": "val", "best_epoch": 3, "ece": 0.02}))
    assert (told.best_on, told.best_epoch, told.ece) == ("val", 3, 0.02)  # results.json wins


def test_csv_rows(seeds, tmp_path, capsys):
    code, _, err = run_main([*seeds, "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0 and "wrote" in err
    rows = rows_of(tmp_path / "cmp.csv")
    assert [(r["kind"], r["name"]) for r in rows] == [("run", "s1"), ("run", "s2"), ("run", "s3"), ("run", "other"),
                                                      ("group", "3 runs")]
    group = rows[-1]
    assert (group["n"], group["seeds"], group["setting"]) == ("3", "1 2 3", "lr=0.4, val_split=null")
    assert [float(group[f"final_test_acc{s}"]) for s in ("", "_std", "_min", "_max")] == [91.1667, 1.2583, 90, 92.5]
    # best.pt on test: the epochs of the highest test accuracy, 90, 91 and 93
    assert [float(group[f"best_test_acc{s}"]) for s in ("", "_std", "_min", "_max")] == [91.3333, 1.5275, 90, 93]
    other = rows[3]
    assert (other["best_on"], other["best_epoch"], other["best_test_acc"]) == ("val", "2", "75.0")
    assert (other["final_val_acc"], other["max_val_acc"], other["ece"]) == ("78.0", "79.0", "0.031")
    assert rows[2]["best_on"] == "test" and rows[2]["best_test_acc"] == "93.0" and rows[2]["ece"] == ""


def test_html_page_is_self_contained(seeds, tmp_path, capsys):
    assert run_main([*seeds, "--out", str(tmp_path / "cmp")], capsys)[0] == 0
    page = (tmp_path / "cmp.html").read_text()
    assert "91.17 ± 1.26 (90.00-92.50)" in page and "91.33 ± 1.53 (90.00-93.00)" in page
    assert "3.10%" in page and "ddof=1" in page and "optimistic" in page
    runs = page[page.index('<table id="runs">'):]
    assert "<td>s3</td>" in runs and "<td>93.00</td>" in runs and "<td>test *</td>" in runs
    pictures = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pictures) == 1
    assert Image.open(io.BytesIO(base64.b64decode(pictures[0]))).format == "PNG"
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the page


def test_markdown_table_on_stdout(seeds, tmp_path, capsys):
    code, out, _ = run_main([*seeds, "--out", str(tmp_path / "cmp")], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("| model | norm | epochs | settings |") and "ECE" in lines[0]
    assert lines[2] == ("| custom_resnet | bn | 3 | lr=0.4, val_split=null | 91.17 ± 1.26 (90.00-92.50) | "
                        "91.33 ± 1.53 (90.00-93.00) | test * | - | seeds 1-3, 3 runs |")
    assert lines[3] == ("| custom_resnet | bn | 3 | lr=0.1, val_split=5000 | 80.00 | 75.00 | val | 3.10% | "
                        "seed 1, 1 run |")
    assert "ddof=1" in out and "optimistic" in out and "wrote" not in out


def test_out_folder_and_overwrite(seeds, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "comparison.csv").write_text("old\n")
    assert run_main([*seeds[:2], "--out", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.html"]
    assert len(rows_of(out / "comparison.csv")) == 3  # overwritten: two runs and their group
    assert run_main([*seeds[:1], "--out", str(tmp_path / "x.html")], capsys)[0] == 0
    assert (tmp_path / "x.html").is_file() and (tmp_path / "x.csv").is_file()


def test_bad_input_is_one_error_line_and_nothing_written(seeds, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    target = ["--out", str(out / "cmp")]
    assert "is not a run folder (not a folder)" in error_of([str(tmp_path / "nope"), *target], capsys, out)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "args.json").write_text("{}")
    assert "half is not a run folder (no metrics.csv)" in error_of([str(tmp_path / "half"), *target], capsys, out)
    empty = write_run(tmp_path, "empty", [])
    assert "has no finished epoch" in error_of([seeds[0], str(empty), *target], capsys, out)
    assert "the following arguments are required: RUN_DIR" in error_of(target, capsys, out)
    assert "given twice" in error_of([seeds[0], seeds[0] + "/", *target], capsys, out)
    missing = ["--out", str(out / "no" / "cmp")]
    assert "folder" in error_of([seeds[0], *missing], capsys, out) and not (out / "no").exists()


def test_different_data_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    a = write_run(tmp_path, "a", [90])
    b = write_run(tmp_path, "b", [90], data={**DATA, "test": 500}, test_subset=500)
    line = error_of([str(a), str(b), "--out", str(out)], capsys, tmp_path)
    assert f"runs {a} and {b} are on different data" in line and "test images 10000 vs 500" in line
    old1 = write_run(tmp_path, "old1", [90], legacy=True)
    old2 = write_run(tmp_path, "old2", [90], legacy=True, data_dir="./other")
    line = error_of([str(old1), str(old2), "--out", str(out)], capsys, tmp_path)
    assert "data_dir './data' vs './other'" in line and "old1" in line and "old2" in line
    # a validation split changes the training images, not the test set: comparable
    c = write_run(tmp_path, "c", [91], val_split=5000, data={**DATA, "train": 45000, "val": 5000})
    assert cmp.compare([a, c]).varying == ("val_split",)


def test_no_script_imported():
    """scripts -> utils -> model: the comparison imports no other command."""
    scripts = {p.stem for p in ROOT.glob("*.py")}
    for path in (ROOT / "compare.py", ROOT / "utils" / "compare.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & scripts, (path, names & scripts)


def test_command_line(seeds, tmp_path):
    """The script itself: the Markdown alone on stdout, the files named on stderr."""
    done = subprocess.run([sys.executable, str(ROOT / "compare.py"), *seeds, "--out", str(tmp_path / "c")],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("| model |") and "wrote" in done.stderr
    assert (tmp_path / "c.html").is_file() and (tmp_path / "c.csv").is_file()
