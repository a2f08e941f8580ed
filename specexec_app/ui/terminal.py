"""The terminal's input while the app writes: keys typed during a load or a reply."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

# Signals that end the process by default, after which the terminal must be as it was.
ENDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def keys_held(stream=None, out=None):
    """While a spinner or a reply is on screen, keys typed are not echoed into it, and not lost:
    the terminal's echo and line editing are off (signals stay on, so Ctrl+C still stops), and
    what was typed waits in the input queue, where the next prompt's line editor finds it. The
    terminal's settings come back at the end, and before the process dies of SIGTERM or SIGHUP.
    Nothing changes where `stream` (stdin by default) is no terminal, where `out` (stdout) is
    not one either (`specexec run ... | less`: the pager owns the terminal's settings), or where
    the process runs in the background (`specexec run ... &`: changing the terminal would stop
    it with SIGTTOU)."""
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        yield
        return
    try:
        fd = (stream or sys.stdin).fileno()
        if not (os.isatty(fd) and os.isatty((out or sys.stdout).fileno())) \
                or os.tcgetpgrp(fd) != os.getpgrp():
            raise OSError
        old = termios.tcgetattr(fd)
        held = list(old)
        held[3] &= ~(termios.ECHO | termios.ICANON)
        held[6] = list(old[6])
        held[6][termios.VMIN], held[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, held)  # TCSANOW: keys already typed stay queued
    except (OSError, ValueError, AttributeError, termios.error):  # no terminal, closed, gone
        yield
        return

    def restore() -> None:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, old)
        except termios.error:  # the terminal went away meanwhile
            pass

    previous = _on_ending(restore)
    try:
        yield
    finally:
        restore()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _on_ending(restore) -> dict:
    """Run `restore` first when an ENDING signal arrives, then what the signal did before (its
    handler, or death by it). Only the main thread sets handlers; returns the ones replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}

    def handler(signum, frame):
        restore()
        before = previous[signum]
        signal.signal(signum, before)
        if callable(before):
            before(signum, frame)
        else:  # SIG_DFL: die of it, as the sender meant
            os.kill(os.getpid(), signum)

    for signum in ENDING:
        before = signal.getsignal(signum)
        if before == signal.SIG_IGN:  # ignored (nohup): it ends nothing
            continue
        previous[signum] = signal.SIG_DFL if before is None else before
        signal.signal(signum, handler)
    return previous
