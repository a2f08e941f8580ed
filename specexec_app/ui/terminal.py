"""The terminal's input while the app writes: keys typed during a load or a reply."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


@contextmanager
def keys_held(stream=None):
    """While a spinner or a reply is on screen, keys typed are not echoed into it, and not lost:
    the terminal's echo and line editing are off (signals stay on, so Ctrl+C still stops), and
    what was typed waits in the input queue, where the next prompt's line editor finds it.
    Where `stream` (stdin by default) is no terminal, or the process runs in the background
    (`specexec run ... &`: changing the terminal would stop it with SIGTTOU), nothing
    changes."""
    try:
        import termios
    except ImportError:  # not a POSIX terminal
        yield
        return
    try:
        fd = (stream or sys.stdin).fileno()
        if not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp():
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
    try:
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, old)
        except termios.error:  # the terminal went away meanwhile
            pass
