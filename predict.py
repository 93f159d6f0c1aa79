"""Predict the classes of new images with a trained model, or export it to ONNX.

    python predict.py --checkpoint runs/X/best.pt photos/ cat.png --out predictions.csv
    python predict.py --checkpoint runs/X/best.pt --export-onnx model.onnx
    python predict.py --onnx model.onnx photos/ --out predictions.csv

Each PATH is an image or a folder (searched recursively). Images are
preprocessed as the run's test images were (size, mean and std come from the
checkpoint or the ONNX file), in the run's precision and with its test-time
flip unless ``--no-tta``. The CSV has a row per file: path, predicted class,
its probability, the top-k classes, and, for files in ``<class>/`` folders
named like the model's classes, the true class (the accuracy is printed). A
file that cannot be read gets its error in the row; ``--strict`` stops instead.
"""
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import utils.io
from utils.cli import DEVICES, Parser, int_at_least, run_command
from utils.data import load_data, set_max_image_pixels
from utils.device import resolve_device
from utils.errors import UserError
from utils.inference import Predictor, find_images, read_batch, top_k, true_class


def build_parser():
    p = Parser(prog="predict.py", description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a best.pt or last.pt written by main.py")
    model.add_argument("--onnx", help="a model.onnx written by --export-onnx (onnxruntime, CPU)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders of images")
    p.add_argument("--out", default=None,
                   help="CSV to write (default: predictions.csv beside the checkpoint or ONNX file)")
    p.add_argument("--top-k", type=int_at_least(1), default=3, help="classes listed per image (at most all)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="images per forward pass (default: the run's batch size; 256 with --onnx)")
    p.add_argument("--tta", action="store_true", default=None,
                   help="average each image's logits with its mirror image's (default: as the run did)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="one view per image")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks cuda, then mps, then cpu")
    p.add_argument("--cam-dir", default=None, help="also write each image's Grad-CAM overlay here")
    p.add_argument("--cam-layer", default=None, help="Grad-CAM layer (default: the run's --gradcam-layer)")
    p.add_argument("--strict", action="store_true", help="stop at the first file that cannot be read")
    p.add_argument("--max-image-pixels", type=int_at_least(1), default=89_478_485,
                   help="refuse image files with more pixels than this (Pillow's decompression-bomb limit)")
    g = p.add_argument_group("export")
    g.add_argument("--export-onnx", default=None, metavar="PATH",
                   help="write the checkpoint's model as ONNX (dynamic batch) and check it against PyTorch")
    g.add_argument("--check-images", type=int_at_least(1), default=300,
                   help="test images the export is checked on (random pixels if the run's data is gone)")
    return p


def load_model(args):
    """A Predictor (or OnnxPredictor) as the command line asks."""
    if args.onnx:
        from utils.onnx_export import OnnxPredictor
        if args.cam_dir or args.export_onnx:
            raise UserError("--cam-dir and --export-onnx need the PyTorch model: pass --checkpoint")
        model = OnnxPredictor(args.onnx)
        model.tta = model.tta if args.tta is None else args.tta
        return model
    return Predictor.from_checkpoint(args.checkpoint, resolve_device(args.device), args.tta)


def main_command(argv) -> int:
    args = build_parser().parse_args(argv)
    set_max_image_pixels(args.max_image_pixels)
    model = load_model(args)
    if args.export_onnx:
        return export_onnx(args, model)
    if not args.paths:
        raise UserError("no PATH given: pass image files or folders to predict (or --export-onnx)")
    if not 1 <= args.top_k <= len(model.classes):
        raise UserError(f"--top-k {args.top_k} must be between 1 and the model's {len(model.classes)} classes")
    return predict(args, model)


def predict(args, model) -> int:
    """Predict every image under the PATHs, write the CSV, print the summary."""
    found = find_images(args.paths)
    if not found:
        raise UserError(f"no image files in {', '.join(args.paths)}: pass images or folders that hold them")
    out = Path(args.out or Path(args.checkpoint or args.onnx).parent / "predictions.csv")
    if not out.parent.is_dir():
        raise UserError(f"cannot write --out {out}: folder {out.parent} does not exist")
    batch = args.batch_size or getattr(model, "batch_size", None) or 256
    rows, start = [], time.perf_counter()
    with tqdm(total=len(found), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for i in range(0, len(found), batch):
            rows += predict_batch(args, model, found[i:i + batch], offset=i)
            bar.update(len(found[i:i + batch]))
    seconds = time.perf_counter() - start
    labelled = any(r["true"] for r in rows)
    columns = (["path", "predicted", "probability"]
               + [f"top{k}{s}" for k in range(1, args.top_k + 1) for s in ("", "_prob")]
               + ["true"] * labelled + ["cam"] * bool(args.cam_dir) + ["error"])
    write_csv(out, rows, columns)
    print(summary(rows, labelled, seconds) + f"wrote {out}")
    return 0


def predict_batch(args, model, found: list, offset: int) -> list:
    files = [f for f, _ in found]
    images, ok, errors = read_batch(files, model.preprocess.image_size)
    if errors and args.strict:
        raise UserError(next(iter(errors.values())) + " (or drop --strict to skip such files)")
    probs = model.probs(images) if len(images) else np.zeros((0, len(model.classes)))
    rows = [{"path": str(f), "true": true_class(f, root, model.classes) or "", "error": errors.get(k, "")}
            for k, (f, root) in enumerate(found)]
    for j, k in enumerate(ok):
        ranked = top_k(probs[j], model.classes, args.top_k)
        rows[k].update(predicted=ranked[0][0], probability=f"{ranked[0][1]:.4f}")
        for rank, (name, p) in enumerate(ranked, 1):
            rows[k].update({f"top{rank}": name, f"top{rank}_prob": f"{p:.4f}"})
    if args.cam_dir and ok:
        cams = write_cams(args, model, images, [offset + k for k in ok], [files[k] for k in ok])
        for k, cam in zip(ok, cams, strict=True):
            rows[k]["cam"] = str(cam)
    return rows


def write_cams(args, model, images: np.ndarray, numbers: list, files: list) -> list:
    """``<cam-dir>/<number>_<name>.png``: each image beside its Grad-CAM of the predicted class, 4x."""
    from utils.gradcam import GradCAM, check_layer, overlay

    folder = Path(args.cam_dir)
    folder.mkdir(parents=True, exist_ok=True)
    layer = args.cam_layer or model.layer
    check_layer(model.model, layer, model.preprocess.image_size)
    with GradCAM(model.model, layer) as cam:
        maps = cam(model.preprocess.to_tensor(images).to(model.device))
    paths = []
    for image, heat, number, f in zip(images, maps, numbers, files, strict=True):
        pair = np.concatenate([image, overlay(image, heat)], axis=1)
        path = folder / f"{number:06d}_{f.stem}.png"
        picture = Image.fromarray(pair).resize((pair.shape[1] * 4, pair.shape[0] * 4), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def write_csv(path: Path, rows: list, columns: list) -> None:
    try:
        utils.io.write_csv(path, rows, columns)  # whole or not at all
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror}): choose a writable --out") from None


def summary(rows: list, labelled: bool, seconds: float) -> str:
    bad = sum(bool(r["error"]) for r in rows)
    text = (f"{len(rows)} images: {len(rows) - bad} predicted, {bad} unreadable (their rows hold the error) "
            f"| {seconds:.1f} s, {1000 * seconds / max(len(rows), 1):.1f} s per 1,000 images\n")
    scored = [r for r in rows if r["true"] and not r["error"]]
    if labelled and scored:
        correct = sum(r["true"] == r["predicted"] for r in scored)
        text += (f"accuracy on the {len(scored)} images in class folders: {100 * correct / len(scored):.2f}% "
                 f"({correct}/{len(scored)})\n")
    return text


def export_onnx(args, model) -> int:
    """--export-onnx: write the file, then check onnxruntime against PyTorch on test images."""
    from utils import onnx_export

    out = Path(args.export_onnx)
    if not out.parent.is_dir():
        raise UserError(f"cannot write --export-onnx {out}: folder {out.parent} does not exist")
    images, source = check_images(model, args.check_images)
    draft = out.with_name(f".{out.name}.unchecked")  # becomes the file only once it passes the check
    try:
        onnx_export.export(model, draft)
        result = onnx_export.check(draft, model, images)
        limit = onnx_export.TOLERANCE * result["max_abs_logit"]
        print(f"onnxruntime vs PyTorch (fp32) on {result['images']} {source}: largest logit difference "
              f"{result['max_abs_diff']:.2e} (tolerance {limit:.2e}: {onnx_export.TOLERANCE:g} x the largest "
              f"|logit| {result['max_abs_logit']:.3g}), top-1 agreement {100 * result['top1_agreement']:.2f}%")
        if not result["ok"]:
            raise UserError(f"the ONNX model disagrees with PyTorch by {result['max_abs_diff']:.3g} (over "
                            f"{limit:.3g}): nothing was written to {out}")
        draft.replace(out)
    finally:
        draft.unlink(missing_ok=True)
    print(f"wrote {out} (dynamic batch; classes, image size, mean and std in its metadata)")
    return 0


def check_images(model, n: int) -> tuple:
    """Up to ``n`` test images of the run's data, or random pixels where that data cannot be read."""
    try:
        _, test = load_data(model.data_dir, download=False)
        keep = np.linspace(0, len(test.labels) - 1, min(n, len(test.labels))).round().astype(int)
        return test.images[keep], f"test images of {model.data_dir}"
    except (UserError, OSError, TypeError):
        rng = np.random.default_rng(0)
        size = model.preprocess.image_size
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "random images (the run's data is gone)"


def main(argv=None) -> int:
    return run_command(main_command, argv)


if __name__ == "__main__":
    sys.exit(main())
