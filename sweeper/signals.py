"""SIGTERM as an exception, so every exit path cleans up like Ctrl-C does.

SLURM (`scancel`, pre-emption), `docker stop` and `kill` send SIGTERM, whose default action
ends the process at once: MLflow runs and Optuna trials would stay RUNNING. Inside
`terminate_as_exception()` a SIGTERM raises `Terminated` in the main thread instead, which,
like KeyboardInterrupt, is a BaseException: no `except Exception` swallows it on its way
up, and every `finally` and context manager on the way runs.

Native code can get in the way: when a signal's handler runs inside a call back from C++
(TorchScript's argument conversion did, in CI), the C++ layer may catch the handler's exception
and raise a RuntimeError of its own. The handlers therefore also record the signal, and
`stop_wins()` turns an error raised after that into the stop it hides.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


_received: int | None = None  # the signal a handler of ours raised for, in the current block
_deferring = False  # inside `deferred()`: the handlers record, safe points raise


def _raise(signum: int, frame: object) -> None:
    if not _record(signum):
        raise Terminated(signum)


def _interrupt(signum: int, frame: object) -> None:
    if not _record(signum):
        raise KeyboardInterrupt


def _record(signum: int) -> bool:
    """Record the signal; True when its raise is left to the next safe point."""
    global _received
    again = _received is not None  # a second signal: the user insists, raise at once
    _received = signum
    return _deferring and not again


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM raises `Terminated` while the block runs, SIGINT KeyboardInterrupt as before
    (main thread only; elsewhere a no-op). Both are recorded for `stop_wins()`."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, _received = _received, None
    previous = signal.signal(signal.SIGTERM, _raise)
    # Python's own Ctrl-C handler, recorded; a handler someone else installed is left alone.
    sigint = signal.getsignal(signal.SIGINT)
    if sigint is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sigint is signal.default_int_handler:
            signal.signal(signal.SIGINT, sigint)
        _received = outer  # a stop is this block's: nothing stale for code after it


@contextlib.contextmanager
def stop_wins() -> Iterator[None]:
    """An error raised in the block after a SIGTERM or SIGINT arrived is that stop (see above):
    the trial ends interrupted and is queued again, not failed for a RuntimeError."""
    try:
        yield
    except Exception as error:
        if _received is None:
            raise
        raise _stop(_received) from error


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a SIGTERM or SIGINT is raised at safe points only: before each optimizer step,
    at each epoch's end (`raise_pending()`) and at the block's end. A handler that raises
    wherever it happens to run can raise inside a call back from native code: in CI, TorchScript
    turned the exception into a RuntimeError once, and the process died of SIGSEGV once. A
    second signal is raised at once."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook  # here: controllers never train

    global _deferring
    outer, _deferring = _deferring, True
    hook = register_optimizer_step_pre_hook(lambda *_: raise_pending())
    try:
        yield
    finally:
        _deferring = outer
        hook.remove()
    raise_pending()


def raise_pending() -> None:
    """The stop a signal asked for, if one is pending (deferred, or its exception swallowed
    whole by native code)."""
    if _received is not None:
        raise _stop(_received)


def _stop(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def exit_code(stop: BaseException) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
    signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
    return 128 + int(signum)
