"""report.html: one self-contained page per run folder, rebuilt from the files in it.

The page embeds every picture as a base64 data URI and inlines its style, so it
opens offline, mailed or copied anywhere. ``main.py`` rewrites it when the run
starts, after every epoch and at the end; while a run is in progress the page
reloads itself every minute.
"""
import base64
import csv
import html
import json
import time
from pathlib import Path

from .io import write_text

# (file, caption) in the order a reader wants them; any other PNG in the folder follows
FIGURES = [
    ("curves.png", "Loss and accuracy per epoch"),
    ("lr.png", "Learning rate of every optimizer step, as it ran"),
    ("lr_finder.png", "LR range test"),
    ("misclassified.png", "The worst mistakes on the test set (lowest probability of the true class first)"),
    ("gradcam.png", "Class activation maps of those images: the predicted class, then the true class"),
    ("reliability.png", "Calibration of the final model on the test set: accuracy per confidence bin"),
    ("robustness.png", "Accuracy on CIFAR-10-C-style corruptions made locally (not the published CIFAR-10-C)"),
    ("faithfulness.png", "Faithfulness of the CAM methods: probability drop when the top-ranked pixels are "
                         "removed, against random pixels"),
    ("confusion.png", "Confusion matrix of the final model"),
    ("class_counts.png", "Images per class"),
    ("samples.png", "Training images of each class"),
    ("image_sizes.png", "Image sizes as stored"),
]
# metrics.csv column -> (header, format) for the table
METRIC_FORMATS = {
    "epoch": ("epoch", "{:.0f}"), "lr": ("lr (end)", "{:.4g}"),
    "train_loss": ("train loss", "{:.4f}"), "train_acc": ("train acc %", "{:.2f}"),
    "val_loss": ("val loss", "{:.4f}"), "val_acc": ("val acc %", "{:.2f}"),
    "test_loss": ("test loss", "{:.4f}"), "test_acc": ("test acc %", "{:.2f}"),
    "test_acc_single": ("test acc % (single view)", "{:.2f}"), "seconds": ("seconds", "{:.1f}"),
}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
.headline { font-size: 1.3em; font-weight: 600; }
.status { color: #666; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
#args td, #args th { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
"""


def read_metrics(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def headline(rows: list) -> str:
    if not rows:
        return "No epoch has finished yet."
    final = rows[-1]
    if final.get("val_acc", "") != "":
        best = max(rows, key=lambda r: float(r["val_acc"]))  # the first of equals, as best.pt
        return (f"Final test accuracy {float(final['test_acc']):.2f}% (epoch {final['epoch']}) | "
                f"best.pt: epoch {best['epoch']}, chosen on validation accuracy "
                f"{float(best['val_acc']):.2f}%; its test accuracy {float(best['test_acc']):.2f}%")
    best = max(rows, key=lambda r: float(r["test_acc"]))
    return (f"Final test accuracy {float(final['test_acc']):.2f}% (epoch {final['epoch']}) | "
            f"best.pt: epoch {best['epoch']}, {float(best['test_acc']):.2f}%, chosen on the test set "
            "(optimistic: --val-split N chooses on held-out training images)")


def _metrics_table(rows: list) -> str:
    if not rows:
        return "<p>No epoch has finished yet.</p>"
    # the val columns are empty without --val-split: left out
    columns = [c for c in rows[0] if c in METRIC_FORMATS and any(r[c] != "" for r in rows)]
    head = "".join(f"<th>{html.escape(METRIC_FORMATS[c][0])}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{METRIC_FORMATS[c][1].format(float(r[c])) if r[c] != '' else ''}</td>"
                         for c in columns) + "</tr>\n"
        for r in rows)
    return f'<table id="metrics">\n<tr>{head}</tr>\n{body}</table>'


def _args_table(args: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>\n"
                   for k, v in args.items() if k != "command")
    return f'<table id="args">\n{rows}</table>'


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)} (<code>{html.escape(path.name)}</code>)</figcaption></figure>\n")


def _pre(title: str, path: Path) -> str:
    if not path.is_file():
        return ""
    return f"<h2>{title}</h2>\n<pre>{html.escape(path.read_text())}</pre>\n"


def build_report(out: Path, status: str = "finished") -> str:
    """The page for run folder ``out``; ``status`` is shown under the headline."""
    out = Path(out)
    args = json.loads((out / "args.json").read_text()) if (out / "args.json").is_file() else {}
    rows = read_metrics(out / "metrics.csv")
    known = [(out / name, caption) for name, caption in FIGURES if (out / name).is_file()]
    names = {name for name, _ in FIGURES}
    known += [(p, p.stem.replace("_", " ")) for p in sorted(out.glob("*.png")) if p.name not in names]
    title = f"{args.get('model', 'run')} | {out.name}"
    refresh = "" if status == "finished" else '<meta http-equiv="refresh" content="60">'
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n",
        f"<h1>{html.escape(title)}</h1>\n",
        f'<p class="headline">{html.escape(headline(rows)) if rows or args.get("epochs") else ""}</p>\n',
        f'<p class="status">{html.escape(status)}; page written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>\n',
    ]
    if "command" in args:
        parts.append(f"<h2>Command</h2>\n<pre>{html.escape(args['command'])}</pre>\n")
    if rows or args.get("epochs"):
        parts.append(f"<h2>Metrics per epoch</h2>\n{_metrics_table(rows)}\n")
    if known:
        parts.append("<h2>Figures</h2>\n" + "".join(_figure(p, c) for p, c in known))
    parts.append(_pre("Data analysis", out / "analysis.txt"))
    parts.append(_pre("Model summary and results", out / "summary.txt"))
    if args:
        parts.append(f"<h2>Arguments</h2>\n{_args_table(args)}\n")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(out: Path, status: str = "finished") -> None:
    write_text(Path(out) / "report.html", build_report(out, status))
