"""How a job ends: the exit codes schedulers act on, and the errors that map to them.

Imported by every module that reports a failure; imports nothing of this package,
so that dependencies point one way (jobs → cli → job packages → shared modules → here).
:func:`mnist_ray.cli.run_job` turns these errors into one line on stderr and the code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_OK = 0
EXIT_FAILED = 1  # the job ran and failed (Ray, training, infrastructure): retrying may help
EXIT_BAD_INPUT = 2  # bad flags or bad data: fix the input, do not retry as is
EXIT_REJECTS = 3  # scoring completed, but some rows or whole files were rejected (see rejects/)
EXIT_INTERRUPTED = 130  # Ctrl+C (SIGINT), as shells report it (128 + 2)
EXIT_TERMINATED = 143  # SIGTERM (a scheduler's timeout, `kill`), as shells report it (128 + 15)


class InputError(Exception):
    """Input a person can fix (a flag, a file, a run directory): exit code 2, one line, no traceback.

    ``str(error)`` is the whole message: it names what is wrong and where.
    """


class UsageError(InputError):
    """A flag, or a combination of flags, that the job cannot run with: reported like argparse's
    own errors (the usage line, then the message), exit code 2."""


class MissingInput(InputError, FileNotFoundError):
    """A path the user named does not exist or matched nothing.

    Also a ``FileNotFoundError``, for callers of the library that expect one; but
    only this subclass, not every missing file, means "bad input".
    """

    def __init__(self, message: str) -> None:
        # One argument: FileNotFoundError(errno, strerror) would otherwise format it as "[Errno …]".
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class JobFailed(RuntimeError):
    """The job failed for a reason one line explains: exit code 1, no traceback."""


class Interrupted(BaseException):
    """SIGINT (Ctrl+C) or SIGTERM (a scheduler's timeout) arrived: the job stops where it is.

    A BaseException, as KeyboardInterrupt is: code that catches ``Exception`` does not swallow
    it, and ``finally`` blocks still clean up (staging, Ray). ``next_run`` says what the next
    run will do about the work left: the job that knows adds it on the way out.
    """

    def __init__(self, signum: int, next_run: str = "") -> None:
        super().__init__(signum)
        self.signum = signum
        self.next_run = next_run

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted ({name})" + (f": {self.next_run}" if self.next_run else "")


# The signals that arrived inside an ``uninterrupted()`` block (None: outside one).
_held: list[int] | None = None
# The first SIGINT or SIGTERM this process received, if any.
_received: int | None = None


def _raise_interrupted(signum: int, frame: object) -> None:
    global _received
    if _received is not None and _held is None:
        # A second signal: the first one's clean stop is stuck somewhere; stop now.
        name = signal.Signals(signum).name
        print(f"interrupted again ({name}): stopping at once", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _received = _received or signum
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


def as_interrupted(exc: BaseException) -> Interrupted | None:
    """``exc`` as the interruption it is, if it is one: the Interrupted a signal raised, or whatever
    it became on its way up. (Raised inside Ray's own C code, it has been seen to come out as a
    SystemError: "returned a result with an exception set".) None when no signal arrived."""
    if isinstance(exc, Interrupted):
        return exc
    if _received is not None:
        return Interrupted(_received)
    return None


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block has finished, then raise :class:`Interrupted`
    if one came: for a short step that must not stop halfway (publishing a batch)."""
    global _held
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
    if held:
        raise Interrupted(held[0])


def handle_signals() -> None:
    """From now on, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread.

    Nothing when called from another thread (a job run inside a program of its own, or a
    test): only the main thread may set handlers, and the signals are that program's.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
