"""SIGTERM handled like Ctrl-C.

Colab, SLURM and Kubernetes send SIGTERM before they stop a job. Inside
``sigterm_as_interrupt()`` it raises ``Terminated``, a ``KeyboardInterrupt``,
wherever the run is, so the code that reports an interrupted run (the epoch
last.pt holds, the command that resumes it) handles both; the exit status is
then 143 (128 + 15) instead of 130.
"""
import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM raises ``Terminated``; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():  # only there can Python catch signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_status(exc: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C (SIGINT), as a shell reports them."""
    return 143 if isinstance(exc, Terminated) else 130
