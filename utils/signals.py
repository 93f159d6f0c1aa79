"""SIGTERM handled like Ctrl-C.

Colab, SLURM and Kubernetes send SIGTERM before they stop a job. Inside
``sigterm_as_interrupt()`` the handler only notes it; the training and test
loops call ``check()`` before every batch, which raises ``Terminated``, a
``KeyboardInterrupt``, so the code that reports an interrupted run (the epoch
last.pt holds, the command that resumes it) handles both; the exit status is
then 143 (128 + 15) instead of 130.

Raising from the handler itself, wherever the process happens to be, was seen
to deadlock: raised inside a multiprocessing queue's lock, the loader's
shutdown then waited on that lock for ever; raised inside an at-fork callback,
Python dropped it. Between batches nothing is half done. ``as_stop`` reads the
loader's "worker exited" error that follows a SIGTERM sent to the whole job
(its workers die at once) as the stop it is.
"""
import contextlib
import signal
import threading

_received = False


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _note(signum, frame):
    global _received
    _received = True
    # SIGTERM sent to the whole job (SLURM, a process group) also ends the loader's workers;
    # PyTorch's SIGCHLD handler would then raise "DataLoader worker killed" over this stop.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM is noted for ``check()``; the previous handlers come back after."""
    global _received
    if threading.current_thread() is not threading.main_thread():  # only there can Python catch signals
        yield
        return
    _received = False
    previous = signal.signal(signal.SIGTERM, _note), signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGCHLD, previous[1])


def check() -> None:
    """Raise ``Terminated`` once SIGTERM has arrived: call it where stopping leaves nothing half done."""
    if _received:
        raise Terminated()


def as_stop(exc: BaseException):
    """The interrupt ``exc`` stands for: itself (Ctrl-C, SIGTERM), ``Terminated`` for an error that
    followed SIGTERM (its loader workers gone), or None for an error of its own."""
    if isinstance(exc, KeyboardInterrupt):
        return exc
    return Terminated() if _received else None


def exit_status(exc: KeyboardInterrupt) -> int:
    """143 for SIGTERM, 130 for Ctrl-C (SIGINT), as a shell reports them."""
    return 143 if isinstance(exc, Terminated) else 130
