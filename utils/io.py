"""Files written whole or not at all: a temporary file in the same folder, then a rename."""
import csv
import io
import json
import os
import shutil
from pathlib import Path


def atomic_write(path, write) -> None:
    """Call ``write(file)`` on a temporary binary file beside ``path``, then rename it over ``path``.

    ``os.replace`` is atomic on POSIX and Windows, so a crash or Ctrl-C leaves
    either the old file or the new one, never half of either.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # plain open: the usual umask mode, unlike mkstemp's 0600
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_copy(source, path) -> None:
    """Make ``path`` a whole copy of ``source`` atomically: a hard link where the file system has
    them (no bytes written; ``source`` later replaced by ``atomic_write`` keeps ``path`` as it was),
    else a byte copy; then a rename, as ``atomic_write``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path, rows: list, columns: list) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
