"""``app.py --export-space DIR``: a folder to push to a Hugging Face Space as it is.

It holds the app and the modules it imports, nothing of training: no optimizer
state in the checkpoint, no data loaders, no training loop. The run's test
images are not copied; ten of them (one per class) become the examples, and the
run's curves, confusion matrix and per-class accuracy come along.
"""
import shutil
from pathlib import Path

from PIL import Image

from . import checkpoint
from .errors import UserError
from .io import write_text

# what app.py imports, directly or not (tests/test_app.py starts the app from a copy of the folder)
MODULES = ["app.py", "model/__init__.py", "model/resnet.py", "model/custom_resnet.py", "model/norm.py",
           "utils/__init__.py", "utils/analysis.py", "utils/checkpoint.py", "utils/cifar.py", "utils/cli.py",
           "utils/device.py", "utils/errors.py", "utils/explorer.py", "utils/gradcam.py", "utils/images.py",
           "utils/inference.py", "utils/io.py"]
RUN_FILES = ["curves.png", "confusion.png", "per_class.csv"]
REQUIREMENTS = """torch>=2.4
numpy>=1.26
pillow>=10.0
opencv-python-headless>=4.9
albumentations>=2.0,<3
gradio>=6.17
"""


def readme(name: str, classes: list, accuracy: float) -> str:
    return f"""---
title: CIFAR-10 explorer {name}
emoji: 🔍
colorFrom: indigo
colorTo: blue
sdk: gradio
app_file: app.py
pinned: false
---

# {name}: predictions, Grad-CAM and mistakes

A {name} trained on {len(classes)} classes ({', '.join(classes)}); test accuracy of this
checkpoint {accuracy:.2f}%. Upload an image or click an example to see the top classes and the Grad-CAM map
of any class, layer and method. Run it anywhere with `pip install -r requirements.txt && python app.py`.
"""


def export_space(checkpoint_path, folder, repo: Path) -> str:
    """Write the Space into ``folder`` (new or empty); returns what was written, for the terminal."""
    from .explorer import Explorer

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty: choose a new folder for --export-space")
    explorer = Explorer(checkpoint_path)
    examples = explorer.examples()
    if not examples:
        raise UserError(f"the Space's examples are test images of the run: {explorer.data_note}; pass --data-dir")
    for name in MODULES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo / name, folder / name)
    ckpt = checkpoint.load(checkpoint_path)
    slim = {**ckpt, "optimizer": {}, "scheduler": {}, "scaler": {}, "lrs": []}  # nothing to train on
    checkpoint.save(folder / "model.pt", slim)
    (folder / "examples").mkdir()
    for name, image in zip(explorer.classes, examples, strict=False):
        Image.fromarray(image).save(folder / "examples" / f"{name}.png")
    for name in RUN_FILES:
        if (Path(checkpoint_path).parent / name).is_file():
            shutil.copyfile(Path(checkpoint_path).parent / name, folder / name)
    write_text(folder / "requirements.txt", REQUIREMENTS)
    write_text(folder / "README.md", readme(explorer.predictor.name, explorer.classes,
                                                   float(ckpt["history"][-1]["test_acc"])))
    return (f"wrote {folder}: app.py, model/, utils/ ({len(MODULES) - 5} modules), model.pt, "
            f"{len(examples)} examples, requirements.txt, README.md; push it to a Gradio Space")
