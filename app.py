"""Explore a trained model in the browser: predictions, Grad-CAM, its mistakes and its run.

    python app.py --checkpoint runs/X/best.pt               # http://127.0.0.1:7860
    python app.py --checkpoint runs/X/best.pt --export-space space/

A local Gradio page (nothing is fetched from outside: no analytics, no share
link). Tabs: classify an uploaded image or one of ten test images, with the top-k
classes; its Grad-CAM for any class, layer, method and opacity; the run's worst
test mistakes with the maps of the predicted and the true class; the run's
curves, per-class accuracy and confusion matrix. The work is done by
``utils/explorer.py``; this file only lays out the page. ``--export-space DIR``
writes a folder to push to a Hugging Face Space (utils/space.py).
"""
import csv
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from utils.cli import DEVICES, Parser, int_at_least, run_command  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.explorer import MAX_MISTAKES, Explorer  # noqa: E402
from utils.gradcam import METHODS  # noqa: E402

HERE = Path(__file__).resolve().parent


def build_parser():
    p = Parser(prog="app.py", description=__doc__.split("\n\n")[0])
    default = HERE / "model.pt"  # an exported Space carries its checkpoint here
    p.add_argument("--checkpoint", default=str(default) if default.is_file() else None,
                   required=not default.is_file(), help="a best.pt or last.pt written by main.py")
    p.add_argument("--data-dir", default=None, help="the run's data, if it moved (default: the run's --data-dir)")
    p.add_argument("--port", type=int_at_least(1), default=7860, help="port on 127.0.0.1")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto picks cuda, then mps, then cpu")
    p.add_argument("--export-space", default=None, metavar="DIR",
                   help="write a Hugging Face Space folder (app, model code, checkpoint, examples) and exit")
    return p


def guarded(fn):
    """A callback whose UserError (a non-image upload, an unknown layer) becomes a message in the page.

    Events run with ``preprocess=False``: an uploaded file arrives as Gradio's file dict and
    is read here, so a file that is no image gets our message instead of Gradio's traceback.
    """
    import gradio as gr

    def call(*args):
        args = [a.get("path") if isinstance(a, dict) else a for a in args]
        try:
            return fn(*args)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
    return call


def example_files(explorer, folder: Path) -> list:
    """The ten example images as PNG files (one per class), written once into ``folder``."""
    from PIL import Image

    examples = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if examples:
        return [str(p) for p in examples]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, image in zip(explorer.classes, explorer.examples(), strict=False):
        path = folder / f"{name}.png"
        Image.fromarray(image).save(path)
        files.append(str(path))
    return files


def predict_tab(gr, explorer, examples):
    layers = [(f"{name} ({c}x{h}x{w}, map {h}x{w})", name) for name, (c, h, w) in explorer.layers]
    default = explorer.args.get("gradcam_layer")
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", label="image", elem_id="image")
            if examples:
                gr.Examples(examples=[[p] for p in examples], inputs=[image], label="test images, one per class")
            else:
                gr.Markdown(f"No example images: {explorer.data_note}")
            k = gr.Slider(1, min(10, len(explorer.classes)), value=min(3, len(explorer.classes)), step=1,
                          label="top-k classes", elem_id="k")
        with gr.Column():
            label = gr.Label(label="prediction", elem_id="prediction")
    with gr.Row():
        target = gr.Dropdown(["predicted", *explorer.classes], value="predicted", label="class to explain",
                             elem_id="target")
        layer = gr.Dropdown(layers, value=default if default in dict(explorer.layers) else layers[-1][1],
                            label="layer", elem_id="layer")
        method = gr.Radio(list(METHODS), value="gradcam", label="method", elem_id="method")
        opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="heatmap opacity", elem_id="opacity")
    cam = gr.Image(label="image | Grad-CAM", elem_id="cam", format="png")
    gr.on([image.change, k.change], guarded(explorer.classify), [image, k], label, api_name="classify",
          preprocess=False)
    gr.on([image.change, target.change, layer.change, method.change, opacity.change], guarded(explorer.explain),
          [image, target, layer, method, opacity], cam, api_name="explain", preprocess=False)
    return layer, method


def mistakes_tab(gr, explorer, layer, method):
    if explorer.test is None:
        gr.Markdown(explorer.data_note, elem_id="mistakes-note")
        return
    n = gr.Slider(1, MAX_MISTAKES, value=10, step=1, label="mistakes to show", elem_id="n-mistakes")
    show = gr.Button("show the worst mistakes", elem_id="show-mistakes")
    gallery = gr.Gallery(label="image | map of the predicted class | map of the true class", columns=2,
                         elem_id="mistakes", format="png")
    show.click(guarded(explorer.mistakes), [n, layer, method], gallery, api_name="mistakes")


def run_tab(gr, explorer):
    files = explorer.run_files()
    if "curves.png" in files:
        gr.Image(files["curves.png"], label="loss and accuracy per epoch", elem_id="curves")
    if "per_class.csv" in files:
        with open(files["per_class.csv"], newline="") as f:
            rows = [[r["class"], f"{float(r['accuracy']):.2f}", r["correct"], r["total"]] for r in csv.DictReader(f)]
        gr.Dataframe(rows, headers=["class", "accuracy %", "correct", "total"], label="per-class test accuracy",
                     elem_id="per-class")
    if "confusion.png" in files:
        gr.Image(files["confusion.png"], label="confusion matrix", elem_id="confusion")
    if not files:
        gr.Markdown("This run folder holds no curves or per-class results yet (the run has not finished).")


def build_page(explorer, examples):
    import gradio as gr

    with gr.Blocks(title=f"CIFAR-10 explorer: {explorer.predictor.name}", analytics_enabled=False) as page:
        gr.Markdown(f"## {explorer.predictor.name} — `{explorer.checkpoint.parent.name}/{explorer.checkpoint.name}`\n"
                    f"{len(explorer.classes)} classes: {', '.join(explorer.classes)}")
        with gr.Tab("predict and explain", id="predict"):
            layer, method = predict_tab(gr, explorer, examples)
        with gr.Tab("mistakes", id="mistakes-tab"):
            mistakes_tab(gr, explorer, layer, method)
        with gr.Tab("the run", id="run-tab"):
            run_tab(gr, explorer)
    return page


def serve(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.export_space:
        from utils.space import export_space
        print(export_space(args.checkpoint, args.export_space, HERE))
        return 0
    explorer = Explorer(args.checkpoint, resolve_device(args.device), args.data_dir)
    folder = HERE / "examples" if (HERE / "examples").is_dir() else Path(tempfile.mkdtemp(prefix="examples-"))
    page = build_page(explorer, example_files(explorer, folder))
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")  # a Space sets 0.0.0.0
    print(f"serving {explorer.checkpoint} at http://{host}:{args.port}", flush=True)
    page.launch(server_name=host, server_port=args.port, share=False, inbrowser=False, show_error=True,
                allowed_paths=[str(folder), str(explorer.checkpoint.parent)])
    return 0


def main(argv=None) -> int:
    return run_command(serve, argv)


if __name__ == "__main__":
    sys.exit(main())
