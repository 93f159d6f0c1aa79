"""SIGTERM handled like Ctrl-C.

Colab, SLURM and Kubernetes send SIGTERM before they stop a job. Inside
``sigterm_as_interrupt()`` it raises ``Terminated``, a ``KeyboardInterrupt``,
wherever the run is, so the code that reports an interrupted run (the epoch
last.pt holds, the command that resumes it) handles both; the exit status is
then 143 (128 + 15) instead of 130.

Python may swallow that exception: a handler that runs inside an at-fork
callback (the loader forking its workers) has its exception printed and
dropped. So the signal is also remembered: the training loop asks ``pending()``
every step, and ``as_stop`` reads the loader's "worker exited" error that
follows a signal sent to the whole job as the stop it is.
"""
import contextlib
import signal
import sys
import threading

_received = False


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise(signum, frame):
    global _received
    _received = True
    # SIGTERM sent to the whole job (SLURM, a process group) also ends the loader's workers;
    # PyTorch's SIGCHLD handler would then raise "DataLoader worker killed" over this stop.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM raises ``Terminated``; the previous handlers come back after."""
    global _received
    if threading.current_thread() is not threading.main_thread():  # only there can Python catch signals
        yield
        return
    _received = False
    previous = signal.signal(signal.SIGTERM, _raise), signal.getsignal(signal.SIGCHLD), sys.unraisablehook
    sys.unraisablehook = _quiet(sys.unraisablehook)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGCHLD, previous[1])
        sys.unraisablehook = previous[2]


def _quiet(hook):
    """Python's report of an exception it dropped, minus our own Terminated (``pending()`` has it)."""
    def report(unraisable):
        if not isinstance(unraisable.exc_value, Terminated):
            hook(unraisable)
    return report


def pending() -> bool:
    """True once SIGTERM has arrived, even if its exception was lost on the way."""
    return _received


def as_stop(exc: BaseException):
    """The interrupt ``exc`` stands for: itself (Ctrl-C, SIGTERM), ``Terminated`` for an error that
    followed SIGTERM (its loader workers gone), or None for an error of its own."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    return Terminated() if _received else None


def exit_status(exc: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C (SIGINT), as a shell reports them."""
    return 143 if isinstance(exc, Terminated) else 130
