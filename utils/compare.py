"""Compare run folders: curves overlaid, final and best accuracies, statistics over seeds.

``compare(paths)`` reads each run folder written by ``main.py`` (``args.json``,
``metrics.csv`` and, when the run finished, ``results.json``) and returns a
``Comparison``; ``build_html``, ``csv_rows`` and ``markdown_table`` render it.

Runs whose ``MATH_FLAGS`` agree except for the seed form one setting; a setting
of two or more runs gets the mean, the sample standard deviation (ddof=1), the
minimum and the maximum of its final test accuracy and of its best.pt test
accuracy (the test accuracy of the epoch best.pt holds). best.pt is the epoch
with the best validation accuracy when the run had a validation split, else the
best test accuracy, which is an optimistic estimate and flagged as such.
"""
import base64
import csv
import html
import io
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from .checkpoint import MATH_FLAGS
from .errors import UserError
from .io import write_csv, write_text
from .plots import DPI, plt
from .report import STYLE

# The flags that make two runs one setting: the mathematics except the seed.
SETTING_FLAGS = tuple(f for f in MATH_FLAGS if f != "seed") + (() if "val_split" in MATH_FLAGS else ("val_split",))
HEAD_FLAGS = ("model", "norm", "epochs")  # always named in the Markdown table
OPTIMISTIC = "best.pt chosen on the test set: its test accuracy is an optimistic estimate"
CSV_COLUMNS = ["kind", "name", "setting", "n", "seeds", "epochs_done", "epochs",
               "final_test_acc", "final_test_acc_std", "final_test_acc_min", "final_test_acc_max",
               "best_test_acc", "best_test_acc_std", "best_test_acc_min", "best_test_acc_max",
               "best_on", "best_epoch", "final_val_acc", "max_val_acc", "max_test_acc", "ece", "path"]


class CompareError(UserError):
    """A folder that is not a run, a run without epochs, or runs that cannot be compared."""


@dataclass
class Run:
    """One run folder: its arguments, its metrics rows (floats, None where empty), best.pt's epoch."""

    path: Path
    name: str
    args: dict
    rows: list
    best_on: str
    best_epoch: int
    ece: float = None

    @property
    def final(self) -> dict:
        return self.rows[-1]

    @property
    def best_row(self) -> dict:
        return next((r for r in self.rows if r["epoch"] == self.best_epoch), None)

    def column(self, name: str) -> list:
        return [r.get(name) for r in self.rows]


@dataclass
class Comparison:
    runs: list
    settings: list = field(default_factory=list)  # lists of runs, first-seen order
    varying: tuple = ()  # SETTING_FLAGS whose values differ between the runs


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"cannot read {path} ({exc}): pass a run folder written by main.py") from None
    if not isinstance(value, dict):
        raise CompareError(f"{path} holds no JSON object: pass a run folder written by main.py")
    return value


def number(text):
    """A metrics.csv cell as a float, None when empty."""
    return None if text is None or text.strip() == "" else float(text)


def read_rows(path: Path) -> list:
    """metrics.csv as dicts of floats (None for an empty cell), one per finished epoch."""
    try:
        with open(path, newline="") as f:
            rows = [{k: number(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    except (OSError, ValueError, csv.Error) as exc:
        raise CompareError(f"cannot read {path} ({exc}): pass a run folder written by main.py") from None
    if any(r.get(c) is None for r in rows for c in ("epoch", "test_acc")):
        raise CompareError(f"{path} has a row without epoch or test_acc: pass a run folder written by main.py")
    return rows


def best_choice(rows: list, results: dict) -> tuple:
    """(split, epoch) of best.pt: results.json's, else the highest val_acc, else the highest test_acc."""
    if "best_epoch" in results:
        return results.get("best_on", "test"), int(results["best_epoch"])
    split = "val" if all(r.get("val_acc") is not None for r in rows) else "test"
    best = max(rows, key=lambda r: r[f"{split}_acc"])  # the first of equals, as main.py keeps it
    return split, int(best["epoch"])


def load_run(path) -> Run:
    """The run folder at ``path``; ``CompareError`` when it is not one or has no finished epoch."""
    path = Path(path)
    missing = [n for n in ("args.json", "metrics.csv") if not (path / n).is_file()]
    if not path.is_dir() or missing:
        why = "not a folder" if not path.is_dir() else f"no {' or '.join(missing)}"
        raise CompareError(f"{path} is not a run folder ({why}): pass folders written by main.py")
    args, rows = read_json(path / "args.json"), read_rows(path / "metrics.csv")
    if not rows:
        raise CompareError(f"run {path} has no finished epoch: wait for its first epoch or leave it out")
    results = read_json(path / "results.json") if (path / "results.json").is_file() else {}
    best_on, best_epoch = best_choice(rows, results)
    return Run(path, path.name, args, rows, best_on, best_epoch, results.get("ece"))


def data_of(run: Run, other: Run) -> dict:
    """What must agree for the two runs' test accuracies to be comparable."""
    data = run.args.get("data")
    if isinstance(data, dict) and isinstance(other.args.get("data"), dict):
        return {"classes": data.get("classes"), "test images": data.get("test")}
    return {"data_dir": run.args.get("data_dir"), "test_subset": run.args.get("test_subset")}


def check_same_data(runs: list) -> None:
    """Every run must be tested on the first run's data: its classes and test set."""
    first = runs[0]
    for run in runs[1:]:
        mine, theirs = data_of(first, run), data_of(run, first)
        diff = [f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diff:
            raise CompareError(f"runs {first.path} and {run.path} are on different data ({'; '.join(diff)}): "
                               "compare runs of one data set only")


def setting_key(run: Run) -> str:
    return json.dumps([run.args.get(f) for f in SETTING_FLAGS])


def compare(paths: list) -> Comparison:
    """Read the run folders, check they share their data, group them by setting."""
    if not paths:
        raise CompareError("no run folder given: pass at least one RUN_DIR")
    seen = {}
    for p in paths:
        key = Path(p).resolve()
        if key in seen:
            raise CompareError(f"{p} is given twice (as {seen[key]} before): pass each run folder once")
        seen[key] = p
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for run, p in zip(runs, paths, strict=True):
        if names.count(run.name) > 1:
            run.name = str(p)  # two folders of one name: tell them apart by the path given
    check_same_data(runs)
    groups = {}
    for run in runs:
        groups.setdefault(setting_key(run), []).append(run)
    varying = tuple(f for f in SETTING_FLAGS if len({json.dumps(r.args.get(f)) for r in runs}) > 1)
    return Comparison(runs, list(groups.values()), varying)


def stats(values: list) -> dict:
    """n, mean, sample standard deviation (ddof=1; None for one value), min and max."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def seeds_text(runs: list) -> str:
    """``seed 1``, ``seeds 1-4`` or ``seeds 1, 3, 7``."""
    seeds = sorted({r.args.get("seed") for r in runs}, key=str)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if all(isinstance(s, int) for s in seeds) and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def setting_label(run: Run, flags) -> str:
    """The run's values of ``flags`` (``lr=0.4, norm=gn``), or its model when none differ."""
    parts = [f"{f}={json.dumps(run.args.get(f))}" for f in flags]
    return ", ".join(parts) or str(run.args.get("model", "run"))


def run_row(run: Run, varying: tuple) -> dict:
    """The run's row of the runs table and the CSV (accuracies in percent, ECE a fraction)."""
    best = run.best_row or {}
    return {"kind": "run", "name": run.name, "setting": setting_label(run, varying), "n": 1,
            "seeds": str(run.args.get("seed")), "epochs_done": int(run.final["epoch"]),
            "epochs": run.args.get("epochs"),
            "final_test_acc": run.final["test_acc"], "best_test_acc": best.get("test_acc"),
            "best_on": run.best_on, "best_epoch": run.best_epoch, "final_val_acc": run.final.get("val_acc"),
            "max_val_acc": stats(run.column("val_acc"))["max"], "max_test_acc": max(run.column("test_acc")),
            "ece": run.ece, "path": str(run.path)}


def setting_row(runs: list, varying: tuple) -> dict:
    """One setting's row: its runs' statistics (mean in the accuracy columns)."""
    rows = [run_row(r, varying) for r in runs]
    if len(runs) == 1:
        return rows[0]
    row = {"kind": "group", "name": f"{len(runs)} runs", "setting": rows[0]["setting"], "n": len(runs),
           "seeds": " ".join(str(r.args.get("seed")) for r in runs), "epochs": runs[0].args.get("epochs"),
           "epochs_done": "/".join(sorted({str(r["epochs_done"]) for r in rows})),
           "best_on": "/".join(sorted({r.best_on for r in runs})),
           "ece": stats([r.ece for r in runs])["mean"], "path": " ".join(str(r.path) for r in runs)}
    for column in ("final_test_acc", "best_test_acc"):
        s = stats([r[column] for r in rows])
        row.update({column: s["mean"], f"{column}_std": s["std"], f"{column}_min": s["min"],
                    f"{column}_max": s["max"]})
    return row


def csv_rows(comparison: Comparison) -> list:
    """A row per run, then a row per setting of two or more runs (kind ``group``), numbers rounded."""
    rows = [run_row(r, comparison.varying) for r in comparison.runs]
    rows += [setting_row(g, comparison.varying) for g in comparison.settings if len(g) > 1]
    return [{k: round(v, 4) if isinstance(v, float) else ("" if v is None else v) for k, v in row.items()}
            for row in rows]


def acc_text(row: dict, column: str, unit: str = "") -> str:
    """``91.17 ± 1.26 (90.00-92.50)`` for a setting of several runs, ``91.00`` for one, ``-`` if unknown."""
    value = row.get(column)
    if value is None:
        return "-"
    if row.get(f"{column}_std") is None:
        return f"{value:.2f}{unit}"
    return (f"{value:.2f}{unit} ± {row[f'{column}_std']:.2f} "
            f"({row[f'{column}_min']:.2f}-{row[f'{column}_max']:.2f})")


def best_on_text(split: str, mark: str = " *") -> str:
    return split + mark if "test" in split.split("/") else split


def ece_text(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def curves_figure(comparison: Comparison):
    """Accuracy and loss per epoch of every run: test solid, validation dashed, a colour per setting."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, group in enumerate(comparison.settings):
        name = setting_label(group[0], comparison.varying) + (f" ({len(group)} runs)" if len(group) > 1 else "")
        for k, run in enumerate(group):
            for ax, metric in zip(axes, ("acc", "loss"), strict=True):
                for split, dash in (("test", "-"), ("val", "--")):
                    values = run.column(f"{split}_{metric}")
                    if all(v is not None for v in values):
                        ax.plot(run.column("epoch"), values, dash, color=colours[i % len(colours)], lw=1.2,
                                label=f"{name}, {split}" if k == 0 else None)
    axes[0].set(title="Accuracy (test solid, validation dashed)", xlabel="epoch", ylabel="accuracy (%)")
    axes[1].set(title="Loss (test solid, validation dashed)", xlabel="epoch", ylabel="cross-entropy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def png_uri(fig) -> str:
    """The figure as a ``data:image/png;base64,...`` URI; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def html_table(table_id: str, header: list, rows: list) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    return f'<table id="{table_id}">\n<tr>{head}</tr>\n{body}</table>\n'


def settings_table(comparison: Comparison) -> str:
    rows = []
    for group in comparison.settings:
        r = setting_row(group, comparison.varying)
        rows.append([r["setting"], r["n"], seeds_text(group), r["epochs_done"], acc_text(r, "final_test_acc"),
                     acc_text(r, "best_test_acc"), best_on_text(r["best_on"]), ece_text(r["ece"])])
    return html_table("settings", ["setting", "runs", "seeds", "epochs done", "final test acc %",
                                   "best.pt test acc %", "best.pt chosen on", "ECE"], rows)


def runs_table(comparison: Comparison) -> str:
    rows = []
    for run in comparison.runs:
        r = run_row(run, comparison.varying)
        rows.append([r["name"], r["setting"], run.args.get("seed"), f"{r['epochs_done']}/{r['epochs']}",
                     acc_text(r, "final_test_acc"), acc_text(r, "final_val_acc"), acc_text(r, "max_test_acc"),
                     acc_text(r, "max_val_acc"), best_on_text(r["best_on"]), r["best_epoch"],
                     acc_text(r, "best_test_acc"), ece_text(r["ece"])])
    return html_table("runs", ["run", "setting", "seed", "epochs", "final test acc %", "final val acc %",
                               "max test acc %", "max val acc %", "best.pt chosen on", "best.pt epoch",
                               "best.pt test acc %", "ECE"], rows)


def shared_table(comparison: Comparison) -> str:
    """The arguments every run has in common (seed and paths left out)."""
    first, skip = comparison.runs[0].args, {"seed", "out_dir", "command", "data"}
    shared = [[k, json.dumps(v)] for k, v in first.items()
              if k not in skip and all(json.dumps(r.args.get(k)) == json.dumps(v) for r in comparison.runs)]
    return html_table("shared", ["argument", "value"], shared)


def notes(comparison: Comparison) -> list:
    """Sentences a reader of the tables needs: the statistics, the optimistic splits, unfinished runs."""
    lines = [("A setting of several runs shows mean ± sample standard deviation (ddof=1) and (min-max) "
              "over its runs, which differ only in the seed."),
             ("best.pt test acc is the test accuracy of the epoch best.pt holds; max test acc is the highest "
              "test accuracy of any epoch. ECE: expected calibration error of the final model on the test set "
              "(- where the run has none).")]
    if any(r.best_on == "test" for r in comparison.runs):
        lines.append(f"* {OPTIMISTIC}.")
    lines += [f"Run {r.name} has finished {int(r.final['epoch'])} of its {r.args.get('epochs')} epochs."
              for r in comparison.runs if r.args.get("epochs") is not None and r.final["epoch"] < r.args["epochs"]]
    return lines


def build_html(comparison: Comparison, written: str) -> str:
    """One self-contained page: tables, notes, the curves as an embedded PNG, the shared arguments."""
    title = f"Comparison of {len(comparison.runs)} runs"
    data = comparison.runs[0].args.get("data") or {"data_dir": comparison.runs[0].args.get("data_dir")}
    return "".join([
        (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
         f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"),
        f'<p class="status">data: {html.escape(json.dumps(data))}; page written {html.escape(written)}</p>\n',
        "<h2>Settings</h2>\n", settings_table(comparison),
        "<h2>Runs</h2>\n", runs_table(comparison),
        "".join(f"<p>{html.escape(line)}</p>\n" for line in notes(comparison)),
        (f'<h2>Curves</h2>\n<figure><img alt="curves" src="{png_uri(curves_figure(comparison))}">'
         "<figcaption>Accuracy and loss per epoch; a colour per setting</figcaption></figure>\n"),
        "<h2>Arguments all runs share</h2>\n", shared_table(comparison),
        "</body></html>\n",
    ])


def markdown_table(comparison: Comparison) -> str:
    """One row per setting, for a README: model, norm, epochs, what else differs, the accuracies."""
    others = tuple(f for f in comparison.varying if f not in HEAD_FLAGS)
    with_ece = any(r.ece is not None for r in comparison.runs)
    header = ["model", "norm", "epochs"] + ["settings"] * bool(others) + [
        "final test accuracy %", "best.pt test accuracy %", "best.pt chosen on"] + ["ECE"] * with_ece + ["runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in comparison.settings:
        r, args = setting_row(group, comparison.varying), group[0].args
        cells = [args.get("model"), args.get("norm"), args.get("epochs")]
        cells += [setting_label(group[0], others)] * bool(others)
        cells += [acc_text(r, "final_test_acc"), acc_text(r, "best_test_acc"), best_on_text(r["best_on"])]
        cells += [ece_text(r["ece"])] * with_ece + [f"{seeds_text(group)}, {r['n']} run{'s' * (r['n'] > 1)}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append("Mean ± sample standard deviation (ddof=1) over seeds, (min-max) in brackets.")
    if any(r.best_on == "test" for r in comparison.runs):
        lines.append(f"\\* {OPTIMISTIC}.")
    return "\n".join(lines) + "\n"


def output_paths(out) -> tuple:
    """``--out``: a folder gets comparison.html and .csv inside, else a stem (a .html/.csv suffix dropped)."""
    out = Path(out)
    if out.is_dir():
        out = out / "comparison"
    elif out.suffix in (".html", ".csv"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".html"), out.with_name(out.name + ".csv")


def write_outputs(out, page: str, rows: list) -> tuple:
    """Write the page and the CSV whole, or neither (a failed second write removes the first)."""
    html_path, csv_path = output_paths(out)
    folder = html_path.parent
    if not folder.is_dir():
        raise CompareError(f"cannot write --out {out}: folder {folder} does not exist; create it or choose another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CompareError(f"cannot write --out {out}: folder {folder} is not writable; choose another")
    try:
        write_csv(csv_path, rows, CSV_COLUMNS)
    except OSError as exc:
        raise CompareError(f"cannot write {csv_path} ({exc.strerror or exc}): choose a writable --out") from None
    try:
        write_text(html_path, page)
    except OSError as exc:
        csv_path.unlink(missing_ok=True)
        raise CompareError(f"cannot write {html_path} ({exc.strerror or exc}): choose a writable --out") from None
    return html_path, csv_path
