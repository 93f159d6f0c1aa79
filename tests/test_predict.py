"""predict.py: predictions of new images, the CSV, unreadable files, and the ONNX export."""
import csv
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import predict
from main import main
from utils import checkpoint
from utils.checkpoint import load_trained
from utils.data import load_image_folder

from conftest import write_image_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run with a tiny lr: it still makes mistakes, so the accuracy is not trivially 100%."""
    root = tmp_path_factory.mktemp("predict")
    data = write_image_folder(root / "data", test_per_class=10)
    out = root / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "1",
                 "--batch-size", "12", "--lr", "2e-4", "--workers", "0", "--gallery-size", "0"]) == 0
    return {"data": data, "out": out, "best": out / "best.pt"}


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()[-1].rsplit("\r", 1)[-1]  # below the progress bar
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_accuracy_on_the_test_folder_equals_what_main_reported(run, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(run["best"]), str(run["data"] / "test"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    correct, total = map(int, re.search(r"accuracy on the 30 images in class folders: [\d.]+% \((\d+)/(\d+)\)",
                                        printed).groups())
    reported = checkpoint.load(run["best"])["history"][-1]["test_acc"]  # main.py's figure for best.pt
    assert round(reported * total / 100) == correct  # the same images right (main's figure is float32)
    assert 100 * correct / total == pytest.approx(reported, abs=1e-5)
    assert 0 < correct < total  # a real test: some right, some wrong
    rows = rows_of(out)
    assert sum(r["predicted"] == r["true"] for r in rows) == correct


def test_csv_rows_top_k_and_the_true_column(run, tmp_path):
    loose = tmp_path / "loose.png"
    shutil.copyfile(run["data"] / "test" / "red" / "001.png", loose)
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(run["best"]), str(run["data"] / "test" / "green"), str(loose),
                         "--top-k", "2", "--out", str(out), "--no-tta"]) == 0
    rows = rows_of(out)
    # green/ itself holds images, not class folders: no true column
    assert list(rows[0]) == ["path", "predicted", "probability", "top1", "top1_prob", "top2", "top2_prob", "error"]
    assert len(rows) == 11 and rows[-1]["path"] == str(loose)
    trained = load_trained(run["best"])
    image = np.asarray(Image.open(loose).convert("RGB"))
    with torch.no_grad():
        probs = trained.model(trained.preprocess.to_tensor(image)).softmax(1)[0]
    order = probs.argsort(descending=True)
    assert rows[-1]["top1"] == trained.classes[order[0]] == rows[-1]["predicted"]
    assert rows[-1]["top2"] == trained.classes[order[1]]
    assert float(rows[-1]["top1_prob"]) == pytest.approx(float(probs[order[0]]), abs=2e-3)  # bf16 on some CPUs
    assert float(rows[-1]["top1_prob"]) >= float(rows[-1]["top2_prob"])


def test_an_unreadable_file_gets_a_row_and_strict_stops(run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(run["data"] / "test" / "blue", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(run["best"]), str(folder), "--out", str(out)]) == 0
    assert "11 images: 10 predicted, 1 unreadable" in capsys.readouterr().out
    broken = [r for r in rows_of(out) if r["path"].endswith("broken.png")][0]
    assert broken["predicted"] == "" and "cannot read image" in broken["error"]
    assert predict.main(["--checkpoint", str(run["best"]), str(folder), "--out", str(tmp_path / "s.csv"),
                         "--strict"]) == 2
    assert f"cannot read image {folder / 'broken.png'}" in error_line(capsys)
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("argv,needle", [
    (["{missing}"], "does not exist: pass image files or folders"),
    (["{empty}"], "no image files in"),
    (["{test}", "--top-k", "4"], "--top-k 4 must be between 1 and the model's 3 classes"),
    ([], "no PATH given"),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "test": run["data"] / "test"}
    argv = [a.format(**paths) for a in argv]
    assert predict.main(["--checkpoint", str(run["best"]), *argv, "--out", str(tmp_path / "p.csv")]) == 2
    assert needle in error_line(capsys)


def test_a_checkpoint_that_is_not_ours(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"junk")
    assert predict.main(["--checkpoint", str(tmp_path / "x.pt"), str(tmp_path)]) == 2
    assert "cannot read checkpoint" in error_line(capsys)


def test_cam_dir_writes_each_image_beside_its_map(run, tmp_path):
    cams = tmp_path / "cams"
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(run["best"]), str(run["data"] / "test" / "red"), "--cam-dir",
                         str(cams), "--out", str(out)]) == 0
    rows = rows_of(out)
    assert len(list(cams.glob("*.png"))) == len(rows) == 10
    with Image.open(rows[0]["cam"]) as picture:
        assert picture.size == (64 * 4, 32 * 4)
        left = np.asarray(picture.convert("RGB"))[::4, :128:4]
    assert np.array_equal(left, np.asarray(Image.open(rows[0]["path"]).convert("RGB")))  # the image itself


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert predict.main(["--checkpoint", str(run["best"]), "--export-onnx", str(path)]) == 0
    return path


def test_onnx_export_metadata_dynamic_batch_and_parity(run, exported, capsys):
    model = onnx.load(exported)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["classes"] == '["blue", "green", "red"]' and meta["image_size"] == "32"
    assert meta["mean"] == "[0.4914, 0.4822, 0.4465]" and meta["std"] == "[0.247, 0.2435, 0.2616]"
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    trained = load_trained(run["best"])
    _, test = load_image_folder(run["data"])
    x = trained.preprocess.to_tensor(test.images)
    with torch.no_grad():
        reference = trained.model(x).numpy()
    for batch in (1, 7, 30):  # any batch size
        got = session.run(["logits"], {"images": x[:batch].numpy()})[0]
        np.testing.assert_allclose(got, reference[:batch], rtol=1e-4, atol=1e-4)


def test_onnx_predictions_agree_with_pytorch(run, exported, tmp_path, capsys):
    torch_csv, onnx_csv = tmp_path / "t.csv", tmp_path / "o.csv"
    test = str(run["data"] / "test")
    assert predict.main(["--checkpoint", str(run["best"]), test, "--out", str(torch_csv), "--no-tta",
                         "--device", "cpu"]) == 0
    assert predict.main(["--onnx", str(exported), test, "--out", str(onnx_csv), "--no-tta"]) == 0
    a, b = rows_of(torch_csv), rows_of(onnx_csv)
    agree = np.mean([x["predicted"] == y["predicted"] for x, y in zip(a, b, strict=True)])
    assert agree >= 0.9  # the checkpoint may run in bf16 here, the ONNX file in fp32
    assert [r["true"] for r in a] == [r["true"] for r in b]


def test_a_failed_check_writes_no_file(run, tmp_path, monkeypatch, capsys):
    import utils.onnx_export
    monkeypatch.setattr(utils.onnx_export, "TOLERANCE", -1.0)  # nothing can pass
    path = tmp_path / "model.onnx"
    assert predict.main(["--checkpoint", str(run["best"]), "--export-onnx", str(path)]) == 2
    assert f"nothing was written to {path}" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_our_onnx(tmp_path, capsys):
    (tmp_path / "x.onnx").write_bytes(b"junk")
    assert predict.main(["--onnx", str(tmp_path / "x.onnx"), str(tmp_path)]) == 2
    assert f"cannot use {tmp_path / 'x.onnx'}" in error_line(capsys)
