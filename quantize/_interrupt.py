"""Ctrl-C that is never lost.

CPython turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be; when that is a callback it
runs on its own (a weakref callback of the import machinery while torch is being imported, for instance) the
exception is printed as "Exception ignored ..." and dropped, and the program would carry on. ``python -m quantize``
installs :func:`install`'s handler before anything heavy is imported: it also records the signal, and :func:`check`
— called after the imports and at every block of the quantization — raises the interrupt that was swallowed.
"""
from __future__ import annotations

import signal

_seen = False


def _handler(signum, frame):
    global _seen
    _seen = True
    raise KeyboardInterrupt


def install() -> None:
    """Use the recording handler (only where Python's default Ctrl-C handling is in place)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived (even one whose exception was swallowed)."""
    if _seen:
        raise KeyboardInterrupt
