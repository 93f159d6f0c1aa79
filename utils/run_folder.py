"""The run folder: every file a run writes, in the order that keeps the folder consistent.

    runs/<model>-<norm>-<time>/
        args.json      the resolved arguments, with the command line
        summary.txt    model table, set-up line, results, per-class accuracy
        metrics.csv    one row per finished epoch (timm's update_summary)
        last.pt        the latest epoch's checkpoint; best.pt the best one (timm's CheckpointSaver)
        *.png, *.csv   curves, lr, galleries, confusion, per-class accuracy, reliability diagram,
                       robustness and faithfulness (when asked for)
        results.json   final and best.pt accuracies (and on which split best.pt was chosen), ECE, ...
        report.html    one self-contained page of all of it, rewritten after every epoch

After an epoch the checkpoint is written before the metrics row, so metrics.csv
never lists an epoch that no checkpoint holds; every file is written whole or
not at all, and a failed write (disk full, permission) is one ``UserError``
naming the file. Under torchrun only rank 0 writes: the other processes get a
folder whose writes do nothing.

A run folder belongs to one process: ``with RunFolder.check(...) as run`` takes
an exclusive lock on ``run/.lock`` (``fcntl.flock``), so a second run on the same
folder is refused, and the operating system drops the lock when its process
dies, so a killed run never blocks its own resume.
"""
import os
import time
from functools import wraps
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a folder is not guarded
    fcntl = None

from . import checkpoint
from .errors import UserError
from .io import atomic_copy, write_csv, write_json, write_text
from .plots import save_figure
from .report import write_report

# val_loss and val_acc are empty without --val-split
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                  "test_acc_single", "seconds"]


LOCK = ".lock"


def _guarded(write):
    """A write method that does nothing on a disabled folder and turns OSError into one UserError."""
    @wraps(write)
    def method(self, name, *args):
        if not self.enabled:
            return None
        try:
            return write(self, name, *args)
        except OSError as exc:
            raise UserError(f"cannot write {self / name} ({exc.strerror or exc}): free some space or fix "
                            "the folder's permissions, then continue with --resume "
                            f"{self / 'last.pt'}") from None
    return method


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
        self._lock = None  # the open lock file while held
        self.saved_epoch = 0  # the epoch last.pt holds, set right after it is written
        self._made = None  # the highest folder this run created, removed again if left empty

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

    def __enter__(self) -> "RunFolder":
        """Create the folder and take its lock: a real write, so a folder nobody can write fails now."""
        if not self.enabled:
            return self
        self._made = next((p for p in reversed([self.path, *self.path.absolute().parents])
                           if not p.exists()), None)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self / LOCK, "a+")
        except OSError as exc:
            self._remove_made()
            raise _unwritable(self.path, exc.strerror or exc) from None
        try:
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            self._lock = None
            raise UserError(f"{self.path} is in use by another run (process {holder}): wait for it to "
                            "end, or choose another --out-dir") from None
        self._lock.truncate(0)
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        for stale in self.path.glob(".*.tmp"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc_info) -> bool:
        if self._lock is not None:
            (self / LOCK).unlink(missing_ok=True)
            self._lock.close()  # releases the flock
            self._lock = None
            self._remove_made()
        return False

    def _remove_made(self) -> None:
        """Remove the folders this run created if nothing was written into them."""
        if self._made is None:
            return
        for folder in [self.path.absolute(), *self.path.absolute().parents]:
            if not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()
            if folder == self._made.absolute():
                return

    def make(self) -> None:
        """The folder exists once the run holds it (``__enter__``); kept for callers outside a ``with``."""
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
        self.save("last.pt", state)
        self.saved_epoch = state["epoch"]
        if is_best:  # the same bytes: linked or copied, not serialised again
            self.copy("best.pt", "last.pt")
        self.write_csv("metrics.csv", history, METRIC_COLUMNS)
        self.report(status)

    @_guarded
    def save(self, name: str, state: dict) -> None:
        checkpoint.save(self / name, state)

    @_guarded
    def copy(self, name: str, source: str) -> None:
        """``name``, a whole copy of ``source`` (utils/io.atomic_copy)."""
        atomic_copy(self / source, self / name)

    @_guarded
    def write_text(self, name: str, text: str) -> None:
        write_text(self / name, text)

    @_guarded
    def write_json(self, name: str, obj) -> None:
        write_json(self / name, obj)

    @_guarded
    def write_csv(self, name: str, rows: list, columns: list) -> None:
        write_csv(self / name, rows, columns)

    @_guarded
    def figure(self, name: str, fig) -> None:
        save_figure(fig, self / name)

    def report(self, status: str = "finished") -> None:
        self._report("report.html", status)

    @_guarded
    def _report(self, name: str, status: str) -> None:
        write_report(self.path, status)


def _unwritable(out: Path, reason) -> UserError:
    return UserError(f"cannot write to --out-dir {out} ({reason}): choose a writable --out-dir")
