"""notebooks/cifar10_resnet.ipynb end to end on the CPU: a tiny image folder, one short epoch.

The notebook is executed with nbclient in a fresh "python3" kernel (the venv's own interpreter,
through ipykernel), after a papermill-style cell that overrides its parameters, exactly as a
Colab user would run it inside a checkout. Any cell that raises fails the test.
"""
import ast
import sys
from pathlib import Path

import pytest

from conftest import write_image_folder

nbclient = pytest.importorskip("nbclient", reason="nbclient is in requirements-dev.txt")
nbformat = pytest.importorskip("nbformat", reason="nbformat is in requirements-dev.txt")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "cifar10_resnet.ipynb"
# what the notebook shows: analysis (3), range test (1), run (5: curves, lr, misclassified,
# gradcam, confusion) and show_cam(GRADCAM_INDEX) (1); the ipywidgets slider is not counted
MIN_PNGS = 10
TRAIN_FILES = ["best.pt", "last.pt", "curves.png", "lr.png", "misclassified.png", "gradcam.png",
               "confusion.png", "summary.txt", "report.html"]


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_stored_notebook_is_clean():
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in code_cells(nb):
        assert cell.outputs == [], f"cell {cell.get('id')} is stored with outputs"
        assert cell.execution_count is None, f"cell {cell.get('id')} is stored with an execution count"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    # every name the parameters cell sets, as plain assignments
    names = {t.id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign)
             for t in node.targets}
    assert {"MODEL", "NORM", "EPOCHS", "BATCH_SIZE", "DATA_DIR", "TRAIN_SUBSET", "TEST_SUBSET",
            "LR_FIND_ITERS", "WORKERS", "GALLERY_SIZE", "RUN_DIR", "GRADCAM_INDEX", "EXTRA_ARGS"} <= names


def test_notebook_calls_the_repository_instead_of_pasting_it():
    """No function or class of main.py, gradcam.py, utils/ or model/ is defined again in a cell."""
    repo_names = set()
    for path in [REPO / "main.py", REPO / "gradcam.py", *(REPO / "utils").glob("*.py"),
                 *(REPO / "model").glob("*.py")]:
        repo_names |= {n.name for n in ast.parse(path.read_text()).body
                       if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert {"GradCAM", "train_one_epoch", "load_trained", "overlay"} <= repo_names
    nb = read_notebook()
    defined = set()
    for cell in code_cells(nb):
        defined |= {n.name for n in ast.walk(ast.parse(cell.source))
                    if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not defined & repo_names, f"the notebook redefines {sorted(defined & repo_names)}"
    source = "\n".join(c.source for c in code_cells(nb))
    assert "from main import main" in source and "load_trained(" in source and "GradCAM(model, layer)" in source


def test_notebook_runs_end_to_end(tmp_path):
    data = write_image_folder(tmp_path / "data", train_per_class=8, test_per_class=4)
    runs = tmp_path / "runs"
    stored = NOTEBOOK.read_bytes()
    nb = read_notebook()  # executed in memory; the file is never written

    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = {"MODEL": "custom_resnet", "EPOCHS": 1, "BATCH_SIZE": 8, "DATA_DIR": str(data),
                 "LR_FIND_ITERS": 20, "WORKERS": 0, "GALLERY_SIZE": 4, "RUN_DIR": str(runs)}
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(params + 1, injected)

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises nbclient.exceptions.CellExecutionError on any cell error

    outputs = [o for c in code_cells(nb) for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    pngs = [o for o in outputs if o.output_type in ("display_data", "execute_result")
            and "image/png" in o.get("data", {})]
    assert len(pngs) >= MIN_PNGS, f"{len(pngs)} inline PNGs, expected at least {MIN_PNGS}"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"({sys.executable})" in text  # the kernel is this interpreter, with this venv's packages
    assert "already in a checkout" in text  # nothing cloned or installed

    for name in ("class_counts.png", "samples.png", "image_sizes.png", "analysis.txt", "report.html"):
        assert (runs / "analyze" / name).is_file(), name
    assert (runs / "lr_find" / "lr_finder.png").is_file()
    for name in TRAIN_FILES:
        assert (runs / "train" / name).is_file(), name
    assert NOTEBOOK.read_bytes() == stored, "the test modified the stored notebook"
