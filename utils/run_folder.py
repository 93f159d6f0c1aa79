"""The run folder: every file a run writes, in the order that keeps the folder consistent.

    runs/<model>-<norm>-<time>/
        args.json      the resolved arguments, with the command line
        summary.txt    model table, set-up line, results, per-class accuracy
        metrics.csv    one row per finished epoch (timm's update_summary)
        last.pt        the latest epoch's checkpoint; best.pt the best one (timm's CheckpointSaver)
        *.png, *.csv   curves, lr, galleries, confusion, per-class accuracy
        report.html    one self-contained page of all of it, rewritten after every epoch

After an epoch the checkpoint is written before the metrics row, so metrics.csv
never lists an epoch that no checkpoint holds. Under torchrun only rank 0
writes: the other processes get a folder whose writes do nothing.
"""
import os
import time
from pathlib import Path

from . import checkpoint
from .errors import UserError
from .io import write_csv, write_json, write_text
from .plots import save_figure
from .report import write_report

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_single",
                  "seconds"]


def default_path(args) -> str:
    """runs/<model>-<norm>-<time>, the checkpoint's own folder on --resume, runs/analyze-<time>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.resume:
        return str(Path(args.resume).parent)
    if args.analyze:
        return f"runs/analyze-{stamp}"
    return f"runs/{args.model}-{args.norm}-{stamp}"


class RunFolder:
    """Writes one run's files; nothing is created until the first write."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # False on every torchrun process but rank 0

    @classmethod
    def check(cls, args, resuming: bool, enabled: bool = True) -> "RunFolder":
        """Resolve --out-dir and check it can be written, before any data is loaded."""
        args.out_dir = args.out_dir or default_path(args)
        out = Path(args.out_dir)
        existing = next(p for p in [out, *out.absolute().parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problem = "is not a folder" if not existing.is_dir() else "is not writable"
            raise _unwritable(out, f"{existing} {problem}")
        if not resuming and any((out / n).exists() for n in ("last.pt", "best.pt")):
            raise UserError(f"{out} already holds a checkpoint: continue it with --resume "
                            f"{out / 'last.pt'}, or choose another --out-dir")
        return cls(out, enabled)

    def __truediv__(self, name) -> Path:
        return self.path / name

    def make(self) -> None:
        if not self.enabled:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.path, exc.strerror or exc) from None

    def start(self, args, summary: str, status: str) -> None:
        """The folder, args.json, the first summary.txt and report.html."""
        self.make()
        self.write_json("args.json", vars(args))
        self.write_text("summary.txt", summary)
        self.report(status)

    def end_epoch(self, state: dict, history: list, is_best: bool, status: str) -> None:
        """last.pt (and best.pt), then the metrics row, then the report: in that order."""
        if not self.enabled:
            return
        checkpoint.save(self / "last.pt", state)
        if is_best:
            checkpoint.save(self / "best.pt", state)
        write_csv(self / "metrics.csv", history, METRIC_COLUMNS)
        self.report(status)

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            write_text(self / name, text)

    def write_json(self, name: str, obj) -> None:
        if self.enabled:
            write_json(self / name, obj)

    def write_csv(self, name: str, rows: list, columns: list) -> None:
        if self.enabled:
            write_csv(self / name, rows, columns)

    def figure(self, name: str, fig) -> None:
        if self.enabled:
            save_figure(fig, self / name)

    def report(self, status: str = "finished") -> None:
        if self.enabled:
            write_report(self.path, status)


def _unwritable(out: Path, reason) -> UserError:
    return UserError(f"cannot write to --out-dir {out} ({reason}): choose a writable --out-dir")
