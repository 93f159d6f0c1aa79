"""The explorer app: its callbacks (utils/explorer.py) and the exported Space, served from a copy."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from main import main
from utils.errors import UserError
from utils.explorer import Explorer

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    data = write_image_folder(root / "data", test_per_class=6)
    out = root / "run"
    assert main(["--model", "custom_resnet", "--data-dir", str(data), "--out-dir", str(out), "--epochs", "1",
                 "--batch-size", "12", "--lr", "2e-4", "--workers", "0", "--gallery-size", "0"]) == 0
    return {"data": data, "best": out / "best.pt", "image": str(data / "test" / "red" / "000.png")}


@pytest.fixture(scope="module")
def explorer(run):
    return Explorer(run["best"])


def test_layers_are_the_spatial_ones_with_their_sizes(explorer):
    layers = dict(explorer.layers)
    assert layers["layer2"] == (256, 8, 8) and layers["layer1"] == (128, 16, 16) and layers["prep"] == (64, 32, 32)
    assert "layer1.res" in layers and "fc" not in layers and "pool" not in layers


def test_classify_top_k_is_sorted_and_capped(explorer, run):
    top = explorer.classify(run["image"], 2)
    assert len(top) == 2 and list(top.values()) == sorted(top.values(), reverse=True)
    everything = explorer.classify(run["image"], 10)  # capped at the 3 classes
    assert set(everything) == {"blue", "green", "red"} and sum(everything.values()) == pytest.approx(1, abs=1e-3)


def test_explain_draws_the_image_and_its_map(explorer, run):
    picture = explorer.explain(run["image"], "predicted", "layer2", "gradcam", 0.5)
    assert picture.shape == (32 * 8, 64 * 8, 3) and picture.dtype == np.uint8
    image = np.asarray(Image.open(run["image"]).convert("RGB"))
    assert np.array_equal(picture[::8, :256:8], image)  # left: the image itself
    plain = explorer.explain(run["image"], "predicted", "layer2", "gradcam", 0.0)
    assert np.array_equal(plain[:, 256:], plain[:, :256])  # opacity 0: no heat at all
    other = explorer.explain(run["image"], "green", "layer1", "gradcam++", 1.0)
    assert not np.array_equal(other[:, 256:], picture[:, 256:])


@pytest.mark.parametrize("call,needle", [
    (lambda e, img: e.explain(img, "predicted", "layer9", "gradcam", 0.5), "layer 'layer9' is not one of"),
    (lambda e, img: e.explain(img, "cat", "layer2", "gradcam", 0.5), "class 'cat' is not one of"),
    (lambda e, img: e.explain(img, "predicted", "layer2", "fullgrad", 0.5), "method 'fullgrad' is not one of"),
    (lambda e, img: e.classify(None, 3), "no image: upload one"),
    (lambda e, img: e.classify(__file__, 3), "cannot read image"),
])
def test_bad_input_is_a_readable_message(explorer, run, call, needle):
    with pytest.raises(UserError) as info:
        call(explorer, run["image"])
    assert needle in str(info.value)


def test_mistakes_show_the_worst_with_both_maps(explorer):
    shown = explorer.mistakes(4, "layer2", "gradcam")
    assert 1 <= len(shown) <= 4
    picture, caption = shown[0]
    assert picture.shape == (32 * 8, 96 * 8, 3)
    true, predicted = caption.split(" | ")[:2]
    assert true.removeprefix("true ") != predicted.removeprefix("predicted ").split(" (")[0]
    wrong = int((explorer.predictor.probs(explorer.test.images).argmax(1) != explorer.test.labels).sum())
    assert len(explorer.mistakes(50, "layer2", "gradcam")) == min(50, wrong)


def test_without_the_data_the_data_tabs_say_why(run, tmp_path):
    moved = Explorer(run["best"], data_dir=tmp_path / "gone")
    assert moved.test is None and "cannot be read here" in moved.data_note and moved.examples() == []
    with pytest.raises(UserError, match="cannot be read here"):
        moved.mistakes(5, "layer2", "gradcam")
    assert moved.classify(run["image"], 1)  # the rest works


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cmd, cwd, port, env=None):
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the app did not start: {proc.communicate()[0][-2000:]}")


def test_exported_space_runs_alone(run, tmp_path, capsys):
    space = tmp_path / "space"
    assert app.main(["--checkpoint", str(run["best"]), "--export-space", str(space)]) == 0
    assert "push it to a Gradio Space" in capsys.readouterr().out
    names = {str(p.relative_to(space)) for p in space.rglob("*") if p.is_file()}
    assert {"app.py", "model.pt", "requirements.txt", "README.md", "utils/explorer.py", "model/resnet.py",
            "examples/red.png", "curves.png"} <= names
    assert not {"main.py", "utils/training.py", "utils/data.py", "utils/engine.py"} & names  # nothing of training
    assert (space / "README.md").read_text().startswith("---\ntitle: ") and "sdk: gradio" in (space / "README.md").read_text()
    import torch
    assert torch.load(space / "model.pt", weights_only=True)["optimizer"] == {}

    alone = tmp_path / "elsewhere" / "space"  # a copy with no way back to the repository
    shutil.copytree(space, alone)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    port = free_port()
    proc = serve([sys.executable, "app.py", "--port", str(port)], alone, port, env)
    try:
        from gradio_client import Client, handle_file
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        result = client.predict(handle_file(str(alone / "examples" / "red.png")), 3, api_name="/classify")
        assert result["label"] in ("blue", "green", "red") and len(result["confidences"]) == 3
        (tmp_path / "notes.png").write_text("not an image")
        with pytest.raises(Exception, match="cannot read image .*notes.png"):  # the page shows this message
            client.predict(handle_file(str(tmp_path / "notes.png")), 3, api_name="/classify")
        with pytest.raises(Exception, match="layer 'layer9' is not one of the model's spatial layers"):
            client.predict(handle_file(str(alone / "examples" / "red.png")), "predicted", "layer9", "gradcam",
                           0.5, api_name="/explain")
        again = client.predict(handle_file(str(alone / "examples" / "blue.png")), 1, api_name="/classify")
        assert len(again["confidences"]) == 1  # the server kept running
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_export_space_refuses_a_used_folder(run, tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert app.main(["--checkpoint", str(run["best"]), "--export-space", str(tmp_path)]) == 2
    assert f"{tmp_path} is not empty" in capsys.readouterr().err
