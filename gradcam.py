"""Explain one image with Grad-CAM: the overlay and the top-3 classes.

    python gradcam.py --checkpoint runs/X/best.pt --image photo.png --class cat --out cam.png

The library lives in ``utils/gradcam.py`` and is re-exported here, so
``from gradcam import GradCAM, overlay`` works as before:

    with GradCAM(model, "layer3") as cam:
        maps = cam(images)                    # (B, H, W) floats in [0, 1], predicted classes
        maps = cam(images, class_idx=[3, 5])  # or one class per image
    picture = overlay(image_uint8, maps[0])   # uint8 RGB, jet heat on the image

The image is preprocessed as the checkpoint's run preprocessed its test set
(size, mean and std come from the checkpoint).
"""
import sys
from pathlib import Path

import numpy as np

from utils.checkpoint import load_trained
from utils.cli import DEVICES, Parser, float_in, int_at_least, run_command
from utils.data import read_image, set_max_image_pixels
from utils.device import resolve_device
from utils.errors import UserError
from utils.gradcam import (CAMS, DEFAULT_LAYERS, METHODS, GradCAM, GradCAMPlusPlus, LayerError,  # noqa: F401
                           check_layer, find_layer, overlay)


def build_parser():
    p = Parser(prog="gradcam.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by main.py")
    p.add_argument("--image", required=True, help="any image file; it is resized as the run's images were")
    p.add_argument("--layer", default=None,
                   help="dotted layer name (default: " + ", ".join(f"{n} for {m}" for m, n in
                                                                   DEFAULT_LAYERS.items()) + ")")
    p.add_argument("--class", dest="class_name", default=None,
                   help="class to explain, by name (default: the predicted class)")
    p.add_argument("--method", default="gradcam", choices=METHODS,
                   help="CAM method; eigencam is class-agnostic (the same map for any --class), "
                        "scorecam runs the model once per channel of the layer (slow on a CPU)")
    p.add_argument("--alpha", type=float_in(0, 1), default=0.5, help="heatmap weight in the overlay")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks cuda, then mps, then cpu")
    p.add_argument("--max-image-pixels", type=int_at_least(1), default=89_478_485,
                   help="refuse image files with more pixels than this (Pillow's decompression-bomb limit)")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: cam-<image name>.png beside the checkpoint)")
    return p


def top3(probs: np.ndarray, classes: list) -> str:
    """'cat 61.2% | dog 30.1% | deer 2.0%'."""
    return " | ".join(f"{classes[i]} {probs[i]:.1%}" for i in np.argsort(-probs)[:3])


def explain_figure(image: np.ndarray, picture: np.ndarray, probs: np.ndarray, classes: list,
                   explained: str, layer: str, method: str):
    """Figure: the input and its overlay; top-3 classes in the title."""
    from utils.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.4))
    size = f"{image.shape[1]}x{image.shape[0]}"
    for ax, img, title in zip(axes, (image, picture), (f"input ({size})", f"{method} for '{explained}'\n"
                                                      f"at {layer}"), strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(top3(probs, classes), fontsize=10)
    fig.tight_layout()
    return fig


def explain(argv) -> int:
    from utils.plots import save_figure

    args = build_parser().parse_args(argv)
    set_max_image_pixels(args.max_image_pixels)
    trained = load_trained(args.checkpoint, resolve_device(args.device))
    classes = trained.classes
    layer = args.layer or DEFAULT_LAYERS[trained.args["model"]]
    check_layer(trained.model, layer, trained.preprocess.image_size)
    if args.class_name is not None and args.class_name not in classes:
        raise UserError(f"--class {args.class_name!r} is not one of this checkpoint's classes: "
                        f"{', '.join(classes)}")
    path = Path(args.image)
    out = Path(args.out or Path(args.checkpoint).parent / f"cam-{path.stem}.png")
    if not path.is_file():
        raise UserError(f"--image {path} does not exist: pass the path of an image file")
    if not out.parent.is_dir():  # before any work is done
        raise UserError(f"cannot write --out {out}: folder {out.parent} does not exist")
    rgb = read_image(path, trained.preprocess.image_size)  # resized like the training images
    x = trained.preprocess.to_tensor(rgb)  # normalised (1, 3, H, W)
    target = None if args.class_name is None else classes.index(args.class_name)
    with CAMS[args.method](trained.model, layer) as cam:
        heatmap = cam(x, target)[0]
        probs = cam.logits.float().softmax(1)[0].cpu().numpy()
        explained = classes[int(cam.class_idx[0])]
    picture = overlay(rgb, heatmap, args.alpha)
    try:
        save_figure(explain_figure(rgb, picture, probs, classes, explained, layer, args.method), out)
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror}): choose a writable --out") from None
    print(top3(probs, classes))
    print(f"{args.method} of '{explained}' at {layer} -> {out}")
    return 0


def main(argv=None) -> int:
    return run_command(explain, argv)


if __name__ == "__main__":
    sys.exit(main())
